//! Transparent interception end to end, in network namespaces the test makes.
//!
//! Namespace A holds a leaky client that is configured with no proxy at all, and
//! tether — the real binary, as uid 65532 like the sidecar — whose own
//! `tether iptables apply` rules redirect A's outbound connections to ports 8080,
//! 8443 and 8081 to its transparent listener. Namespace B, across a veth pair, holds
//! a plain-HTTP origin (8080), a TLS origin (8443, listed by a host name that A's
//! `/etc/hosts` resolves) and an origin no upstream lists (8081), each counting its
//! sockets from its own side; `ss` in B counts them again.
//!
//! Needs root, iproute2, iptables and util-linux's setpriv. Skipped with a message
//! when they are missing, except in CI (`CI` set), where that is a failure.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use support::netns::{self, NsRuntime, Pair, TetherProcess, B_ADDR, B_ADDR6, TETHER_UID};
use support::*;
use tether::testkit::tls::{TestCa, ALPN_HTTP1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The plain-HTTP origin's port, and its upstream's name.
const PLAIN: u16 = 8080;
/// The TLS origin's port: tether relays it as tunnels, never terminating TLS.
const SECURE: u16 = 8443;
/// A port that is redirected but that no upstream lists.
const OTHER: u16 = 8081;
const CAP: usize = 4;
/// tether's listeners inside namespace A: fixed ports are safe in a namespace
/// nothing else uses.
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9901);

/// tether's config. With `ipv6` the transparent listener is dual-stack and a
/// third upstream, `plain6`, is the plain origin's IPv6 address. `allow_unlisted`
/// comes with `allow_private`: B's addresses are private-use and unique-local, which
/// only listed upstreams reach without it.
fn tether_config(allow_unlisted: bool, ipv6: bool) -> String {
    let listen = if ipv6 {
        "[::]:15001"
    } else {
        "127.0.0.1:15001"
    };
    let mut config = format!(
        r#"
[proxy]
listen = "127.0.0.1:3128"
client_idle_timeout = "1s"
[admin]
listen = "{ADMIN}"
[transparent]
enabled = true
listen = "{listen}"
ports = [{PLAIN}, {SECURE}, {OTHER}]
allow_unlisted = {allow_unlisted}
[egress]
allow_private = {allow_unlisted}
[pool]
max_connections = {CAP}
idle_timeout = "2s"
reap_interval = "100ms"
tunnel_idle_timeout = "3s"
min_idle_for_eviction = "50ms"
queue_timeout = "20s"
[[upstream]]
name = "plain"
origin = "{B_ADDR}:{PLAIN}"
[[upstream]]
name = "secure"
origin = "secure.test:{SECURE}"
"#
    );
    if ipv6 {
        config.push_str(&format!(
            "[[upstream]]\nname = \"plain6\"\norigin = \"[{B_ADDR6}]:{PLAIN}\"\n"
        ));
    }
    config
}

/// The namespaces, the origins in B, tether in A. Fields drop in order: tether and
/// the runtimes go before the namespaces they live in.
struct World {
    tether: TetherProcess,
    a: NsRuntime,
    _b: NsRuntime,
    plain: Origin,
    /// The plain origin's twin on B's IPv6 address (with `ipv6` only).
    plain6: Option<Origin>,
    secure: Origin,
    other: Origin,
    tls: TlsConnector,
    pair: Pair,
}

impl World {
    async fn start(allow_unlisted: bool) -> World {
        World::start_with(allow_unlisted, false).await
    }

    async fn start_with(allow_unlisted: bool, ipv6: bool) -> World {
        let pair = Pair::new(&[("secure.test", B_ADDR.into())]);
        let b = NsRuntime::enter(&pair.b);
        let a = NsRuntime::enter(&pair.a);
        let ca = TestCa::new("tether-e2e-transparent");
        let server_tls = ca
            .server(&["secure.test", &B_ADDR.to_string()])
            .server_config(ALPN_HTTP1);
        let origin = |ip: IpAddr, port: u16, tls| {
            b.run(Origin::start_with(OriginOptions {
                bind: Some((ip, port).into()),
                tls,
                ..Default::default()
            }))
        };
        let plain = origin(B_ADDR.into(), PLAIN, None).await;
        let plain6 = match ipv6 {
            true => Some(origin(B_ADDR6.into(), PLAIN, None).await),
            false => None,
        };
        let secure = origin(B_ADDR.into(), SECURE, Some(server_tls)).await;
        let other = origin(B_ADDR.into(), OTHER, None).await;
        let tether = TetherProcess::spawn(&pair.a, &tether_config(allow_unlisted, ipv6));
        let ready = eventually(WAIT, || async {
            tether.assert_running();
            a.run(try_get(ADMIN, "/readyz"))
                .await
                .is_some_and(|r| r.status == 200)
        })
        .await;
        assert!(ready, "tether did not become ready:\n{}", tether.log());
        let binary = tether.binary.to_str().unwrap().to_string();
        let config = tether.config.to_str().unwrap().to_string();
        let uid = TETHER_UID.to_string();
        let mut apply = vec!["iptables", "apply", "--config", &config, "--uid", &uid];
        if ipv6 {
            apply.push("--ipv6");
        }
        netns::run_in(&pair.a, &binary, &apply);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let mut client_tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        World {
            tether,
            a,
            _b: b,
            plain,
            plain6,
            secure,
            other,
            tls: TlsConnector::from(Arc::new(client_tls)),
            pair,
        }
    }

    async fn admin(&self, path: &'static str) -> Reply {
        self.a
            .run(try_get(ADMIN, path))
            .await
            .expect("tether's admin listener answers")
    }

    async fn metrics(&self) -> String {
        self.admin("/metrics").await.text()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Sockets open to `upstream` by tether's gauges: pooled plus tunnels.
    async fn gauge(&self, upstream: &str) -> f64 {
        let text = self.metrics().await;
        let tunnels: f64 = ["active", "idle"]
            .iter()
            .map(|s| {
                metric(
                    &text,
                    "tether_tunnels",
                    &[("upstream", upstream), ("state", s)],
                )
                .unwrap_or(0.0)
            })
            .sum();
        upstream_gauge(&text, upstream) + tunnels
    }

    /// tether's gauge, the origin's own count and `ss` in B agree on `origin`'s
    /// sockets; returns that count.
    async fn agreed(&self, upstream: &str, origin: &Origin, port: u16) -> Option<usize> {
        let open = origin.open();
        let gauge = self.gauge(upstream).await;
        let ss = netns::established_from(&self.pair.b, port);
        (gauge == open as f64 && ss == open).then_some(open)
    }

    /// `n` leaky jobs over TLS to the secure origin, one after another; each leaves
    /// its connection open.
    async fn tls_jobs(&self, n: usize) -> (Vec<u16>, Vec<http1::SendRequest<Empty<Bytes>>>) {
        let tls = self.tls.clone();
        self.a
            .run(async move {
                let mut statuses = Vec::new();
                let mut held = Vec::new();
                for _ in 0..n {
                    let (status, send) = tls_job(&tls).await;
                    statuses.push(status);
                    held.push(send);
                }
                (statuses, held)
            })
            .await
    }
}

/// `GET path` on a new connection, or `None` if nothing answers.
async fn try_get(addr: SocketAddr, path: &'static str) -> Option<Reply> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    Some(Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.ok()?.to_bytes(),
    })
}

/// One job of a client that speaks TLS to the origin itself, verifying its
/// certificate: a new connection, one request, and the connection kept forever.
async fn tls_job(tls: &TlsConnector) -> (u16, http1::SendRequest<Empty<Bytes>>) {
    let tcp = TcpStream::connect((B_ADDR, SECURE)).await.expect("connect");
    let name = ServerName::try_from("secure.test").unwrap();
    let stream = tls
        .connect(name, tcp)
        .await
        .expect("the origin's own certificate arrives through the interception");
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/bytes/1000")
        .header(http::header::HOST, format!("secure.test:{SECURE}"))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    resp.into_body().collect().await.expect("body");
    (status, send)
}

/// `n` leaky clients at once, each running `jobs` plain-HTTP jobs against `port` in
/// B; every job is a new connection that is never closed.
async fn plain_jobs(world: &World, port: u16, clients: usize, jobs: usize) -> Vec<LeakyClient> {
    plain_jobs_to(world, (B_ADDR, port).into(), clients, jobs).await
}

/// [`plain_jobs`] against any address.
async fn plain_jobs_to(
    world: &World,
    addr: SocketAddr,
    clients: usize,
    jobs: usize,
) -> Vec<LeakyClient> {
    world
        .a
        .run(async move {
            let host = addr.to_string();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..clients {
                let host = host.clone();
                tasks.spawn(async move {
                    let mut client = LeakyClient::new();
                    for _ in 0..jobs {
                        let job = client.job(addr, &host, "/delay/20").await.expect("job");
                        assert_eq!(job.status, 200, "{job:?}");
                    }
                    client
                });
            }
            tasks.join_all().await
        })
        .await
}

/// Packet counts of tether's nat rules in `ns`: one packet per connection, since the
/// nat table sees only a connection's first.
struct Counters {
    text: String,
}

impl Counters {
    fn read(ns: &str) -> Counters {
        Counters::read_with(ns, "iptables")
    }

    fn read_with(ns: &str, program: &str) -> Counters {
        let text = netns::run_in(
            ns,
            program,
            &[
                "-w",
                "-t",
                "nat",
                "-L",
                tether::iptables::CHAIN,
                "-v",
                "-n",
                "-x",
            ],
        );
        Counters { text }
    }

    fn packets(&self, rule: &str) -> u64 {
        self.text
            .lines()
            .find(|l| l.contains(rule))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no rule {rule:?} in\n{}", self.text))
    }

    fn redirected(&self, port: u16) -> u64 {
        self.packets(&format!("dpt:{port} redir ports 15001"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_configured_with_no_proxy_is_held_at_the_cap_and_reaped() {
    if !netns::can_run("a_client_configured_with_no_proxy_is_held_at_the_cap_and_reaped") {
        return;
    }
    let world = World::start(false).await;
    let held_plain = plain_jobs(&world, PLAIN, 8, 5).await;
    let (statuses, held_tls) = world.tls_jobs(20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // Plain HTTP was parsed and pooled: 40 requests on at most CAP sockets, every
    // one carrying tether's Via although the client knows no proxy.
    assert_eq!(world.plain.requests(), 40);
    assert_eq!(
        world.plain.listening().unproxied_requests(),
        0,
        "all went through tether"
    );
    assert!(
        world.plain.peak() <= CAP,
        "plain peak {}",
        world.plain.peak()
    );
    assert!(world.plain.accepted() <= CAP, "sockets were reused");
    // TLS was relayed untouched (the client verified the origin's certificate) as
    // governed tunnels: 20 leaked connections, never more than CAP upstream, the
    // idle ones evicted to make room.
    assert_eq!(world.secure.accepted(), 20);
    assert_eq!(world.secure.listening().tls_failures(), 0);
    assert!(
        world.secure.peak() <= CAP,
        "secure peak {}",
        world.secure.peak()
    );
    assert_eq!(
        world
            .metric(
                "tether_upstream_connections_closed_total",
                &[("upstream", "secure"), ("reason", "evicted")],
            )
            .await,
        (20 - CAP) as f64
    );

    eprintln!(
        "plain: {} requests on {} upstream sockets (peak {}); secure: {} tunnels, peak {}",
        world.plain.requests(),
        world.plain.accepted(),
        world.plain.peak(),
        world.secure.accepted(),
        world.secure.peak()
    );

    // Gauges scraped from tether equal what the upstreams count, and what ss in B
    // counts, while sockets are open.
    for (name, origin, port) in [
        ("plain", &world.plain, PLAIN),
        ("secure", &world.secure, SECURE),
    ] {
        let agreed = eventually(WAIT, || async {
            world
                .agreed(name, origin, port)
                .await
                .is_some_and(|n| n > 0)
        })
        .await;
        assert!(
            agreed,
            "{name}: gauge {} vs origin {} vs ss {}",
            world.gauge(name).await,
            origin.open(),
            netns::established_from(&world.pair.b, port)
        );
        let opened = world
            .metric(
                "tether_upstream_connections_opened_total",
                &[("upstream", name)],
            )
            .await;
        assert_eq!(
            opened,
            origin.accepted() as f64,
            "{name}: opened = accepted"
        );
    }

    // The work stops: every upstream socket is reaped, on both sides.
    let reaped = eventually(WAIT, || async {
        world.agreed("plain", &world.plain, PLAIN).await == Some(0)
            && world.agreed("secure", &world.secure, SECURE).await == Some(0)
    })
    .await;
    assert!(
        reaped,
        "sockets left: plain {}, secure {}",
        world.plain.open(),
        world.secure.open()
    );
    let pools: serde_json::Value =
        serde_json::from_slice(&world.admin("/debug/pools").await.body).unwrap();
    for name in ["plain", "secure"] {
        let pool = pools["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["upstream"] == name)
            .unwrap_or_else(|| panic!("no pool {name} in {pools}"));
        assert!(pool["closed"]["idle_timeout"].as_u64() > Some(0), "{pool}");
    }
    drop((held_plain, held_tls));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tethers_own_upstream_connections_are_never_redirected_back_into_it() {
    if !netns::can_run("tethers_own_upstream_connections_are_never_redirected_back_into_it") {
        return;
    }
    let world = World::start(false).await;
    let _plain = plain_jobs(&world, PLAIN, 1, 3).await;
    let (statuses, _tls) = world.tls_jobs(2).await;
    assert_eq!(statuses, [200, 200]);

    let counters = Counters::read(&world.pair.a);
    let upstream_sockets = world.plain.accepted() + world.secure.accepted();
    // Each client connection was redirected once...
    assert_eq!(counters.redirected(PLAIN), 3, "{}", counters.text);
    assert_eq!(counters.redirected(SECURE), 2, "{}", counters.text);
    // ...and each of tether's own connections to those same ports matched the
    // exclusion for its uid instead, and reached the origins.
    assert_eq!(
        counters.packets(&format!("owner UID match {TETHER_UID}")),
        upstream_sockets as u64,
        "{}",
        counters.text
    );
    assert_eq!(
        world
            .metric("tether_downstream_connections_opened_total", &[])
            .await,
        5.0,
        "tether accepted only the client's connections"
    );
    assert_eq!(
        world
            .metric(
                "tether_downstream_connections_closed_total",
                &[("reason", "denied")]
            )
            .await,
        0.0
    );
    assert_eq!(world.plain.listening().unproxied_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_connection_to_an_unlisted_destination_is_closed_unless_allowed() {
    if !netns::can_run(
        "a_redirected_connection_to_an_unlisted_destination_is_closed_unless_allowed",
    ) {
        return;
    }
    let world = World::start(false).await;
    let reply = world
        .a
        .run(async {
            let mut stream = TcpStream::connect((B_ADDR, OTHER)).await.expect("connect");
            let _ = stream
                .write_all(b"GET / HTTP/1.1\r\nHost: unlisted\r\n\r\n")
                .await;
            let mut reply = Vec::new();
            // Bounded: were the connection not intercepted, the origin would answer
            // and keep it open.
            let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut reply)).await;
            (read.is_ok(), reply)
        })
        .await;
    let (closed, reply) = reply;
    assert!(
        closed && reply.is_empty(),
        "closed without a byte: {reply:?}"
    );
    assert_eq!(world.other.accepted(), 0);
    let denied = || async {
        world
            .metric(
                "tether_downstream_connections_closed_total",
                &[("reason", "denied")],
            )
            .await
    };
    assert!(eventually(WAIT, || async { denied().await == 1.0 }).await);
    assert!(world.tether.log().contains("redirected connection closed"));

    // allow_unlisted, applied by a live reload: the same destination is now relayed,
    // pooled under the `unlisted` label.
    world.tether.reload(&tether_config(true, false));
    let reloaded = eventually(WAIT, || async {
        world
            .metric("tether_config_reloads_total", &[("result", "success")])
            .await
            == 1.0
    })
    .await;
    assert!(reloaded, "{}", world.tether.log());
    let _held = plain_jobs(&world, OTHER, 1, 2).await;
    assert_eq!(world.other.requests(), 2);
    assert_eq!(world.other.listening().unproxied_requests(), 0);
    assert_eq!(
        world
            .metric(
                "tether_upstream_requests_total",
                &[
                    ("upstream", "unlisted"),
                    ("code", "2xx"),
                    ("reused", "true")
                ],
            )
            .await,
        1.0,
        "the second request reused the pooled socket"
    );
    let pools: serde_json::Value =
        serde_json::from_slice(&world.admin("/debug/pools").await.body).unwrap();
    let unlisted = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["upstream"] == "unlisted")
        .unwrap_or_else(|| panic!("no unlisted pool in {pools}"));
    assert_eq!(unlisted["origin"], format!("{B_ADDR}:{OTHER}"));
    assert_eq!(denied().await, 1.0, "nothing more was denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_listener_intercepts_ipv6_and_ipv4_clients() {
    if !netns::can_run("a_dual_stack_listener_intercepts_ipv6_and_ipv4_clients") {
        return;
    }
    // ip6tables REDIRECT delivers to [::1]; IPv4 clients arrive v4-mapped on the
    // same socket and still have an IPv4 original destination.
    let world = World::start_with(false, true).await;
    let plain6 = world.plain6.clone().expect("the IPv6 origin");
    let _v6 = plain_jobs_to(&world, (B_ADDR6, PLAIN).into(), 2, 3).await;
    let _v4 = plain_jobs(&world, PLAIN, 2, 3).await;
    assert_eq!(plain6.requests(), 6);
    assert_eq!(plain6.listening().unproxied_requests(), 0);
    assert_eq!(world.plain.requests(), 6);
    assert_eq!(world.plain.listening().unproxied_requests(), 0);
    for (name, origin) in [("plain6", &plain6), ("plain", &world.plain)] {
        let requests = world
            .metric(
                "tether_upstream_connections_opened_total",
                &[("upstream", name)],
            )
            .await;
        assert_eq!(requests, origin.accepted() as f64, "{name}");
        assert!(origin.peak() <= CAP);
    }
    // Each leaky job was a new connection, redirected once by its own family's rules.
    for program in ["iptables", "ip6tables"] {
        let counters = Counters::read_with(&world.pair.a, program);
        assert_eq!(
            counters.redirected(PLAIN),
            6,
            "{program}: {}",
            counters.text
        );
    }
}
