//! The governed pool of one upstream.
//!
//! Guarantees, each stated by a test:
//! - `open = connecting + active + idle + tunnels ≤ max_connections` at every instant.
//!   The right to a socket is a [`Slot`]; it is created under the pool lock when the
//!   cap allows and dropped (any path: success, error, panic, reap, shutdown) when the
//!   socket itself is dropped, because the slot travels inside the socket's IO.
//! - Nothing waits while a socket could be had: a check-in while requests wait goes
//!   straight to the oldest waiter, and a freed slot becomes the oldest waiter's right
//!   to connect (FIFO).
//! - A state change and its gauge change happen under the same lock, so a scrape never
//!   sees more than the cap.
//! - The reaper holds only a weak reference; a pool nobody uses goes away.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::connect::Connector;
use crate::config::PoolConfig;
use crate::error::ProxyError;
use crate::telemetry::Telemetry;

mod client;
mod expire;
mod metrics;
mod queue;
mod table;

pub use client::{Client, SendRequest};
use expire::{close_at_check_in, close_when_idle, AtCheckIn};
pub use metrics::{CloseReason, ConnState, PoolMetrics, Rejection};
use queue::Queue;
pub use table::Keepalive;
use table::{Limits, Table};

/// One governed pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    name: Arc<str>,
    connector: Connector,
    limits: RwLock<Limits>,
    state: Mutex<State>,
    pub(crate) metrics: PoolMetrics,
    /// The shared `[budget]`, when one is configured.
    budget: Option<Arc<super::budget::Budget>>,
    /// This pool's counts as the budget sees them.
    member: Arc<super::budget::MemberStats>,
}

struct State {
    table: Table,
    /// The upstream has spoken h2: while one of its connections is being opened,
    /// further requests wait for its streams instead of opening more.
    h2_known: bool,
    queue: Queue<Grant>,
    draining: bool,
}

/// What a waiter is handed: a ready connection, or the right to open one.
enum Grant {
    Idle(Pooled),
    Connect(Slot),
}

/// The right to one socket under the cap. Dropping it frees the place and counts the
/// close; it is moved into the socket's IO so it drops exactly when the socket does.
pub struct Slot {
    inner: Arc<Inner>,
    id: u64,
}

/// A connection checked out for one request. Dropped without [`Pooled::check_in`]
/// after a request was sent, it is closed (its exchange did not finish cleanly); if no
/// request was sent it goes back idle.
pub struct Pooled {
    inner: Arc<Inner>,
    id: u64,
    value: Option<SendRequest>,
    pub reused: bool,
    sent: bool,
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
        let floor = config.min_connections;
        let metrics = PoolMetrics::new(telemetry, name);
        let inner = Arc::new(Inner {
            name: name.into(),
            connector,
            limits: RwLock::new(Limits::new(config)),
            state: Mutex::new(State {
                table: Table::new(metrics::state_gauges(telemetry, name)),
                h2_known,
                queue: Queue::new(metrics.queue_depth.clone()),
                draining: false,
            }),
            metrics,
            budget: budget.clone(),
            member: Default::default(),
        });
        inner.member.floor.store(floor, Ordering::Relaxed);
        if let Some(budget) = &budget {
            budget.join(Arc::downgrade(&inner), inner.member.clone());
        }
        spawn_reaper(Arc::downgrade(&inner));
        Pool { inner }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    pub fn config(&self) -> Arc<PoolConfig> {
        self.inner.limits().config().clone()
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.inner.metrics
    }

    /// An idle connection (most recently used first), else the right to connect if
    /// under the cap, else a place in the FIFO queue until one of those frees up.
    pub async fn checkout(&self) -> Result<Checkout, ProxyError> {
        let limits = self.inner.limits();
        let rx = {
            let mut st = self.inner.state.lock();
            if let Some(pooled) = self.inner.take_stream(&mut st, &limits) {
                return Ok(Checkout::Reused(pooled));
            }
            if let Some(pooled) = self.inner.take_idle(&mut st) {
                return Ok(Checkout::Reused(pooled));
            }
            let expected_streams = if st.h2_known {
                st.table
                    .count(ConnState::Connecting)
                    .saturating_mul(limits.max_streams_per_connection)
            } else {
                0
            };
            let mut over_budget = false;
            if st.table.has_room(&limits) && st.queue.len() >= expected_streams {
                match self.inner.new_slot(&mut st, ConnState::Connecting) {
                    Some(slot) => return Ok(Checkout::Connect(slot)),
                    None => over_budget = true,
                }
            }
            let queued = self.enqueue(st, &limits, false)?;
            if over_budget {
                self.make_budget_room();
            }
            queued
        };
        match self.wait(rx, &limits, std::future::pending()).await? {
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
    fn enqueue<'a>(
        &'a self,
        mut st: parking_lot::MutexGuard<'_, State>,
        config: &PoolConfig,
        slot_only: bool,
    ) -> Result<(oneshot::Receiver<Grant>, WaitGuard<'a>), ProxyError> {
        if st.queue.len() >= config.queue_limit {
            drop(st);
            self.inner.metrics.reject(Rejection::QueueFull);
            return Err(ProxyError::QueueFull {
                upstream: self.inner.name.to_string(),
            });
        }
        let (id, rx) = st.queue.push(slot_only);
        self.inner.publish(&st);
        Ok((
            rx,
            WaitGuard {
                inner: &self.inner,
                id,
            },
        ))
    }

    /// Waits for a grant up to `queue_timeout`, running `meanwhile` alongside.
    async fn wait(
        &self,
        (rx, _guard): (oneshot::Receiver<Grant>, WaitGuard<'_>),
        config: &PoolConfig,
        meanwhile: impl std::future::Future<Output = ()>,
    ) -> Result<Grant, ProxyError> {
        let started = Instant::now();
        let granted = tokio::time::timeout(config.queue_timeout, async {
            tokio::select! {
                granted = rx => granted,
                _ = meanwhile => unreachable!("runs until the grant arrives"),
            }
        })
        .await;
        self.inner
            .metrics
            .queue_wait
            .record(started.elapsed().as_secs_f64());
        match granted {
            Ok(Ok(grant)) => Ok(grant),
            // The sender is only dropped by a pool being torn down.
            Ok(Err(_)) => Err(ProxyError::ShuttingDown),
            Err(_) => {
                self.inner.metrics.reject(Rejection::QueueTimeout);
                Err(ProxyError::QueueTimeout {
                    upstream: self.inner.name.to_string(),
                    timeout: config.queue_timeout,
                })
            }
        }
    }

    /// Takes a slot for a CONNECT tunnel: under the cap at once; at the cap, by
    /// closing the idle pooled socket or the tunnel idle longest (at least
    /// `min_idle_for_eviction`), re-checked while the request waits in the queue.
    pub async fn checkout_tunnel(
        &self,
        tunnels: &super::tunnel::Tunnels,
    ) -> Result<Slot, ProxyError> {
        let limits = self.inner.limits();
        let queued = {
            let mut st = self.inner.state.lock();
            if st.table.has_room(&limits) {
                if let Some(slot) = self.inner.new_slot(&mut st, ConnState::Connecting) {
                    return Ok(slot);
                }
            }
            self.enqueue(st, &limits, true)?
        };
        self.make_budget_room();
        let make_room = async {
            let tick = (limits.min_idle_for_eviction / 4)
                .clamp(Duration::from_millis(5), Duration::from_millis(250));
            loop {
                self.make_room(tunnels, &limits);
                tokio::time::sleep(tick).await;
            }
        };
        match self.wait(queued, &limits, make_room).await? {
            Grant::Connect(slot) => Ok(slot),
            Grant::Idle(pooled) => {
                // Slot-only waiters are skipped by hand-offs; be safe regardless.
                pooled.discard(CloseReason::Evicted);
                Err(ProxyError::ShuttingDown)
            }
        }
    }

    /// Closes one idle pooled socket, else the longest-idle tunnel past
    /// `min_idle_for_eviction`. Its place goes to the oldest waiter.
    fn make_room(&self, tunnels: &super::tunnel::Tunnels, config: &PoolConfig) -> bool {
        if self.inner.evict_oldest_idle(0) {
            return true;
        }
        tunnels.evict_longest_idle(config.min_idle_for_eviction)
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
        if let Client::H2(h2) = &value {
            let limits = self.inner.limits();
            let mut st = self.inner.state.lock();
            st.h2_known = true;
            st.table.share(id, h2.clone());
            if let Some(entry) = st.table.get_mut(id) {
                entry.streams = 1;
            }
            let inner = self.inner.clone();
            while st.queue.wants_connection()
                && st
                    .table
                    .get(id)
                    .is_some_and(|e| e.streams < limits.max_streams_per_connection)
            {
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
        Pooled {
            inner: self.inner.clone(),
            id,
            value: Some(value),
            reused: false,
            sent: false,
        }
    }

    /// Applies an upstream's `Keep-Alive: timeout=N[, max=M]` to socket `id`: its idle
    /// timeout becomes `min(idle_timeout, N - keepalive_margin)` (zero: not kept) and
    /// its request budget `min(max_requests_per_connection, M)`.
    pub fn advertised_keepalive(&self, id: u64, timeout: Option<Duration>, max: Option<u64>) {
        let config = self.config();
        if !config.adaptive_keepalive || (timeout.is_none() && max.is_none()) {
            return;
        }
        let idle_timeout = timeout
            .map(|t| {
                t.saturating_sub(config.keepalive_margin)
                    .min(config.idle_timeout)
            })
            .unwrap_or(config.idle_timeout);
        let max_requests = max
            .map(|m| m.min(config.max_requests_per_connection))
            .unwrap_or(config.max_requests_per_connection);
        if let Some(entry) = self.inner.state.lock().table.get_mut(id) {
            entry.keepalive = Some(Keepalive {
                idle_timeout,
                max_requests,
            });
        }
    }

    /// Slots for the connections the warm floor lacks: enough to bring idle plus
    /// connecting sockets up to `min_idle`, within the cap.
    pub fn warm_slots(&self) -> Vec<Slot> {
        let limits = self.inner.limits();
        let mut st = self.inner.state.lock();
        if limits.min_idle == 0 || st.draining {
            return Vec::new();
        }
        let connecting = st.table.count(ConnState::Connecting);
        let lacking = limits
            .min_idle
            .saturating_sub(st.table.idle_len() + connecting);
        (0..lacking.min(st.table.room(&limits)))
            .map_while(|_| self.inner.new_slot(&mut st, ConnState::Connecting))
            .collect()
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
            let unused: Vec<u64> = st
                .table
                .sharing()
                .iter()
                .copied()
                .filter(|&id| st.table.get(id).is_some_and(|e| e.streams == 0))
                .collect();
            for id in unused {
                victims.extend(st.table.unshare(id, CloseReason::Shutdown));
            }
            victims
        };
        drop(victims);
    }

    /// Applies new limits to the live pool: surplus idle sockets close, a raised cap
    /// admits waiters. In-flight requests are untouched.
    pub fn reconfigure(&self, config: PoolConfig) {
        let limits = Limits::new(config);
        *self.inner.limits.write() = limits.clone();
        self.inner
            .member
            .floor
            .store(limits.min_connections, Ordering::Relaxed);
        let (victims, grants) = {
            let mut st = self.inner.state.lock();
            // Closed sockets leave the table only when their drivers drop them, so
            // count the surplus once rather than re-reading it in the loop.
            let idle = st.table.idle_len();
            let over_idle = idle.saturating_sub(limits.idle_limit());
            let surplus = st.table.surplus(&limits).max(over_idle).min(idle);
            let ids = st.table.idle_ids()[..surplus].to_vec();
            let victims: Vec<Client> = ids
                .into_iter()
                .filter_map(|id| st.table.take_idle(id, CloseReason::MaxIdle))
                .collect();
            let grants = self.inner.grant_waiters(&mut st, &limits);
            (victims, grants)
        };
        drop(victims);
        drop(grants);
    }

    /// One reaper pass: closes idle sockets past `idle_timeout` or `max_lifetime`.
    /// Returns how many it closed.
    pub fn reap(&self) -> usize {
        self.inner.reap(Instant::now())
    }

    /// Counts by state, for tests and the debug endpoint.
    pub fn counts(&self) -> PoolCounts {
        let st = self.inner.state.lock();
        PoolCounts {
            connecting: st.table.count(ConnState::Connecting),
            active: st.table.count(ConnState::Active),
            idle: st.table.count(ConnState::Idle),
            tunnels_active: st.table.count(ConnState::TunnelActive),
            tunnels_idle: st.table.count(ConnState::TunnelIdle),
            queued: st.queue.len(),
        }
    }

    /// A JSON-ready picture of the pool for `/debug/pools`.
    pub fn snapshot(&self) -> PoolSnapshot {
        let config = self.config();
        let now = Instant::now();
        let counts = self.counts();
        let st = self.inner.state.lock();
        let mut connections: Vec<ConnSnapshot> = st
            .table
            .iter()
            .map(|(id, e)| ConnSnapshot {
                id,
                state: e.state(),
                age_ms: now.saturating_duration_since(e.created).as_millis() as u64,
                idle_ms: match e.state() {
                    ConnState::Idle | ConnState::TunnelIdle => {
                        now.saturating_duration_since(e.idle_at).as_millis() as u64
                    }
                    _ => 0,
                },
                requests: e.requests,
                local_port: e.local_port,
                protocol: match e.state() {
                    ConnState::TunnelActive | ConnState::TunnelIdle => "tunnel",
                    _ if e.h2 => "h2",
                    _ => "h1",
                },
                streams: e.streams,
                keepalive: e.keepalive,
            })
            .collect();
        connections.sort_by_key(|c| c.id);
        PoolSnapshot {
            upstream: self.inner.name.to_string(),
            origin: self.inner.connector.origin().to_string(),
            limits: (*config).clone(),
            open: connections.len(),
            counts,
            connections,
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// Connection counts of one pool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolCounts {
    pub connecting: usize,
    pub active: usize,
    pub idle: usize,
    pub tunnels_active: usize,
    pub tunnels_idle: usize,
    pub queued: usize,
}

impl PoolCounts {
    /// Every socket of the pool, tunnels included.
    pub fn open(&self) -> usize {
        self.connecting + self.active + self.idle + self.tunnels_active + self.tunnels_idle
    }
}

#[derive(Debug, Serialize)]
pub struct PoolSnapshot {
    pub upstream: String,
    pub origin: String,
    pub limits: PoolConfig,
    pub open: usize,
    pub counts: PoolCounts,
    pub connections: Vec<ConnSnapshot>,
}

#[derive(Debug, Serialize)]
pub struct ConnSnapshot {
    pub id: u64,
    pub state: ConnState,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub requests: u64,
    pub local_port: u16,
    /// `h1`, `h2` or `tunnel`.
    pub protocol: &'static str,
    /// Open HTTP/2 streams.
    pub streams: usize,
    /// The upstream's advertised keep-alive limits in force for this socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Keepalive>,
}

impl Inner {
    /// The limits in force (a cheap clone, read once per operation).
    fn limits(&self) -> Limits {
        self.limits.read().clone()
    }

    /// The right to one more socket, if the shared budget (when there is one)
    /// allows it; the caller has checked the pool's own cap.
    fn new_slot(self: &Arc<Self>, st: &mut State, state: ConnState) -> Option<Slot> {
        if let Some(budget) = &self.budget {
            if !budget.try_take() {
                return None;
            }
        }
        let id = st.table.insert(state, Instant::now());
        self.publish(st);
        Some(Slot {
            inner: self.clone(),
            id,
        })
    }

    /// Tells the budget this pool's counts (under the pool's lock).
    fn publish(&self, st: &State) {
        if self.budget.is_some() {
            self.member.open.store(st.table.open(), Ordering::Relaxed);
            self.member.waiting.store(st.queue.len(), Ordering::Relaxed);
        }
    }

    /// Whether this pool should leave a freed budget unit to a pool below its floor.
    fn yields_budget(&self, st: &State) -> bool {
        self.budget.as_ref().is_some_and(|b| {
            st.table.open() >= self.member.floor.load(Ordering::Relaxed)
                && b.is_full()
                && b.someone_starved_besides(&self.member)
        })
    }

    /// A budget unit came free: serve this pool's waiters with it.
    pub(crate) fn grant_from_budget(self: &Arc<Self>) {
        let limits = self.limits();
        let grants = {
            let mut st = self.state.lock();
            self.grant_waiters(&mut st, &limits)
        };
        drop(grants);
    }

    /// Closes this pool's longest-idle socket if it is above its budget floor.
    pub(crate) fn evict_one_idle(&self) -> bool {
        self.evict_oldest_idle(self.member.floor.load(Ordering::Relaxed))
    }

    /// Closes the least recently used idle socket, if more than `keep` are open.
    fn evict_oldest_idle(&self, keep: usize) -> bool {
        let victim = {
            let mut st = self.state.lock();
            if st.table.open() <= keep {
                return false;
            }
            let oldest = st.table.idle_ids().first().copied();
            oldest.and_then(|id| st.table.take_idle(id, CloseReason::Evicted))
        };
        victim.is_some()
    }

    fn set_reason(&self, id: u64, reason: CloseReason) {
        let mut st = self.state.lock();
        if let Some(entry) = st.table.get_mut(id) {
            entry.close_with(reason);
        } else if st.table.take_closed_in_use(id) {
            self.metrics.closed(reason);
        }
    }

    /// A stream on an open HTTP/2 connection with room for one, oldest connection
    /// first so that surplus connections go idle and are reaped.
    fn take_stream(self: &Arc<Self>, st: &mut State, limits: &Limits) -> Option<Pooled> {
        let table = &st.table;
        let id = table.sharing().iter().copied().find(|&id| {
            table.get(id).is_some_and(|e| {
                e.streams < limits.max_streams_per_connection
                    && table.shared(id).is_some_and(|c| !c.is_closed())
            })
        })?;
        self.stream_on(st, id)
    }

    /// Opens one more stream on HTTP/2 connection `id`.
    fn stream_on(self: &Arc<Self>, st: &mut State, id: u64) -> Option<Pooled> {
        let value = st.table.shared(id)?.clone();
        let entry = st.table.set_state(id, ConnState::Active)?;
        entry.streams += 1;
        let reused = entry.requests > 0 || entry.streams > 1;
        Some(Pooled {
            inner: self.clone(),
            id,
            value: Some(Client::H2(value)),
            reused,
            sent: false,
        })
    }

    /// Gives `pooled` to the oldest waiter still waiting; back if there is none.
    fn hand_to_waiter(&self, st: &mut State, pooled: Pooled) -> Result<(), Pooled> {
        st.queue
            .hand_off(Grant::Idle(pooled))
            .map_err(|back| match back {
                Grant::Idle(pooled) => pooled,
                Grant::Connect(_) => unreachable!("handed off a connection"),
            })
    }

    /// Pops the most recently used idle connection that is still open.
    fn take_idle(self: &Arc<Self>, st: &mut State) -> Option<Pooled> {
        while let Some((id, value)) = st.table.pop_idle() {
            if value.is_closed() {
                // Its driver is finishing; the slot's drop will count it.
                st.table.close_with(id, CloseReason::RemoteClosed);
                continue;
            }
            return Some(Pooled {
                inner: self.clone(),
                id,
                value: Some(value),
                reused: true,
                sent: false,
            });
        }
        None
    }

    /// Hands free capacity to waiters, oldest first. Returns grants whose waiter had
    /// already gone, to be dropped (and so released) after the lock.
    fn grant_waiters(self: &Arc<Self>, st: &mut State, limits: &Limits) -> Vec<Grant> {
        let mut undelivered = Vec::new();
        while st.table.has_room(limits) && !st.queue.is_empty() && !self.yields_budget(st) {
            let Some(slot) = self.new_slot(st, ConnState::Connecting) else {
                break; // the shared budget is spent
            };
            if let Err(grant) = st.queue.grant_oldest(Grant::Connect(slot)) {
                undelivered.push(grant);
                // The undelivered slot still holds its place until it is dropped; stop
                // here and let its release grant the next waiter.
                break;
            }
        }
        self.publish(st);
        undelivered
    }

    /// Called when a socket (or a failed connect) is gone: frees its place and
    /// counts the close.
    fn release(self: &Arc<Self>, id: u64) {
        let limits = self.limits();
        let (entry, grants) = {
            let mut st = self.state.lock();
            let Some(entry) = st.table.remove(id) else {
                return;
            };
            if let Some(budget) = &self.budget {
                budget.give_back();
            }
            if entry.opened {
                match entry.reason {
                    Some(reason) => self.metrics.closed(reason),
                    None if entry.in_use() => st.table.closed_in_use(id),
                    None => self.metrics.closed(CloseReason::RemoteClosed),
                }
            }
            let grants = self.grant_waiters(&mut st, &limits);
            self.publish(&st);
            (entry, grants)
        };
        drop(entry); // with the sender it held, if any
        drop(grants);
        if let Some(budget) = &self.budget {
            // Our waiters had first call unless a pool below its floor was waiting.
            budget.wake();
        }
    }

    /// Returns a connection after a complete exchange. It goes to the oldest waiter,
    /// else idle, unless a limit says it must close.
    fn check_in(self: &Arc<Self>, id: u64, value: Client) {
        let limits = self.limits();
        let now = Instant::now();
        let mut st = self.state.lock();
        let at = AtCheckIn {
            remote_closed: value.is_closed(),
            draining: st.draining,
            over_cap: st.table.surplus(&limits) > 0,
            // Another upstream waits below its budget floor: free the unit.
            yield_budget: self.yields_budget(&st),
        };
        let Some(entry) = st.table.get_mut(id) else {
            // The socket closed under this exchange, which completed all the same
            // (an upstream's `Connection: close`, say).
            if st.table.take_closed_in_use(id) {
                self.metrics.closed(CloseReason::RemoteClosed);
            }
            return;
        };
        if entry.h2 {
            entry.streams = entry.streams.saturating_sub(1);
        }
        let idle_now = entry.streams == 0;
        let close = close_at_check_in(entry, &limits, now, at);
        if let Client::H2(_) = value {
            drop(value); // the shared handle stays in the table while it may take streams
            let retired = close.and_then(|reason| st.table.unshare(id, reason));
            if retired.is_none() && st.queue.wants_connection() {
                // Hand-off before idling: the oldest waiter gets this stream.
                if let Some(pooled) = self.stream_on(&mut st, id) {
                    if let Err(pooled) = self.hand_to_waiter(&mut st, pooled) {
                        drop(st);
                        drop(pooled); // nobody waited after all: returns the stream
                    }
                    return;
                }
            }
            if idle_now {
                let entry = st
                    .table
                    .set_state(id, ConnState::Idle)
                    .expect("checked above");
                entry.idle_at = now;
            }
            drop(st);
            drop(retired);
            return;
        }
        if let Some(reason) = close {
            entry.close_with(reason);
            drop(st);
            drop(value);
            return;
        }
        // Hand-off before idling: the oldest live waiter gets it.
        let pooled = Pooled {
            inner: self.clone(),
            id,
            value: Some(value),
            reused: true,
            sent: false,
        };
        let Err(mut pooled) = self.hand_to_waiter(&mut st, pooled) else {
            return;
        };
        let value = pooled.value.take().expect("present until handed on");
        drop(pooled); // value taken: dropping it does nothing
        if st.table.idle_len() >= limits.idle_limit() {
            st.table.close_with(id, CloseReason::MaxIdle);
            drop(st);
            drop(value);
            return;
        }
        st.table.push_idle(id, value, now);
    }

    fn reap(&self, now: Instant) -> usize {
        let limits = self.limits();
        let (victims, h2_victims) = {
            let mut st = self.state.lock();
            // The warm floor: the `min_idle` most recently used idle sockets are
            // exempt from the idle timeout (max_lifetime still renews them).
            let floor_from = st.table.idle_len().saturating_sub(limits.min_idle);
            let victims = st.table.expire_idle(|entry, place| {
                close_when_idle(entry, &limits, now, place >= floor_from)
            });
            let h2_expired: Vec<(u64, CloseReason)> = st
                .table
                .sharing()
                .iter()
                .filter_map(|&id| {
                    let e = st.table.get(id)?;
                    if e.streams > 0 {
                        return None;
                    }
                    close_when_idle(e, &limits, now, false).map(|r| (id, r))
                })
                .collect();
            let h2_victims: Vec<_> = h2_expired
                .into_iter()
                .filter_map(|(id, reason)| st.table.unshare(id, reason))
                .collect();
            (victims, h2_victims)
        };
        let n = victims.len() + h2_victims.len();
        drop(victims);
        drop(h2_victims);
        n
    }

    /// Counts a request on a connection.
    fn note_request(&self, id: u64) {
        if let Some(entry) = self.state.lock().table.get_mut(id) {
            entry.requests += 1;
        }
    }

    pub(crate) fn set_tunnel_idle(&self, id: u64, idle: bool) {
        let mut st = self.state.lock();
        let state = if idle {
            ConnState::TunnelIdle
        } else {
            ConnState::TunnelActive
        };
        let went_idle = idle
            && st
                .table
                .get(id)
                .is_some_and(|e| e.state() != ConnState::TunnelIdle);
        if let Some(entry) = st.table.set_state(id, state) {
            if went_idle {
                entry.idle_at = Instant::now();
            }
        }
    }
}

impl Slot {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Chooses the reason this socket will be counted as closed with.
    pub fn close_reason(&self, reason: CloseReason) {
        self.inner.set_reason(self.id, reason);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl Pooled {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_h2(&self) -> bool {
        self.value.as_ref().is_some_and(Client::is_h2)
    }

    /// Waits until the connection can take a request; an error means it closed.
    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        self.value
            .as_mut()
            .expect("present until checked in")
            .ready()
            .await
    }

    /// The request sender; counts the request against the connection.
    pub fn send(&mut self) -> &mut Client {
        if !self.sent {
            self.sent = true;
            self.inner.note_request(self.id);
        }
        self.value.as_mut().expect("present until checked in")
    }

    /// Returns the connection after a complete exchange.
    pub fn check_in(mut self) {
        if let Some(value) = self.value.take() {
            self.inner.check_in(self.id, value);
        }
    }

    /// Closes the connection, counted with `reason`.
    pub fn discard(mut self, reason: CloseReason) {
        self.inner.set_reason(self.id, reason);
        self.value = None;
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            if self.sent {
                // The exchange was cut short: the connection's state is unknown.
                self.inner.set_reason(self.id, CloseReason::Error);
            } else {
                self.inner.check_in(self.id, value);
            }
        }
    }
}

/// Removes a waiter that gave up (timeout, or its client went away) from the queue.
struct WaitGuard<'a> {
    inner: &'a Arc<Inner>,
    id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        if st.queue.remove(self.id) {
            self.inner.publish(&st);
        }
    }
}

fn spawn_reaper(weak: Weak<Inner>) {
    let Some(inner) = weak.upgrade() else { return };
    let mut period = inner.limits.read().reap_interval;
    drop(inner);
    tokio::spawn(async move {
        let mut next = Instant::now() + period;
        loop {
            tokio::time::sleep_until(next).await;
            let Some(inner) = weak.upgrade() else { return };
            inner.reap(Instant::now());
            period = inner.limits.read().reap_interval;
            next = Instant::now() + period.max(Duration::from_millis(10));
        }
    });
}

#[cfg(test)]
mod tests {
    //! The pool's state machine in paused time, over in-memory connections.

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::policy::Origin;
    use crate::telemetry::Telemetry;
    use crate::testkit::memory::{connect, fill_idle};
    use crate::testkit::metric;

    fn pool(f: impl FnOnce(&mut PoolConfig)) -> (Pool, Arc<Telemetry>) {
        let mut config = PoolConfig::default();
        f(&mut config);
        let telemetry = Telemetry::new();
        let origin = Origin::parse_authority("upstream.test:80").unwrap();
        let pool = Pool::new("up", Connector::plain(origin, false), config, &telemetry);
        (pool, telemetry)
    }

    fn closed(telemetry: &Telemetry, reason: &str) -> f64 {
        let text = telemetry.render();
        metric(
            &text,
            "tether_upstream_connections_closed_total",
            &[("upstream", "up"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    }

    /// Lets connection drivers observe dropped handles.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    async fn slot(pool: &Pool) -> Slot {
        match pool.checkout().await.unwrap() {
            Checkout::Connect(slot) => slot,
            Checkout::Reused(_) => panic!("expected a fresh slot"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_closes_only_connections_idle_past_idle_timeout() {
        let (pool, telemetry) = pool(|c| c.idle_timeout = Duration::from_secs(30));
        let _held = fill_idle(&pool, 3).await;
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(pool.reap(), 0);
        // One is used again: its idle clock restarts.
        let Checkout::Reused(p) = pool.checkout().await.unwrap() else {
            panic!()
        };
        p.check_in();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(pool.reap(), 2);
        settle().await;
        assert_eq!(pool.counts().open(), 1);
        assert_eq!(closed(&telemetry, "idle_timeout"), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_lifetime_closes_a_busy_connection_at_check_in() {
        let (pool, telemetry) = pool(|c| {
            c.max_lifetime = Duration::from_secs(600);
            c.idle_timeout = Duration::from_secs(3600);
        });
        let _held = fill_idle(&pool, 1).await;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(100)).await;
            let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
                panic!()
            };
            p.send();
            p.check_in();
            assert_eq!(pool.reap(), 0, "used every 100 s: never idle long");
        }
        tokio::time::advance(Duration::from_secs(100)).await;
        let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
            panic!()
        };
        p.send();
        p.check_in();
        settle().await;
        assert_eq!(pool.counts().open(), 0);
        assert_eq!(closed(&telemetry, "max_lifetime"), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_closes_idle_connections_past_max_lifetime() {
        let (pool, telemetry) = pool(|c| {
            c.max_lifetime = Duration::from_secs(60);
            c.idle_timeout = Duration::from_secs(3600);
        });
        let _held = fill_idle(&pool, 2).await;
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(pool.reap(), 2);
        settle().await;
        assert_eq!(closed(&telemetry, "max_lifetime"), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_requests_closes_at_check_in() {
        let (pool, telemetry) = pool(|c| c.max_requests_per_connection = 3);
        let _held = fill_idle(&pool, 1).await;
        for _ in 0..3 {
            let Checkout::Reused(mut p) = pool.checkout().await.unwrap() else {
                panic!()
            };
            p.send();
            p.check_in();
        }
        settle().await;
        assert_eq!(pool.counts().open(), 0);
        assert_eq!(closed(&telemetry, "max_requests"), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn check_ins_beyond_max_idle_are_closed() {
        let (pool, telemetry) = pool(|c| {
            c.max_connections = 4;
            c.max_idle = Some(2);
        });
        let _held = fill_idle(&pool, 4).await;
        settle().await;
        assert_eq!(pool.counts().idle, 2);
        assert_eq!(pool.counts().open(), 2);
        assert_eq!(closed(&telemetry, "max_idle"), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_oldest_first_by_hand_off() {
        let (pool, _) = pool(|c| c.max_connections = 1);
        let (first, _far) = connect(&pool, slot(&pool).await).await;
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..3 {
            let (pool, order) = (pool.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let Checkout::Reused(p) = pool.checkout().await.unwrap() else {
                    panic!()
                };
                order.lock().push(n);
                p.check_in();
            }));
            settle().await; // queue them in a known order
        }
        assert_eq!(pool.counts().queued, 3);
        first.check_in();
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2]);
        assert_eq!(pool.counts().open(), 1, "one connection served everyone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_place_goes_to_the_oldest_waiter_who_then_connects() {
        let (pool, _) = pool(|c| c.max_connections = 1);
        let (first, _far) = connect(&pool, slot(&pool).await).await;
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { matches!(pool.checkout().await.unwrap(), Checkout::Connect(_)) }
        });
        settle().await;
        first.discard(CloseReason::Error); // the socket closes: its place is freed
        assert!(waiter.await.unwrap(), "the waiter got the right to connect");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_limit_and_queue_timeout_bound_the_wait() {
        let (pool, _) = pool(|c| {
            c.max_connections = 1;
            c.queue_limit = 1;
            c.queue_timeout = Duration::from_secs(5);
        });
        let (_held, _far) = connect(&pool, slot(&pool).await).await;
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.checkout().await.err().map(|e| e.classify().1) }
        });
        settle().await;
        let full = pool.checkout().await.err().map(|e| e.classify().1);
        assert_eq!(full, Some("queue_full"));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(waiting.await.unwrap(), Some("queue_timeout"));
        assert_eq!(
            pool.counts().queued,
            0,
            "the timed-out waiter left the queue"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_under_concurrent_checkouts() {
        let (pool, _) = pool(|c| c.max_connections = 3);
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (pool, peak) = (pool.clone(), peak.clone());
                tokio::spawn(async move {
                    let (mut p, far) = match pool.checkout().await.unwrap() {
                        Checkout::Connect(slot) => connect(&pool, slot).await,
                        Checkout::Reused(p) => (p, tokio::io::duplex(1).0),
                    };
                    peak.fetch_max(pool.counts().open(), std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    p.send();
                    p.check_in();
                    far
                })
            })
            .collect();
        let mut held = Vec::new();
        for t in tasks {
            held.push(t.await.unwrap());
        }
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        assert!(pool.counts().open() <= 3);
    }
}
