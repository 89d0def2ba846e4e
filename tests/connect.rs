//! Governed CONNECT tunnels: policy, cap with idle-first eviction, idle reaping,
//! half-close and byte counting, over real loopback sockets.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::*;
use tether::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `GET path` over an open tunnel, as a client speaking to the origin itself would.
async fn get_over(
    stream: TcpStream,
    host: &str,
    path: &str,
) -> (u16, http1::SendRequest<Empty<Bytes>>) {
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    (status, send)
}

fn tunnel_config(origin: &Origin, f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = config(&[("up", origin)]);
    f(&mut cfg);
    cfg
}

fn tunnels_gauge(tether: &tether::Running) -> f64 {
    let text = tether.metrics();
    ["active", "idle"]
        .iter()
        .map(|s| {
            metric(&text, "tether_tunnels", &[("upstream", "up"), ("state", s)]).unwrap_or(0.0)
        })
        .sum()
}

#[tokio::test]
async fn an_allowed_connect_tunnels_end_to_end() {
    let origin = Origin::start().await;
    let tether = start(tunnel_config(&origin, |_| {})).await;
    let stream = tunnel(tether.proxy_addr, &origin.authority())
        .await
        .unwrap();
    let (status, _keep) = get_over(stream, &origin.authority(), "/bytes/1000").await;
    assert_eq!(status, 200);
    assert_eq!(origin.accepted(), 1);
    assert!(eventually(WAIT, || async { tunnels_gauge(&tether) == 1.0 }).await);
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(json["pools"][0]["connections"][0]["protocol"], "tunnel");
}

#[tokio::test]
async fn connect_to_a_denied_host_or_port_gets_403_without_an_upstream_socket() {
    let origin = Origin::start().await;
    let other = Origin::start().await;
    let tether = start(tunnel_config(&origin, |_| {})).await;
    let denied_host = tunnel(
        tether.proxy_addr,
        &format!("localhost:{}", origin.addr.port()),
    )
    .await
    .unwrap_err();
    assert!(denied_host.starts_with("HTTP/1.1 403"), "{denied_host}");
    let denied_port = tunnel(tether.proxy_addr, &other.authority())
        .await
        .unwrap_err();
    assert!(denied_port.starts_with("HTTP/1.1 403"), "{denied_port}");
    assert!(denied_port.contains("x-tether-error: denied"));
    let malformed = tunnel(tether.proxy_addr, "no-port").await.unwrap_err();
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    assert_eq!(origin.accepted() + other.accepted(), 0);
}

#[tokio::test]
async fn a_tunnel_through_an_allow_pattern_to_a_private_address_needs_allow_private() {
    // Loopback stands in for every special-purpose range: the check is the one
    // forwarded requests meet, on the addresses the name resolves to.
    let origin = Origin::start().await;
    let mut cfg = config(&[]);
    cfg.egress.allow = vec!["localhost:*".into()];
    let target = format!("localhost:{}", origin.addr.port());
    let tether = start(cfg.clone()).await;
    let refused = tunnel(tether.proxy_addr, &target).await.unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("x-tether-error: denied"), "{refused}");
    assert_eq!(origin.accepted(), 0, "a refused address is never dialled");

    cfg.egress.allow_private = true;
    let tether = start(cfg).await;
    let stream = tunnel(tether.proxy_addr, &target).await.unwrap();
    let (status, _keep) = get_over(stream, &target, "/").await;
    assert_eq!(status, 200);
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn fifty_leaky_tunnel_clients_are_held_at_the_cap_by_idle_first_eviction() {
    let origin = Origin::start().await;
    let tether = start(tunnel_config(&origin, |c| {
        c.pool.max_connections = 8;
        c.pool.min_idle_for_eviction = Duration::from_millis(50);
        c.pool.tunnel_idle_timeout = Duration::from_millis(1500);
    }))
    .await;
    let mut held = Vec::new();
    for _ in 0..50 {
        // Each job: a new tunnel, one request, then the tunnel is left open, idle.
        let stream = tunnel(tether.proxy_addr, &origin.authority())
            .await
            .expect("tunnel granted");
        let (status, send) = get_over(stream, &origin.authority(), "/").await;
        assert_eq!(status, 200);
        held.push(send);
        assert!(origin.open() <= 8, "{} upstream sockets", origin.open());
    }
    assert!(origin.peak() <= 8, "upstream peak {}", origin.peak());
    assert_eq!(origin.accepted(), 50);
    let evicted = metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "up"), ("reason", "evicted")],
    );
    assert_eq!(evicted, Some(42.0));
    // The gauge equals the upstream's own count.
    assert!(
        eventually(WAIT, || async {
            tunnels_gauge(&tether) == origin.open() as f64
        })
        .await
    );
    // Work stops: every tunnel is gone after tunnel_idle_timeout, on both sides.
    assert!(
        eventually(WAIT, || async {
            origin.open() == 0 && tunnels_gauge(&tether) == 0.0
        })
        .await
    );
    assert!(
        held.iter().all(|s| s.is_closed()),
        "client sides closed too"
    );
    let reaped = metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "up"), ("reason", "idle_timeout")],
    );
    assert_eq!(reaped, Some(8.0));
}

#[tokio::test]
async fn at_the_cap_with_no_idle_tunnel_a_connect_queues_then_times_out() {
    let origin = Origin::start().await;
    let tether = start(tunnel_config(&origin, |c| {
        c.pool.max_connections = 1;
        c.pool.queue_timeout = Duration::from_millis(300);
        c.pool.min_idle_for_eviction = Duration::from_secs(10);
    }))
    .await;
    let busy = tunnel(tether.proxy_addr, &origin.authority())
        .await
        .unwrap();
    let refused = tunnel(tether.proxy_addr, &origin.authority())
        .await
        .unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("x-tether-error: queue_timeout"));
    drop(busy);
    assert!(eventually(WAIT, || async { origin.open() == 0 }).await);
    assert!(
        tunnel(tether.proxy_addr, &origin.authority()).await.is_ok(),
        "the freed place is usable"
    );
}

/// A raw TCP origin that reads until the client half-closes, then answers with the
/// number of bytes it received and a 256 KiB tail.
async fn half_close_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("{}\n", got.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(&vec![b'z'; 256 * 1024]).await.unwrap();
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_client_that_shuts_down_writing_still_receives_the_response() {
    let (addr, _) = half_close_origin().await;
    let mut cfg = config(&[]);
    cfg.upstream
        .push(tether::config::UpstreamConfig::new("up", addr.to_string()));
    let tether = start(cfg).await;
    let mut stream = tunnel(tether.proxy_addr, &addr.to_string()).await.unwrap();
    stream.write_all(&[b'a'; 10_000]).await.unwrap();
    stream.shutdown().await.unwrap(); // half-close: no more bytes from the client
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"10000\n"));
    assert_eq!(reply.len(), 6 + 256 * 1024);
}

#[tokio::test]
async fn a_bulk_transfer_is_relayed_and_counted() {
    let origin = Origin::start().await;
    let tether = start(tunnel_config(&origin, |_| {})).await;
    let stream = tunnel(tether.proxy_addr, &origin.authority())
        .await
        .unwrap();
    let size = 256 * 1024 * 1024;
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(format!("/stream/{size}"))
                .header("host", "x")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        total += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(total, size);
    let down = metric(
        &tether.metrics(),
        "tether_tunnel_bytes_total",
        &[("upstream", "up"), ("direction", "downstream")],
    )
    .unwrap();
    assert!(down >= size as f64, "{down} bytes counted downstream");
    let up = metric(
        &tether.metrics(),
        "tether_tunnel_bytes_total",
        &[("upstream", "up"), ("direction", "upstream")],
    )
    .unwrap();
    assert!(up > 0.0);
}
