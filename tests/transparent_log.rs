//! The transparent listener's refusal warnings are throttled. In a test binary of its
//! own: the log is captured with a thread-local subscriber, and tracing's per-callsite
//! interest is shared by every test thread of a process, so a concurrent test that
//! reaches the same log line first (with no subscriber) could hide it from this one.

mod support;

use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Any local process can reach the transparent listener without being redirected:
/// a flood of such connections is counted in full, but logged once per interval.
#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_connections_that_were_not_redirected_logs_one_warning() {
    let (logs, _guard) = Captured::install();
    let origin = Origin::start().await;
    let mut cfg = config(&[("up", &origin)]);
    cfg.transparent.enabled = true;
    cfg.transparent.listen = "127.0.0.1:0".parse().unwrap();
    let tether = start(cfg).await;
    let listen = tether.transparent_addr.unwrap();
    const FLOOD: usize = 50;
    for _ in 0..FLOOD {
        let mut client = TcpStream::connect(listen).await.unwrap();
        let mut reply = Vec::new();
        let _ = client.read_to_end(&mut reply).await;
    }
    let denied = || {
        metric(
            &tether.metrics(),
            "tether_downstream_connections_closed_total",
            &[("reason", "denied")],
        )
    };
    assert!(eventually(WAIT, || async { denied() == Some(FLOOD as f64) }).await);
    let text = String::from_utf8(logs.bytes()).unwrap();
    let warnings = text
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("did not redirect"))
        .count();
    assert_eq!(warnings, 1, "one warning for {FLOOD} connections:\n{text}");
}
