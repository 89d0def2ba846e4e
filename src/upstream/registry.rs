//! The upstreams outside the table in force: those made on demand for origins an
//! allow pattern admits, and those a reload removed, kept until they drain. Also
//! builds the listed ones for a new table, keeping live pools across reloads.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::connect::Connector;
use super::{budget, Upstream};
use crate::cluster::Cluster;
use crate::config::{Config, PoolConfig};
use crate::policy::Origin;
use crate::telemetry::{Telemetry, UNLISTED};

/// Upstreams not in the current table: those created on demand for origins matched by
/// allow patterns, and those a reload removed, kept until their last socket closes.
pub struct Upstreams {
    unlisted: Mutex<HashMap<Origin, Arc<Upstream>>>,
    retired: Mutex<Vec<Arc<Upstream>>>,
    telemetry: Arc<Telemetry>,
    defaults: Mutex<PoolConfig>,
    /// The shared `[budget]`, created with the first configuration that sets one.
    budget: Mutex<Option<Arc<budget::Budget>>>,
    /// The `[cluster]` whose shares lower the caps of pools with a
    /// `cluster_max_connections`.
    cluster: Mutex<Option<Cluster>>,
}

impl Upstreams {
    pub fn new(telemetry: Arc<Telemetry>) -> Upstreams {
        Upstreams {
            unlisted: Mutex::default(),
            retired: Mutex::default(),
            telemetry,
            defaults: Mutex::new(PoolConfig::default()),
            budget: Mutex::new(None),
            cluster: Mutex::new(None),
        }
    }

    /// The cluster whose shares apply from now on (set once, at start).
    pub fn set_cluster(&self, cluster: Option<Cluster>) {
        *self.cluster.lock() = cluster;
    }

    /// The cluster in force, if `[cluster]` lists members.
    pub fn cluster(&self) -> Option<Cluster> {
        self.cluster.lock().clone()
    }

    /// This replica's share for a pool under `config`: `None` when it has no
    /// cluster cap (or there is no cluster).
    pub fn share_for(&self, config: &PoolConfig) -> Option<usize> {
        let total = config.cluster_max_connections?;
        let cluster = self.cluster.lock();
        Some(cluster.as_ref()?.cap(total, config.max_connections))
    }

    /// Applies the shares in force to every pool in `upstreams` (after the cluster
    /// standing changed).
    pub fn apply_shares(&self, upstreams: &[Arc<Upstream>]) {
        for up in upstreams {
            up.pool.set_share(self.share_for(&up.pool.config()));
        }
    }

    /// The listed upstreams of `config`. An upstream of `previous` with the same
    /// name and connection settings is kept, its live pool taking the new limits.
    pub fn build(
        &self,
        config: &Config,
        previous: &[Arc<Upstream>],
    ) -> Result<Vec<Arc<Upstream>>, String> {
        let budget = {
            let mut current = self.budget.lock();
            match (&*current, config.budget.max_connections) {
                (Some(b), max) if max > 0 => b.set_max(max),
                (Some(_), _) => tracing::warn!("removing the [budget] takes effect on restart"),
                (None, 0) => {}
                (None, max) => *current = Some(budget::Budget::new(max, &self.telemetry)),
            }
            current.clone()
        };
        let mut listed = Vec::new();
        for up in &config.upstream {
            let limits = up.pool(&config.pool);
            let share = self.share_for(&limits);
            if let Some(old) = previous.iter().find(|o| o.settings.same_connection(up)) {
                old.pool.set_limits(limits, share);
                listed.push(old.clone());
                continue;
            }
            let origin = Origin::parse_authority(&up.origin)?;
            let connector = Connector::for_upstream(origin, up, limits.max_connections)
                .map_err(|e| format!("upstream {}: {e}", up.name))?;
            let mut upstream =
                Upstream::with_budget(&up.name, connector, limits, &self.telemetry, budget.clone());
            upstream.rewrite_realm = up.rewrite_realm;
            upstream.tls = up.tls;
            upstream.settings = up.clone();
            // Before anyone can use it: a new pool opens nothing above its share.
            upstream.pool.set_share(share);
            let upstream = Arc::new(upstream);
            spawn_warmer(Arc::downgrade(&upstream));
            listed.push(upstream);
        }
        *self.defaults.lock() = config.pool.clone();
        let share = self.share_for(&config.pool);
        for u in self.unlisted.lock().values() {
            u.pool.set_limits(config.pool.clone(), share);
        }
        Ok(listed)
    }

    /// Drains upstreams a reload removed: idle sockets close now, in-flight
    /// exchanges finish, and the pool is forgotten once its last socket closes.
    pub fn retire(&self, removed: Vec<Arc<Upstream>>) {
        for u in &removed {
            u.pool.drain();
        }
        self.retired.lock().extend(removed);
    }

    /// The pool for an origin matched by an allow pattern, created on first use.
    pub fn unlisted(&self, origin: &Origin, deny_private: bool) -> Arc<Upstream> {
        let mut map = self.unlisted.lock();
        // Forget pools with no socket left, so the map cannot grow without bound.
        if map.len() > 64 {
            map.retain(|_, u| u.pool.counts().open() > 0);
        }
        if let Some(existing) = map.get(origin) {
            if existing.pool.connector().denies_private() == deny_private {
                return existing.clone();
            }
            // A reload changed `allow_private`: the pool was built under the old
            // rule, so it drains and a new one dials under the new rule.
            let stale = map.remove(origin).expect("just found");
            stale.pool.drain();
            self.retired.lock().push(stale);
        }
        let connector = Connector::plain(origin.clone(), deny_private);
        let upstream = Arc::new(Upstream::new(
            UNLISTED,
            connector,
            self.defaults.lock().clone(),
            &self.telemetry,
        ));
        upstream
            .pool
            .set_share(self.share_for(&upstream.pool.config()));
        map.insert(origin.clone(), upstream.clone());
        upstream
    }

    /// Unlisted and retired upstreams that still exist.
    pub fn others(&self) -> Vec<Arc<Upstream>> {
        let mut retired = self.retired.lock();
        retired.retain(|u| u.pool.counts().open() > 0);
        let mut all: Vec<_> = self.unlisted.lock().values().cloned().collect();
        all.extend(retired.iter().cloned());
        all
    }
}

/// Keeps an upstream's warm floor (`min_idle`) filled: every `reap_interval`, opens
/// the sockets it lacks and checks them in idle. Ends with the upstream.
fn spawn_warmer(upstream: std::sync::Weak<Upstream>) {
    tokio::spawn(async move {
        loop {
            let Some(up) = upstream.upgrade() else { return };
            let config = up.pool.config();
            for slot in up.pool.warm_slots() {
                match up.connect(slot, &config).await {
                    Ok(pooled) => pooled.check_in(),
                    Err(e) => {
                        tracing::debug!(upstream = %up.name, error = %e, "warm connection failed");
                        break;
                    }
                }
            }
            drop(up);
            tokio::time::sleep(config.reap_interval).await;
        }
    });
}
