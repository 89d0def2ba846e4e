//! The connection table of one pool: one [`Entry`] per socket under the cap, keyed
//! by id, holding all the pool knows of it — its state, its clocks, its HTTP/2
//! streams, and its client handle while the pool rather than a request holds it.
//!
//! Kept by this type's methods alone:
//! - [`Table::open`] counts every entry (connecting, active, idle, tunnels), and
//!   [`Table::room`] is the one comparison of it with the cap in force,
//!   [`Limits::cap`].
//! - An entry's state and the per-state count change together, in one call, under
//!   the pool's lock; the `state` gauges are set from those counts, all at once, when
//!   a scrape renders them ([`Table::publish_gauges`]), so a scrape never sees more
//!   than the cap.
//! - An entry holds its client handle exactly while it is an idle HTTP/1.1
//!   connection, listed in the idle stack, or an HTTP/2 connection open to new
//!   streams, listed in the sharing order. Those two lists are orders over entries
//!   (LIFO reuse keeps the rest idle long enough to be reaped; the oldest HTTP/2
//!   connection is filled first so surplus ones go idle), not a second record.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use metrics::Gauge;
use serde::Serialize;
use tokio::time::Instant;

use super::client::Client;
use super::metrics::{CloseReason, ConnState, PerLabel};
use crate::config::PoolConfig;
use crate::upstream::request::RequestBody;

/// The limits a pool works under: its configuration, and the cap in force.
#[derive(Clone)]
pub(super) struct Limits {
    config: Arc<PoolConfig>,
    /// This replica's share of `cluster_max_connections`, when a cluster shares it.
    share: Option<usize>,
}

impl Limits {
    pub(super) fn new(config: PoolConfig, share: Option<usize>) -> Limits {
        Limits {
            config: Arc::new(config),
            share,
        }
    }

    pub(super) fn config(&self) -> &Arc<PoolConfig> {
        &self.config
    }

    /// This replica's cluster share, if a cluster shares the cap.
    pub(super) fn share(&self) -> Option<usize> {
        self.share
    }

    /// The most sockets (connecting + active + idle + tunnels) the pool may have
    /// open: `max_connections`, lowered to the cluster share when there is one.
    /// Every cap check reads it here.
    pub(super) fn cap(&self) -> usize {
        let own = self.config.max_connections;
        self.share.map_or(own, |share| share.min(own))
    }
}

impl Deref for Limits {
    type Target = PoolConfig;

    fn deref(&self) -> &PoolConfig {
        &self.config
    }
}

/// Limits an upstream advertised for one connection, already reduced by tether's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Keepalive {
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_requests: u64,
}

/// One socket under the cap.
pub(super) struct Entry {
    state: ConnState,
    pub(super) created: Instant,
    /// When the socket last went idle (or was created).
    pub(super) idle_at: Instant,
    pub(super) requests: u64,
    pub(super) local_port: u16,
    /// Open HTTP/2 streams (0 for HTTP/1.1).
    pub(super) streams: usize,
    pub(super) h2: bool,
    /// Set by whoever decides to close the socket; read when it is dropped.
    pub(super) reason: Option<CloseReason>,
    /// The TCP connection (and, for TLS upstreams, the handshake) was established;
    /// failed connects are not counted as closed.
    pub(super) opened: bool,
    /// What the upstream advertised (`Keep-Alive: timeout=N, max=M`), when
    /// `adaptive_keepalive` is on: this socket's own idle timeout and request budget.
    pub(super) keepalive: Option<Keepalive>,
    /// The client handle while the pool holds it (see the module docs).
    held: Option<Client>,
    /// An HTTP/1.1 connection's response-head watch, for the reaper to fire.
    pub(super) head: Option<Arc<super::head::HeadWatch>>,
}

impl Entry {
    /// A socket just given its place, in `state`.
    pub(super) fn new(state: ConnState, now: Instant) -> Entry {
        Entry {
            state,
            created: now,
            idle_at: now,
            requests: 0,
            local_port: 0,
            streams: 0,
            h2: false,
            reason: None,
            opened: false,
            keepalive: None,
            held: None,
            head: None,
        }
    }

    pub(super) fn state(&self) -> ConnState {
        self.state
    }

    /// Chooses the reason the socket will be counted as closed with, if none was.
    pub(super) fn close_with(&mut self, reason: CloseReason) {
        self.reason.get_or_insert(reason);
    }

    /// The shared sender of an HTTP/2 connection, while it takes streams.
    pub(super) fn shared(&self) -> Option<&http2::SendRequest<RequestBody>> {
        match &self.held {
            Some(Client::H2(value)) => Some(value),
            _ => None,
        }
    }

    /// A request holds the socket: an HTTP/2 stream is open, or an HTTP/1.1
    /// exchange is under way.
    pub(super) fn in_use(&self) -> bool {
        if self.h2 {
            self.streams > 0
        } else {
            self.state == ConnState::Active
        }
    }
}

/// A state's gauge, the number of entries in it, and how many of them the gauge was
/// last given. Pools may share a gauge (every unlisted origin's is `upstream` =
/// `unlisted`; a pool draining after a reload shares its successor's), so each adds
/// the change since its last publication rather than setting its own count.
struct StateCount {
    gauge: Gauge,
    n: usize,
    published: usize,
}

/// The connection table (see the module docs).
pub(super) struct Table {
    entries: HashMap<u64, Entry>,
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Vec<u64>,
    /// HTTP/2 connections that may take more streams, oldest first.
    sharing: Vec<u64>,
    /// Sockets that closed while a request still held them and no reason was chosen
    /// yet: the holder's check-in (completed) or discard (its reason) decides how the
    /// close is counted. Its count fell when the socket did.
    closed_in_use: HashSet<u64>,
    states: PerLabel<ConnState, StateCount, 5>,
    next_id: u64,
}

impl Table {
    pub(super) fn new(gauges: PerLabel<ConnState, Gauge, 5>) -> Table {
        Table {
            entries: HashMap::new(),
            idle: Vec::new(),
            sharing: Vec::new(),
            closed_in_use: HashSet::new(),
            states: gauges.map(|gauge| StateCount {
                gauge,
                n: 0,
                published: 0,
            }),
            next_id: 1,
        }
    }

    /// Every socket of the pool, tunnels included.
    pub(super) fn open(&self) -> usize {
        self.entries.len()
    }

    /// Places left under the cap in force.
    pub(super) fn room(&self, limits: &Limits) -> usize {
        limits.cap().saturating_sub(self.open())
    }

    /// One more socket may open.
    pub(super) fn has_room(&self, limits: &Limits) -> bool {
        self.room(limits) > 0
    }

    /// Sockets above the cap in force (a lowered cap closes them as they come back).
    pub(super) fn surplus(&self, limits: &Limits) -> usize {
        self.open().saturating_sub(limits.cap())
    }

    /// Sockets in `state`.
    pub(super) fn count(&self, state: ConnState) -> usize {
        self.states.get(state).n
    }

    /// A new entry in `state`; its id.
    pub(super) fn insert(&mut self, state: ConnState, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(id, Entry::new(state, now));
        self.states.get_mut(state).n += 1;
        id
    }

    /// The socket is gone: its entry, with the handle it held (to be dropped after
    /// the lock).
    pub(super) fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.states.get_mut(entry.state).n -= 1;
        if entry.held.is_some() {
            let order = if entry.h2 {
                &mut self.sharing
            } else {
                &mut self.idle
            };
            if let Some(pos) = order.iter().position(|&i| i == id) {
                order.remove(pos);
            }
        }
        Some(entry)
    }

    pub(super) fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&id)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(&id, e)| (id, e))
    }

    /// Moves entry `id` to `state`, its count with it.
    pub(super) fn set_state(&mut self, id: u64, state: ConnState) -> Option<&mut Entry> {
        let entry = self.entries.get_mut(&id)?;
        if entry.state != state {
            self.states.get_mut(entry.state).n -= 1;
            self.states.get_mut(state).n += 1;
            entry.state = state;
        }
        Some(entry)
    }

    /// The response-head watches of the HTTP/1.1 connections.
    pub(super) fn heads(&self) -> impl Iterator<Item = &super::head::HeadWatch> {
        self.entries.values().filter_map(|e| e.head.as_deref())
    }

    /// Brings this pool's part of every `state` gauge to its count: one consistent
    /// picture of the pool for the scrape about to render them.
    pub(super) fn publish_gauges(&mut self) {
        for state in ConnState::ALL {
            let count = self.states.get_mut(state);
            if count.n != count.published {
                count
                    .gauge
                    .increment(count.n as f64 - count.published as f64);
                count.published = count.n;
            }
        }
    }

    /// Chooses the reason socket `id` will be counted as closed with, if none was.
    pub(super) fn close_with(&mut self, id: u64, reason: CloseReason) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.close_with(reason);
        }
    }

    /// Idle HTTP/1.1 connections.
    pub(super) fn idle_len(&self) -> usize {
        self.idle.len()
    }

    /// Idle HTTP/1.1 connections, least recently used first.
    pub(super) fn idle_ids(&self) -> &[u64] {
        &self.idle
    }

    /// HTTP/1.1 connection `id` goes idle, its sender held by the pool.
    pub(super) fn push_idle(&mut self, id: u64, value: Client, now: Instant) {
        let Some(entry) = self.set_state(id, ConnState::Idle) else {
            return;
        };
        entry.idle_at = now;
        entry.held = Some(value);
        self.idle.push(id);
    }

    /// The most recently used idle connection, now active.
    pub(super) fn pop_idle(&mut self) -> Option<(u64, Client)> {
        let id = self.idle.pop()?;
        let entry = self.set_state(id, ConnState::Active)?;
        Some((
            id,
            entry.held.take().expect("an idle entry holds its sender"),
        ))
    }

    /// Takes idle connection `id` off the idle stack to be closed with `reason`. The
    /// caller drops the returned sender after releasing the lock.
    pub(super) fn take_idle(&mut self, id: u64, reason: CloseReason) -> Option<Client> {
        let pos = self.idle.iter().position(|&i| i == id)?;
        self.idle.remove(pos);
        let entry = self.entries.get_mut(&id)?;
        entry.close_with(reason);
        entry.held.take()
    }

    /// Closes the idle connections `verdict` gives a reason for, keeping the order of
    /// the rest. `verdict` sees each entry with its place in the stack, least
    /// recently used first. The caller drops the senders after releasing the lock.
    pub(super) fn expire_idle(
        &mut self,
        mut verdict: impl FnMut(&Entry, usize) -> Option<CloseReason>,
    ) -> Vec<Client> {
        let mut victims = Vec::new();
        let entries = &mut self.entries;
        let mut place = 0;
        // One pass, keeping order (LIFO reuse relies on it): O(n), not O(n²).
        self.idle.retain(|id| {
            let entry = entries.get_mut(id).expect("idle ids name entries");
            let reason = verdict(entry, place);
            place += 1;
            match reason {
                Some(reason) => {
                    entry.close_with(reason);
                    victims.extend(entry.held.take());
                    false
                }
                None => true,
            }
        });
        victims
    }

    /// HTTP/2 connection `id` is shared: requests may open streams on it.
    pub(super) fn share(&mut self, id: u64, value: http2::SendRequest<RequestBody>) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.h2 = true;
        entry.held = Some(Client::H2(value));
        self.sharing.push(id);
    }

    /// HTTP/2 connections that may take more streams, oldest first.
    pub(super) fn sharing(&self) -> &[u64] {
        &self.sharing
    }

    /// The shared sender of HTTP/2 connection `id`, while it takes streams.
    pub(super) fn shared(&self, id: u64) -> Option<&http2::SendRequest<RequestBody>> {
        self.entries.get(&id)?.shared()
    }

    /// Takes HTTP/2 connection `id` out of sharing, to close with `reason` once its
    /// last stream ends. The caller drops the returned sender after the lock.
    pub(super) fn unshare(&mut self, id: u64, reason: CloseReason) -> Option<Client> {
        let pos = self.sharing.iter().position(|&i| i == id)?;
        self.sharing.remove(pos);
        let entry = self.entries.get_mut(&id)?;
        entry.close_with(reason);
        entry.held.take()
    }

    /// Socket `id`, gone with no reason chosen while a request held it, waits for
    /// the holder to say how it ended.
    pub(super) fn closed_in_use(&mut self, id: u64) {
        self.closed_in_use.insert(id);
    }

    /// The holder of socket `id` has said how it ended: whether its close was still
    /// to be counted.
    pub(super) fn take_closed_in_use(&mut self, id: u64) -> bool {
        self.closed_in_use.remove(&id)
    }
}
