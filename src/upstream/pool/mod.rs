//! The governed pool of one upstream: [`Pool`] is its public face.
//!
//! Guarantees, each stated by a test:
//! - `open = connecting + active + idle + tunnels ≤ cap` at every instant, the cap in
//!   force being `Limits::cap` (`max_connections`), compared with the open count in
//!   one place, `Table::room`. The right to a socket is a [`Slot`]; it is created
//!   under the pool lock when the cap allows and dropped (any path: success, error,
//!   panic, reap, shutdown) when the socket itself is dropped, because the slot
//!   travels inside the socket's IO.
//! - Nothing waits while a socket could be had: a check-in while requests wait goes
//!   straight to the oldest waiter, and a freed slot becomes the oldest waiter's right
//!   to connect (FIFO).
//! - An HTTP/2 connection is shared while it has free streams; another opens only when
//!   every open one is saturated and the cap allows (`h2`).
//! - The state gauges are set from the table's counts under the pool's lock when a
//!   scrape renders them, all of one pool at once, so a scrape never sees more than
//!   the cap (gauges moved live would count a socket changing state twice).
//! - The reaper holds only a weak reference; a pool nobody uses goes away.
//!
//! Lock order: the `limits` lock is only ever held alone (read, cloned, released).
//! Then the pool's `state` lock, then the shared budget's lock; the budget never
//! takes a pool's lock while holding its own, and [`Budget::wake`] runs after the
//! pool's lock is released. Anything whose drop may take the pool's lock again (a
//! [`Slot`], a [`Pooled`], an undelivered grant, a closed connection's handle) is
//! dropped after the lock is released: the lock is not reentrant. Tunnels'
//! registry lock is never held while taking the pool's.
//!
//! The files, each one concern, dependencies pointing down the list:
//! - this façade: checkout (reuse, connect, queue), tunnel slots, fresh
//!   connections, drain, reconfigure, snapshots;
//! - `inner`: the lock and what it guards, [`Slot`] and [`Pooled`], check-in and
//!   release, the budget's side of the pool;
//! - `reap`: the reaper (which also expires the queue's waiters and fires the
//!   HTTP/1.1 response-head deadlines of `head`), the warm floor, adaptive
//!   keep-alive;
//! - `h2`: HTTP/2 stream sharing; `queue`: the waiters' FIFO, hand-off and deadlines;
//!   `expire`: when a socket must close, as pure functions; `snapshot`: typed
//!   pictures for `/debug/pools` and the status page;
//! - `table`: the connection table and the cap; `metrics`: handles and typed label
//!   values; `client`: HTTP/1.1 or HTTP/2 behind one type.
//!
//! [`Budget::wake`]: super::budget::Budget::wake

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::budget::BudgetMember;
use super::connect::Connector;
use crate::clock::MsClock;
use crate::config::PoolConfig;
use crate::error::ProxyError;
use crate::telemetry::Telemetry;

mod client;
mod expire;
mod h2;
mod head;
mod inner;
mod metrics;
mod queue;
mod reap;
mod snapshot;
mod table;

pub use client::{Client, SendRequest};
pub use head::HeadWatch;
use inner::Inner;
use inner::{Grant, State};
pub use inner::{Pooled, Slot};
pub use metrics::{CloseReason, ConnState, PoolMetrics, Rejection};
use queue::{Expired, Granted, Queue};
pub use snapshot::{ConnSnapshot, PoolCounts, PoolSnapshot};
pub use table::Keepalive;
use table::{Limits, Table};

/// One governed pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What [`Pool::checkout`] gives: a connection to use, or the right to open one.
pub enum Checkout {
    Reused(Pooled),
    Connect(Slot),
}

impl Pool {
    pub fn new(
        name: &str,
        connector: Connector,
        config: PoolConfig,
        telemetry: &Telemetry,
    ) -> Pool {
        Pool::with_budget(name, connector, config, telemetry, None)
    }

    /// A pool whose sockets also count against a shared [`Budget`](super::budget::Budget).
    pub fn with_budget(
        name: &str,
        connector: Connector,
        config: PoolConfig,
        telemetry: &Telemetry,
        budget: Option<Arc<super::budget::Budget>>,
    ) -> Pool {
        let h2_known = connector.expects_h2();
        let metrics = PoolMetrics::new(telemetry, name);
        let inner = Arc::new(Inner {
            name: name.into(),
            connector,
            limits: RwLock::new(Limits::new(config, None)),
            state: Mutex::new(State {
                table: Table::new(metrics::state_gauges(telemetry, name)),
                h2_known,
                queue: Queue::new(metrics.queue_depth.clone()),
                draining: false,
            }),
            metrics,
            budget: budget.clone(),
            member: Default::default(),
            due: Default::default(),
            clock: MsClock::new(),
            heads_due: AtomicU64::new(u64::MAX),
        });
        let pool = Pool { inner };
        let limits = pool.inner.limits();
        pool.set_limits((**limits.config()).clone(), limits.share());
        let inner = &pool.inner;
        if let Some(budget) = &budget {
            let member: Weak<dyn BudgetMember> = Arc::downgrade(inner) as _;
            budget.join(member, inner.member.clone());
        }
        reap::spawn(Arc::downgrade(inner));
        telemetry.collect_on_render(Arc::downgrade(inner) as Weak<dyn crate::telemetry::Collect>);
        pool
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    pub fn config(&self) -> Arc<PoolConfig> {
        self.inner.limits.read().config().clone()
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.inner.metrics
    }

    /// An idle connection (most recently used first), else the right to connect if
    /// under the cap, else a place in the FIFO queue until one of those frees up.
    pub async fn checkout(&self) -> Result<Checkout, ProxyError> {
        self.checkout_before(None).await
    }

    /// [`checkout`](Pool::checkout), waiting in the queue no later than `deadline`
    /// (the request's own, `request_timeout` from its start) nor longer than
    /// `queue_timeout`: a request whose whole time is spent never takes a socket only
    /// to time out on it. The wait has no timer of its own: the pool's expires it
    /// ([`Queue::expire`](queue::Queue::expire)).
    pub async fn checkout_before(&self, deadline: Option<Instant>) -> Result<Checkout, ProxyError> {
        let limits = self.inner.limits();
        let queued = {
            let mut st = self.inner.state.lock();
            if let Some(pooled) = self.inner.take_stream(&mut st, &limits) {
                return Ok(Checkout::Reused(pooled));
            }
            if let Some(pooled) = self.inner.take_idle(&mut st) {
                return Ok(Checkout::Reused(pooled));
            }
            let streams_coming = h2::streams_coming(&st.table, &limits, st.h2_known);
            let mut over_budget = false;
            if st.table.has_room(&limits) && st.queue.len() >= streams_coming {
                match self.inner.new_slot(&mut st, ConnState::Connecting) {
                    Some(slot) => return Ok(Checkout::Connect(slot)),
                    None => over_budget = true,
                }
            }
            let queued = self.enqueue(st, &limits, false, deadline)?;
            if over_budget {
                self.make_budget_room();
            }
            queued
        };
        match self.wait(queued, std::future::pending()).await? {
            Grant::Idle(pooled) => Ok(Checkout::Reused(pooled)),
            Grant::Connect(slot) => Ok(Checkout::Connect(slot)),
        }
    }

    /// The budget is spent: close an idle socket of another upstream above its floor.
    fn make_budget_room(&self) {
        if let Some(budget) = self.inner.budget.as_ref().filter(|b| b.is_full()) {
            budget.make_room(&self.inner.member);
        }
    }

    /// Joins the FIFO queue, or refuses with `queue_full`. `slot_only` waiters (CONNECT
    /// tunnels) need a socket of their own and are skipped by connection hand-offs.
    ///
    /// The waiter is sent [`Expired`] after `queue_timeout`, or at `deadline` if
    /// that is sooner; the pool's timer is told when that is earlier than any
    /// deadline it knows of.
    fn enqueue<'a>(
        &'a self,
        mut st: parking_lot::MutexGuard<'_, State>,
        config: &PoolConfig,
        slot_only: bool,
        deadline: Option<Instant>,
    ) -> Result<Queued<'a>, ProxyError> {
        if st.queue.len() >= config.queue_limit {
            drop(st);
            self.inner.metrics.reject(Rejection::QueueFull);
            return Err(ProxyError::QueueFull {
                upstream: self.inner.name.to_string(),
            });
        }
        let started = Instant::now();
        let limit = deadline.map_or(config.queue_timeout, |d| {
            config
                .queue_timeout
                .min(d.saturating_duration_since(started))
        });
        if limit.is_zero() {
            // No time to wait (`queue_timeout = 0`, or the request's deadline has
            // come): refused at once, never handed a socket it has no time for.
            drop(st);
            self.inner.metrics.queued_for(std::time::Duration::ZERO);
            self.inner.metrics.reject(Rejection::QueueTimeout);
            return Err(ProxyError::QueueTimeout {
                upstream: self.inner.name.to_string(),
                timeout: limit,
            });
        }
        let (id, rx, rearm) = st.queue.push(slot_only, started + limit);
        self.inner.publish(&st);
        drop(st);
        if rearm {
            self.inner.due.notify_one();
        }
        Ok(Queued {
            rx,
            guard: WaitGuard {
                inner: &self.inner,
                id,
            },
            started,
            limit,
        })
    }

    /// Waits for the grant (or [`Expired`]) of a place in the queue, running
    /// `meanwhile` alongside.
    async fn wait(
        &self,
        queued: Queued<'_>,
        meanwhile: impl std::future::Future<Output = ()>,
    ) -> Result<Grant, ProxyError> {
        let Queued {
            rx,
            guard,
            started,
            limit,
        } = queued;
        let granted = tokio::select! {
            biased;
            granted = rx => granted,
            _ = meanwhile => unreachable!("runs until the grant arrives"),
        };
        self.inner.metrics.queued_for(started.elapsed());
        match granted {
            Ok(Ok(grant)) => {
                guard.granted();
                Ok(grant)
            }
            Ok(Err(Expired)) => {
                guard.granted(); // expiring took it out of the queue
                self.inner.metrics.reject(Rejection::QueueTimeout);
                Err(ProxyError::QueueTimeout {
                    upstream: self.inner.name.to_string(),
                    timeout: limit,
                })
            }
            // The sender is only dropped by a pool being torn down.
            Err(_) => Err(ProxyError::ShuttingDown),
        }
    }

    /// The right to a socket of its own (a tunnel's), not a pooled connection: at
    /// once when the cap allows, else a place in the FIFO queue, where `make_room`
    /// runs until the place is granted (a tunnel evicts to make one).
    pub async fn checkout_slot(
        &self,
        make_room: impl std::future::Future<Output = ()>,
    ) -> Result<Slot, ProxyError> {
        let limits = self.inner.limits();
        let queued = {
            let mut st = self.inner.state.lock();
            if st.table.has_room(&limits) {
                if let Some(slot) = self.inner.new_slot(&mut st, ConnState::Connecting) {
                    return Ok(slot);
                }
            }
            self.enqueue(st, &limits, true, None)?
        };
        self.make_budget_room();
        match self.wait(queued, make_room).await? {
            Grant::Connect(slot) => Ok(slot),
            Grant::Idle(pooled) => {
                // Slot-only waiters are skipped by hand-offs; be safe regardless.
                pooled.discard(CloseReason::Evicted);
                Err(ProxyError::ShuttingDown)
            }
        }
    }

    /// Closes the least recently used idle pooled socket, if there is one; its place
    /// goes to the oldest waiter once it is gone.
    pub fn evict_idle(&self) -> bool {
        self.inner.evict_oldest_idle(0)
    }

    /// Marks socket `id` connected (TCP, and TLS when originated), in `state`.
    pub fn connected(&self, id: u64, local_port: u16, state: ConnState) {
        let mut st = self.inner.state.lock();
        if let Some(entry) = st.table.set_state(id, state) {
            entry.opened = true;
            entry.local_port = local_port;
        }
        self.inner.metrics.opened.increment(1);
    }

    /// A [`Pooled`] handle for the fresh connection `id`. An HTTP/2 connection is
    /// shared at once: waiting requests get streams on it.
    pub fn fresh(&self, id: u64, value: SendRequest) -> Pooled {
        if let Some(head) = value.head() {
            // Where the reaper finds it.
            if let Some(entry) = self.inner.state.lock().table.get_mut(id) {
                head.register();
                entry.head = Some(head.clone());
            }
        }
        if let Client::H2(h2) = &value {
            let limits = self.inner.limits();
            let mut st = self.inner.state.lock();
            st.h2_known = true;
            h2::share(&mut st.table, id, h2.clone());
            let inner = self.inner.clone();
            while st.queue.wants_connection() && h2::has_free_stream(&st.table, id, &limits) {
                let Some(pooled) = inner.stream_on(&mut st, id) else {
                    break;
                };
                if let Err(pooled) = inner.hand_to_waiter(&mut st, pooled) {
                    drop(st);
                    drop(pooled); // no waiter took it: its stream is returned
                    st = self.inner.state.lock();
                }
            }
        }
        Pooled::new(self.inner.clone(), id, value, false)
    }

    /// Applies an upstream's `Keep-Alive: timeout=N[, max=M]` to socket `id` (see
    /// `reap::advertised`).
    pub fn advertised_keepalive(&self, id: u64, timeout: Option<Duration>, max: Option<u64>) {
        let Some(keepalive) = reap::advertised(&self.config(), timeout, max) else {
            return;
        };
        if let Some(entry) = self.inner.state.lock().table.get_mut(id) {
            entry.keepalive = Some(keepalive);
        }
    }

    /// Slots for the connections the warm floor lacks: enough to bring idle plus
    /// connecting sockets up to `min_idle`, within the cap.
    pub fn warm_slots(&self) -> Vec<Slot> {
        reap::warm_slots(&self.inner)
    }

    /// Chooses the reason socket `id` will be counted as closed with, if none was.
    pub fn close_reason(&self, id: u64, reason: CloseReason) {
        self.inner.set_reason(id, reason);
    }

    /// Records how a connection's driver ended, unless a reason was already chosen.
    pub fn driver_ended(&self, id: u64, error: bool) {
        // A clean end decides nothing yet: under a request, the request's holder
        // knows whether its exchange completed (see `Table::closed_in_use`).
        if error {
            self.inner.set_reason(id, CloseReason::Error);
        }
    }

    /// Closes idle connections now and keeps the pool from idling any more: for
    /// shutdown, and for pools whose upstream was removed from the config.
    pub fn drain(&self) {
        let victims = {
            let mut st = self.inner.state.lock();
            st.draining = true;
            let ids = st.table.idle_ids().to_vec();
            let mut victims: Vec<Client> = ids
                .into_iter()
                .filter_map(|id| st.table.take_idle(id, CloseReason::Shutdown))
                .collect();
            let unused = h2::unused(&st.table);
            for id in unused {
                victims.extend(st.table.unshare(id, CloseReason::Shutdown));
            }
            victims
        };
        drop(victims);
    }

    /// Applies new limits to the live pool, keeping its cluster share: surplus idle
    /// sockets close, a raised cap admits waiters. In-flight requests are untouched.
    pub fn reconfigure(&self, config: PoolConfig) {
        let share = self.inner.limits().share();
        self.set_limits(config, share);
    }

    /// Sets this replica's share of the cluster-wide cap (`None`: no cluster cap),
    /// which lowers the cap in force to it. Lowered, idle sockets above it close at
    /// once and active ones close at check-in instead of being reused; raised, it
    /// admits waiters.
    pub fn set_share(&self, share: Option<usize>) {
        let config = (**self.inner.limits().config()).clone();
        self.set_limits(config, share);
    }

    /// The one place the limits in force change (construction, a reload's config,
    /// a cluster share, or both at once), and so the one place
    /// `tether_upstream_max_connections` is set: never write `limits` directly.
    pub fn set_limits(&self, config: PoolConfig, share: Option<usize>) {
        let limits = Limits::new(config, share);
        *self.inner.limits.write() = limits.clone();
        self.inner.metrics.max_connections.set(limits.cap() as f64);
        // A floor above the cap in force could never be reached: the budget would
        // count this pool as starved for good and make the others yield to it.
        let floor = limits.min_connections.min(limits.cap());
        self.inner.member.floor.store(floor, Ordering::Relaxed);
        let (victims, grants) = {
            let mut st = self.inner.state.lock();
            // Closed sockets leave the table only when their drivers drop them, so
            // count the surplus once rather than re-reading it in the loop.
            let idle = st.table.idle_len();
            let over_idle = idle.saturating_sub(limits.idle_limit());
            let surplus = st.table.surplus(&limits).max(over_idle).min(idle);
            let ids = st.table.idle_ids()[..surplus].to_vec();
            let mut victims: Vec<Client> = ids
                .into_iter()
                .filter_map(|id| st.table.take_idle(id, CloseReason::MaxIdle))
                .collect();
            // HTTP/2 connections with no stream open are idle too: above the cap,
            // they stop taking streams and close.
            let over = st.table.surplus(&limits).saturating_sub(victims.len());
            let unused = h2::unused(&st.table);
            for id in unused.into_iter().take(over) {
                victims.extend(st.table.unshare(id, CloseReason::MaxIdle));
            }
            let grants = self.inner.grant_waiters(&mut st, &limits);
            (victims, grants)
        };
        drop(victims);
        drop(grants);
    }

    /// One reaper pass: closes idle sockets past `idle_timeout` or `max_lifetime`.
    /// Returns how many it closed.
    pub fn reap(&self) -> usize {
        reap::pass(&self.inner, Instant::now())
    }

    /// Counts by state, for tests and the debug endpoint.
    pub fn counts(&self) -> PoolCounts {
        let st = self.inner.state.lock();
        PoolCounts::of(&st.table, st.queue.len())
    }

    /// A typed picture of the pool for `/debug/pools` and the status page.
    pub fn snapshot(&self) -> PoolSnapshot {
        // The limits lock is never held with another, so the cap is read before and
        // after the table: a cap that changed in between is read again, so a
        // snapshot never pairs the sockets a raised cap let in with the cap before.
        let (limits, counts, connections) = loop {
            let before = self.inner.limits();
            let (counts, connections) = {
                let st = self.inner.state.lock();
                let counts = PoolCounts::of(&st.table, st.queue.len());
                (counts, snapshot::connections(&st.table, Instant::now()))
            };
            let after = self.inner.limits();
            if before.cap() == after.cap() {
                break (after, counts, connections);
            }
        };
        let metrics = &self.inner.metrics;
        PoolSnapshot {
            upstream: self.inner.name.to_string(),
            origin: self.inner.connector.origin().to_string(),
            limits: (**limits.config()).clone(),
            cap: limits.cap(),
            share: limits.share(),
            open: connections.len(),
            counts,
            connections,
            closed: metrics.closed_totals(),
            rejected: metrics.rejected_totals(),
            responses: metrics.responses_total(),
            queue_waits: metrics.queue_wait_totals().0,
            queue_wait_seconds: metrics.queue_wait_totals().1,
            errors: metrics.error_totals(),
        }
    }

    /// Marks tunnel `id` idle (no byte either way for `min_idle_for_eviction`) or
    /// active again.
    pub fn set_tunnel_idle(&self, id: u64, idle: bool) {
        self.inner.set_tunnel_idle(id, idle);
    }
}

/// A place in the queue: where its grant arrives, and since when and for how long
/// it waits.
struct Queued<'a> {
    rx: oneshot::Receiver<Granted<Grant>>,
    guard: WaitGuard<'a>,
    started: Instant,
    limit: std::time::Duration,
}

/// Removes a waiter that gave up (its client went away) from the queue.
struct WaitGuard<'a> {
    inner: &'a Arc<Inner>,
    id: u64,
}

impl WaitGuard<'_> {
    /// The grant (or `Expired`) came: whoever sent it took the waiter out of the
    /// queue first ([`Queue::hand_off`], [`Queue::grant_oldest`], [`Queue::expire`]),
    /// so there is nothing to remove and the lock need not be taken again.
    fn granted(self) {
        std::mem::forget(self);
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        if st.queue.remove(self.id) {
            self.inner.publish(&st);
        }
    }
}

#[cfg(test)]
mod tests;
