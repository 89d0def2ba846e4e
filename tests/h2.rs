//! HTTP/2 upstreams: one connection carries many streams; more open only when every
//! open one is saturated, and never beyond the cap.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tether::config::Protocol;
use tokio::net::TcpListener;

/// A cleartext HTTP/2 (prior knowledge) origin that answers after 200 ms and counts
/// its sockets.
async fn h2c_origin(max_streams: u32) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, open)
}

#[tokio::test]
async fn a_hundred_concurrent_requests_share_one_h2_connection() {
    let (addr, accepted, open) = h2c_origin(100).await;
    let mut cfg = config(&[]);
    let mut up = tether::config::UpstreamConfig::new("h2", addr.to_string());
    up.protocol = Protocol::Http2;
    up.max_connections = Some(8);
    up.idle_timeout = Some(Duration::from_millis(500));
    up.reap_interval = Some(Duration::from_millis(100));
    cfg.upstream.push(up);
    route(&mut cfg, "h2");
    let tether = start(cfg).await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { route_get(route, "/").await }))
        .collect();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one h2 connection carried all 100 streams"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/pools").await.body).unwrap();
    assert_eq!(json["pools"][0]["connections"][0]["protocol"], "h2");
    // Gauges count the connection once, and it is reaped like any other.
    assert!(eventually(WAIT, || async { open.load(Ordering::SeqCst) == 0 }).await);
    assert_eq!(upstream_gauge(&tether.metrics(), "h2"), 0.0);
}

#[tokio::test]
async fn saturated_h2_connections_open_more_within_the_cap() {
    let (addr, accepted, _open) = h2c_origin(10).await;
    let mut cfg = config(&[]);
    let mut up = tether::config::UpstreamConfig::new("h2", addr.to_string());
    up.protocol = Protocol::Http2;
    up.max_connections = Some(3);
    up.max_streams_per_connection = Some(10);
    cfg.upstream.push(up);
    route(&mut cfg, "h2");
    let tether = start(cfg).await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..60)
        .map(|_| tokio::spawn(async move { route_get(route, "/").await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&n),
        "60 requests, 10 streams each, cap 3: {n} connections"
    );
}
