//! The client side: idle and header timeouts, the connection limit, oversized heads.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// tether with one route listener in front of `origin`, configured by `f`.
async fn routed(origin: &Origin, f: impl FnOnce(&mut tether::config::Config)) -> tether::Running {
    let mut cfg = config(&[("up", origin)]);
    route(&mut cfg, "up");
    f(&mut cfg);
    start(cfg).await
}

/// A route to `origin` whose idle client connections close after `ms` milliseconds.
async fn with_client_idle_timeout(origin: &Origin, ms: u64) -> tether::Running {
    routed(origin, |cfg| {
        cfg.proxy.client_idle_timeout = Duration::from_millis(ms)
    })
    .await
}

fn downstream_closed(tether: &tether::Running, reason: &str) -> f64 {
    metric(
        &tether.metrics(),
        "tether_downstream_connections_closed_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// Reads until the server closes the socket; true if it did within `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_client_connections_are_closed_after_client_idle_timeout() {
    let origin = Origin::start().await;
    let tether = with_client_idle_timeout(&origin, 300).await;
    let mut client = LeakyClient::new();
    for _ in 0..3 {
        assert_eq!(
            client
                .job(tether.route_addrs[0], "x", "/")
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(client.open(), 3);
    assert!(
        eventually(WAIT, || async { client.open() == 0 }).await,
        "tether closed the leaked client sockets"
    );
    assert_eq!(downstream_closed(&tether, "idle_timeout"), 3.0);
}

#[tokio::test]
async fn a_busy_client_connection_is_not_cut_by_the_idle_timeout() {
    let origin = Origin::start().await;
    let tether = with_client_idle_timeout(&origin, 200).await;
    let reply = route_get(tether.route_addrs[0], "/delay/700").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ok");
}

#[tokio::test]
async fn slowloris_heads_are_cut_at_header_read_timeout() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| {
        cfg.proxy.header_read_timeout = Duration::from_millis(300);
        cfg.proxy.client_idle_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stream = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Keep trickling a byte now and then; the head never completes.
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if stream.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    assert!(closed_by_server(&mut stream, WAIT).await);
    assert_eq!(downstream_closed(&tether, "header_timeout"), 1.0);
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn a_connection_that_never_sends_is_closed_at_header_read_timeout() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.proxy.header_read_timeout = Duration::from_millis(200);
    let tether = start(cfg).await;
    let mut stream = TcpStream::connect(tether.proxy_addr).await.unwrap();
    assert!(closed_by_server(&mut stream, WAIT).await);
    assert_eq!(downstream_closed(&tether, "header_timeout"), 1.0);
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| cfg.proxy.max_header_bytes = 8192).await;
    let mut stream = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    let big = "a".repeat(20_000);
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn at_max_client_connections_the_longest_idle_client_is_closed_first() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| cfg.proxy.max_client_connections = 5).await;
    let route = tether.route_addrs[0];
    let mut client = LeakyClient::new();
    for _ in 0..5 {
        assert_eq!(client.job(route, "x", "/").await.unwrap().status, 200);
    }
    // A sixth client arrives: one idle client is closed to make room, and the new
    // one is served.
    assert_eq!(client.job(route, "x", "/").await.unwrap().status, 200);
    assert!(eventually(WAIT, || async { client.open() == 5 }).await);
    assert_eq!(downstream_closed(&tether, "evicted"), 1.0);
    assert!(tether.shared.downstream().open() <= 5);
}

#[tokio::test]
async fn at_max_client_connections_with_none_idle_new_clients_are_refused() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| cfg.proxy.max_client_connections = 2).await;
    let route = tether.route_addrs[0];
    let busy: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { route_get(route, "/delay/1000").await.status }))
        .collect();
    assert!(eventually(WAIT, || async { origin.requests() == 2 }).await);
    let mut refused = TcpStream::connect(route).await.unwrap();
    assert!(closed_by_server(&mut refused, WAIT).await);
    assert_eq!(downstream_closed(&tether, "limit"), 1.0);
    for b in busy {
        assert_eq!(b.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_request() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let mut stream = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    // Each request gets a 200 that keeps the connection, and then the socket is
    // idle past the parking delay (10 ms): tether hands it back from hyper and holds
    // it bare. The same connection must serve the next requests, including two
    // pipelined in one write.
    for _ in 0..2 {
        stream.write_all(request).await.unwrap();
        let reply = read_some(&mut stream).await;
        assert!(
            reply.starts_with("HTTP/1.1 200") && !reply.contains("connection: close"),
            "{reply}"
        );
        assert!(eventually(WAIT, || async { parked(&tether) == 1.0 }).await);
    }
    stream
        .write_all(&[request.as_slice(), request.as_slice()].concat())
        .await
        .unwrap();
    let mut both = String::new();
    while both.matches("HTTP/1.1 200").count() < 2 {
        both.push_str(&read_some(&mut stream).await);
    }
    let opened = metric(
        &tether.metrics(),
        "tether_downstream_connections_opened_total",
        &[],
    );
    assert_eq!(opened, Some(1.0), "one client connection throughout");
    assert_eq!(origin.requests(), 4);
}

fn parked(tether: &tether::Running) -> f64 {
    metric(
        &tether.metrics(),
        "tether_downstream_parked_connections",
        &[],
    )
    .unwrap_or(0.0)
}

fn downstream_open(tether: &tether::Running) -> f64 {
    ["active", "idle"]
        .iter()
        .map(|state| {
            metric(
                &tether.metrics(),
                "tether_downstream_connections",
                &[("state", state)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

/// One request on a fresh connection, then idle until tether has parked it (one more
/// parked connection than before).
async fn parked_connection(tether: &tether::Running) -> TcpStream {
    let before = parked(tether);
    let mut stream = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_some(&mut stream).await.starts_with("HTTP/1.1 200"));
    assert!(
        eventually(WAIT, || async { parked(tether) == before + 1.0 }).await,
        "the idle connection was parked"
    );
    stream
}

#[tokio::test]
async fn a_parked_connection_the_client_closes_is_closed_and_counted_once() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let stream = parked_connection(&tether).await;
    drop(stream);
    assert!(
        eventually(WAIT, || async { downstream_open(&tether) == 0.0 }).await,
        "the client's close of a parked socket is noticed"
    );
    assert_eq!(parked(&tether), 0.0);
    assert_eq!(downstream_closed(&tether, "client_closed"), 1.0);
    let opened = metric(
        &tether.metrics(),
        "tether_downstream_connections_opened_total",
        &[],
    );
    assert_eq!(opened, Some(1.0));
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_client_idle_timeout() {
    let origin = Origin::start().await;
    let tether = with_client_idle_timeout(&origin, 1500).await;
    let mut stream = parked_connection(&tether).await;
    assert!(closed_by_server(&mut stream, WAIT).await);
    assert_eq!(downstream_closed(&tether, "idle_timeout"), 1.0);
    assert_eq!(parked(&tether), 0.0);
    assert_eq!(downstream_open(&tether), 0.0);
}

async fn read_some(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn clients_that_leave_mid_request_leave_the_gauges_at_zero() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let route = tether.route_addrs[0];
    // One leaves while tether waits for the response head, one in the middle of a
    // body, one after a complete response.
    let mut waiting = TcpStream::connect(route).await.unwrap();
    waiting
        .write_all(b"GET /delay/300 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reading = TcpStream::connect(route).await.unwrap();
    reading
        .write_all(b"GET /gated/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_some(&mut reading).await.starts_with("HTTP/1.1 200"));
    let mut done = TcpStream::connect(route).await.unwrap();
    done.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_some(&mut done).await.starts_with("HTTP/1.1 200"));
    assert!(eventually(WAIT, || async { origin.requests() == 3 }).await);
    drop((waiting, reading, done));
    origin.open_gate();
    assert!(
        eventually(WAIT, || async {
            downstream_closed(&tether, "client_closed") + downstream_closed(&tether, "error") == 3.0
        })
        .await
    );
    for state in ["active", "idle"] {
        let value = metric(
            &tether.metrics(),
            "tether_downstream_connections",
            &[("state", state)],
        );
        assert_eq!(value, Some(0.0), "state={state}");
    }
}

#[tokio::test]
async fn a_parked_connection_on_a_route_a_reload_removed_is_closed() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let mut stream = parked_connection(&tether).await;
    // The same upstream, no route: the route listener stops, and its parked client
    // connections (which have no task watching the listener) are closed too.
    tether.reload(config(&[("up", &origin)])).await.unwrap();
    assert!(closed_by_server(&mut stream, WAIT).await);
    assert_eq!(downstream_closed(&tether, "shutdown"), 1.0);
    assert_eq!(parked(&tether), 0.0);
    assert_eq!(downstream_open(&tether), 0.0);
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |_| {}).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(parked_connection(&tether).await);
    }
    assert_eq!(parked(&tether), 3.0);
    let shared = tether.shared.clone();
    assert_eq!(tether.shutdown().await, 0, "nothing had to be cut");
    for stream in &mut streams {
        assert!(closed_by_server(stream, WAIT).await);
    }
    assert_eq!(shared.downstream().open(), 0);
}

/// Client sockets in ESTABLISHED state on tether's side of `port` (`ss`); `None`
/// where `ss` is not installed.
fn ss_established_from(port: u16) -> Option<usize> {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).lines().count())
}

/// The attack from the hardening report: fill `max_client_connections` with half-sent
/// request heads, then keep opening connections that trickle one byte at a time. Each
/// newcomer may take an evicted connection's place, but at no sample does tether hold
/// more than the limit: its registry and gauges never exceed it, and the kernel shows
/// at most one socket more (the one the accept loop is deciding on).
#[tokio::test]
async fn half_sent_heads_and_trickling_clients_never_lift_max_client_connections() {
    const LIMIT: usize = 8;
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| {
        cfg.proxy.max_client_connections = LIMIT;
        cfg.proxy.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    let route = tether.route_addrs[0];
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let mut s = TcpStream::connect(route).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    assert!(
        eventually(WAIT, || async {
            tether.shared.downstream().open() == LIMIT
        })
        .await
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let shared = tether.shared.clone();
        let metrics = tether.shared.telemetry().clone();
        let stop = stop.clone();
        let port = route.port();
        tokio::spawn(async move {
            let (mut registered, mut gauge, mut kernel) = (0, 0.0f64, 0);
            while !stop.is_cancelled() {
                registered = registered.max(shared.downstream().open());
                let text = metrics.render();
                let open: f64 = ["active", "idle"]
                    .iter()
                    .map(|s| {
                        metric(&text, "tether_downstream_connections", &[("state", s)])
                            .unwrap_or(0.0)
                    })
                    .sum();
                gauge = gauge.max(open);
                kernel = kernel.max(ss_established_from(port).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (registered, gauge, kernel)
        })
    };
    const NEWCOMERS: usize = 24;
    let mut tricklers = Vec::new();
    for _ in 0..NEWCOMERS {
        let mut s = TcpStream::connect(route).await.unwrap();
        let stop = stop.clone();
        tricklers.push(tokio::spawn(async move {
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                if stop.is_cancelled() || s.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.cancel();
    let (registered, gauge, kernel) = sampler.await.unwrap();
    for t in tricklers {
        t.await.unwrap();
    }
    let evicted = downstream_closed(&tether, "evicted");
    let refused = downstream_closed(&tether, "limit");
    println!(
        "peak: {registered} registered, {gauge} in the gauges, {kernel} established (ss); \
         {evicted} evicted, {refused} refused"
    );
    assert!(
        registered <= LIMIT,
        "tether registered {registered} clients"
    );
    assert!(gauge <= LIMIT as f64, "the gauges showed {gauge} clients");
    if ss_established_from(route.port()).is_some() {
        assert!(
            kernel <= LIMIT + 1,
            "ss showed {kernel} established sockets"
        );
    }
    assert!(evicted >= 1.0, "newcomers were admitted by evicting");
    // Every newcomer either took an evicted connection's place or was refused.
    assert!(
        evicted + refused >= NEWCOMERS as f64,
        "{NEWCOMERS} newcomers: {evicted} evicted, {refused} refused"
    );
    // The first half-sent heads were the longest idle: they went first, at once.
    for mut s in held.drain(..4) {
        assert!(closed_by_server(&mut s, Duration::from_millis(500)).await);
    }
    // Once the attack stops, what is left closes at header_read_timeout.
    assert!(eventually(WAIT, || async { tether.shared.downstream().open() == 0 }).await);
}

/// An evicted connection holding a half-sent head is closed at once, not left to
/// finish its head: the newcomer that evicted it is served meanwhile.
#[tokio::test]
async fn an_evicted_half_sent_head_closes_at_once() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| {
        cfg.proxy.max_client_connections = 1;
        cfg.proxy.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let route = tether.route_addrs[0];
    let mut victim = TcpStream::connect(route).await.unwrap();
    victim.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    assert!(eventually(WAIT, || async { tether.shared.downstream().open() == 1 }).await);
    assert_eq!(route_get(route, "/").await.status, 200);
    assert!(closed_by_server(&mut victim, Duration::from_secs(1)).await);
    assert_eq!(downstream_closed(&tether, "evicted"), 1.0);
}

/// A half-sent head does not hold up shutdown until `drain_timeout`: asked to close,
/// a connection with no request in flight goes at once.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_half_sent_head() {
    let origin = Origin::start().await;
    let tether = routed(&origin, |cfg| {
        cfg.proxy.header_read_timeout = Duration::from_secs(60);
        cfg.proxy.drain_timeout = Duration::from_secs(60);
    })
    .await;
    let route = tether.route_addrs[0];
    let mut client = TcpStream::connect(route).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(eventually(WAIT, || async { tether.shared.downstream().open() == 1 }).await);
    let cut = tokio::time::timeout(WAIT, tether.shutdown())
        .await
        .expect("shutdown does not wait for the head");
    assert_eq!(cut, 0, "the connection closed by itself, it was not cut");
    assert!(closed_by_server(&mut client, Duration::from_secs(1)).await);
}
