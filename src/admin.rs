//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! `/debug/pools` and `/debug/clients` (JSON), and the status page at `/`.
//!
//! The status page is rendered here from the same typed snapshots `/debug/pools`
//! serialises ([`Status`]), so it is a complete snapshot without JavaScript; its inline
//! script re-renders the table from `/debug/pools` every second. Close and rejection
//! totals are each pool's own, counted alongside the `/metrics` counters; `/metrics`
//! sums the pools that share an `upstream` label (unlisted origins, say).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterStatus;
use crate::diagnosis::ClientReport;
use crate::downstream::ClientShare;
use crate::telemetry::{ReloadStatus, COMMIT, VERSION};
use crate::upstream::PoolSnapshot;
use crate::Shared;

const STATUS_PAGE: &str = include_str!("status.html");

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
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
                async move { Ok::<_, std::convert::Infallible>(route(req, &shared, peer)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared, peer: SocketAddr) -> Response<Full<Bytes>> {
    // `/admin/*` (POST, loopback peers) and `/debug/config`: src/control.rs.
    if let Some(resp) = crate::control::route(&req, shared, peer) {
        return resp;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.is_ready() && joining_cluster(shared) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: joining the cluster, no share of its caps yet\n",
        ),
        "/readyz" if shared.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => with_type(
            {
                shared
                    .downstream()
                    .count_suspects(&shared.table().config.diagnosis);
                shared.telemetry().render()
            },
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/debug/pools" => json(&status(shared)),
        "/debug/clients" => {
            let config = &shared.table().config;
            let downstream = shared.downstream();
            json(&serde_json::json!({
                "clients": downstream.clients.top(&config.diagnosis),
                // Bounded like `clients`: the top `diagnosis.top_clients` by open
                // connections, with the per-client limit and their evictions.
                "by_connections": top_clients(shared),
            }))
        }
        "/" => with_type(status_page(&status(shared)), "text/html; charset=utf-8"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A replica that is listed but has no share yet (its first reads and the
/// hold-off after them) is not ready while an upstream has a cluster cap: clients
/// the Service sent it would only queue.
fn joining_cluster(shared: &Shared) -> bool {
    let Some(cluster) = shared.upstreams().cluster() else {
        return false;
    };
    cluster.status().joining
        && shared
            .table()
            .listed
            .iter()
            .any(|u| u.pool.config().cluster_max_connections.is_some())
}

/// What `/debug/pools` serves and the status page shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub instance: Instance,
    pub downstream: Downstream,
    pub pools: Vec<PoolSnapshot>,
    /// The `[cluster]` as this replica sees it (members, its place, fallback);
    /// each pool's `share` is what it takes of its `cluster_max_connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// The top `diagnosis.top_clients` clients by connections open (bounded).
    pub clients: Vec<ClientShare>,
    /// Clients the leak diagnosis suspects (of the top `diagnosis.top_clients`).
    pub suspects: Vec<ClientReport>,
}

/// This tether: which build, how long up, how the last reload went.
#[derive(Debug, Serialize)]
pub struct Instance {
    pub version: &'static str,
    pub commit: &'static str,
    pub uptime_seconds: u64,
    pub reload: ReloadStatus,
}

#[derive(Debug, Serialize)]
pub struct Downstream {
    pub open: usize,
}

/// Every pool: limits and the cap in force, counts by state, queue depth, one entry
/// per socket, and its `closed` and `rejected` totals by reason.
pub fn status(shared: &Shared) -> Status {
    let telemetry = shared.telemetry();
    let diagnosis = &shared.table().config.diagnosis;
    Status {
        instance: Instance {
            version: VERSION,
            commit: COMMIT,
            uptime_seconds: telemetry.uptime().as_secs(),
            reload: telemetry.reload_status(),
        },
        suspects: shared
            .downstream()
            .clients
            .top(diagnosis)
            .into_iter()
            .filter(|c| c.suspected_leak)
            .collect(),
        downstream: Downstream {
            open: shared.downstream().open(),
        },
        pools: shared
            .all_upstreams()
            .iter()
            .map(|u| u.pool.snapshot())
            .collect(),
        cluster: shared.upstreams().cluster().map(|c| (*c.status()).clone()),
        clients: top_clients(shared),
    }
}

fn top_clients(shared: &Shared) -> Vec<ClientShare> {
    let config = &shared.table().config;
    shared.downstream().top_by_connections(
        config.diagnosis.top_clients,
        config.proxy.max_connections_per_client,
    )
}

/// The status page with the table rendered from `status`.
fn status_page(status: &Status) -> String {
    let rows: String = match status.pools.as_slice() {
        [] => EMPTY_ROW.to_string(),
        pools => pools.iter().map(pool_row).collect(),
    };
    let clients: String = match status.clients.as_slice() {
        [] => EMPTY_CLIENTS.to_string(),
        clients => clients.iter().map(client_row).collect(),
    };
    let suspects: String = match status.suspects.as_slice() {
        [] => EMPTY_SUSPECTS.to_string(),
        suspects => suspects.iter().map(suspect_row).collect(),
    };
    let i = &status.instance;
    let reload = if i.reload.last_successful {
        "ok"
    } else {
        "failed"
    };
    STATUS_PAGE
        .replace(
            "<!--VERSION-->",
            &format!("{} ({})", esc(i.version), esc(i.commit)),
        )
        .replace("<!--UPTIME-->", &i.uptime_seconds.to_string())
        .replace("<!--RELOAD-->", reload)
        .replace("<!--SUSPECTS-->", &suspects)
        .replace("<!--DOWNSTREAM-->", &status.downstream.open.to_string())
        .replace("<!--CLUSTER-->", &cluster_line(status.cluster.as_ref()))
        .replace("<!--ROWS-->", &rows)
        .replace("<!--CLIENTS-->", &clients)
}

const EMPTY_SUSPECTS: &str = r#"<tr><td colspan="4">none suspected</td></tr>"#;

/// One suspected leaking client; the inline script's `suspect()` builds the same.
fn suspect_row(c: &ClientReport) -> String {
    format!(
        concat!(
            r#"<tr class="suspect" data-client="{address}"><td>{address}</td>"#,
            r#"<td data-field="opened">{opened}</td><td data-field="requests">{requests}</td>"#,
            r#"<td data-field="open">{open}</td></tr>"#
        ),
        address = esc(&c.address),
        opened = c.opened_in_window,
        requests = c.requests_in_window,
        open = c.connections_open,
    )
}

/// The cluster as this replica sees it; the inline script's `cluster()` writes the
/// same text.
fn cluster_line(cluster: Option<&ClusterStatus>) -> String {
    let Some(c) = cluster else {
        return String::new();
    };
    if c.fallback {
        return "Cluster: member list never read; each cap is its own max_connections. ".into();
    }
    let place = match c.self_index {
        None => "this replica is not listed (share 0)".to_string(),
        Some(i) => format!("this replica is #{}", i + 1),
    };
    format!(
        r#"Cluster: <b data-field="members">{}</b> members, {place}. "#,
        c.members.unwrap_or(0)
    )
}

const EMPTY_CLIENTS: &str = r#"<tr><td colspan="4">no client connections</td></tr>"#;

/// One client's row in the fair-share table; the inline script's `client()` builds
/// the same markup.
fn client_row(c: &ClientShare) -> String {
    let limit = c.limit.map_or("none".to_string(), |l| l.to_string());
    format!(
        concat!(
            r#"<tr class="client" data-client="{address}">"#,
            r#"<td>{address}</td>"#,
            r#"<td data-field="open">{open}</td>"#,
            r#"<td data-field="limit">{limit}</td>"#,
            r#"<td data-field="evicted">{evicted}</td>"#,
            "</tr>"
        ),
        address = esc(&c.address),
        open = c.connections_open,
        limit = limit,
        evicted = c.evicted,
    )
}

const EMPTY_ROW: &str = r#"<tr><td colspan="14">no upstreams</td></tr>"#;

/// One upstream's row. The inline script's `row()` builds the same markup; the data
/// attributes are what the browser test reads.
fn pool_row(p: &PoolSnapshot) -> String {
    let c = &p.counts;
    let cap = p.cap;
    let tunnels = c.tunnels_active + c.tunnels_idle;
    let width = |count: usize| {
        if cap == 0 {
            0.0
        } else {
            100.0 * count as f64 / cap as f64
        }
    };
    let mut bar = String::new();
    for (class, count) in [
        ("connecting", c.connecting),
        ("active", c.active),
        ("idle", c.idle),
        ("tunnels", tunnels),
    ] {
        let _ = write!(
            bar,
            r#"<span class="seg {class}" style="width:{:.1}%" title="{class} {count}"></span>"#,
            width(count)
        );
    }
    let name = esc(&p.upstream);
    format!(
        concat!(
            r#"<tr class="pool" data-upstream="{name}">"#,
            r#"<td><b>{name}</b><br><small>{origin}</small></td>"#,
            r#"<td><b data-field="open">{open}</b> / <span data-field="cap">{cap}</span>{share}</td>"#,
            r#"<td><div class="bar">{bar}</div></td>"#,
            r#"<td data-field="connecting">{connecting}</td>"#,
            r#"<td data-field="active">{active}</td>"#,
            r#"<td data-field="idle">{idle}</td>"#,
            r#"<td data-field="tunnels">{tunnels}</td>"#,
            r#"<td data-field="queued">{queued}</td>"#,
            r#"<td data-field="rate">-</td>"#,
            r#"<td data-field="error_rate">-</td>"#,
            r#"<td data-field="queue_wait">{queue_wait}</td>"#,
            r#"<td class="reasons">{errors}</td>"#,
            r#"<td class="reasons">{rejected}</td>"#,
            r#"<td class="reasons">{closed}</td>"#,
            "</tr>"
        ),
        name = name,
        origin = esc(&p.origin),
        open = p.open,
        cap = cap,
        share = match (p.share, p.limits.cluster_max_connections) {
            (Some(share), Some(total)) => format!(
                r#"<br><small>cluster share <span data-field="share">{share}</span> of {total}</small>"#
            ),
            _ => String::new(),
        },
        bar = bar,
        connecting = c.connecting,
        active = c.active,
        idle = c.idle,
        tunnels = tunnels,
        queued = c.queued,
        queue_wait = mean_ms(p.queue_wait_seconds, p.queue_waits),
        errors = reasons(&p.errors, "error"),
        rejected = reasons(&p.rejected, "rejected"),
        closed = reasons(&p.closed, "closed"),
    )
}

/// The mean of `n` waits totalling `seconds`, in milliseconds ("-" for none): the
/// server-rendered page's figure since start; the script's is over the last minute.
fn mean_ms(seconds: f64, n: u64) -> String {
    match n {
        0 => "-".to_string(),
        n => format!("{:.1}", 1000.0 * seconds / n as f64),
    }
}

/// The non-zero entries of a `{reason: count}` map, each count tagged `data-{attr}`.
fn reasons(map: &BTreeMap<&'static str, u64>, attr: &str) -> String {
    let items: Vec<String> = map
        .iter()
        .filter(|(_, &v)| v > 0)
        .map(|(k, v)| {
            let k = esc(k);
            format!(r#"<span class="reason">{k} <b data-{attr}="{k}">{v}</b></span>"#)
        })
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

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
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
    use crate::config::PoolConfig;
    use crate::upstream::PoolCounts;

    #[test]
    fn the_page_escapes_names_and_lists_only_nonzero_reasons() {
        let instance = || Instance {
            version: "1.2.3",
            commit: "abc",
            uptime_seconds: 7,
            reload: ReloadStatus {
                last_successful: false,
                last_success_unix: 0.0,
                failures: 1,
            },
        };
        let doc = Status {
            instance: instance(),
            suspects: vec![ClientReport {
                address: "127.0.0.9".into(),
                connections_open: 30,
                opened_in_window: 40,
                used_in_window: 40,
                requests_in_window: 40,
                requests_per_connection: 1.0,
                suspected_leak: true,
            }],
            downstream: Downstream { open: 2 },
            pools: vec![PoolSnapshot {
                upstream: "<x>".into(),
                origin: "a:1".into(),
                open: 1,
                limits: PoolConfig {
                    max_connections: 4,
                    ..PoolConfig::default()
                },
                cap: 4,
                share: None,
                counts: PoolCounts {
                    active: 1,
                    ..PoolCounts::default()
                },
                connections: Vec::new(),
                closed: BTreeMap::from([("error", 0), ("idle_timeout", 2)]),
                rejected: BTreeMap::from([("queue_full", 0)]),
                responses: 9,
                queue_waits: 2,
                queue_wait_seconds: 0.5,
                errors: BTreeMap::from([("connect", 3), ("tls", 0)]),
            }],
            cluster: None,
            clients: vec![ClientShare {
                address: "127.0.0.2".into(),
                connections_open: 20,
                limit: Some(20),
                evicted: 80,
            }],
        };
        let page = status_page(&doc);
        assert!(page.contains(r#"<tr class="pool" data-upstream="&lt;x&gt;">"#));
        assert!(page.contains(r#"<b data-closed="idle_timeout">2</b>"#));
        assert!(!page.contains(r#"data-closed="error""#));
        assert!(page.contains(r#"style="width:25.0%" title="active 1""#));
        assert!(page.contains(r#"<b id="downstream">2</b>"#));
        assert!(page.contains(r#"<tr class="client" data-client="127.0.0.2">"#));
        assert!(page.contains(r#"<td data-field="evicted">80</td>"#));
        assert!(page.contains(r#"<b data-error="connect">3</b>"#));
        assert!(page.contains(r#"<td data-field="queue_wait">250.0</td>"#));
        assert!(!page.contains(r#"data-error="tls""#));
        assert!(page.contains(r#"<tr class="suspect" data-client="127.0.0.9">"#));
        assert!(page.contains(r#"<b id="version">1.2.3 (abc)</b>"#));
        assert!(page.contains(r#"<b id="reload">failed</b>"#));
        let empty = status_page(&Status {
            instance: instance(),
            suspects: Vec::new(),
            downstream: Downstream { open: 0 },
            pools: Vec::new(),
            cluster: None,
            clients: Vec::new(),
        });
        assert!(empty.contains("no upstreams"));
        assert!(empty.contains("no client connections"));
    }
}
