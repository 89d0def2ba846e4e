//! The shared state of one pool and the handles that hold a place in it.
//!
//! A [`Slot`] is the right to one socket under the cap; a [`Pooled`] is a connection
//! checked out for one request. Both hold the pool's [`Inner`] and give their place
//! back when dropped: [`Inner::release`] when the socket is gone, [`Inner::check_in`]
//! when an exchange completed. Everything here runs under the pool's lock, taken once
//! per call; handles that may close a socket are dropped after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::time::Instant;

use super::client::{Client, SendRequest};
use super::expire::{close_at_check_in, AtCheckIn};
use super::h2;
use super::head::{Due, HeadWatch};
use super::metrics::{CloseReason, ConnState, PoolMetrics};
use super::queue::Queue;
use super::table::{Limits, Table};
use crate::clock::MsClock;
use crate::upstream::budget::{Budget, BudgetMember, MemberStats};
use crate::upstream::connect::Connector;

/// What one pool shares between its façade, its slots and connections, and its
/// reaper.
pub(super) struct Inner {
    pub(super) name: Arc<str>,
    pub(super) connector: Connector,
    pub(super) limits: RwLock<Limits>,
    pub(super) state: Mutex<State>,
    pub(super) metrics: PoolMetrics,
    /// The shared `[budget]`, when one is configured.
    pub(super) budget: Option<Arc<Budget>>,
    /// This pool's counts as the budget sees them.
    pub(super) member: Arc<MemberStats>,
    /// Tells the reaper that a deadline is earlier than any it knew of: a waiter's
    /// ([`Queue::armed`](super::queue::Queue::armed)) or a response head's
    /// ([`Inner::heads_due`]).
    pub(super) due: Arc<tokio::sync::Notify>,
    /// The pool's millisecond clock, on which response heads are due.
    pub(super) clock: MsClock,
    /// The earliest response-head deadline the reaper will wake for (pool
    /// milliseconds; `u64::MAX`: none).
    pub(super) heads_due: AtomicU64,
}

/// What the pool's lock guards.
pub(super) struct State {
    pub(super) table: Table,
    /// The upstream has spoken h2: while one of its connections is being opened,
    /// further requests wait for its streams instead of opening more.
    pub(super) h2_known: bool,
    pub(super) queue: Queue<Grant>,
    pub(super) draining: bool,
}

/// What a waiter is handed: a ready connection, or the right to open one.
pub(super) enum Grant {
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

impl Inner {
    /// The limits in force (a cheap clone, read once per operation).
    pub(super) fn limits(&self) -> Limits {
        self.limits.read().clone()
    }

    /// The right to one more socket, if the shared budget (when there is one)
    /// allows it; the caller has checked the pool's own cap.
    pub(super) fn new_slot(self: &Arc<Self>, st: &mut State, state: ConnState) -> Option<Slot> {
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
    pub(super) fn publish(&self, st: &State) {
        if self.budget.is_some() {
            self.member.open.store(st.table.open(), Ordering::Relaxed);
            self.member.waiting.store(st.queue.len(), Ordering::Relaxed);
        }
    }

    /// Whether this pool should leave a freed budget unit to a pool below its floor.
    pub(super) fn yields_budget(&self, st: &State) -> bool {
        self.budget.as_ref().is_some_and(|b| {
            st.table.open() >= self.member.floor.load(Ordering::Relaxed)
                && b.is_full()
                && b.someone_starved_besides(&self.member)
        })
    }

    /// Closes the least recently used idle socket, if more than `keep` are open.
    pub(super) fn evict_oldest_idle(&self, keep: usize) -> bool {
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

    pub(super) fn set_reason(&self, id: u64, reason: CloseReason) {
        let mut st = self.state.lock();
        if let Some(entry) = st.table.get_mut(id) {
            entry.close_with(reason);
        } else if st.table.take_closed_in_use(id) {
            self.metrics.closed(reason);
        }
    }

    /// A stream on a shared HTTP/2 connection with one free (see [`h2::pick`]).
    pub(super) fn take_stream(self: &Arc<Self>, st: &mut State, limits: &Limits) -> Option<Pooled> {
        let id = h2::pick(&st.table, limits)?;
        self.stream_on(st, id)
    }

    /// Opens one more stream on HTTP/2 connection `id`.
    pub(super) fn stream_on(self: &Arc<Self>, st: &mut State, id: u64) -> Option<Pooled> {
        let (value, reused) = h2::open_stream(&mut st.table, id)?;
        Some(Pooled::new(self.clone(), id, value, reused))
    }

    /// Gives `pooled` to the oldest waiter still waiting; back if there is none.
    pub(super) fn hand_to_waiter(&self, st: &mut State, pooled: Pooled) -> Result<(), Pooled> {
        st.queue
            .hand_off(Grant::Idle(pooled))
            .map_err(|back| match back {
                Grant::Idle(pooled) => pooled,
                Grant::Connect(_) => unreachable!("handed off a connection"),
            })
    }

    /// Sends `Expired` to the waiters past their deadline at `now`; when the reaper
    /// must look at the queue next.
    pub(super) fn expire_waiters(&self, now: Instant) -> Option<Instant> {
        let mut st = self.state.lock();
        if st.queue.expire(now) > 0 {
            self.publish(&st);
        }
        st.queue.armed()
    }

    /// Arms `head` with the deadline `at` and wakes the reaper if it would sleep past it.
    pub(super) fn arm_head(&self, head: &HeadWatch, at: Instant) {
        // Rounded up: a deadline never fires early.
        let at = self.clock.ms_ceil(at);
        head.arm(at);
        // Read first: with one timeout for all, a later request's deadline is later
        // than the one the reaper waits for, and the word is not written.
        if at < self.heads_due.load(Ordering::SeqCst)
            && at < self.heads_due.fetch_min(at, Ordering::SeqCst)
        {
            self.due.notify_one();
        }
    }

    /// Fires the response-head deadlines due at `now`; when the reaper must look
    /// again, if any deadline is armed.
    pub(super) fn expire_heads(&self, now: Instant) -> Option<Instant> {
        let now_ms = self.clock.ms(now);
        let at = |ms| self.clock.at(ms);
        let due = self.heads_due.load(Ordering::SeqCst);
        if due > now_ms {
            // Nothing can be due: the reaper woke for something else.
            return (due != u64::MAX).then(|| at(due));
        }
        // Cleared before the scan, lowered after it: a deadline armed meanwhile
        // either is seen by the scan or finds the word above it and wakes the reaper.
        self.heads_due.store(u64::MAX, Ordering::SeqCst);
        let mut next = None;
        let mut fired = Vec::new();
        {
            let st = self.state.lock();
            for head in st.table.heads() {
                match head.fire_if_due(now_ms) {
                    Due::Idle => {}
                    Due::Later(ms) => next = Some(next.map_or(ms, |n: u64| n.min(ms))),
                    Due::Fired(waker) => fired.extend(waker),
                }
            }
        }
        // Woken after the lock: a wake-up may unpark another worker.
        fired.into_iter().for_each(Waker::wake);
        let next = next?;
        self.heads_due.fetch_min(next, Ordering::SeqCst);
        Some(at(next))
    }

    /// Pops the most recently used idle connection that is still open.
    pub(super) fn take_idle(self: &Arc<Self>, st: &mut State) -> Option<Pooled> {
        while let Some((id, value)) = st.table.pop_idle() {
            if value.is_closed() {
                // Its driver is finishing; the slot's drop will count it.
                st.table.close_with(id, CloseReason::RemoteClosed);
                continue;
            }
            return Some(Pooled::new(self.clone(), id, value, true));
        }
        None
    }

    /// Hands free capacity to waiters, oldest first. Returns grants whose waiter had
    /// already gone, to be dropped (and so released) after the lock.
    pub(super) fn grant_waiters(self: &Arc<Self>, st: &mut State, limits: &Limits) -> Vec<Grant> {
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
    pub(super) fn release(self: &Arc<Self>, id: u64) {
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
    pub(super) fn check_in(self: &Arc<Self>, id: u64, value: Client) {
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
        let last_stream = entry.h2 && h2::end_stream(entry);
        let close = close_at_check_in(entry, &limits, now, at);
        if let Client::H2(_) = value {
            drop(value); // the shared handle stays in the table while it may take streams
            return self.stream_ended(st, id, close, last_stream, now);
        }
        if let Some(reason) = close {
            entry.close_with(reason);
            drop(st);
            drop(value);
            return;
        }
        // Hand-off before idling: the oldest live waiter gets it. (With nobody
        // waiting, no `Pooled`, and no reference to the pool, is made for it.)
        let value = if st.queue.is_empty() {
            value
        } else {
            let pooled = Pooled::new(self.clone(), id, value, true);
            let Err(mut pooled) = self.hand_to_waiter(&mut st, pooled) else {
                return;
            };
            let value = pooled.value.take().expect("present until handed on");
            drop(pooled); // value taken: dropping it does nothing
            value
        };
        if st.table.idle_len() >= limits.idle_limit() {
            st.table.close_with(id, CloseReason::MaxIdle);
            drop(st);
            drop(value);
            return;
        }
        st.table.push_idle(id, value, now);
    }

    /// The HTTP/2 half of [`Inner::check_in`]: a stream of connection `id` ended.
    /// The connection leaves sharing if it must `close` (and closes with its last
    /// stream); else the oldest waiter gets the freed stream; else, when that was the
    /// last stream, the connection goes idle.
    fn stream_ended(
        self: &Arc<Self>,
        mut st: MutexGuard<'_, State>,
        id: u64,
        close: Option<CloseReason>,
        last_stream: bool,
        now: Instant,
    ) {
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
        if last_stream {
            if let Some(entry) = st.table.set_state(id, ConnState::Idle) {
                entry.idle_at = now;
            }
        }
        drop(st);
        drop(retired);
    }

    /// Counts a request on a connection.
    pub(super) fn note_request(&self, id: u64) {
        if let Some(entry) = self.state.lock().table.get_mut(id) {
            entry.requests += 1;
        }
    }

    pub(super) fn set_tunnel_idle(&self, id: u64, idle: bool) {
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
    /// Connection `id` checked out, nothing sent on it yet.
    pub(super) fn new(inner: Arc<Inner>, id: u64, value: SendRequest, reused: bool) -> Pooled {
        Pooled {
            inner,
            id,
            value: Some(value),
            reused,
            sent: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_h2(&self) -> bool {
        self.value.as_ref().is_some_and(Client::is_h2)
    }

    /// The watch on the response-head deadline of an HTTP/1.1 connection, once the
    /// pool's reaper keeps it (a connection whose entry was gone before it was
    /// registered has none, and its request a timer).
    pub fn head(&self) -> Option<&HeadWatch> {
        self.value
            .as_ref()
            .and_then(Client::head)
            .map(|h| &**h)
            .filter(|h| h.is_registered())
    }

    /// Arms this connection's response-head deadline `at`, for the pool's reaper to
    /// fire then; false if the connection has no watch (HTTP/2), whose request
    /// needs a timer of its own.
    pub fn arm_head(&self, at: Instant) -> bool {
        let head = self.head();
        if let Some(head) = head {
            self.inner.arm_head(head, at);
        }
        head.is_some()
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
        self.release(None);
    }

    /// Closes the connection, counted with `reason`, or, for an HTTP/2 stream, ends
    /// that stream alone (see [`release`](Self::release)).
    pub fn discard(mut self, reason: CloseReason) {
        self.release(Some(reason));
    }

    /// Ends this handle's exchange: checked in when it completed (`cut_short` is
    /// `None`); otherwise an HTTP/1.1 connection, in a state unknown, closes with the
    /// reason. An HTTP/2 stream cut short is checked in all the same: hyper resets it
    /// as its handles drop, its place on the shared connection is free again, and
    /// the connection closes only if check-in finds it closed or past a limit.
    fn release(&mut self, cut_short: Option<CloseReason>) {
        let Some(value) = self.value.take() else {
            return;
        };
        match cut_short {
            Some(reason) if !value.is_h2() => self.inner.set_reason(self.id, reason),
            _ => self.inner.check_in(self.id, value),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A request sent and not seen through was cut short.
        self.release(self.sent.then_some(CloseReason::Error));
    }
}

/// The state and queue gauges, set from the table and the queue under the lock when
/// a scrape renders.
impl crate::telemetry::Collect for Inner {
    fn collect(&self) {
        let mut st = self.state.lock();
        st.table.publish_gauges();
        st.queue.publish_depth();
    }
}

/// A pool goes once its last socket has: its gauges fall to the table's zeros, and
/// its queue's to none waiting.
impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        st.table.publish_gauges();
        st.queue.unpublish_depth();
    }
}

impl BudgetMember for Inner {
    fn grant_from_budget(self: Arc<Self>) {
        let limits = self.limits();
        let grants = {
            let mut st = self.state.lock();
            self.grant_waiters(&mut st, &limits)
        };
        drop(grants);
    }

    fn evict_one_idle(&self) -> bool {
        self.evict_oldest_idle(self.member.floor.load(Ordering::Relaxed))
    }
}
