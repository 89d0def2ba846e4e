//! Governance beyond a fixed cap: adaptive idle timeouts from the upstream's own
//! `Keep-Alive`, a shared connection budget, leak diagnosis, warm floors.

mod support;

use std::time::Duration;

use support::*;
use tether::config::Config;

fn closed(tether: &tether::Running, reason: &str) -> f64 {
    closed_total(tether, "up", reason)
}

/// Gaps between requests, pseudo-random but repeatable, straddling the upstream's
/// one-second keep-alive timeout.
fn gaps() -> impl Iterator<Item = Duration> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..10).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(100 + x % 1400)
    })
}

async fn run_pattern(adaptive: bool) -> (tether::Running, Origin) {
    // The upstream advertises `Keep-Alive: timeout=1` and closes idle sockets at 1 s;
    // tether's own idle timeout is a minute.
    let origin = Origin::start_with(OriginOptions {
        idle_close_after: Some(Duration::from_secs(1)),
        advertise_keep_alive: Some(1),
        ..Default::default()
    })
    .await;
    let mut cfg: Config = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.idle_timeout = Duration::from_secs(60);
    cfg.pool.reap_interval = Duration::from_millis(50);
    cfg.pool.keepalive_margin = Duration::from_millis(300);
    cfg.pool.adaptive_keepalive = adaptive;
    let tether = start(cfg).await;
    for gap in gaps() {
        assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
        tokio::time::sleep(gap).await;
    }
    (tether, origin)
}

#[tokio::test]
async fn an_advertised_keep_alive_timeout_makes_tether_close_first() {
    let (tether, origin) = run_pattern(true).await;
    let stale = metric(
        &tether.metrics(),
        "tether_upstream_stale_retries_total",
        &[("upstream", "up")],
    );
    assert_eq!(
        stale,
        Some(0.0),
        "no request ever met a socket the upstream had closed"
    );
    assert_eq!(
        closed(&tether, "remote_closed"),
        0.0,
        "the upstream never had to close one"
    );
    assert!(closed(&tether, "idle_timeout") >= 1.0);
    // The effective limit shows per connection.
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(
        json["pools"][0]["connections"][0]["keepalive"]["idle_timeout"],
        "700ms"
    );
    assert_sockets(&tether, &origin, "up", 0).await;
}

#[tokio::test]
async fn without_adaptive_keepalive_the_upstream_closes_first() {
    let (tether, _origin) = run_pattern(false).await;
    // Every request still succeeds (stale sockets are retried), but the closes are
    // the upstream's: the race the adaptive timeout avoids.
    assert!(closed(&tether, "remote_closed") >= 1.0);
    assert_eq!(closed(&tether, "idle_timeout"), 0.0);
}

/// A tether whose diagnosis names a client after 20 used connections, in front of
/// an origin (kept alive with it).
async fn diagnosed() -> (tether::Running, Origin) {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.diagnosis.leak_min_connections = 20;
    (start(cfg).await, origin)
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A keep-alive HTTP/1.1 client on `stream` (a handshake sends nothing).
async fn http1(stream: tokio::net::TcpStream) -> Sender {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    send
}

/// `GET /` on `send`, its body read to the end.
async fn get_on(send: &mut Sender) {
    let req = http::Request::get("/")
        .header("host", "x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
}

/// A client that opens its whole pool before sending anything (a load generator,
/// a pooled client warming up) is not taken for a leak: its connections are judged
/// on the requests they carry once used, here three each.
#[tokio::test(flavor = "current_thread")]
async fn a_client_opening_its_pool_at_once_is_not_named() {
    let (logs, _guard) = Captured::install();
    let (tether, _origin) = diagnosed().await;
    let route = tether.route_addrs[0];
    let ip: std::net::IpAddr = "127.0.0.4".parse().unwrap();
    let mut pool = Vec::new();
    for _ in 0..30 {
        pool.push(connect_from(ip, route).await.unwrap());
    }
    let opened = |t: &tether::Running| {
        metric(
            &t.metrics(),
            "tether_downstream_connections_opened_total",
            &[],
        )
    };
    assert!(
        eventually(WAIT, || async { opened(&tether) == Some(30.0) }).await,
        "all thirty admitted before any request"
    );
    let mut senders = Vec::new();
    for stream in pool {
        senders.push(http1(stream).await);
    }
    for _ in 0..3 {
        for send in &mut senders {
            get_on(send).await;
        }
    }
    let text = String::from_utf8(logs.bytes()).unwrap();
    assert!(!text.contains("client 127.0.0.4 opened"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/clients").await.body).unwrap();
    let me = json["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == "127.0.0.4")
        .unwrap()
        .clone();
    assert_eq!(me["opened_in_window"], 30);
    assert_eq!(me["used_in_window"], 30);
    assert_eq!(me["requests_per_connection"], 3.0);
    assert_eq!(me["suspected_leak"], false);
    let scrape = admin(&tether, "/metrics").await.text();
    assert_eq!(
        metric(&scrape, "tether_suspected_leaking_clients", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_leaking_client_is_named_and_a_well_behaved_one_is_not() {
    let (logs, _guard) = Captured::install();
    let (tether, _origin) = diagnosed().await;
    let route = tether.route_addrs[0];
    let leaky_ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let good_ip: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    // The leaky client: a new connection per job, one request each.
    let mut leaky = LeakyClient::from_source(leaky_ip);
    for _ in 0..30 {
        assert_eq!(leaky.job(route, "x", "/").await.unwrap().status, 200);
    }
    // A well-behaved client: one keep-alive connection for sixty requests.
    let mut send = http1(connect_from(good_ip, route).await.unwrap()).await;
    for _ in 0..60 {
        get_on(&mut send).await;
    }

    let text = String::from_utf8(logs.bytes()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("new HTTP client per job"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning, rate-limited: {warnings:?}");
    assert!(
        warnings[0]
            .contains("client 127.0.0.2 opened 21 connections in 1m, 1.0 requests per connection"),
        "{}",
        warnings[0]
    );
    assert!(
        !text.contains("client 127.0.0.3 opened"),
        "the well-behaved client is not named"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/clients").await.body).unwrap();
    let clients = json["clients"].as_array().unwrap();
    let find = |ip: &str| clients.iter().find(|c| c["address"] == ip).unwrap().clone();
    let leaky_report = find("127.0.0.2");
    assert_eq!(leaky_report["opened_in_window"], 30);
    assert_eq!(leaky_report["connections_open"], 30);
    assert_eq!(leaky_report["suspected_leak"], true);
    let good_report = find("127.0.0.3");
    assert_eq!(good_report["requests_per_connection"], 60.0);
    assert_eq!(good_report["suspected_leak"], false);
    assert_eq!(
        clients[0]["address"], "127.0.0.2",
        "most connections opened first"
    );

    // For alerting and the status page: one suspect, the leaky client alone.
    let scrape = admin(&tether, "/metrics").await.text();
    assert_eq!(
        metric(&scrape, "tether_suspected_leaking_clients", &[]),
        Some(1.0)
    );
    let status: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    let suspects = status["suspects"].as_array().unwrap();
    assert_eq!(suspects.len(), 1, "{suspects:?}");
    assert_eq!(suspects[0]["address"], "127.0.0.2");
    let page = admin(&tether, "/").await.text();
    assert!(page.contains(r#"<tr class="suspect" data-client="127.0.0.2">"#));
    assert!(!page.contains(r#"<tr class="suspect" data-client="127.0.0.3">"#));
}

#[tokio::test]
async fn a_warm_floor_keeps_sockets_ready_through_quiet_periods() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.upstream[0].min_idle = Some(2);
    cfg.pool.idle_timeout = Duration::from_millis(300);
    cfg.pool.reap_interval = Duration::from_millis(50);
    let tether = start(cfg).await;
    // Opened before any request, and counted like any socket.
    assert_sockets(&tether, &origin, "up", 2).await;
    // A quiet period three times the idle timeout: the floor is not reaped.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_sockets(&tether, &origin, "up", 2).await;
    assert_eq!(closed(&tether, "idle_timeout"), 0.0);
    assert_eq!(origin.accepted(), 2);
    // The first request after the quiet period pays no handshake.
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let reused = metric(
        &tether.metrics(),
        "tether_upstream_requests_total",
        &[("upstream", "up"), ("code", "2xx"), ("reused", "true")],
    );
    assert_eq!(reused, Some(1.0));
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_warm_floor_is_refilled_after_the_upstream_closes_it() {
    let origin = Origin::start_with(OriginOptions {
        idle_close_after: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.upstream[0].min_idle = Some(1);
    cfg.upstream[0].max_connections = Some(2);
    cfg.pool.reap_interval = Duration::from_millis(50);
    let tether = start(cfg).await;
    assert!(
        eventually(WAIT, || async { origin.accepted() >= 3 }).await,
        "closed twice, re-opened twice"
    );
    assert!(origin.peak() <= 2, "within the cap");
    assert_sockets(&tether, &origin, "up", 1).await;
}

/// Samples the two origins' open sockets until stopped; returns the largest total.
fn watch_total(
    a: Origin,
    b: Origin,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(a.open() + b.open());
            if stopped.try_recv().is_ok() {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (stop, task)
}

fn budget_config(a: &Origin, b: &Origin) -> Config {
    let mut cfg = config(&[("a", a), ("b", b)]);
    route(&mut cfg, "a");
    route(&mut cfg, "b");
    cfg.budget.max_connections = 4;
    for up in &mut cfg.upstream {
        up.max_connections = Some(4);
        up.min_connections = Some(2);
    }
    cfg
}

#[tokio::test]
async fn under_a_shared_budget_each_upstream_gets_its_floor() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let tether = start(budget_config(&a, &b)).await;
    let (to_a, to_b) = (tether.route_addrs[0], tether.route_addrs[1]);
    let (stop, peak) = watch_total(a.clone(), b.clone());
    // Upstream a takes the whole budget...
    let a_tasks: Vec<_> = (0..12)
        .map(|_| tokio::spawn(async move { route_get(to_a, "/delay/300").await.status }))
        .collect();
    assert!(eventually(WAIT, || async { a.open() == 4 }).await);
    // ...then b needs sockets: a yields down to its floor as its requests finish.
    let b_tasks: Vec<_> = (0..12)
        .map(|_| tokio::spawn(async move { route_get(to_b, "/delay/300").await.status }))
        .collect();
    for t in a_tasks.into_iter().chain(b_tasks) {
        assert_eq!(t.await.unwrap(), 200);
    }
    stop.send(()).unwrap();
    let peak = peak.await.unwrap();
    assert!(
        peak <= 4,
        "the two upstreams together saw {peak} sockets at once"
    );
    assert!(
        b.peak() >= 2,
        "b got at least its floor (peak {})",
        b.peak()
    );
    let text = tether.metrics();
    let open = metric(&text, "tether_budget_connections", &[("state", "open")]).unwrap();
    assert_eq!(open as usize, a.open() + b.open());
    assert_eq!(
        metric(&text, "tether_budget_max_connections", &[]),
        Some(4.0)
    );
}

#[tokio::test]
async fn a_spent_budget_closes_another_upstreams_idle_socket_above_its_floor() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let mut cfg = budget_config(&a, &b);
    cfg.pool.queue_timeout = Duration::from_secs(2);
    let tether = start(cfg).await;
    let (to_a, to_b) = (tether.route_addrs[0], tether.route_addrs[1]);
    let a_tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { route_get(to_a, "/delay/100").await.status }))
        .collect();
    for t in a_tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        eventually(WAIT, || async { a.open() == 4 }).await,
        "a holds the whole budget, idle"
    );
    // Served by eviction: waiting in the queue would end in a 503 queue_timeout.
    assert_eq!(route_get(to_b, "/").await.status, 200);
    let evicted = metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "a"), ("reason", "evicted")],
    );
    assert_eq!(evicted, Some(1.0));
    assert!(eventually(WAIT, || async { a.open() == 3 && b.open() == 1 }).await);
}
