//! The transparent listener over loopback, without iptables: what it does with a
//! connection that was not redirected to it. (Redirected traffic, in network
//! namespaces with real iptables rules, is in `e2e_transparent.rs`.)

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_connection_that_was_not_redirected_is_closed_and_counted_as_denied() {
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.transparent.enabled = true;
    cfg.transparent.listen = "127.0.0.1:0".parse().unwrap();
    cfg.transparent.allow_unlisted = true;
    let tether = start(cfg).await;
    let listen = tether
        .transparent_addr
        .expect("the transparent listener is bound");
    let mut client = TcpStream::connect(listen).await.unwrap();
    // Its "original destination" is the listener itself: relaying would loop.
    let _ = client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply).await;
    assert!(reply.is_empty(), "closed without a byte: {reply:?}");
    let closed = || {
        metric(
            &tether.metrics(),
            "tether_downstream_connections_closed_total",
            &[("reason", "denied")],
        )
    };
    assert!(eventually(WAIT, || async { closed() == Some(1.0) }).await);
    assert_eq!(origin.accepted(), 0);
    assert_eq!(tether.shared.downstream.open(), 0);
}

#[tokio::test]
async fn the_transparent_listener_is_not_bound_unless_enabled() {
    let origin = Origin::start().await;
    let tether = start(config(&[("up", &origin)])).await;
    assert_eq!(tether.transparent_addr, None);
}
