//! TLS origination over real loopback sockets: clients speak plain HTTP to a route
//! listener, tether speaks TLS to an origin whose certificate comes from a CA made for
//! the test. Pooled TLS sockets obey the same cap and reaping as plain ones, and every
//! failure to establish TLS is a 502 `upstream_tls` that leaves nothing open.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::RootCertStore;
use support::*;
use tether::config::{Config, Protocol, UpstreamConfig};
use tether::testkit::tls::{Identity, TestCa, ALPN_H2_HTTP1, ALPN_HTTP1};
use tokio::net::TcpListener;

/// A CA for one test, its PEM on disk for `ca_file`.
struct Pki {
    ca: TestCa,
    ca_file: tempfile::TempPath,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new("tether test CA");
        let ca_file = ca.pem_file().expect("write the CA PEM");
        Pki { ca, ca_file }
    }

    /// A TLS origin presenting a certificate for `names`, offering `alpn`.
    async fn origin(&self, names: &[&str], alpn: &[&[u8]]) -> Origin {
        self.origin_with(names, alpn, OriginOptions::default())
            .await
    }

    async fn origin_with(&self, names: &[&str], alpn: &[&[u8]], options: OriginOptions) -> Origin {
        Origin::start_with(OriginOptions {
            tls: Some(self.ca.server(names).server_config(alpn)),
            ..options
        })
        .await
    }
}

/// A TLS origin presenting `id`, HTTP/1.1 only.
async fn origin_presenting(id: &Identity) -> Origin {
    Origin::start_with(OriginOptions {
        tls: Some(id.server_config(ALPN_HTTP1)),
        ..Default::default()
    })
    .await
}

/// Stock WebPKI, even with `id`'s certificate as a trust anchor, refuses it as
/// `CaUsedAsEndEntity`: the certificate really carries `CA:TRUE`, so a test using it
/// exercises pinning and would fail if the generator stopped making CA certificates.
/// `at` is a time within the certificate's validity (WebPKI checks dates first).
fn assert_stock_webpki_refuses_as_ca(id: &Identity, at: UnixTime) {
    let mut roots = RootCertStore::empty();
    roots
        .add(id.chain[0].clone())
        .expect("a usable trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .expect("a verifier");
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let refused = webpki
        .verify_server_cert(&id.chain[0], &[], &name, &[], at)
        .expect_err("WebPKI refuses a CA certificate as an end entity");
    assert!(
        format!("{refused:?}").contains("CaUsedAsEndEntity"),
        "{refused:?}"
    );
}

/// One TLS upstream `up` behind a route, fast reaping; `f` adjusts the upstream.
fn tls_config(
    origin: &Origin,
    ca_file: Option<&Path>,
    f: impl FnOnce(&mut Config, &mut UpstreamConfig),
) -> Config {
    let mut cfg = config(&[("up", origin)]);
    route(&mut cfg, "up");
    cfg.pool.idle_timeout = Duration::from_millis(300);
    cfg.pool.reap_interval = Duration::from_millis(50);
    let mut up = cfg.upstream.remove(0);
    up.tls = true;
    up.ca_file = ca_file.map(Path::to_path_buf);
    f(&mut cfg, &mut up);
    cfg.upstream.push(up);
    cfg
}

fn counter(tether: &tether::Running, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&tether.metrics(), name, labels).unwrap_or(0.0)
}

/// Sends `n` requests at once to `path` on the first route and returns the replies.
async fn burst(tether: &tether::Running, n: usize, path: &'static str) -> Vec<Reply> {
    let route = tether.route_addrs[0];
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { route_get(route, path).await }))
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

/// Every reply is a 502 with `x-tether-error: code` whose body contains `reason`; then
/// nothing is left open on either side and the origin never saw a request.
async fn assert_refused(tether: &tether::Running, origin: &Origin, code: &str, reason: &str) {
    for reply in burst(tether, 5, "/").await {
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert_eq!(reply.tether_error(), Some(code));
        assert!(
            reply.text().contains(reason),
            "the body names the cause ({reason}): {}",
            reply.text()
        );
    }
    assert_eq!(origin.requests(), 0);
    assert!(origin.accepted() >= 1, "the TCP connection was made");
    assert_sockets(tether, origin, "up", 0).await;
    assert_eq!(
        counter(
            tether,
            "tether_upstream_connections_opened_total",
            &[("upstream", "up")]
        ),
        0.0,
        "a socket whose handshake failed never counts as opened"
    );
}

#[tokio::test]
async fn h1_over_tls_is_pooled_under_the_cap_and_reaped() {
    let pki = Pki::new();
    let origin = pki.origin(&["127.0.0.1"], ALPN_HTTP1).await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.max_connections = Some(4);
    }))
    .await;
    let replies = burst(&tether, 100, "/delay/20").await;
    assert!(replies.iter().all(|r| r.status == 200 && r.text() == "ok"));
    assert!(
        origin.peak() <= 4,
        "the origin saw {} TLS sockets at once",
        origin.peak()
    );
    assert!(origin.accepted() <= 4);
    assert_eq!(origin.requests(), 100);
    assert_eq!(origin.listening().tls_failures(), 0);
    assert_eq!(origin.listening().h2_connections(), 0);
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(
        counter(
            &tether,
            "tether_upstream_connections_closed_total",
            &[("upstream", "up"), ("reason", "idle_timeout")]
        ),
        origin.accepted() as f64
    );
}

#[tokio::test]
async fn a_pool_that_reopens_every_socket_at_once_resumes_every_tls_session() {
    let pki = Pki::new();
    let origin = pki.origin(&["127.0.0.1"], ALPN_HTTP1).await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.max_connections = Some(16);
        up.max_idle = Some(Some(16));
    }))
    .await;
    // 16 slow requests at once: 16 sockets, full handshakes (no session yet); the
    // origin (rustls) sends two tickets on each.
    let replies = burst(&tether, 16, "/delay/300").await;
    assert!(replies.iter().all(|r| r.status == 200));
    let first = origin.accepted();
    assert!(
        first > 8,
        "the burst opened {first} sockets, too few to need more than 8 tickets"
    );
    // The pool reaps them all (idle_timeout 300 ms) ...
    assert!(
        eventually(WAIT, || async { origin.open() == 0 }).await,
        "the pool reaped its idle sockets"
    );
    let resumed_before = origin.listening().tls_resumed();
    // ... and reopens as many at once: every one resumes a session.
    let replies = burst(&tether, 16, "/delay/300").await;
    assert!(replies.iter().all(|r| r.status == 200));
    let reopened = origin.accepted() - first;
    assert!(reopened > 8, "the second burst opened {reopened} sockets");
    assert_eq!(
        origin.listening().tls_resumed() - resumed_before,
        reopened,
        "every reopened socket resumed its TLS session"
    );
    assert_eq!(origin.listening().tls_failures(), 0);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_upstream_tls_and_nothing_leaks() {
    let pki = Pki::new();
    let origin = pki.origin(&["127.0.0.1"], ALPN_HTTP1).await;
    // No ca_file: the test CA is in neither the webpki nor the system roots.
    let tether = start(tls_config(&origin, None, |_, _| {})).await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "invalid certificate: UnknownIssuer: the certificate is not signed by a CA in \
         the system roots (no ca_file is set): set ca_file to the CA that signed it, or \
         to the server's own certificate if it is self-signed",
    )
    .await;
    assert_eq!(origin.listening().tls_failures(), origin.accepted());
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_502_upstream_tls() {
    let pki = Pki::new();
    let origin = pki.origin(&["registry.test"], ALPN_HTTP1).await;
    // Verified against the origin's address, which the certificate does not name.
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, _| {})).await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "NotValidForName: the certificate names DNS:registry.test, not 127.0.0.1 (the \
         host of origin): origin's host must be one of the names it has, or set sni to one \
         of them",
    )
    .await;
    tether.shutdown().await;

    // An `sni` override naming something else fails the same way.
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.sni = Some("other.test".into());
    }))
    .await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "NotValidForName: the certificate names DNS:registry.test, not other.test (sni): \
         set sni to one of the names it has",
    )
    .await;
}

#[tokio::test]
async fn sni_names_the_certificate_to_verify() {
    let pki = Pki::new();
    let origin = pki.origin(&["registry.test"], ALPN_HTTP1).await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.sni = Some("registry.test".into());
    }))
    .await;
    for _ in 0..3 {
        let reply = route_get(tether.route_addrs[0], "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(origin.accepted(), 1, "one TLS socket, reused");
}

#[tokio::test]
async fn a_self_signed_ca_certificate_in_ca_file_is_trusted_as_the_servers_own() {
    // What `openssl req -x509 ... -addext subjectAltName=DNS:registry.test` makes.
    let id = Identity::self_signed_ca(&["registry.test", "127.0.0.1"]);
    assert_stock_webpki_refuses_as_ca(&id, UnixTime::now());
    let ca_file = id.cert_pem_file().expect("write the certificate PEM");
    let origin = origin_presenting(&id).await;
    // Reached by its DNS name (the registry case) and by its IP SAN.
    for sni in [Some("registry.test"), None] {
        let tether = start(tls_config(&origin, Some(&ca_file), |_, up| {
            up.sni = sni.map(String::from);
        }))
        .await;
        for _ in 0..3 {
            let reply = route_get(tether.route_addrs[0], "/").await;
            assert_eq!(reply.status, 200, "sni {sni:?}: {}", reply.text());
        }
        tether.shutdown().await;
    }
    assert_eq!(origin.accepted(), 2, "one TLS socket per run, reused");
    assert_eq!(origin.requests(), 6);
    assert_eq!(origin.listening().tls_failures(), 0);
}

#[tokio::test]
async fn a_pinned_certificate_is_still_checked_against_the_name() {
    let id = Identity::self_signed_ca(&["registry.test"]);
    assert_stock_webpki_refuses_as_ca(&id, UnixTime::now());
    let ca_file = id.cert_pem_file().expect("write the certificate PEM");
    let origin = origin_presenting(&id).await;
    // Verified against the origin's address, which the certificate does not name.
    let tether = start(tls_config(&origin, Some(&ca_file), |_, _| {})).await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "NotValidForName: the certificate names DNS:registry.test, not 127.0.0.1 (the \
         host of origin): origin's host must be one of the names it has, or set sni to one \
         of them",
    )
    .await;
}

#[tokio::test]
async fn an_expired_pinned_certificate_is_refused_with_its_dates() {
    let id = Identity::self_signed_ca_valid(&["127.0.0.1"], (2000, 1, 1), (2020, 1, 1));
    // 2010-01-01, while it was valid.
    assert_stock_webpki_refuses_as_ca(
        &id,
        UnixTime::since_unix_epoch(Duration::from_secs(1_262_304_000)),
    );
    let ca_file = id.cert_pem_file().expect("write the certificate PEM");
    let origin = origin_presenting(&id).await;
    let tether = start(tls_config(&origin, Some(&ca_file), |_, _| {})).await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "invalid certificate: Expired: the certificate expired at 2020-01-01T00:00:00Z",
    )
    .await;
}

#[tokio::test]
async fn a_self_signed_ca_certificate_not_in_ca_file_is_refused_with_what_to_set() {
    let pinned = Identity::self_signed_ca(&["127.0.0.1"]);
    let presented = Identity::self_signed_ca(&["127.0.0.1"]);
    assert_stock_webpki_refuses_as_ca(&presented, UnixTime::now());
    let ca_file = pinned.cert_pem_file().expect("write the certificate PEM");
    let origin = origin_presenting(&presented).await;
    let tether = start(tls_config(&origin, Some(&ca_file), |_, _| {})).await;
    assert_refused(
        &tether,
        &origin,
        "upstream_tls",
        "invalid certificate: CaUsedAsEndEntity: the server presents a CA certificate \
         (basicConstraints CA:TRUE, as `openssl req -x509` makes by default) as its own, \
         and ca_file does not hold that exact certificate: if it is the server's \
         self-signed certificate, set ca_file to it",
    )
    .await;
}

#[tokio::test]
async fn forcing_http2_on_an_upstream_refusing_h2_is_a_502_upstream_protocol() {
    let pki = Pki::new();
    // ALPN offers http/1.1 only: the server ends the handshake with an alert.
    let origin = pki.origin(&["127.0.0.1"], ALPN_HTTP1).await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.protocol = Protocol::Http2;
    }))
    .await;
    assert_refused(
        &tether,
        &origin,
        "upstream_protocol",
        "accepts none of the protocols offered by ALPN (h2)",
    )
    .await;
}

#[tokio::test]
async fn forcing_http2_on_an_upstream_without_alpn_is_a_502_upstream_protocol() {
    let pki = Pki::new();
    // A server that predates ALPN completes the handshake without choosing a protocol.
    let origin = pki.origin(&["127.0.0.1"], &[]).await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.protocol = Protocol::Http2;
    }))
    .await;
    assert_refused(
        &tether,
        &origin,
        "upstream_protocol",
        "did not negotiate h2 by ALPN",
    )
    .await;
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate() {
    let pki = Pki::new();
    // Untrusted and naming another host: only skipping verification lets it through.
    let origin = pki.origin(&["elsewhere.test"], ALPN_HTTP1).await;
    let tether = start(tls_config(&origin, None, |_, up| {
        up.insecure_skip_verify = true;
    }))
    .await;
    for _ in 0..5 {
        let reply = route_get(tether.route_addrs[0], "/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(origin.accepted(), 1, "one TLS socket, reused");
    assert_sockets(&tether, &origin, "up", 0).await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_bounded_by_connect_timeout() {
    // Accepts TCP and never answers the ClientHello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let holder = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            holder.lock().push(socket);
        }
    });
    let mut cfg = Config::default();
    cfg.proxy.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    let mut up = UpstreamConfig::new("up", addr.to_string());
    up.tls = true;
    up.insecure_skip_verify = true;
    up.connect_timeout = Some(Duration::from_millis(300));
    cfg.upstream.push(up);
    route(&mut cfg, "up");
    let tether = start(cfg).await;
    let reply = route_get(tether.route_addrs[0], "/").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.tether_error(), Some("upstream_connect_timeout"));
    assert_eq!(held.lock().len(), 1, "TCP connected; the handshake stalled");
    assert!(
        eventually(WAIT, || async {
            upstream_gauge(&tether.metrics(), "up") == 0.0
                && tether.pool_counts("up").map(|c| c.open()) == Some(0)
                && ss_established_to(addr.port()).unwrap_or(0) == 0
        })
        .await,
        "the stalled socket was closed by tether"
    );
}

#[tokio::test]
async fn h2_upstream_carries_100_concurrent_requests_on_one_connection() {
    let pki = Pki::new();
    let origin = pki
        .origin_with(
            &["127.0.0.1"],
            ALPN_H2_HTTP1,
            OriginOptions {
                h2_max_concurrent_streams: Some(100),
                ..Default::default()
            },
        )
        .await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.max_connections = Some(4);
    }))
    .await;
    // The first request learns by ALPN that the upstream speaks h2.
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let replies = burst(&tether, 100, "/delay/300").await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "every stream got its answer"
    );
    assert_eq!(origin.accepted(), 1, "100 streams shared one socket");
    assert_eq!(origin.peak(), 1);
    assert_eq!(origin.listening().h2_connections(), 1);
    assert_eq!(origin.requests(), 101);
    assert_sockets(&tether, &origin, "up", 0).await;
    assert_eq!(
        counter(
            &tether,
            "tether_upstream_connections_opened_total",
            &[("upstream", "up")]
        ),
        1.0,
        "an h2 connection counts once"
    );
}

#[tokio::test]
async fn h2_opens_another_connection_only_when_streams_are_saturated() {
    let pki = Pki::new();
    let origin = pki
        .origin_with(
            &["127.0.0.1"],
            ALPN_H2_HTTP1,
            OriginOptions {
                h2_max_concurrent_streams: Some(10),
                ..Default::default()
            },
        )
        .await;
    let tether = start(tls_config(&origin, Some(&pki.ca_file), |_, up| {
        up.max_connections = Some(3);
        up.max_streams_per_connection = Some(10);
    }))
    .await;
    assert_eq!(route_get(tether.route_addrs[0], "/").await.status, 200);
    let replies = burst(&tether, 30, "/delay/300").await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(
        origin.accepted(),
        3,
        "30 streams at 10 per connection need 3 connections"
    );
    assert!(origin.peak() <= 3);
    assert_eq!(origin.listening().h2_connections(), 3);
    assert_sockets(&tether, &origin, "up", 0).await;
}
