//! The `dns:` member source through the system resolver: the tether binary runs in
//! a network namespace of this test's own, whose resolv.conf (mounted by `ip netns
//! exec`) names a DNS server the test runs in the other namespace. The server's
//! records stand in for a headless Service's: as they change, so does the share.
//! The machine's own resolver configuration and /etc/hosts are never touched.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::netns::{self, NsRuntime, Pair, TetherProcess, A_ADDR, B_ADDR};
use support::{eventually, metric, WAIT};
use tether::testkit::dns::DnsServer;
use tokio::net::TcpStream;

/// The name the members are listed under (not under `.local`, which nsswitch
/// hands to mDNS on many machines).
const NAME: &str = "gateway.tether.test";
/// tether's admin listener in namespace A: a fixed port is safe in a namespace
/// nothing else uses.
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

fn peer(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 213, 0, n))
}

/// The text of `path` on tether's admin listener, if it answers.
async fn admin(path: &'static str) -> Option<String> {
    let stream = TcpStream::connect(ADMIN).await.ok()?;
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, ADMIN.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let body = send.send_request(req).await.ok()?.into_body();
    let bytes = body.collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The share tether reports for its one upstream, and the member count.
async fn share(a: &NsRuntime) -> Option<(u64, u64)> {
    let text = a.run(admin("/debug/pools")).await?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((
        v["pools"][0]["share"].as_u64()?,
        v["cluster"]["members"].as_u64()?,
    ))
}

#[tokio::test]
async fn the_dns_source_follows_the_records_the_system_resolver_returns() {
    if !netns::can_run("the_dns_source_follows_the_records_the_system_resolver_returns") {
        return;
    }
    let pair = Pair::new(&[]);
    pair.resolver(IpAddr::V4(B_ADDR));
    let b = NsRuntime::enter(&pair.b);
    let a = NsRuntime::enter(&pair.a);
    let dns = b
        .run(DnsServer::start(SocketAddr::new(IpAddr::V4(B_ADDR), 53)))
        .await;
    // Three members; this replica (10.213.0.1) sorts first: 6 over 3 is 2 each.
    dns.set(NAME, &[peer(4), IpAddr::V4(A_ADDR), peer(3)]);
    let tether = TetherProcess::spawn(
        &pair.a,
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:3128"
[admin]
listen = "{ADMIN}"
[cluster]
members = "dns:{NAME}"
self = "{A_ADDR}"
refresh = "100ms"
hold_off = "300ms"
[pool]
cluster_max_connections = 6
[[upstream]]
name = "registry"
origin = "{B_ADDR}:8080"
"#
        ),
    );
    let expect = |want: (u64, u64)| {
        let a = &a;
        async move {
            let ok = eventually(WAIT, || async { share(a).await == Some(want) }).await;
            (ok, share(a).await)
        }
    };
    let (ok, now) = expect((2, 3)).await;
    assert!(ok, "share, members: {now:?}\n{}", tether.log());
    assert!(
        dns.queries() >= 2,
        "tether asked the namespace's nameserver"
    );

    // One member's record goes: 6 over 2, after the hold-off.
    dns.set(NAME, &[peer(3), IpAddr::V4(A_ADDR)]);
    let (ok, now) = expect((3, 2)).await;
    assert!(ok, "share, members: {now:?}\n{}", tether.log());

    // A lower address joins and sorts first: 6 over 3 again, this replica second.
    dns.set(
        NAME,
        &[
            peer(3),
            IpAddr::V4(A_ADDR),
            IpAddr::V4(Ipv4Addr::new(10, 213, 0, 0)),
        ],
    );
    let (ok, now) = expect((2, 3)).await;
    assert!(ok, "share, members: {now:?}\n{}", tether.log());

    // The name stops resolving: the share in force stays, the failures are counted.
    dns.remove(NAME);
    let failing = eventually(WAIT, || async {
        let text = a.run(admin("/metrics")).await.unwrap_or_default();
        metric(&text, "tether_cluster_read_failures_total", &[]).unwrap_or(0.0) >= 2.0
    })
    .await;
    assert!(failing, "reads did not fail\n{}", tether.log());
    assert_eq!(share(&a).await, Some((2, 3)));
    tether.assert_running();
}
