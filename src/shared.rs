//! The state every connection of one running instance shares: the routing table in
//! force ([`Table`], swapped whole by a reload), the upstreams' pools, the client
//! connections' registry and the instance's telemetry. Children read it through
//! accessors; only the instance (start, reload, shutdown) changes it.

use foldhash::{HashMap, HashMapExt};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::downstream::Downstream;
use crate::policy::Policy;
use crate::telemetry::Telemetry;
use crate::upstream::{Upstream, Upstreams};

/// What a request is routed by: one configuration's policy, upstreams and routes.
/// A reload builds a new table and swaps it in; requests in flight keep theirs.
pub struct Table {
    pub config: Arc<Config>,
    pub policy: Policy,
    /// The `[[upstream]]`s, in config order (policy decisions index into it).
    pub listed: Vec<Arc<Upstream>>,
    /// Route listener number → index into `listed`.
    pub routes: HashMap<usize, usize>,
    /// `(index into listed, bound address)` of each route listener.
    pub route_addrs: Vec<(usize, SocketAddr)>,
}

impl Table {
    /// The upstream route listener `route` stands in for, if it still exists.
    pub fn route_upstream(&self, route: usize) -> Option<Arc<Upstream>> {
        self.routes.get(&route).map(|&i| self.listed[i].clone())
    }
}

/// State shared by every connection of one running instance.
pub struct Shared {
    table: ArcSwap<Table>,
    upstreams: Upstreams,
    telemetry: Arc<Telemetry>,
    downstream: Arc<Downstream>,
    ready: AtomicBool,
    /// Cancelled when a drain is asked for (`POST /admin/drain`) or begins.
    draining: tokio_util::sync::CancellationToken,
    /// Client connection tasks (drained on shutdown), and the runtime a parked
    /// client socket's wake-up spawns its next task on.
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    /// State for a new instance: an empty table until the first `set_table`, not
    /// ready, client tasks tracked by `tasks`.
    pub(crate) fn new(telemetry: Arc<Telemetry>, tasks: TaskTracker) -> Shared {
        Shared {
            table: ArcSwap::from_pointee(Table {
                config: Arc::new(Config::default()),
                policy: Policy::default(),
                listed: Vec::new(),
                routes: HashMap::new(),
                route_addrs: Vec::new(),
            }),
            upstreams: Upstreams::new(telemetry.clone()),
            downstream: Downstream::new(telemetry.clone()),
            telemetry,
            ready: AtomicBool::new(false),
            draining: tokio_util::sync::CancellationToken::new(),
            tasks,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Asks for a drain: not ready from now on; the owner of the [`Running`]
    /// instance (the binary) sees [`Shared::drain_requested`] and shuts down.
    ///
    /// [`Running`]: crate::Running
    pub fn request_drain(&self) {
        self.draining.cancel();
        self.set_ready(false);
    }

    /// Whether a drain was asked for or has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Completes once a drain is asked for.
    pub async fn drain_requested(&self) {
        self.draining.cancelled().await
    }

    /// Swaps in a new routing table; requests in flight keep the one they loaded.
    pub(crate) fn set_table(&self, table: Table) {
        self.table.store(Arc::new(table));
    }

    /// The pools of every upstream not in the table (unlisted and retired ones),
    /// and the builder of listed ones.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// This instance's metrics recorder.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The client connections' registry.
    pub fn downstream(&self) -> &Arc<Downstream> {
        &self.downstream
    }

    /// `/readyz`: accepting, and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        // Once draining, nothing makes the instance ready again.
        self.ready
            .store(ready && !self.draining.is_cancelled(), Ordering::Release);
    }

    /// Runs a client connection's task on the instance's runtime, tracked so that
    /// shutdown waits for it (also when spawned from outside the runtime: a parked
    /// socket's wake-up comes from the reactor).
    pub(crate) fn spawn_client_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// The routing table in force.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Every upstream that has a pool: listed, unlisted, and removed-but-draining.
    pub fn all_upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut all = self.table().listed.clone();
        all.extend(self.upstreams.others());
        all
    }
}
