//! The governed pool over real loopback sockets, counted on the upstream's side.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::config::Config;

fn pool_config(origin: &Origin, f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = config(&[("up", origin)]);
    route(&mut cfg, "up");
    f(&mut cfg);
    cfg
}

fn closed(tether: &tether::Running, reason: &str) -> f64 {
    closed_total(tether, "up", reason)
}

fn rejected(tether: &tether::Running, reason: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_upstream_rejected_total",
        &[("upstream", "up"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// A tether whose one upstream socket is busy: a pool of one, `queue_timeout` as
/// given (or the default), and a request for `slow` in flight on it.
async fn one_socket_busy(
    queue_timeout: Option<Duration>,
    slow: &'static str,
) -> (Origin, tether::Running, tokio::task::JoinHandle<Reply>) {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_connections = 1;
        if let Some(t) = queue_timeout {
            c.pool.queue_timeout = t;
        }
    }))
    .await;
    let route = tether.route_addrs[0];
    let busy = tokio::spawn(async move { route_get(route, slow).await });
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    (origin, tether, busy)
}

#[tokio::test]
async fn two_hundred_clients_share_four_upstream_sockets() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| c.pool.max_connections = 4)).await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..200)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/20").await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        origin.peak() <= 4,
        "upstream saw {} simultaneous sockets",
        origin.peak()
    );
    assert!(
        origin.accepted() <= 4,
        "upstream accepted {} sockets",
        origin.accepted()
    );
    assert_eq!(origin.requests(), 200);
    assert_sockets(&tether, &origin, "up", origin.accepted()).await;
}

#[tokio::test]
async fn a_full_queue_answers_503_queue_full_at_once() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_connections = 2;
        c.pool.queue_limit = 10;
    }))
    .await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..60)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/300").await }))
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        match reply.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(reply.tether_error(), Some("queue_full"));
                assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
                full += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        full >= 40,
        "60 requests, 2 sockets, 10 queue places: {full} rejected"
    );
    assert_eq!(ok + full, 60);
    assert_eq!(rejected(&tether, "queue_full"), full as f64);
    assert!(origin.peak() <= 2);
}

#[tokio::test]
async fn a_request_waiting_past_queue_timeout_gets_503_queue_timeout() {
    let (origin, tether, slow) =
        one_socket_busy(Some(Duration::from_millis(200)), "/delay/1500").await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.tether_error(), Some("queue_timeout"));
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(rejected(&tether, "queue_timeout"), 1.0);
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(origin.accepted(), 1);
}

/// The queue's wait and the response head's share one timer: a request that waited
/// in the queue for less than `queue_timeout` still gets all of
/// `response_header_timeout` for its head, past the queue's limit.
#[tokio::test]
async fn a_request_that_waited_in_the_queue_gets_its_whole_head_timeout() {
    let (origin, tether, first) =
        one_socket_busy(Some(Duration::from_millis(600)), "/delay/400").await;
    // Queued for about 400 ms, then 400 ms for its head: 800 ms after it queued,
    // past the queue's 600.
    let second = route_get(tether.route_addrs[0], "/delay/400").await;
    assert_eq!(second.status, 200, "{:?}", second.tether_error());
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(rejected(&tether, "queue_timeout"), 0.0);
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn a_waiter_whose_client_disconnects_leaves_the_queue() {
    let (origin, tether, slow) = one_socket_busy(None, "/delay/1500").await;
    let route = tether.route_addrs[0];
    let waiting = tokio::spawn(async move { route_get(route, "/").await });
    let depth = |t: &tether::Running| {
        metric(
            &t.metrics(),
            "tether_upstream_queue_depth",
            &[("upstream", "up")],
        )
    };
    assert!(eventually(WAIT, || async { depth(&tether) == Some(1.0) }).await);
    waiting.abort(); // the client goes away: its socket closes
    assert!(
        eventually(WAIT, || async { depth(&tether) == Some(0.0) }).await,
        "queue depth back to 0"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(
        origin.requests(),
        1,
        "the abandoned request never reached the upstream"
    );
}

#[tokio::test]
async fn leaky_client_is_held_at_the_cap_and_reaped_to_zero() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_connections = 4;
        c.pool.idle_timeout = Duration::from_millis(600);
        c.pool.reap_interval = Duration::from_millis(100);
        c.proxy.client_idle_timeout = Duration::from_millis(800);
    }))
    .await;
    let route = tether.route_addrs[0];
    // Five workers, ten jobs each; every job is a new client that is never closed.
    let workers: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = LeakyClient::new();
                for _ in 0..10 {
                    let job = client.job(route, "registry", "/delay/10").await.unwrap();
                    assert_eq!(job.status, 200);
                }
                client
            })
        })
        .collect();
    let mut clients = Vec::new();
    for w in workers {
        clients.push(w.await.unwrap());
    }
    assert_eq!(clients.iter().map(|c| c.leaked()).sum::<usize>(), 50);
    assert!(
        origin.peak() <= 4,
        "upstream saw {} sockets at once",
        origin.peak()
    );
    let opened = origin.accepted();
    assert!(opened <= 4);

    // Work stops: both sides fall to zero on tether's timers alone.
    assert_sockets(&tether, &origin, "up", 0).await;
    let clients = Arc::new(clients);
    assert!(
        eventually(WAIT, || async {
            clients.iter().map(|c| c.open()).sum::<usize>() == 0
        })
        .await
    );
    assert_eq!(closed(&tether, "idle_timeout"), opened as f64);
    let text = tether.metrics();
    assert_eq!(
        metric(
            &text,
            "tether_downstream_connections_closed_total",
            &[("reason", "idle_timeout")]
        ),
        Some(50.0)
    );
    assert_eq!(
        metric(&text, "tether_downstream_connections", &[("state", "idle")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "tether_downstream_connections",
            &[("state", "active")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn max_requests_per_connection_closes_with_its_reason() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_requests_per_connection = 3
    }))
    .await;
    for _ in 0..9 {
        assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    }
    assert!(eventually(WAIT, || async { closed(&tether, "max_requests") == 3.0 }).await);
    assert_eq!(origin.accepted(), 3);
    assert_sockets(&tether, &origin, "up", 0).await;
}

#[tokio::test]
async fn max_lifetime_closes_an_old_idle_connection() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_lifetime = Duration::from_millis(300);
        c.pool.reap_interval = Duration::from_millis(50);
    }))
    .await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(closed(&tether, "max_lifetime"), 1.0);
    assert_eq!(closed(&tether, "idle_timeout"), 0.0);
}

#[tokio::test]
async fn surplus_idle_connections_over_max_idle_are_closed() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_connections = 4;
        c.pool.max_idle = Some(1);
    }))
    .await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/300").await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(origin.accepted(), 4);
    assert_sockets(&tether, &origin, "up", 1).await;
    assert_eq!(closed(&tether, "max_idle"), 3.0);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_a_502() {
    let origin = Origin::start_with(OriginOptions {
        idle_close_after: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.idle_timeout = Duration::from_secs(30)
    }))
    .await;
    for _ in 0..3 {
        assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
        // The upstream's keep-alive timeout fires long before tether's.
        assert!(eventually(WAIT, || async { origin.open() == 0 }).await);
    }
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(closed(&tether, "remote_closed"), 3.0);
}

#[tokio::test]
async fn upstream_connection_close_is_not_reused() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |_| {})).await;
    for _ in 0..3 {
        assert_eq!(route_get(tether.route_addrs[0], "/close").await.status, 200);
    }
    assert_eq!(origin.accepted(), 3);
    assert_sockets(&tether, &origin, "up", 0).await;
}

#[tokio::test]
async fn gauges_match_upstream_sockets_after_every_phase() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |c| {
        c.pool.max_connections = 3;
        c.pool.idle_timeout = Duration::from_millis(400);
        c.pool.reap_interval = Duration::from_millis(50);
    }))
    .await;
    let route = tether.route_addrs[0];
    // Phase 1: three concurrent slow requests hold three active sockets.
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/800").await.status }))
        .collect();
    assert!(eventually(WAIT, || async { origin.requests() == 3 }).await);
    assert_sockets(&tether, &origin, "up", 3).await;
    let text = tether.metrics();
    assert_eq!(
        metric(
            &text,
            "tether_upstream_connections",
            &[("upstream", "up"), ("state", "active")]
        ),
        Some(3.0)
    );
    // Phase 2: done, all idle.
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_sockets(&tether, &origin, "up", 3).await;
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    let conns = json["pools"][0]["connections"].as_array().unwrap().clone();
    assert_eq!(
        conns.len(),
        3,
        "/debug/pools lists exactly the live sockets"
    );
    assert!(conns.iter().all(|c| c["state"] == "idle"));
    // Phase 3: reaped.
    assert_sockets(&tether, &origin, "up", 0).await;
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(json["pools"][0]["connections"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn upstream_connection_close_is_counted_as_a_remote_close() {
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |_| {})).await;
    assert_eq!(route_get(tether.route_addrs[0], "/close").await.status, 200);
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(
        closed(&tether, "remote_closed"),
        1.0,
        "{}",
        tether.metrics()
    );
}

/// A client that reads a response's head and leaves: returns the pool's socket count
/// and how many the origin accepted once the next request has been served.
async fn leave_mid_body(path: &str) -> (tether::Running, Origin) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |_| {})).await;
    let route = tether.route_addrs[0];
    let mut client = tokio::net::TcpStream::connect(route).await.unwrap();
    client
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, client.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    drop(client);
    assert!(
        eventually(WAIT, || async {
            upstream_gauge(&tether.metrics(), "up") == 0.0 || idle_sockets(&tether) == 1.0
        })
        .await
    );
    assert_eq!(route_get(route, "/").await.status, 200);
    (tether, origin)
}

fn idle_sockets(tether: &tether::Running) -> f64 {
    metric(
        &tether.metrics(),
        "tether_upstream_connections",
        &[("upstream", "up"), ("state", "idle")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_client_leaving_mid_body_does_not_cost_an_upstream_socket() {
    // 512 KiB: more than the socket buffers hold, so most of it is still on its way
    // when the client leaves; tether reads the rest and keeps the socket.
    let (tether, origin) = leave_mid_body("/bytes/524288").await;
    assert_eq!(origin.accepted(), 1, "the next request reused the socket");
    assert_eq!(closed(&tether, "error"), 0.0);
}

#[tokio::test]
async fn a_long_abandoned_remainder_closes_the_upstream_socket() {
    // 64 MiB: more than tether drains (1 MiB), so the socket is closed instead.
    let (tether, origin) = leave_mid_body("/bytes/67108864").await;
    assert_eq!(origin.accepted(), 2);
    assert_eq!(closed(&tether, "error"), 1.0);
}

#[tokio::test]
async fn a_client_leaving_before_the_response_head_does_not_cost_an_upstream_socket() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start().await;
    let tether = start(pool_config(&origin, |_| {})).await;
    let route = tether.route_addrs[0];
    let mut client = tokio::net::TcpStream::connect(route).await.unwrap();
    client
        .write_all(b"GET /delay/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(eventually(WAIT, || async { origin.requests() == 1 }).await);
    drop(client);
    // The origin answers 200 ms later; tether reads that answer and keeps the socket.
    assert!(eventually(WAIT, || async { idle_sockets(&tether) == 1.0 }).await);
    assert_eq!(route_get(route, "/").await.status, 200);
    assert_eq!(origin.accepted(), 1, "the next request reused the socket");
    assert_eq!(closed(&tether, "error"), 0.0);
}

/// `request_timeout` bounds the whole exchange, the time queued for a socket
/// included: a request still queued at its deadline is answered 503
/// `queue_timeout` then, rather than waiting out `queue_timeout`, taking a socket
/// at last and timing out on it (which closed a good socket as `error`).
#[tokio::test]
async fn a_request_queued_past_its_request_timeout_is_answered_then_and_wastes_no_socket() {
    let origin = Origin::start().await;
    let mut config = support::config(&[("a", &origin)]);
    config.pool.max_connections = 1;
    config.pool.request_timeout = Duration::from_millis(300);
    config.pool.queue_timeout = Duration::from_secs(60); // far beyond WAIT
    route(&mut config, "a");
    let tether = start(config).await;
    // A tunnel holds the only place under the cap; request_timeout does not bound it.
    let held = tunnel(tether.proxy_addr, &origin.authority())
        .await
        .expect("the tunnel opens");

    let reply = tokio::time::timeout(WAIT, route_get(tether.route_addrs[0], "/"))
        .await
        .expect("answered at the request's deadline, not after queue_timeout");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.tether_error(), Some("queue_timeout"));

    drop(held);
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let closed_as_error = metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "a"), ("reason", "error")],
    );
    assert_eq!(closed_as_error, Some(0.0));
    tether.shutdown().await;
}
