//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! `/debug/pools` and `/debug/clients` (JSON), and the status page at `/`.
//!
//! The status page is rendered here from the same document `/debug/pools` serves, so
//! it is a complete snapshot without JavaScript; its inline script re-renders the
//! table from `/debug/pools` every second. Close and rejection totals are read back
//! from the Prometheus exposition, so the page, `/debug/pools` and `/metrics` cannot
//! disagree about them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry as t;
use crate::Shared;

const STATUS_PAGE: &str = include_str!("status.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(ok) => ok,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &shared)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => with_type(
            shared.telemetry().render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/debug/pools" => json(&pools_json(shared)),
        "/debug/clients" => json(&serde_json::json!({
            "clients": shared.downstream().clients.top(&shared.table().config.diagnosis)
        })),
        "/" => with_type(status_page(&pools_json(shared)), "text/html; charset=utf-8"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Every pool: limits, counts by state, queue depth, one entry per socket, and the
/// `closed` (by reason) and `rejected` (by reason) totals of its upstream label.
/// Pools of unlisted origins share the label `unlisted`, so they share those totals.
pub fn pools_json(shared: &Shared) -> serde_json::Value {
    let text = shared.telemetry().render();
    let closed = totals(&text, t::UPSTREAM_CLOSED, "reason");
    let rejected = totals(&text, t::UPSTREAM_REJECTED, "reason");
    let pools: Vec<_> = shared
        .all_upstreams()
        .iter()
        .map(|u| {
            let mut pool = serde_json::to_value(u.pool.snapshot()).expect("json");
            let of = |t: &HashMap<String, BTreeMap<String, u64>>| {
                serde_json::json!(t.get(&*u.name).cloned().unwrap_or_default())
            };
            pool["closed"] = of(&closed);
            pool["rejected"] = of(&rejected);
            pool
        })
        .collect();
    serde_json::json!({
        "downstream": { "open": shared.downstream().open() },
        "pools": pools,
    })
}

/// The samples of counter `name` in a Prometheus text exposition, summed by their
/// `upstream` label and then by their `by` label.
fn totals(text: &str, name: &str, by: &str) -> HashMap<String, BTreeMap<String, u64>> {
    let mut out: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = parse_labels(labels);
        let find = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let (Some(upstream), Some(key), Ok(value)) =
            (find("upstream"), find(by), value.trim().parse::<f64>())
        else {
            continue;
        };
        *out.entry(upstream.clone())
            .or_default()
            .entry(key.clone())
            .or_default() += value as u64;
    }
    out
}

/// `a="x",b="y\"z"` into pairs, undoing the exposition's escapes.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = s.chars();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return pairs;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        pairs.push((key.trim_start_matches(',').trim().to_string(), value));
    }
}

/// The status page with the table rendered from `pools` (a `/debug/pools` document).
fn status_page(pools: &serde_json::Value) -> String {
    let rows: String = match pools["pools"].as_array() {
        Some(list) if !list.is_empty() => list.iter().map(pool_row).collect(),
        _ => EMPTY_ROW.to_string(),
    };
    STATUS_PAGE
        .replace(
            "<!--DOWNSTREAM-->",
            &pools["downstream"]["open"]
                .as_u64()
                .unwrap_or(0)
                .to_string(),
        )
        .replace("<!--ROWS-->", &rows)
}

const EMPTY_ROW: &str = r#"<tr><td colspan="10">no upstreams</td></tr>"#;

/// One upstream's row. The inline script's `row()` builds the same markup; the data
/// attributes are what the browser test reads.
fn pool_row(p: &serde_json::Value) -> String {
    let n = |key: &str| p["counts"][key].as_u64().unwrap_or(0);
    let cap = p["limits"]["max_connections"].as_u64().unwrap_or(0);
    let tunnels = n("tunnels_active") + n("tunnels_idle");
    let width = |count: u64| {
        if cap == 0 {
            0.0
        } else {
            100.0 * count as f64 / cap as f64
        }
    };
    let mut bar = String::new();
    for (class, count) in [
        ("connecting", n("connecting")),
        ("active", n("active")),
        ("idle", n("idle")),
        ("tunnels", tunnels),
    ] {
        let _ = write!(
            bar,
            r#"<span class="seg {class}" style="width:{:.1}%" title="{class} {count}"></span>"#,
            width(count)
        );
    }
    let name = esc(p["upstream"].as_str().unwrap_or(""));
    format!(
        concat!(
            r#"<tr class="pool" data-upstream="{name}">"#,
            r#"<td><b>{name}</b><br><small>{origin}</small></td>"#,
            r#"<td><b data-field="open">{open}</b> / <span data-field="cap">{cap}</span></td>"#,
            r#"<td><div class="bar">{bar}</div></td>"#,
            r#"<td data-field="connecting">{connecting}</td>"#,
            r#"<td data-field="active">{active}</td>"#,
            r#"<td data-field="idle">{idle}</td>"#,
            r#"<td data-field="tunnels">{tunnels}</td>"#,
            r#"<td data-field="queued">{queued}</td>"#,
            r#"<td class="reasons">{rejected}</td>"#,
            r#"<td class="reasons">{closed}</td>"#,
            "</tr>"
        ),
        name = name,
        origin = esc(p["origin"].as_str().unwrap_or("")),
        open = p["open"].as_u64().unwrap_or(0),
        cap = cap,
        bar = bar,
        connecting = n("connecting"),
        active = n("active"),
        idle = n("idle"),
        tunnels = tunnels,
        queued = n("queued"),
        rejected = reasons(&p["rejected"], "rejected"),
        closed = reasons(&p["closed"], "closed"),
    )
}

/// The non-zero entries of a `{reason: count}` map, each count tagged `data-{attr}`.
fn reasons(map: &serde_json::Value, attr: &str) -> String {
    let items: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_u64().filter(|&v| v > 0).map(|v| (esc(k), v)))
        .map(|(k, v)| format!(r#"<span class="reason">{k} <b data-{attr}="{k}">{v}</b></span>"#))
        .collect();
    if items.is_empty() {
        r#"<span class="none">none</span>"#.to_string()
    } else {
        items.join(" ")
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    with_type(
        serde_json::to_string_pretty(value).expect("json"),
        "application/json",
    )
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = with_type(body.to_string(), "text/plain; charset=utf-8");
    *resp.status_mut() = status;
    resp
}

fn with_type(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_counters_by_upstream_and_label() {
        let text = "\
# TYPE tether_upstream_connections_closed_total counter
tether_upstream_connections_closed_total{upstream=\"registry\",reason=\"idle_timeout\"} 3
tether_upstream_connections_closed_total{reason=\"error\",upstream=\"registry\"} 1
tether_upstream_connections_closed_total{upstream=\"auth\",reason=\"idle_timeout\"} 0
tether_upstream_connections_closed_totals{upstream=\"auth\",reason=\"idle_timeout\"} 9
tether_upstream_connections_opened_total{upstream=\"auth\"} 4
";
        let t = totals(text, t::UPSTREAM_CLOSED, "reason");
        assert_eq!(t["registry"]["idle_timeout"], 3);
        assert_eq!(t["registry"]["error"], 1);
        assert_eq!(t["auth"].len(), 1);
        assert_eq!(t["auth"]["idle_timeout"], 0);
    }

    #[test]
    fn label_values_are_unescaped() {
        assert_eq!(
            parse_labels(r#"a="x",b="say \"hi\"\\n""#),
            [
                ("a".into(), "x".into()),
                ("b".into(), "say \"hi\"\\n".into())
            ]
        );
    }

    #[test]
    fn the_page_escapes_names_and_lists_only_nonzero_reasons() {
        let doc = serde_json::json!({
            "downstream": { "open": 2 },
            "pools": [{
                "upstream": "<x>", "origin": "a:1", "open": 1,
                "limits": { "max_connections": 4 },
                "counts": { "connecting": 0, "active": 1, "idle": 0,
                            "tunnels_active": 0, "tunnels_idle": 0, "queued": 0 },
                "closed": { "error": 0, "idle_timeout": 2 },
                "rejected": { "queue_full": 0 },
            }],
        });
        let page = status_page(&doc);
        assert!(page.contains(r#"<tr class="pool" data-upstream="&lt;x&gt;">"#));
        assert!(page.contains(r#"<b data-closed="idle_timeout">2</b>"#));
        assert!(!page.contains(r#"data-closed="error""#));
        assert!(page.contains(r#"style="width:25.0%" title="active 1""#));
        assert!(page.contains(r#"<b id="downstream">2</b>"#));
        let empty = status_page(&serde_json::json!({ "downstream": { "open": 0 }, "pools": [] }));
        assert!(empty.contains("no upstreams"));
    }
}
