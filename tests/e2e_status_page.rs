//! The status page at `/` on the admin listener, rendered by headless Chromium
//! against a tether with traffic: the numbers on the page are `/debug/pools`'.
//! Without JavaScript the server-rendered page shows the same numbers.
//!
//! Needs `chromium` (Debian package, installed by `.ci/run`; `CHROMIUM` names another
//! binary). Where it is missing the Chromium test skips with a message, except in CI
//! (`CI` set), where that is a failure.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use tether::Running;

/// How long one Chromium run may take.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// One upstream's row as rendered: `data-field` texts, and the `data-closed` /
/// `data-rejected` counts.
#[derive(Debug, Default, PartialEq)]
struct Row {
    fields: BTreeMap<String, String>,
    closed: BTreeMap<String, u64>,
    rejected: BTreeMap<String, u64>,
    html: String,
}

/// A tether with traffic held still: on `registry` (cap 8) three requests hold
/// active sockets (their bodies wait on the origin's gate), two sockets are idle,
/// and one was closed by the upstream; on `auth` (cap 1, no queue) one request holds
/// the only socket and one more was rejected with `queue_full`.
struct Scene {
    tether: Running,
    registry: Origin,
    auth: Origin,
}

impl Scene {
    async fn start() -> Scene {
        let registry = Origin::start().await;
        let auth = Origin::start().await;
        let mut cfg = config(&[("registry", &registry), ("auth", &auth)]);
        route(&mut cfg, "registry");
        route(&mut cfg, "auth");
        cfg.pool.idle_timeout = Duration::from_secs(600);
        cfg.proxy.client_idle_timeout = Duration::from_secs(600);
        cfg.upstream[0].max_connections = Some(8);
        cfg.upstream[1].max_connections = Some(1);
        cfg.upstream[1].queue_limit = Some(0);
        let tether = start(cfg).await;
        let (to_registry, to_auth) = (tether.route_addrs[0], tether.route_addrs[1]);

        assert_eq!(route_get(to_registry, "/close").await.status, 200);
        assert!(eventually(WAIT, || async { registry.open() == 0 }).await);
        for _ in 0..3 {
            tokio::spawn(async move { route_get(to_registry, "/gated/200000").await });
        }
        assert!(eventually(WAIT, || async { registry.requests() == 4 }).await);
        let (a, b) = tokio::join!(
            route_get(to_registry, "/delay/200"),
            route_get(to_registry, "/delay/200")
        );
        assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
        tokio::spawn(async move { route_get(to_auth, "/gated/200000").await });
        assert!(eventually(WAIT, || async { auth.requests() == 1 }).await);
        let refused = route_get(to_auth, "/").await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.tether_error(), Some("queue_full"));

        let scene = Scene {
            tether,
            registry,
            auth,
        };
        // Settled: the pools hold still, and only the four held clients remain.
        let settled = eventually(WAIT, || async {
            let p = scene.pools().await;
            p["downstream"]["open"] == 4
                && p["pools"][0]["counts"]["active"] == 3
                && p["pools"][0]["counts"]["idle"] == 2
                && p["pools"][1]["counts"]["active"] == 1
                && p["pools"][0]["closed"]["remote_closed"] == 1
        })
        .await;
        assert!(settled, "scene did not settle: {:#}", scene.pools().await);
        scene
    }

    async fn pools(&self) -> serde_json::Value {
        serde_json::from_slice(&admin(&self.tether, "/debug/pools").await.body).unwrap()
    }

    fn page_url(&self) -> String {
        format!("http://{}/", self.tether.admin_addr)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for _ in 0..3 {
            self.registry.open_gate();
        }
        self.auth.open_gate();
    }
}

#[tokio::test]
async fn status_page_in_chromium_shows_the_numbers_of_debug_pools() {
    let Some(chromium) = chromium() else {
        return;
    };
    let scene = Scene::start().await;
    let dir = tempfile::tempdir().unwrap();
    let before = counts_only(scene.pools().await);

    // --virtual-time-budget lets the page's timers run: the first refresh from
    // /debug/pools replaces the server-rendered table.
    let dom = run_chromium(
        &chromium,
        dir.path(),
        &["--virtual-time-budget=3000", "--dump-dom"],
        &scene.page_url(),
    )
    .await;
    let after = scene.pools().await;
    assert_eq!(
        before,
        counts_only(after.clone()),
        "the pools changed while the page loaded"
    );
    assert!(
        dom.contains(r#"data-source="live""#),
        "the script did not refresh the table from /debug/pools:\n{dom}"
    );
    assert_page_matches(&dom, &after);

    let png = dir.path().join("status.png");
    run_chromium(
        &chromium,
        dir.path(),
        &[
            "--virtual-time-budget=3000",
            "--hide-scrollbars",
            "--window-size=1400,640",
            &format!("--screenshot={}", png.display()),
        ],
        &scene.page_url(),
    )
    .await;
    let image = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    eprintln!("status page screenshot: {}", png.display());
    // To refresh the README's picture: TETHER_STATUS_SCREENSHOT=docs/status-page.png
    if let Some(to) = std::env::var_os("TETHER_STATUS_SCREENSHOT") {
        let to = Path::new(env!("CARGO_MANIFEST_DIR")).join(to);
        std::fs::copy(&png, &to).expect("copy the screenshot");
        eprintln!("copied to {}", to.display());
    }
}

#[tokio::test]
async fn status_page_without_javascript_is_a_complete_snapshot() {
    let scene = Scene::start().await;
    let page = admin(&scene.tether, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.headers.get("content-type").unwrap(),
        "text/html; charset=utf-8"
    );
    let html = page.text();
    assert!(html.contains(r#"data-source="server""#));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external assets"
    );
    assert_page_matches(&html, &scene.pools().await);
}

/// Every pool of `pools` has a row on the page with its numbers, and nothing else
/// has a row.
fn assert_page_matches(html: &str, pools: &serde_json::Value) {
    let rows = rows(html);
    let list = pools["pools"].as_array().unwrap();
    assert_eq!(rows.len(), list.len(), "one row per pool");
    assert_eq!(
        text_after(html, r#"id="downstream""#).as_deref(),
        Some(pools["downstream"]["open"].to_string().as_str())
    );
    let instance = &pools["instance"];
    let version = format!(
        "{} ({})",
        instance["version"].as_str().unwrap(),
        instance["commit"].as_str().unwrap()
    );
    assert_eq!(text_after(html, r#"id="version""#), Some(version));
    assert_eq!(text_after(html, r#"id="reload""#).as_deref(), Some("ok"));
    assert!(html.contains(r#"<table id="suspects">"#));
    for p in list {
        let name = p["upstream"].as_str().unwrap();
        let row = &rows[name];
        let c = &p["counts"];
        let tunnels = c["tunnels_active"].as_u64().unwrap() + c["tunnels_idle"].as_u64().unwrap();
        let expected: BTreeMap<String, String> = [
            ("open", p["open"].to_string()),
            ("cap", p["limits"]["max_connections"].to_string()),
            ("connecting", c["connecting"].to_string()),
            ("active", c["active"].to_string()),
            ("idle", c["idle"].to_string()),
            ("tunnels", tunnels.to_string()),
            ("queued", c["queued"].to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut fields = row.fields.clone();
        // Rates need two snapshots: "-" server-side, then per second over the last
        // minute. The scene holds still, so they are zero once known.
        for rate in ["rate", "error_rate"] {
            let shown = fields.remove(rate).unwrap_or_default();
            assert!(
                shown == "-" || shown.parse::<f64>() == Ok(0.0),
                "{name} {rate}: {shown}"
            );
        }
        // No request queued in the scene (auth's extra one was refused at once).
        assert_eq!(fields.remove("queue_wait").as_deref(), Some("-"), "{name}");
        assert_eq!(fields, expected, "{name}: {}", row.html);
        for (kind, n) in nonzero(&p["errors"]) {
            let shown = format!(r#"<b data-error="{kind}">{n}</b>"#);
            assert!(row.html.contains(&shown), "{name}: {shown} in {}", row.html);
        }
        assert_eq!(row.closed, nonzero(&p["closed"]), "{name} closed");
        assert_eq!(row.rejected, nonzero(&p["rejected"]), "{name} rejected");
        let cap = p["limits"]["max_connections"].as_f64().unwrap();
        let active = c["active"].as_f64().unwrap();
        let bar = format!(
            r#"style="width:{:.1}%" title="active {active}""#,
            100.0 * active / cap
        );
        assert!(row.html.contains(&bar), "{name}: no {bar} in {}", row.html);
    }
    // The scene's own numbers, so a page and an endpoint that agree on nothing fail.
    assert_eq!(rows["registry"].fields["active"], "3");
    assert_eq!(rows["registry"].fields["idle"], "2");
    assert_eq!(rows["registry"].fields["open"], "5");
    assert_eq!(rows["registry"].closed.get("remote_closed"), Some(&1));
    assert_eq!(rows["auth"].fields["active"], "1");
    assert_eq!(rows["auth"].rejected.get("queue_full"), Some(&1));
}

/// `pools` without the per-socket list, whose ages move on by themselves.
fn counts_only(mut pools: serde_json::Value) -> serde_json::Value {
    for p in pools["pools"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("connections");
    }
    // The clock moves on; the pools are what must hold still.
    pools["instance"]
        .as_object_mut()
        .unwrap()
        .remove("uptime_seconds");
    pools
}

fn nonzero(map: &serde_json::Value) -> BTreeMap<String, u64> {
    map.as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| v.as_u64().filter(|&v| v > 0).map(|v| (k.clone(), v)))
        .collect()
}

/// The `<tr class="pool" data-upstream="…">` rows of the page's table (not of the
/// script that builds them), by upstream.
fn rows(html: &str) -> BTreeMap<String, Row> {
    let table = &html[html.find("<tbody>").expect("a table body")..];
    let table = &table[..table.find("</tbody>").expect("the end of the table body")];
    let mut rows = BTreeMap::new();
    for chunk in table.split(r#"<tr class="pool" data-upstream=""#).skip(1) {
        let (name, rest) = chunk.split_once('"').unwrap();
        let html = rest.split("</tr>").next().unwrap().to_string();
        let mut row = Row::default();
        for (attr, into) in [("data-closed", 0), ("data-rejected", 1), ("data-field", 2)] {
            for part in html.split(&format!(r#"{attr}=""#)).skip(1) {
                let (key, after) = part.split_once('"').unwrap();
                let value = after[after.find('>').unwrap() + 1..]
                    .split('<')
                    .next()
                    .unwrap()
                    .to_string();
                match into {
                    0 => row.closed.insert(key.into(), value.parse().unwrap()),
                    1 => row.rejected.insert(key.into(), value.parse().unwrap()),
                    _ => row.fields.insert(key.into(), value).map(|_| 0),
                };
            }
        }
        row.html = html;
        rows.insert(name.to_string(), row);
    }
    rows
}

/// The text right after the element that has `attr`.
fn text_after(html: &str, attr: &str) -> Option<String> {
    let rest = &html[html.find(attr)? + attr.len()..];
    let rest = &rest[rest.find('>')? + 1..];
    Some(rest.split('<').next()?.trim().to_string())
}

/// The Chromium binary, or `None` (after saying so) where it is missing outside CI.
fn chromium() -> Option<PathBuf> {
    let found = match std::env::var_os("CHROMIUM") {
        Some(path) => Some(PathBuf::from(path)),
        None => ["chromium", "chromium-browser"].iter().find_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        }),
    };
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required in CI (apt-get install chromium)"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
async fn run_chromium(chromium: &Path, dir: &Path, args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir_in(dir).unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(CHROMIUM_TIMEOUT, cmd.output())
        .await
        .expect("chromium finished in time")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 DOM")
}
