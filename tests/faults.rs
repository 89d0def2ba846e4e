//! Upstream faults and timeouts: each gives the client a clear status, the broken
//! connection leaves the pool, gauges return to the truth and the next request
//! succeeds. Bad input: 4xx, no panic, no upstream socket.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::*;
use tether::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a raw origin misbehaves on its first connection; later ones answer `200 ok`.
#[derive(Clone, Copy)]
enum Fault {
    /// Read the request, then reset the connection.
    ResetBeforeResponse,
    /// Promise 100,000 bytes, send 1,000, then reset.
    ResetMidBody,
    /// Answer with bytes that are not HTTP.
    Malformed,
    /// Accept and never answer (a stuck TLS handshake, for a TLS upstream).
    Silent,
}

struct RawOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

async fn raw_origin(fault: Fault) -> RawOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let n = a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                if n == 0 && matches!(fault, Fault::Silent) {
                    // Swallow whatever arrives (a TLS ClientHello), answer nothing.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                while let Ok(read) = s.read(&mut buf).await {
                    if read == 0 {
                        break;
                    }
                    let reply: &[u8] = match (n, fault) {
                        (0, Fault::ResetBeforeResponse) => {
                            #[allow(deprecated)] // SO_LINGER 0: the point is a reset
                            s.set_linger(Some(Duration::ZERO)).unwrap();
                            break;
                        }
                        (0, Fault::ResetMidBody) => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                                .await;
                            let _ = s.write_all(&[b'x'; 1000]).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            #[allow(deprecated)] // SO_LINGER 0: the point is a reset
                            s.set_linger(Some(Duration::ZERO)).unwrap();
                            break;
                        }
                        (0, Fault::Malformed) => b"this is not http\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(reply).await.is_err() {
                        break;
                    }
                }
                drop(s);
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    RawOrigin {
        addr,
        accepted,
        open,
    }
}

fn raw_config(origin: &RawOrigin, f: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = config(&[]);
    cfg.upstream.push(tether::config::UpstreamConfig::new(
        "up",
        origin.addr.to_string(),
    ));
    route(&mut cfg, "up");
    f(&mut cfg);
    cfg
}

async fn pool_is_empty(tether: &tether::Running, origin: &RawOrigin) {
    assert!(
        eventually(WAIT, || async {
            upstream_gauge(&tether.metrics(), "up") == origin.open.load(Ordering::SeqCst) as f64
                && tether.pool_counts("up").unwrap().open() == origin.open.load(Ordering::SeqCst)
        })
        .await,
        "gauge {} vs origin {}",
        upstream_gauge(&tether.metrics(), "up"),
        origin.open.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn connection_refused_is_502_upstream_connect() {
    let (addr, _reserved) = tether::testkit::refusing_addr();
    let mut cfg = config(&[]);
    cfg.upstream
        .push(tether::config::UpstreamConfig::new("up", addr.to_string()));
    route(&mut cfg, "up");
    let tether = start(cfg).await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.tether_error(), Some("upstream_connect"));
    assert_eq!(tether.pool_counts("up").unwrap().open(), 0);
    assert_eq!(upstream_gauge(&tether.metrics(), "up"), 0.0);
}

#[tokio::test]
async fn a_stuck_tls_handshake_is_504_upstream_connect_timeout() {
    let origin = raw_origin(Fault::Silent).await;
    let tether = start(raw_config(&origin, |c| {
        let up = &mut c.upstream[0];
        up.tls = true;
        up.sni = Some("localhost".into());
        up.connect_timeout = Some(Duration::from_millis(300));
    }))
    .await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.tether_error(), Some("upstream_connect_timeout"));
    pool_is_empty(&tether, &origin).await;
}

#[tokio::test]
async fn no_response_head_within_response_header_timeout_is_504() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.response_header_timeout = Duration::from_millis(200);
    let tether = start(cfg).await;
    let reply = route_get(tether.route_addrs[0], "/delay/2000").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.tether_error(), Some("upstream_timeout"));
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(
        route_get(tether.route_addrs[0], "/").await.status,
        200,
        "the next request succeeds"
    );
}

#[tokio::test]
async fn the_whole_exchange_is_bounded_by_request_timeout() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    cfg.pool.request_timeout = Duration::from_millis(300);
    let tether = start(cfg).await;
    // Head within the limit, body never finishes: the response is cut, not completed.
    assert_body_is_cut(tether.route_addrs[0], "/gated/1000000").await;
    assert_sockets(&tether, &origin, "up", 0).await;
    // Head too slow for the whole-exchange limit.
    let reply = route_get(tether.route_addrs[0], "/delay/1000").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.tether_error(), Some("request_timeout"));
}

#[tokio::test]
async fn a_reset_before_the_response_is_502_and_the_next_request_succeeds() {
    let origin = raw_origin(Fault::ResetBeforeResponse).await;
    let tether = start(raw_config(&origin, |_| {})).await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.tether_error(), Some("upstream_error"));
    pool_is_empty(&tether, &origin).await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    assert_eq!(origin.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_reset_mid_body_aborts_the_client_response() {
    let origin = raw_origin(Fault::ResetMidBody).await;
    let tether = start(raw_config(&origin, |_| {})).await;
    assert_body_is_cut(tether.route_addrs[0], "/").await;
    pool_is_empty(&tether, &origin).await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let closed = metric(
        &tether.metrics(),
        "tether_upstream_connections_closed_total",
        &[("upstream", "up"), ("reason", "error")],
    );
    assert_eq!(closed, Some(1.0));
}

#[tokio::test]
async fn a_malformed_response_is_502() {
    let origin = raw_origin(Fault::Malformed).await;
    let tether = start(raw_config(&origin, |_| {})).await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 502);
    pool_is_empty(&tether, &origin).await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
}

/// Sends raw bytes on a new connection and returns the response head that came
/// back (or everything until the server closed).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn bad_input_gets_4xx_without_an_upstream_socket() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    let tether = start(cfg).await;
    let forward = tether.proxy_addr;
    let host = origin.authority();
    let cases: Vec<(SocketAddr, String, &str)> = vec![
        (forward, "GARBAGE\r\n\r\n".into(), "400"),
        (forward, "GET  HTTP/1.1\r\n\r\n".into(), "400"),
        (
            forward,
            format!("GET http://{host}:99999/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "400",
        ),
        (
            forward,
            format!("GET http://u:p@{host}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "400",
        ),
        (
            forward,
            format!("GET ftp://{host}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "400",
        ),
        (
            forward,
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "403",
        ),
        (
            forward,
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "403",
        ),
        (
            tether.route_addrs[0],
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
                .into(),
            "400",
        ),
    ];
    for (addr, request, status) in cases {
        let reply = raw_exchange(addr, request.as_bytes()).await;
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} -> {reply:?}"
        );
    }
    assert_eq!(origin.accepted(), 0, "no bad request reached the upstream");
}

#[tokio::test]
async fn a_request_framed_two_ways_cannot_smuggle_a_second_request() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    route(&mut cfg, "up");
    let tether = start(cfg).await;
    // Content-Length says the body is "0\r\n\r\nGET /smuggled..." up to 60 bytes;
    // chunked framing says the body is empty and a second request follows.
    let smuggle = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n\
                   0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = TcpStream::connect(tether.route_addrs[0]).await.unwrap();
    s.write_all(smuggle.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("connection: close"),
        "the client connection is closed after: {out}"
    );
    assert!(
        !out.contains("content-length: 60"),
        "the upstream never saw the conflicting length: {out}"
    );
    assert_eq!(
        origin.requests(),
        1,
        "exactly one request reached the upstream"
    );
}

/// `GET path` on `addr` answers `200`, and then its body fails: a cut response must
/// never look like a complete (truncated) one.
async fn assert_body_is_cut(addr: SocketAddr, path: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.into_body().collect().await.is_err(),
        "the body must fail, not end early"
    );
}
