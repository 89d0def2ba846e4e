//! The admin listener's actions (fail readiness, restore it; drain is in
//! tests/lifecycle.rs, with the binary) and `/debug/config`, over real HTTP.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::netns::{self, NsRuntime, Pair, A_ADDR};
use support::*;

async fn call(addr: SocketAddr, method: Method, path: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(addr, req).await
}

#[tokio::test]
async fn fail_readiness_makes_readyz_fail_until_restored_and_takes_post_only() {
    let origin = Origin::start().await;
    let tether = start(config(&[("up", &origin)])).await;
    let admin = tether.admin_addr;
    assert_eq!(call(admin, Method::GET, "/readyz").await.status, 200);

    let get = call(admin, Method::GET, "/admin/fail-readiness").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers["allow"], "POST");
    assert_eq!(
        call(admin, Method::GET, "/readyz").await.status,
        200,
        "GET changed nothing"
    );

    assert_eq!(
        call(admin, Method::POST, "/admin/fail-readiness")
            .await
            .status,
        200
    );
    assert_eq!(call(admin, Method::GET, "/readyz").await.status, 503);
    // Not ready is not stopped: clients already pointed at tether are served.
    let reply = proxy_get(
        tether.proxy_addr,
        &format!("http://{}/", origin.authority()),
    )
    .await;
    assert_eq!(reply.status, 200);

    assert_eq!(
        call(admin, Method::POST, "/admin/restore-readiness")
            .await
            .status,
        200
    );
    assert_eq!(call(admin, Method::GET, "/readyz").await.status, 200);
}

#[tokio::test]
async fn debug_config_shows_the_configuration_in_force_read_only() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("registry", &origin)]);
    cfg.pool.max_connections = 7;
    cfg.upstream[0].max_connections = Some(5);
    let tether = start(cfg.clone()).await;
    let reply = call(tether.admin_addr, Method::GET, "/debug/config").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(json["pool"]["max_connections"], 7);
    assert_eq!(json["upstream"][0]["name"], "registry");
    assert_eq!(json["upstream"][0]["max_connections"], 5);
    assert_eq!(json["upstream"][0]["origin"], origin.authority());
    // Round trip: it is the whole configuration, not a summary.
    let back: tether::config::Config = serde_json::from_value(json).unwrap();
    assert_eq!(back, cfg);

    cfg.pool.max_connections = 9;
    tether.reload(cfg).await.unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&tether, "/debug/config").await.body).unwrap();
    assert_eq!(json["pool"]["max_connections"], 9, "after a reload");

    let post = call(tether.admin_addr, Method::POST, "/debug/config").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

/// A peer that is not loopback (another network namespace, over a veth pair) may
/// read, but not act: 403, and readiness unchanged.
#[test]
fn admin_actions_from_a_peer_off_the_host_are_refused() {
    if !netns::can_run("admin_actions_from_a_peer_off_the_host_are_refused") {
        return;
    }
    let pair = Pair::new(&[]);
    let (a, b) = (NsRuntime::enter(&pair.a), NsRuntime::enter(&pair.b));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        // tether runs inside namespace a until the test is done, then drains.
        let stopped = a.handle.spawn(async move {
            let mut cfg = tether::config::Config::default();
            cfg.proxy.listen = "127.0.0.1:0".parse().unwrap();
            cfg.admin.listen = "0.0.0.0:0".parse().unwrap();
            let running = tether::start(cfg).await.expect("tether starts");
            let _ = port_tx.send(running.admin_addr.port());
            let _ = finished.await;
            running.shutdown().await
        });
        let admin_addr = port_rx.await.expect("tether started in the namespace");
        let remote = SocketAddr::from((A_ADDR, admin_addr));
        let refused = b
            .run(async move { call(remote, Method::POST, "/admin/fail-readiness").await })
            .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
        let drain = b
            .run(async move { call(remote, Method::POST, "/admin/drain").await })
            .await;
        assert_eq!(drain.status, StatusCode::FORBIDDEN);
        let ready = b
            .run(async move { call(remote, Method::GET, "/readyz").await })
            .await;
        assert_eq!(ready.status, 200, "nothing changed");
        let local = SocketAddr::from(([127, 0, 0, 1], admin_addr));
        let accepted = a
            .run(async move { call(local, Method::POST, "/admin/fail-readiness").await })
            .await;
        assert_eq!(accepted.status, 200, "the same request from loopback");
        let ready = b
            .run(async move { call(remote, Method::GET, "/readyz").await })
            .await;
        assert_eq!(ready.status, 503);
        let _ = done.send(());
        assert_eq!(stopped.await.unwrap(), 0, "nothing was cut");
    });
}
