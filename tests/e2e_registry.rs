//! The real CNCF distribution registry (Debian `docker-registry`) behind tether.
//!
//! The test writes the registry's config (a loopback port, filesystem storage in a
//! temporary directory, TLS from a CA made for the run, token auth whose realm is a
//! testkit token server signing ES256 JWTs with an `x5c` certificate from the same
//! CA), starts it as a child process, pushes a two-platform image through tether's
//! registry route by the upload API, then preheats it many times with a leaky client.
//! The registry is counted with `ss` from tether's side, the token server by its own
//! counts: both stay within their caps and are reaped to zero.
//!
//! Without the binary the test is skipped with a message, except in CI (`CI` set),
//! where `.ci/run` installs it and its absence is a failure.

mod support;

use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tether::config::{Config, Protocol, RouteConfig, UpstreamConfig};
use tether::testkit::registry::{
    push_image, registry_flow, serve_tokens, Image, JwtSigner, TokenKind, TokenOptions,
};
use tether::testkit::tls::{TestCa, ALPN_HTTP1};
use tether::Running;

const REGISTRY_CAP: usize = 4;
const AUTH_CAP: usize = 2;
const SERVICE: &str = "tether-e2e";
const ISSUER: &str = "tether-testkit";
const REPOSITORY: &str = "tether/e2e";
const TAG: &str = "v1";
/// How long the registry may take to start listening.
const STARTUP: Duration = Duration::from_secs(20);

/// The registry binary, or `None` when the test should be skipped.
fn registry_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("docker-registry"))
        .find(|p| p.is_file());
    if found.is_none() {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
        assert!(
            !in_ci,
            "CI is set but docker-registry is not installed (.ci/run installs the Debian package)"
        );
        eprintln!(
            "SKIPPED: docker-registry is not installed; `apt-get install docker-registry` to run this test"
        );
    }
    found
}

/// A running `docker-registry serve`, killed when dropped.
struct RegistryProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl RegistryProcess {
    /// Writes the config into `dir` and starts the registry on a free loopback port.
    fn spawn(bin: &Path, dir: &Path, ca: &TestCa, realm: &str) -> RegistryProcess {
        // Bind then release: the registry takes the port a moment later.
        let addr = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write registry file");
            path
        };
        let identity = ca.server(&["127.0.0.1"]);
        let cert = write("registry.crt", &identity.cert_pem());
        let key = write("registry.key", &identity.key_pem());
        let bundle = write("token-ca.pem", &ca.pem());
        let storage = dir.join("storage");
        std::fs::create_dir(&storage).expect("storage dir");
        let config = write(
            "config.yml",
            &format!(
                "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: tether-e2e-secret
  tls:
    certificate: {cert}
    key: {key}
auth:
  token:
    realm: {realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {bundle}
",
                storage = storage.display(),
                cert = cert.display(),
                key = key.display(),
                bundle = bundle.display(),
            ),
        );
        let log = dir.join("registry.log");
        let out = File::create(&log).expect("registry log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            // REGISTRY_* variables would override the config.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start docker-registry");
        RegistryProcess { child, addr, log }
    }

    /// Waits until the registry accepts connections, failing at once if it exited.
    async fn ready(&mut self) {
        let addr = self.addr;
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the registry") {
                panic!("docker-registry exited ({status}):\n{}", self.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "docker-registry did not listen on {addr} within {STARTUP:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The most established sockets `ss` saw to `port` while sampling.
struct SsSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SsSampler {
    fn start(port: u16) -> SsSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let task = tokio::task::spawn_blocking(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(n) = ss_established_to(port) {
                    p.fetch_max(n, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        SsSampler { stop, peak, task }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler");
        self.peak.load(Ordering::SeqCst)
    }
}

async fn start_tether(
    registry: SocketAddr,
    auth: SocketAddr,
    ca_file: &Path,
    protocol: Protocol,
) -> Running {
    let mut cfg = Config::default();
    cfg.proxy.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.proxy.client_idle_timeout = Duration::from_millis(500);
    cfg.pool.idle_timeout = Duration::from_millis(500);
    cfg.pool.reap_interval = Duration::from_millis(50);
    for (name, addr, cap) in [
        ("registry", registry, REGISTRY_CAP),
        ("auth", auth, AUTH_CAP),
    ] {
        let mut up = UpstreamConfig::new(name, addr.to_string());
        up.tls = true;
        up.ca_file = Some(ca_file.to_path_buf());
        up.protocol = protocol;
        up.max_connections = Some(cap);
        cfg.upstream.push(up);
        cfg.route.push(RouteConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: name.into(),
        });
    }
    start(cfg).await
}

/// Push once, preheat `workers × each` times, and check caps, reaping and gauges.
async fn push_and_preheat(protocol: Protocol) {
    let Some(bin) = registry_binary() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("tether e2e CA");
    let ca_file = ca.pem_file().expect("CA file");
    let signer = Arc::new(JwtSigner::new(
        &ca.signer("tether e2e token signer"),
        ISSUER,
    ));
    let token_server = serve_tokens(TokenOptions {
        tls: Some(ca.server(&["127.0.0.1"]).server_config(ALPN_HTTP1)),
        service: SERVICE.into(),
        kind: TokenKind::Jwt(signer.clone()),
        storage: Default::default(),
    })
    .await;
    let realm = format!("https://{}/token", token_server.addr);
    let mut registry = RegistryProcess::spawn(&bin, dir.path(), &ca, &realm);
    registry.ready().await;
    let tether = start_tether(registry.addr, token_server.addr, &ca_file, protocol).await;
    let base = format!("http://{}", tether.route_addrs[0]);
    let auth_route = tether.route_addrs[1];
    let sampler = SsSampler::start(registry.addr.port());

    let image = Image::sample("e2e");
    let mut pusher = LeakyClient::new();
    let pushed = push_image(&mut pusher, &base, REPOSITORY, TAG, &image)
        .await
        .unwrap_or_else(|e| panic!("push through tether: {e}\n{}", registry.log_text()));
    assert_eq!(
        pushed,
        2 + 2 * image.blobs.len() + image.manifests.len() + 1
    );

    let (workers, each) = (6, 5);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let mut client = LeakyClient::new();
                let mut done = Vec::new();
                for _ in 0..each {
                    done.push(registry_flow(&mut client, &base, REPOSITORY, TAG).await);
                }
                (done, client)
            })
        })
        .collect();
    let mut clients = vec![pusher];
    let expected: Vec<&str> = image.manifests.iter().map(|m| m.digest.as_str()).collect();
    for t in tasks {
        let (done, client) = t.await.expect("preheat task");
        for preheat in done {
            let preheat = preheat
                .unwrap_or_else(|e| panic!("preheat through tether: {e}\n{}", registry.log_text()));
            assert_eq!(
                preheat.realm,
                format!("http://127.0.0.1:{}/token", auth_route.port())
            );
            assert_eq!(preheat.digest, image.index.digest);
            assert_eq!(preheat.manifests, expected);
            assert_eq!(preheat.layers.len(), 2);
        }
        clients.push(client);
    }

    let routes = [tether.route_addrs[0], auth_route];
    assert!(clients
        .iter()
        .flat_map(|c| c.connected_to())
        .all(|a| routes.contains(a)));
    assert_eq!(
        signer.issued(),
        1 + workers * each,
        "every token was fetched"
    );
    assert_eq!(token_server.requests(), 1 + workers * each);
    assert_eq!(token_server.unproxied_requests(), 0, "all through tether");
    assert!(token_server.peak() <= AUTH_CAP);

    // Work stops: tether reaps both pools, and with them the leaked client sockets.
    let port = registry.addr.port();
    let reaped = eventually(WAIT, || async {
        upstream_gauge(&tether.metrics(), "registry") == 0.0
            && tether.pool_counts("registry").map(|c| c.open()) == Some(0)
            && ss_established_to(port).unwrap_or(0) == 0
    })
    .await;
    let ss_peak = sampler.finish().await;
    assert!(
        reaped,
        "registry sockets: gauge {}, ss {:?}",
        upstream_gauge(&tether.metrics(), "registry"),
        ss_established_to(port)
    );
    assert_sockets(&tether, &token_server, "auth", 0).await;
    assert!(
        eventually(WAIT, || async {
            clients.iter().map(LeakyClient::open).sum::<usize>() == 0
        })
        .await
    );
    let metrics = tether.metrics();
    let opened = |up| {
        metric(
            &metrics,
            "tether_upstream_connections_opened_total",
            &[("upstream", up)],
        )
        .unwrap_or(0.0)
    };
    eprintln!(
        "{protocol:?}: {} client connections; registry: {} sockets opened, ss peak {ss_peak}; auth: {} accepted, peak {}",
        clients.iter().map(LeakyClient::leaked).sum::<usize>(),
        opened("registry"),
        token_server.accepted(),
        token_server.peak(),
    );
    assert!(
        ss_peak <= REGISTRY_CAP,
        "ss saw {ss_peak} sockets to the registry"
    );
    // The cap bounds sockets open at once; a socket reaped mid-run may be replaced,
    // so the accepted total is not the invariant.
    assert!(
        token_server.peak() <= AUTH_CAP,
        "auth peak {}",
        token_server.peak()
    );
    if protocol == Protocol::Auto {
        // The registry (Go's net/http) offers h2: once the push has shown it, every
        // preheat's requests are streams on that one connection.
        assert_eq!(opened("registry"), 1.0, "one h2 connection to the registry");
    }
}

#[tokio::test]
async fn real_registry_push_and_preheats_over_http1_stay_capped_and_are_reaped() {
    push_and_preheat(Protocol::Http1).await;
}

#[tokio::test]
async fn real_registry_push_and_preheats_over_h2_stay_capped_and_are_reaped() {
    push_and_preheat(Protocol::Auto).await;
}
