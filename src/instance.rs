//! The composition root: start an instance (bind every listener, build the
//! upstreams, swap in the first table), reload its configuration in place, and
//! shut it down gracefully.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{self, Config};
use crate::policy::Policy;
use crate::route::Mode;
use crate::shared::{Shared, Table};
use crate::telemetry::{self, Telemetry};
use crate::upstream::{self, Upstream};
use crate::{admin, server};

/// Why tether could not start (or reload).
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

/// A route listener: identified across reloads by its configured address (and,
/// for port-0 addresses that tests use, its position among equal addresses).
type RouteKey = (SocketAddr, usize);

struct RouteListener {
    id: usize,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// A running tether instance.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Bound addresses of the `[[route]]` listeners, in config order at start.
    pub route_addrs: Vec<SocketAddr>,
    /// Bound address of the `[transparent]` listener, when enabled.
    pub transparent_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    routes: Mutex<HashMap<RouteKey, RouteListener>>,
    next_route: Mutex<usize>,
    reloads: [Counter; 2],
    stop: CancellationToken,
    /// The admin listener outlives the drain, so probes see `/readyz` turn 503.
    admin_stop: CancellationToken,
    connections: TaskTracker,
}

async fn bind(what: String, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn route_keys(config: &Config) -> Vec<RouteKey> {
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    config
        .route
        .iter()
        .map(|r| {
            let n = seen.entry(r.listen).or_default();
            *n += 1;
            (r.listen, *n - 1)
        })
        .collect()
}

/// The runtime an instance runs on, for `proxy.worker_threads` (0: one thread per
/// core the process may use, CPU quota included, or `TOKIO_WORKER_THREADS`, held
/// to the config's own [`MAX_WORKER_THREADS`](crate::config::MAX_WORKER_THREADS)).
///
/// One thread is tokio's current-thread scheduler: the thread that reads a request
/// also forwards it, drives the upstream socket and writes the response, with no
/// work-stealing queues, no wake-ups of idle workers and no hand-off between
/// threads. Under a sidecar's limit below two cores that is the default. Measured
/// against the multi-threaded scheduler with one worker (`benches/RESULTS.md`,
/// issue 21's ninth pass): 1.15× the 1 KiB requests per second at 0.91× the CPU.
pub fn runtime(worker_threads: usize) -> tokio::runtime::Builder {
    let threads = match worker_threads {
        0 => std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .map(|n| n.min(crate::config::MAX_WORKER_THREADS))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    };
    let mut runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(n);
            runtime
        }
    };
    runtime.enable_all();
    runtime
}

/// Binds every listener and starts serving. Listeners on port 0 get a free port;
/// the bound addresses are in the returned [`Running`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    config.validate()?;
    raise_fd_limit(&config);
    let proxy_listener = bind("proxy.listen".into(), config.proxy.listen).await?;
    let admin_listener = bind("admin.listen".into(), config.admin.listen).await?;
    let transparent_listener = match config.transparent.enabled {
        true => Some(bind("transparent.listen".into(), config.transparent.listen).await?),
        false => None,
    };
    let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let proxy_addr = local(&proxy_listener);
    let admin_addr = local(&admin_listener);
    let transparent_addr = transparent_listener.as_ref().map(local);

    let telemetry = Telemetry::new();
    let connections = TaskTracker::new();
    let shared = Arc::new(Shared::new(telemetry.clone(), connections.clone()));
    let admin_stop = CancellationToken::new();
    // The first read of the member list comes before the first pools, so none of
    // them opens a socket above its share.
    let cluster = Cluster::start(&config, &telemetry, admin_stop.clone()).await;
    shared.upstreams().set_cluster(cluster.clone());
    let listed = shared
        .upstreams()
        .build(&config, &[])
        .map_err(StartError::Upstream)?;
    let running = Running {
        proxy_addr,
        admin_addr,
        route_addrs: Vec::new(),
        transparent_addr,
        shared: shared.clone(),
        routes: Mutex::default(),
        next_route: Mutex::new(0),
        reloads: ["success", "failure"]
            .map(|r| telemetry.counter(telemetry::CONFIG_RELOADS, &[("result", r)])),
        stop: CancellationToken::new(),
        admin_stop,
        connections,
    };
    let route_addrs = running.apply(config, listed).await?;
    let mut running = running;
    running.route_addrs = route_addrs;

    tokio::spawn(server::accept_loop(
        proxy_listener,
        shared.clone(),
        Mode::Forward,
        running.stop.clone(),
        running.connections.clone(),
    ));
    if let Some(listener) = transparent_listener {
        tokio::spawn(server::transparent::accept_loop(
            listener,
            shared.clone(),
            running.stop.clone(),
            running.connections.clone(),
        ));
    }
    tokio::spawn(admin::serve(
        admin_listener,
        shared.clone(),
        running.admin_stop.clone(),
    ));
    tokio::spawn(server::sweep_parked(
        Arc::downgrade(&shared),
        running.admin_stop.clone(),
    ));
    if let Some(cluster) = cluster {
        tokio::spawn(apply_shares(cluster, Arc::downgrade(&shared)));
    }
    tokio::spawn(telemetry::upkeep(
        Arc::downgrade(&telemetry),
        running.admin_stop.clone(),
    ));
    shared.set_ready(true);
    tracing::info!(
        %proxy_addr,
        %admin_addr,
        routes = %Joined(&running.route_addrs),
        transparent = transparent_addr.map(tracing::field::display),
        // What `worker_threads` (or a CPU quota) came to: one is the
        // current-thread scheduler.
        threads = tokio::runtime::Handle::current().metrics().num_workers(),
        version = telemetry::VERSION,
        commit = telemetry::COMMIT,
        "tether is ready"
    );
    Ok(running)
}

impl Running {
    /// Binds the route listeners `config` adds, swaps in its table, stops the route
    /// listeners it dropped and drains the upstreams it removed. Returns the bound
    /// address of every route, in config order. Nothing changes if a bind fails.
    async fn apply(
        &self,
        config: Config,
        listed: Vec<Arc<Upstream>>,
    ) -> Result<Vec<SocketAddr>, StartError> {
        let keys = route_keys(&config);
        let mut fresh = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if !self.routes.lock().contains_key(key) {
                fresh.push((*key, bind(format!("route[{i}].listen"), key.0).await?));
            }
        }
        let mut routes = self.routes.lock();
        for (key, listener) in fresh {
            let id = {
                let mut next = self.next_route.lock();
                *next += 1;
                *next - 1
            };
            let stop = self.stop.child_token();
            let bound = listener
                .local_addr()
                .expect("bound listener has an address");
            tokio::spawn(server::accept_loop(
                listener,
                self.shared.clone(),
                Mode::Route(id),
                stop.clone(),
                self.connections.clone(),
            ));
            routes.insert(key, RouteListener { id, bound, stop });
        }
        routes.retain(|key, route| {
            let keep = keys.contains(key);
            if !keep {
                route.stop.cancel();
            }
            keep
        });
        let index_of = |name: &str| {
            listed
                .iter()
                .position(|u| &*u.name == name)
                .expect("validated")
        };
        let mut table_routes = foldhash::HashMap::default();
        let mut route_addrs = Vec::new();
        for (key, route) in keys.iter().zip(&config.route) {
            let listener = &routes[key];
            table_routes.insert(listener.id, index_of(&route.upstream));
            route_addrs.push(listener.bound);
        }
        drop(routes);
        let previous = self.shared.table();
        let table = Table {
            policy: Policy::new(&config),
            route_addrs: config
                .route
                .iter()
                .zip(&route_addrs)
                .map(|(r, a)| (index_of(&r.upstream), *a))
                .collect(),
            routes: table_routes,
            listed,
            config: Arc::new(config),
        };
        let removed = previous
            .listed
            .iter()
            .filter(|o| !table.listed.iter().any(|l| Arc::ptr_eq(l, o)))
            .cloned()
            .collect();
        self.shared.set_table(table);
        self.shared.upstreams().retire(removed);
        Ok(route_addrs)
    }

    /// Applies a new configuration to the running instance: pool limits change in
    /// place (a lowered cap closes idle sockets down to it, a raised one admits
    /// waiters), added upstreams and routes start, removed ones drain. In-flight
    /// requests are untouched. On any error the old configuration stays in force.
    pub async fn reload(&self, config: Config) -> Result<(), StartError> {
        let before = self.shared.table().config.clone();
        let result = self.try_reload(config).await;
        match &result {
            Ok(()) => {
                self.reloads[0].increment(1);
                self.shared.telemetry().reload_finished(true);
                let diff = config::ConfigDiff::between(&before, &self.shared.table().config);
                tracing::info!(
                    added = %diff.added.join(", "),
                    removed = %diff.removed.join(", "),
                    changed = diff.changed.len(),
                    "configuration reloaded: {diff}"
                );
            }
            Err(e) => {
                self.reloads[1].increment(1);
                self.shared.telemetry().reload_finished(false);
                match e {
                    StartError::Config(errors) => {
                        for problem in &errors.0 {
                            tracing::error!(
                                "reload refused, keeping the running configuration: {problem}"
                            );
                        }
                    }
                    other => tracing::error!(
                        "reload refused, keeping the running configuration: {other}"
                    ),
                }
            }
        }
        result
    }

    /// Loads `path` (with environment overrides) and reloads it.
    pub async fn reload_from(&self, path: Option<&Path>) -> Result<(), StartError> {
        match Config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                let e = StartError::Config(e);
                self.reloads[1].increment(1);
                self.shared.telemetry().reload_finished(false);
                if let StartError::Config(errors) = &e {
                    for problem in &errors.0 {
                        tracing::error!(
                            "reload refused, keeping the running configuration: {problem}"
                        );
                    }
                }
                Err(e)
            }
        }
    }

    async fn try_reload(&self, mut config: Config) -> Result<(), StartError> {
        config.validate()?;
        let current = self.shared.table();
        for held in config.keep_restart_only(&current.config) {
            tracing::warn!(
                key = %held.path, running = %held.old, new = %held.new,
                "{} changes only on restart: keeping the running value, applying the rest",
                held.path
            );
        }
        // Pools are reconfigured by `build`; a failed bind afterwards leaves the new
        // limits on kept pools, which is the operator's intent anyway.
        let listed = self
            .shared
            .upstreams()
            .build(&config, &current.listed)
            .map_err(StartError::Upstream)?;
        self.apply(config, listed).await?;
        Ok(())
    }

    /// Graceful shutdown: not ready, stop accepting, close idle sockets at once, let
    /// in-flight requests finish within `drain_timeout`, then cut what remains.
    /// Returns how many client connections had to be cut.
    pub async fn shutdown(self) -> usize {
        self.shared.request_drain();
        self.stop.cancel();
        self.connections.close();
        for up in self.shared.all_upstreams() {
            up.pool.drain();
        }
        self.shared.downstream().close_idle();
        let drain = self.shared.table().config.proxy.drain_timeout;
        let cut = match tokio::time::timeout(drain, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.shared.downstream().open(),
        };
        if cut > 0 {
            tracing::warn!(
                cut,
                drain_ms = crate::telemetry::millis(drain),
                "drain timeout: cutting client connections still in flight"
            );
        }
        // Give pooled sockets' drivers a moment to observe their handles dropping.
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.admin_stop.cancel();
        cut
    }

    /// The Prometheus text of this instance.
    pub fn metrics(&self) -> String {
        self.shared.telemetry().render()
    }

    /// Counts of the listed upstream `name`'s pool.
    pub fn pool_counts(&self, name: &str) -> Option<upstream::PoolCounts> {
        self.shared
            .table()
            .listed
            .iter()
            .find(|u| &*u.name == name)
            .map(|u| u.pool.counts())
    }
}

/// Addresses as one comma-separated log value (a log field is a string or a
/// number, not Rust's debug text of a list).
struct Joined<'a>(&'a [SocketAddr]);

impl std::fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// Applies each change of the cluster's standing to every pool, until the
/// instance or the refresh task is gone.
async fn apply_shares(mut cluster: Cluster, shared: std::sync::Weak<Shared>) {
    while cluster.changed().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.upstreams().apply_shares(&shared.all_upstreams());
    }
}

/// Raises the soft open-file limit to the hard limit: every client and upstream
/// socket is a descriptor. Warns when even the hard limit is below what the
/// configuration may need.
fn raise_fd_limit(config: &Config) {
    // Saturating: absurd limits in a config must not overflow (and panic) here.
    let needed = config
        .upstream
        .iter()
        .map(|u| u.pool(&config.pool).max_connections)
        .fold(
            config.proxy.max_client_connections.saturating_add(64),
            usize::saturating_add,
        );
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below max_client_connections plus the pools' caps"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::runtime;

    #[test]
    fn one_worker_thread_is_the_current_thread_scheduler_and_more_are_the_multi_threaded_one() {
        let one = runtime(1).build().unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // Timers and sockets work on it: the instance's clocks and listeners need both.
        one.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (accepted, connected) =
                tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
            accepted.unwrap();
            connected.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        });
        let three = runtime(3).build().unwrap();
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
