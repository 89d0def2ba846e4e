//! HTTP/2 upstreams: one connection carries many streams; more open only when every
//! open one is saturated, and never beyond the cap. The authority goes as
//! `:authority` alone, and a stream cut short frees its place.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tether::config::Protocol;
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A cleartext HTTP/2 (prior knowledge) origin allowing `max_streams` per
/// connection, where `answer` makes each response. It counts the sockets it
/// accepted and those still open.
async fn h2c_server<F, Fut>(
    max_streams: u32,
    answer: F,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
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
            let (o, answer) = (o.clone(), answer.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = answer(req);
                    async move { Ok::<_, Infallible>(response.await) }
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

fn text(body: &'static str) -> Response<Body> {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed())
}

/// An origin that answers `ok` after 200 ms.
async fn h2c_origin(max_streams: u32) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    h2c_server(max_streams, |_req| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        text("ok")
    })
    .await
}

/// tether with one route listener to upstream `h2`, HTTP/2 by prior knowledge to
/// `addr`, its pool tuned by `tune`.
async fn start_h2(
    addr: SocketAddr,
    tune: impl FnOnce(&mut tether::config::UpstreamConfig),
) -> tether::Running {
    let mut cfg = config(&[]);
    let mut up = tether::config::UpstreamConfig::new("h2", addr.to_string());
    up.protocol = Protocol::Http2;
    tune(&mut up);
    cfg.upstream.push(up);
    route(&mut cfg, "h2");
    start(cfg).await
}

/// The origin accepted one socket, and tether's pool holds it as one h2 connection.
async fn assert_one_h2_connection(tether: &tether::Running, accepted: &AtomicUsize, why: &str) {
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection {why}");
    let json: serde_json::Value =
        serde_json::from_slice(&admin(tether, "/debug/pools").await.body).unwrap();
    let connections = json["pools"][0]["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{json}");
    assert_eq!(connections[0]["protocol"], "h2");
}

#[tokio::test]
async fn a_hundred_concurrent_requests_share_one_h2_connection() {
    let (addr, accepted, open) = h2c_origin(100).await;
    let tether = start_h2(addr, |up| {
        up.max_connections = Some(8);
        up.idle_timeout = Some(Duration::from_millis(500));
        up.reap_interval = Some(Duration::from_millis(100));
    })
    .await;
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { route_get(route, "/").await }))
        .collect();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "ok");
    }
    assert_one_h2_connection(&tether, &accepted, "carried all 100 streams").await;
    // Gauges count the connection once, and it is reaped like any other.
    assert!(eventually(WAIT, || async { open.load(Ordering::SeqCst) == 0 }).await);
    assert_eq!(upstream_gauge(&tether.metrics(), "h2"), 0.0);
}

#[tokio::test]
async fn saturated_h2_connections_open_more_within_the_cap() {
    let (addr, accepted, _open) = h2c_origin(10).await;
    let tether = start_h2(addr, |up| {
        up.max_connections = Some(3);
        up.max_streams_per_connection = Some(10);
    })
    .await;
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

/// The authority an HTTP/2 request names, as the origin read it: its `Host` fields
/// and the URI's authority (hyper's server puts `:authority` there).
type Seen = Arc<std::sync::Mutex<Vec<(Vec<String>, Option<String>)>>>;

/// A cleartext HTTP/2 origin as strict as nginx: it answers 400 to a request that
/// carries a `Host` field beside `:authority` (nginx reads both as Host and refuses
/// the duplicate), and records what every request named.
async fn strict_h2c_origin() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    let (addr, _, _) = h2c_server(100, move |req| {
        let hosts: Vec<String> = req
            .headers()
            .get_all(http::header::HOST)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let authority = req.uri().authority().map(|a| a.to_string());
        let strict = hosts.is_empty() && authority.is_some();
        record.lock().unwrap().push((hosts, authority));
        let mut resp = text("ok");
        if !strict {
            *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        }
        async move { resp }
    })
    .await;
    (addr, seen)
}

/// RFC 9113 §8.3.1: a request forwarded over HTTP/2 carries its authority in
/// `:authority`, and a `Host` field beside it is what strict origins (nginx, so a
/// registry behind it) refuse. The `Host` tether chose is the authority, through a
/// route listener and as a forward proxy alike, and no `Host` field goes with it.
#[tokio::test]
async fn an_h2_upstream_gets_the_authority_as_a_pseudo_header_and_no_host_field() {
    let (addr, seen) = strict_h2c_origin().await;
    let tether = start_h2(addr, |_| {}).await;

    let routed = route_get(tether.route_addrs[0], "/v2/").await;
    assert_eq!((routed.status.as_u16(), routed.text()), (200, "ok".into()));
    let forwarded = proxy_get(tether.proxy_addr, &format!("http://{addr}/v2/")).await;
    assert_eq!(
        (forwarded.status.as_u16(), forwarded.text()),
        (200, "ok".into())
    );

    let authority = addr.to_string();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [(vec![], Some(authority.clone())), (vec![], Some(authority))],
        "each request's (Host fields, :authority) at the origin"
    );
}

/// A cleartext HTTP/2 origin whose `/endless` body never ends (flow control paces
/// it), whose `/stall` head never comes (it counts those requests), and whose other
/// paths answer `ok`; it counts its sockets.
async fn endless_h2c_origin() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let stalled = Arc::new(AtomicUsize::new(0));
    let count = stalled.clone();
    let (addr, accepted, _) = h2c_server(100, move |req| {
        let count = count.clone();
        async move {
            match req.uri().path() {
                "/stall" => {
                    count.fetch_add(1, Ordering::SeqCst);
                    std::future::pending().await
                }
                "/endless" => {
                    let chunks = futures_util::stream::repeat_with(|| {
                        Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
                    });
                    Response::new(StreamBody::new(chunks).boxed())
                }
                _ => text("ok"),
            }
        }
    })
    .await;
    (addr, accepted, stalled)
}

/// A client that leaves in the middle of a response body, or before its head came,
/// resets that one stream: its place on the shared connection is free again, and
/// the connection, which did nothing wrong, goes on carrying streams. (A stream cut short used to keep its
/// place for good, so leavers, such as a registry client cancelling a blob pull,
/// wedged a pool whose connections all filled with dead streams.)
#[tokio::test]
async fn a_client_leaving_mid_exchange_frees_its_stream_and_keeps_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, accepted, stalled) = endless_h2c_origin().await;
    let tether = start_h2(addr, |up| {
        up.max_connections = Some(1);
        up.max_streams_per_connection = Some(1);
        up.queue_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let route = tether.route_addrs[0];
    for _ in 0..3 {
        let mut leaver = tokio::net::TcpStream::connect(route).await.unwrap();
        leaver
            .write_all(format!("GET /endless HTTP/1.1\r\nHost: {route}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = vec![0; 64 * 1024];
        let mut read = 0;
        while read < 128 * 1024 {
            let n = leaver.read(&mut got).await.unwrap();
            assert!(n > 0, "the body streams");
            read += n;
        }
        drop(leaver);
        // The one stream there is is free again for the next request.
        let reply = route_get(route, "/ok").await;
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "ok".into()));
    }
    for n in 1..=3 {
        let mut leaver = tokio::net::TcpStream::connect(route).await.unwrap();
        leaver
            .write_all(format!("GET /stall HTTP/1.1\r\nHost: {route}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert!(eventually(WAIT, || async { stalled.load(Ordering::SeqCst) == n }).await);
        drop(leaver);
        let reply = route_get(route, "/ok").await;
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "ok".into()));
    }
    assert_one_h2_connection(&tether, &accepted, "throughout").await;
}
