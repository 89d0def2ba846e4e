//! Forward-proxy and route-listener behaviour over real loopback sockets.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn forward_proxied_get_reaches_the_upstream_with_rewritten_headers() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    let url = format!("http://{}/echo?q=1", origin.authority());
    let req = Request::get(&url)
        .header("host", origin.authority())
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("x-keep", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(tether.proxy_addr, req).await;
    assert_eq!(reply.status, 200);
    let echoed = reply.text();
    assert!(
        echoed.starts_with("GET /echo?q=1\n"),
        "origin-form upstream: {echoed}"
    );
    assert!(echoed.contains(&format!("host: {}", origin.authority())));
    assert!(echoed.contains("x-keep: kept"));
    assert!(echoed.contains("via: 1.1 tether"));
    for hop in ["proxy-connection", "proxy-authorization", "x-drop-me"] {
        assert!(
            !echoed.contains(hop),
            "{hop} must not be forwarded: {echoed}"
        );
    }
    assert_eq!(reply.headers.get("via").unwrap(), "1.1 tether");
}

#[tokio::test]
async fn forward_proxied_post_delivers_the_body() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    let payload = "x".repeat(100_000);
    let req = Request::post(format!("http://{}/echo", origin.authority()))
        .header("host", origin.authority())
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let reply = send(tether.proxy_addr, req).await;
    assert_eq!(reply.status, 200);
    let echoed = reply.text();
    assert!(echoed.starts_with("POST /echo\n"));
    assert!(echoed.contains("content-length: 100000"));
    assert!(echoed.ends_with(&payload), "body delivered intact");
}

#[tokio::test]
async fn route_listener_forwards_with_host_rewritten() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("registry", &origin)]);
    route(&mut cfg, "registry");
    let tether = start(cfg).await;
    let reply = route_get(tether.route_addrs[0], "/echo").await;
    assert_eq!(reply.status, 200);
    let echoed = reply.text();
    assert!(
        echoed.contains(&format!("host: {}", origin.authority())),
        "{echoed}"
    );
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn denied_origin_gets_403_and_no_upstream_connection() {
    let listed = Origin::start().await;
    let other = Origin::start().await;
    let tether = start(config(&[("web", &listed)])).await;
    let reply = proxy_get(tether.proxy_addr, &format!("http://{}/", other.authority())).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.tether_error(), Some("denied"));
    assert!(reply.text().contains("not allowed by the egress policy"));
    assert_eq!(other.accepted(), 0, "a denied origin sees no connection");
    assert_eq!(listed.accepted(), 0);
}

#[tokio::test]
async fn allow_pattern_admits_an_unlisted_origin_but_not_private_addresses_by_default() {
    // Loopback stands in for every special-purpose range (the classifier's unit
    // tests cover the rest on values alone): nothing here leaves 127.0.0.1.
    let listed = Origin::start().await;
    let unlisted = Origin::start().await;
    let mut cfg = config(&[("listed", &listed)]);
    // Both patterns admit both origins; only the listed one is trusted as written.
    cfg.egress.allow = vec!["127.0.0.1:*".into(), "localhost:*".into()];
    let by_address = format!("http://{}/", unlisted.authority());
    // A name is judged by the addresses it resolves to.
    let by_name = format!("http://localhost:{}/", unlisted.addr.port());
    let tether = start(cfg.clone()).await;
    for url in [&by_address, &by_name] {
        let reply = proxy_get(tether.proxy_addr, url).await;
        assert_eq!(reply.status, 403, "{url}: loopback needs allow_private");
        assert_eq!(reply.tether_error(), Some("denied"), "{url}");
        assert!(
            reply.text().contains("(loopback, RFC "),
            "{url}: the refusal names the range: {}",
            reply.text()
        );
    }
    let reply = proxy_get(tether.proxy_addr, &by_address).await;
    assert!(
        reply
            .text()
            .contains("127.0.0.1 is in 127.0.0.0/8 (loopback, RFC 1122)"),
        "{}",
        reply.text()
    );
    assert_eq!(unlisted.accepted(), 0, "a refused address is never dialled");
    let reply = proxy_get(
        tether.proxy_addr,
        &format!("http://{}/", listed.authority()),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "a listed upstream on loopback stays reachable"
    );
    assert_eq!(listed.accepted(), 1);

    cfg.egress.allow_private = true;
    let tether = start(cfg).await;
    for url in [&by_address, &by_name] {
        let reply = proxy_get(tether.proxy_addr, url).await;
        assert_eq!(reply.status, 200, "{url}");
    }
    assert_eq!(unlisted.accepted(), 2, "one socket per unlisted origin");
    assert_eq!(
        metric(
            &tether.metrics(),
            "tether_upstream_connections_opened_total",
            &[("upstream", "unlisted")]
        ),
        Some(2.0)
    );
}

/// A pool for an origin reached by an allow pattern is built under the rule in force;
/// a reload that turns `allow_private` off must not leave it dialling private
/// addresses.
#[tokio::test]
async fn a_reload_turning_allow_private_off_applies_to_origins_already_used() {
    let unlisted = Origin::start().await;
    let mut cfg = config(&[]);
    cfg.egress.allow = vec!["127.0.0.1:*".into()];
    cfg.egress.allow_private = true;
    let url = format!("http://{}/", unlisted.authority());
    let tether = start(cfg.clone()).await;
    assert_eq!(proxy_get(tether.proxy_addr, &url).await.status, 200);
    cfg.egress.allow_private = false;
    tether.reload(cfg).await.unwrap();
    let reply = proxy_get(tether.proxy_addr, &url).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.tether_error(), Some("denied"));
    // The pool built under the old rule drains: its idle socket closes.
    assert!(eventually(WAIT, || async { unlisted.open() == 0 }).await);
    assert_eq!(unlisted.accepted(), 1);
}

#[tokio::test]
async fn origin_form_request_on_the_forward_port_gets_400() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    let reply = route_get(tether.proxy_addr, "/").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.tether_error(), Some("bad_target"));
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn bad_targets_get_400_without_an_upstream_connection() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    for url in [
        format!("http://user:pw@{}/", origin.authority()),
        format!("https://{}/", origin.authority()),
        "ftp://127.0.0.1:21/".to_string(),
    ] {
        let req = Request::get(url.as_str())
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = send(tether.proxy_addr, req).await;
        assert_eq!(reply.status, 400, "{url}");
    }
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test]
async fn large_response_streams_before_the_upstream_finishes_sending() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    let stream = TcpStream::connect(tether.proxy_addr).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let size = 8 * 1024 * 1024;
    let req = Request::get(format!("http://{}/gated/{size}", origin.authority()))
        .header("host", origin.authority())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The origin holds back everything after its first 64 KiB until the gate opens:
    // a buffering proxy would never deliver this first frame.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!first.is_empty());
    origin.open_gate();
    let mut total = first.len();
    while let Some(frame) = body.frame().await {
        total += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(total, size);
}

#[tokio::test]
async fn streamed_256_mib_response_passes_intact() {
    let origin = Origin::start().await;
    let tether = start(config(&[("web", &origin)])).await;
    let stream = TcpStream::connect(tether.proxy_addr).await.unwrap();
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let size = 256 * 1024 * 1024;
    let req = Request::get(format!("http://{}/stream/{size}", origin.authority()))
        .header("host", origin.authority())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        total += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(total, size);
}
