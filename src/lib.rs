//! tether: a connection-governing egress proxy.
//!
//! A request travels: [`listener`] (accept, client timeouts and limits) →
//! [`proxy`] (classify, [`policy`], head rewriting) → [`upstream`] (governed pool:
//! cap, queue, reuse, connect, reaper) → back through [`body`] and [`rewrite`].
//! [`admin`] serves metrics and health; [`telemetry`] names every metric.

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod listener;
pub mod policy;
pub mod proxy;
pub mod rewrite;
pub mod telemetry;
pub mod testkit;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use listener::Downstream;
use policy::Policy;
use proxy::Mode;
use telemetry::Telemetry;
use upstream::Upstreams;

/// State shared by every connection of one running instance.
pub struct Shared {
    pub config: Arc<Config>,
    pub policy: Policy,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    pub downstream: Arc<Downstream>,
    /// `(upstream index, bound address)` of each route listener.
    pub route_addrs: Vec<(usize, SocketAddr)>,
    pub ready: AtomicBool,
}

/// Why tether could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Upstream(String),
}

/// A running tether instance.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Bound addresses of the `[[route]]` listeners, in config order.
    pub route_addrs: Vec<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: CancellationToken,
    connections: TaskTracker,
}

/// Binds every listener and starts serving. Listeners on port 0 get a free port;
/// the bound addresses are in the returned [`Running`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    config.validate()?;
    for up in config.upstream.iter().filter(|u| u.insecure_skip_verify) {
        tracing::warn!(upstream = %up.name, "insecure_skip_verify is set: the upstream's certificate is not verified");
    }
    let bind = |what: String, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let proxy_listener = bind("proxy.listen".into(), config.proxy.listen).await?;
    let admin_listener = bind("admin.listen".into(), config.admin.listen).await?;
    let mut route_listeners = Vec::new();
    for (i, route) in config.route.iter().enumerate() {
        let upstream = config
            .upstream
            .iter()
            .position(|u| u.name == route.upstream)
            .expect("validated: routes name known upstreams");
        route_listeners.push((
            upstream,
            bind(format!("route[{i}].listen"), route.listen).await?,
        ));
    }
    let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let proxy_addr = local(&proxy_listener);
    let admin_addr = local(&admin_listener);
    let route_addrs: Vec<SocketAddr> = route_listeners.iter().map(|(_, l)| local(l)).collect();

    let telemetry = Telemetry::new();
    let shared = Arc::new(Shared {
        policy: Policy::new(&config),
        upstreams: Upstreams::new(&config, telemetry.clone()).map_err(StartError::Upstream)?,
        downstream: Downstream::new(telemetry.clone()),
        telemetry,
        route_addrs: route_listeners
            .iter()
            .zip(&route_addrs)
            .map(|((u, _), a)| (*u, *a))
            .collect(),
        config: Arc::new(config),
        ready: AtomicBool::new(false),
    });

    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::spawn(listener::accept_loop(
        proxy_listener,
        shared.clone(),
        Mode::Forward,
        stop.clone(),
        connections.clone(),
    ));
    for (upstream, l) in route_listeners {
        tokio::spawn(listener::accept_loop(
            l,
            shared.clone(),
            Mode::Route(upstream),
            stop.clone(),
            connections.clone(),
        ));
    }
    tokio::spawn(admin::serve(
        admin_listener,
        shared.clone(),
        stop.child_token(),
    ));
    shared.ready.store(true, Ordering::Release);
    tracing::info!(%proxy_addr, %admin_addr, routes = ?route_addrs, "tether is ready");
    Ok(Running {
        proxy_addr,
        admin_addr,
        route_addrs,
        shared,
        stop,
        connections,
    })
}

impl Running {
    /// Graceful shutdown: not ready, stop accepting, close idle sockets at once, let
    /// in-flight requests finish within `drain_timeout`, then cut what remains.
    /// Returns how many client connections had to be cut.
    pub async fn shutdown(self) -> usize {
        self.shared.ready.store(false, Ordering::Release);
        self.stop.cancel();
        self.connections.close();
        for up in self.shared.upstreams.all() {
            up.pool.drain();
        }
        self.shared.downstream.close_idle();
        let drain = self.shared.config.proxy.drain_timeout;
        let cut = match tokio::time::timeout(drain, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.shared.downstream.open(),
        };
        if cut > 0 {
            tracing::warn!(
                cut,
                ?drain,
                "drain timeout: cutting client connections still in flight"
            );
        }
        // Give pooled sockets' drivers a moment to observe their handles dropping.
        tokio::time::sleep(Duration::from_millis(10)).await;
        cut
    }

    /// The Prometheus text of this instance.
    pub fn metrics(&self) -> String {
        self.shared.telemetry.render()
    }

    /// Counts of the listed upstream `name`'s pool.
    pub fn pool_counts(&self, name: &str) -> Option<upstream::PoolCounts> {
        self.shared
            .upstreams
            .listed
            .iter()
            .find(|u| &*u.name == name)
            .map(|u| u.pool.counts())
    }
}
