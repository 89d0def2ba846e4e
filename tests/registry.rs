//! The registry path: a Dragonfly-style client pointed only at tether's two route
//! listeners (registry and auth) preheats images from a fake TLS registry and token
//! server. The realm is rewritten to the auth route, so the token fetch is governed
//! too: both servers see only tether's pooled sockets, within each cap, reaped to zero.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tether::config::{Config, RouteConfig, UpstreamConfig};
use tether::testkit::registry::{
    fetch_blob, registry_flow, FakeRegistry, Preheat, RegistryOptions,
};
use tether::testkit::tls::{TestCa, ALPN_H2_HTTP1, ALPN_HTTP1};
use tether::Running;

const REGISTRY_CAP: usize = 4;
const AUTH_CAP: usize = 2;
const REPOSITORY: &str = "library/alpine";

/// A fake registry pair and a tether fronting it with one route each.
struct Setup {
    fake: FakeRegistry,
    tether: Running,
    _ca_file: Option<tempfile::TempPath>,
}

impl Setup {
    /// `alpn`: serve TLS offering these protocols; `None`: plain HTTP.
    async fn start(alpn: Option<&[&[u8]]>) -> Setup {
        let ca = TestCa::new("tether registry test CA");
        let ca_file = alpn.map(|_| ca.pem_file().expect("write the CA PEM"));
        let tls = alpn.map(|alpn| ca.server(&["127.0.0.1"]).server_config(alpn));
        let fake = FakeRegistry::start(RegistryOptions {
            tls,
            ..RegistryOptions::default()
        })
        .await;

        let mut cfg = Config::default();
        cfg.proxy.listen = "127.0.0.1:0".parse().unwrap();
        cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
        // Leaked client connections are closed by tether, not by the client.
        cfg.proxy.client_idle_timeout = Duration::from_millis(500);
        cfg.pool.idle_timeout = Duration::from_millis(400);
        cfg.pool.reap_interval = Duration::from_millis(50);
        for (name, server, cap) in [
            ("registry", &fake.registry, REGISTRY_CAP),
            ("auth", &fake.auth, AUTH_CAP),
        ] {
            let mut up = UpstreamConfig::new(name, server.authority());
            up.tls = ca_file.is_some();
            up.ca_file = ca_file.as_ref().map(|p| p.to_path_buf());
            up.rewrite_realm = true;
            up.max_connections = Some(cap);
            cfg.upstream.push(up);
            cfg.route.push(RouteConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                upstream: name.into(),
            });
        }
        let tether = start(cfg).await;
        Setup {
            fake,
            tether,
            _ca_file: ca_file,
        }
    }

    fn registry_route(&self) -> SocketAddr {
        self.tether.route_addrs[0]
    }

    fn auth_route(&self) -> SocketAddr {
        self.tether.route_addrs[1]
    }

    fn registry_base(&self) -> String {
        format!("http://{}", self.registry_route())
    }

    /// `workers` clients run `each` preheats apiece, all at once. Returns the
    /// preheats and the clients (still holding every connection they opened).
    async fn preheats(&self, workers: usize, each: usize) -> (Vec<Preheat>, Vec<LeakyClient>) {
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let base = self.registry_base();
                tokio::spawn(async move {
                    let mut client = LeakyClient::new();
                    let mut done = Vec::new();
                    for _ in 0..each {
                        let preheat = registry_flow(&mut client, &base, REPOSITORY, "3.20")
                            .await
                            .unwrap_or_else(|e| panic!("preheat through tether: {e}"));
                        done.push(preheat);
                    }
                    (done, client)
                })
            })
            .collect();
        let mut preheats = Vec::new();
        let mut clients = Vec::new();
        for t in tasks {
            let (done, client) = t.await.expect("preheat task");
            preheats.extend(done);
            clients.push(client);
        }
        (preheats, clients)
    }

    /// Each preheat resolved the tag to the fake's index and both platform manifests,
    /// and saw the realm of tether's auth route.
    fn assert_complete(&self, preheats: &[Preheat]) {
        let image = &self.fake.image;
        let realm = format!("http://127.0.0.1:{}/token", self.auth_route().port());
        for p in preheats {
            assert_eq!(p.realm, realm, "the realm was rewritten to the auth route");
            assert!(p.challenge.contains(r#"service="registry""#));
            assert_eq!(p.digest, image.index.digest);
            let expected: Vec<&str> = image.manifests.iter().map(|m| m.digest.as_str()).collect();
            assert_eq!(p.manifests, expected);
            assert_eq!(p.layers.len(), 2);
            assert_eq!(p.requests, 5);
        }
    }

    /// The client only ever connected to tether's routes; every request either server
    /// saw came through tether.
    fn assert_only_through_tether(&self, clients: &[LeakyClient]) {
        let routes = [self.registry_route(), self.auth_route()];
        for addr in clients.iter().flat_map(|c| c.connected_to()) {
            assert!(
                routes.contains(addr),
                "the client connected to {addr} directly"
            );
        }
        assert_eq!(self.fake.registry.unproxied_requests(), 0);
        assert_eq!(self.fake.auth.unproxied_requests(), 0);
    }

    /// Both servers saw at most their cap, and everything is reaped to zero on both
    /// sides of tether, with gauges, pools, server counts and `ss` agreeing.
    async fn assert_capped_and_reaped(&self, clients: &[LeakyClient]) {
        let (registry, auth) = (&self.fake.registry, &self.fake.auth);
        eprintln!(
            "registry: {} requests, {} sockets accepted, peak {}; auth: {} requests, {} accepted, peak {}",
            registry.requests(),
            registry.accepted(),
            registry.peak(),
            auth.requests(),
            auth.accepted(),
            auth.peak(),
        );
        assert!(
            registry.peak() <= REGISTRY_CAP,
            "registry peak {}",
            registry.peak()
        );
        assert!(auth.peak() <= AUTH_CAP, "auth peak {}", auth.peak());
        assert_sockets(&self.tether, registry, "registry", 0).await;
        assert_sockets(&self.tether, auth, "auth", 0).await;
        assert!(
            eventually(WAIT, || async {
                clients.iter().map(LeakyClient::open).sum::<usize>() == 0
            })
            .await,
            "tether closed every leaked client connection"
        );
        let metrics = self.tether.metrics();
        for up in ["registry", "auth"] {
            let opened = metric(
                &metrics,
                "tether_upstream_connections_opened_total",
                &[("upstream", up)],
            );
            let reaped = metric(
                &metrics,
                "tether_upstream_connections_closed_total",
                &[("upstream", up), ("reason", "idle_timeout")],
            );
            assert_eq!(opened, reaped, "{up}: every socket opened was reaped idle");
        }
    }
}

#[tokio::test]
async fn thirty_preheats_through_routes_stay_under_both_caps_and_are_reaped() {
    let setup = Setup::start(Some(ALPN_HTTP1)).await;
    let (preheats, clients) = setup.preheats(6, 5).await;
    assert_eq!(preheats.len(), 30);
    setup.assert_complete(&preheats);
    assert_eq!(
        clients.iter().map(LeakyClient::leaked).sum::<usize>(),
        150,
        "every request was a new client connection"
    );
    // Every token request arrived, all of them through tether's auth pool.
    assert_eq!(setup.fake.tokens_issued(), 30);
    assert_eq!(setup.fake.auth.requests(), 30);
    assert_eq!(setup.fake.registry.requests(), 120);
    setup.assert_only_through_tether(&clients);
    setup.assert_capped_and_reaped(&clients).await;
}

#[tokio::test]
async fn repository_challenges_keep_scope_and_error_when_the_realm_is_rewritten() {
    let setup = Setup::start(Some(ALPN_HTTP1)).await;
    let route = setup.registry_route();
    let realm = format!("http://127.0.0.1:{}/token", setup.auth_route().port());
    let path = format!("/v2/{REPOSITORY}/manifests/3.20");

    let reply = route_get(route, &path).await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.headers["www-authenticate"],
        format!(
            r#"Bearer realm="{realm}",service="registry",scope="repository:{REPOSITORY}:pull""#
        )
        .as_str()
    );

    let req = http::Request::get(&path)
        .header("host", route.to_string())
        .header("authorization", "Bearer forged")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = send(route, req).await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.headers["www-authenticate"],
        format!(
            r#"Bearer realm="{realm}",service="registry",scope="repository:{REPOSITORY}:pull",error="invalid_token""#
        )
        .as_str()
    );
    assert_eq!(setup.fake.registry.unproxied_requests(), 0);
}

#[tokio::test]
async fn a_blob_redirect_to_storage_is_rewritten_to_the_auth_route() {
    let setup = Setup::start(Some(ALPN_HTTP1)).await;
    let mut client = LeakyClient::new();
    let base = setup.registry_base();
    let preheat = registry_flow(&mut client, &base, REPOSITORY, "3.20")
        .await
        .expect("preheat");
    for layer in &preheat.layers {
        let blob = fetch_blob(&mut client, &base, REPOSITORY, layer, &preheat.token)
            .await
            .expect("blob through both routes");
        assert_eq!(
            blob.location.as_deref(),
            Some(
                format!(
                    "http://127.0.0.1:{}/blobs/{layer}?expires=300",
                    setup.auth_route().port()
                )
                .as_str()
            ),
            "the storage URL points at the auth route"
        );
    }
    setup.assert_only_through_tether(std::slice::from_ref(&client));
    setup.assert_capped_and_reaped(&[client]).await;
}

#[tokio::test]
async fn preheats_over_plain_http_upstreams_are_governed_the_same_way() {
    let setup = Setup::start(None).await;
    assert!(setup.fake.realm().starts_with("http://"));

    // Straight at the registry, every request leaks one socket on the server.
    let mut direct = LeakyClient::new();
    for _ in 0..3 {
        registry_flow(&mut direct, &setup.fake.registry_url(), REPOSITORY, "3.20")
            .await
            .expect("direct preheat");
    }
    assert_eq!(setup.fake.registry.accepted(), 12);
    assert_eq!(setup.fake.registry.open(), 12);
    assert_eq!(setup.fake.auth.unproxied_requests(), 3);
    drop(direct);
    assert!(eventually(WAIT, || async { setup.fake.registry.open() == 0 }).await);

    let before = (setup.fake.registry.accepted(), setup.fake.auth.accepted());
    let (preheats, clients) = setup.preheats(4, 5).await;
    setup.assert_complete(&preheats);
    let through = (
        setup.fake.registry.accepted() - before.0,
        setup.fake.auth.accepted() - before.1,
    );
    assert!(
        through.0 <= REGISTRY_CAP && through.1 <= AUTH_CAP,
        "{through:?}"
    );
    assert_eq!(
        setup.fake.auth.unproxied_requests(),
        3,
        "only the direct runs"
    );
    assert_sockets(&setup.tether, &setup.fake.registry, "registry", 0).await;
    assert_sockets(&setup.tether, &setup.fake.auth, "auth", 0).await;
    assert!(
        eventually(WAIT, || async {
            clients.iter().map(LeakyClient::open).sum::<usize>() == 0
        })
        .await
    );
}

#[tokio::test]
async fn thirty_preheats_over_h2_upstreams_stay_under_both_caps() {
    let setup = Setup::start(Some(ALPN_H2_HTTP1)).await;
    let (preheats, clients) = setup.preheats(6, 5).await;
    assert_eq!(preheats.len(), 30);
    setup.assert_complete(&preheats);
    assert_eq!(setup.fake.tokens_issued(), 30);
    let (registry, auth) = (&setup.fake.registry, &setup.fake.auth);
    assert_eq!(registry.h2_connections(), registry.accepted(), "all h2");
    assert_eq!(auth.h2_connections(), auth.accepted(), "all h2");
    setup.assert_only_through_tether(&clients);
    setup.assert_capped_and_reaped(&clients).await;
}
