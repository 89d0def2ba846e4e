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
    assert_eq!(tether.shared.downstream().open(), 0);
}

#[tokio::test]
async fn the_transparent_listener_is_not_bound_unless_enabled() {
    let origin = Origin::start().await;
    let tether = start(config(&[("up", &origin)])).await;
    assert_eq!(tether.transparent_addr, None);
}

#[test]
fn iptables_print_takes_the_ports_from_the_config_and_needs_a_uid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.toml");
    std::fs::write(
        &path,
        "[transparent]\nenabled = true\nlisten = \"127.0.0.1:15001\"\nports = [32402, 32612]\n",
    )
    .unwrap();
    let tether = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("iptables")
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let printed = tether(&["print", "--uid", "65532"]);
    assert!(printed.status.success());
    let text = String::from_utf8(printed.stdout).unwrap();
    let redirects: Vec<&str> = text.lines().filter(|l| l.contains("REDIRECT")).collect();
    assert_eq!(
        redirects,
        [
            "iptables -w -t nat -A TETHER_OUTPUT -p tcp --dport 32402 -j REDIRECT --to-ports 15001",
            "iptables -w -t nat -A TETHER_OUTPUT -p tcp --dport 32612 -j REDIRECT --to-ports 15001",
        ]
    );
    let exclusion = text
        .lines()
        .position(|l| l.contains("--uid-owner 65532 -j RETURN"));
    let first_redirect = text.lines().position(|l| l.contains("REDIRECT"));
    assert!(
        exclusion < first_redirect,
        "tether's own traffic is excluded first:\n{text}"
    );
    let overridden = tether(&[
        "print",
        "--uid",
        "1",
        "--port",
        "443",
        "--proxy-port",
        "9000",
    ]);
    let text = String::from_utf8(overridden.stdout).unwrap();
    assert!(text.contains("--dport 443 -j REDIRECT --to-ports 9000") && !text.contains("32402"));
    let no_uid = tether(&["print"]);
    assert_eq!(no_uid.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&no_uid.stderr).contains("--uid"));
}
