//! A client connection's state and the guards that keep its accounting true: the
//! registry of open connections ([`Downstream`]), each connection's clocks and
//! in-flight count ([`ClientConn`]), a request in flight ([`RequestGuard`]), and the
//! guard that rides inside the socket and deregisters it when the socket drops.
//!
//! Invariant: a connection is in `Downstream::conns` exactly while its socket exists
//! (the [`ClientGuard`] inside the socket's IO removes it), and it is counted in the
//! `active` or the `idle` gauge, never both, switching under its `in_flight` count.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use super::close::ClientClose;
use crate::clock::MsClock;
use crate::error::ProxyError;
use crate::telemetry::{self as t, Telemetry};

/// Downstream accounting shared by all listeners.
pub struct Downstream {
    /// The open client connections (low half) and those of them with a request in
    /// flight (high half), in one word so that a scrape reads the two together
    /// ([`Downstream::collect`]): two gauges moved live would be read at two moments.
    counts: AtomicU64,
    active: Gauge,
    idle: Gauge,
    /// Idle connections held as bare sockets (a subset of `idle`), moved live: a
    /// scrape reads it apart from `counts`, so it may differ from them by the
    /// connections that changed in between.
    pub(super) parked: Gauge,
    /// `tether_suspected_leaking_clients`, set at each scrape.
    suspects: Gauge,
    pub(super) opened: Counter,
    /// One per [`ClientClose`], in [`ClientClose::ALL`] order.
    closed: [Counter; 9],
    rejected: Mutex<HashMap<&'static str, Counter>>,
    telemetry: Arc<Telemetry>,
    pub(super) conns: Mutex<Registry>,
    /// Woken whenever a client socket drops: admission waits on it for its victim.
    pub(super) freed: Notify,
    ids: AtomicU64,
    /// The zero of every connection's millisecond clock (`ClientConn::now_ms`): one
    /// for all, so a connection does not carry its own 16-byte `Instant`.
    clock: MsClock,
    /// Per-client-address counters for leak diagnosis.
    pub clients: crate::diagnosis::Clients,
}

/// The open client connections, and how many each client (peer IP) holds: both
/// change together under one lock, so admission's per-client count is exact.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) conns: HashMap<u64, Arc<ClientConn>>,
    /// Only clients with a connection open: bounded by the open connections.
    pub(super) clients: HashMap<IpAddr, ClientCount>,
}

/// One client's open connections and the evictions they have suffered.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ClientCount {
    pub(super) open: usize,
    pub(super) evicted: u64,
}

impl Registry {
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<ClientConn>> {
        self.conns.values()
    }

    /// Connections `ip` holds.
    pub(super) fn open_from(&self, ip: IpAddr) -> usize {
        self.clients.get(&ip).map_or(0, |c| c.open)
    }

    pub(super) fn insert(&mut self, conn: Arc<ClientConn>) {
        self.clients.entry(conn.peer.ip()).or_default().open += 1;
        self.conns.insert(conn.id, conn);
    }

    fn remove(&mut self, conn: &ClientConn) {
        if self.conns.remove(&conn.id).is_none() {
            return;
        }
        let ip = conn.peer.ip();
        if let Some(c) = self.clients.get_mut(&ip) {
            c.open -= 1;
            if c.open == 0 {
                self.clients.remove(&ip);
            }
        }
    }
}

/// One client in `/debug/clients`' fair-share table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientShare {
    pub address: String,
    pub connections_open: usize,
    /// `max_connections_per_client` in force (`null`: no per-client limit).
    pub limit: Option<usize>,
    /// Its connections evicted to make room since it last had none open.
    pub evicted: u64,
}

/// Set in [`ClientConn::in_flight`] when the socket drops: the request guards still
/// alive (hyper may drop a response body after the socket) then leave
/// [`Downstream::counts`] alone.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Set in [`ClientConn::events`] while the watcher polls hyper.
const POLLING: u8 = 1 << 7;

/// What happened on a connection since its watcher last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Events(u8);

impl Events {
    /// The last request in flight ended: the parking countdown starts.
    const REQUEST_ENDED: u8 = 1;
    /// The connection is asked to close (eviction, shutdown).
    const CLOSE: u8 = 1 << 1;

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn close_requested(self) -> bool {
        self.0 & Events::CLOSE != 0
    }
}

/// One client connection's shared state.
pub struct ClientConn {
    pub id: u64,
    pub peer: SocketAddr,
    /// Requests in flight, plus [`CLOSED`] once the socket has dropped.
    pub(super) in_flight: AtomicUsize,
    /// Milliseconds (as [`ClientConn::now_ms`]) when the connection last went idle.
    pub(super) idle_since: AtomicU64,
    /// Milliseconds (as [`ClientConn::now_ms`], +1; 0 = none) when the first byte of a request
    /// head arrived on an idle connection.
    pub(super) head_started: AtomicU64,
    pub(super) reason: AtomicU8,
    /// Chosen as an eviction victim: never chosen again.
    pub(super) evicting: AtomicBool,
    /// A request began on it (for the leak diagnosis: connections used).
    used: AtomicBool,
    /// What the connection's watcher is to look at: [`Events`] bits, and [`POLLING`]
    /// while it is inside hyper's poll (then it looks anyway, and needs no wake-up).
    events: AtomicU8,
    /// The watcher's task, woken when an event arrives from outside its own poll.
    watcher: AtomicWaker,
    pub(super) downstream: Arc<Downstream>,
    /// A CONNECT answered `200`: the tunnel to run once hyper hands the socket back.
    handoff: Handoff,
    /// The socket while it is parked: no task and no HTTP state, only this slot and
    /// the reactor's wake-up (see `server::park`).
    pub(super) parked: Mutex<Option<Box<dyn Parked>>>,
}

/// A client socket parked with no task (see `server::park`): what the connection's
/// state needs of it, without knowing its type.
pub(crate) trait Parked: Send {
    /// The listener it came from has stopped (a route removed by a reload).
    fn listener_stopped(&self) -> bool;
    /// Serves it again on a new task: the reactor reported it readable.
    fn resume(self: Box<Self>, conn: Arc<ClientConn>);
}

/// What a client socket becomes after `CONNECT`: the other end and the tunnel governor.
pub struct TunnelJob {
    pub tunnels: crate::upstream::tunnel::Tunnels,
    pub upstream: crate::upstream::Tracked<TcpStream>,
    /// Keeps the client connection counted as active for the tunnel's life.
    pub busy: RequestGuard,
    /// What the tunnel's access-log line names.
    pub log: crate::upstream::tunnel::TunnelLog,
}

/// The CONNECT hand-off between the request path and the server side. The request
/// path answers `CONNECT` with `200` and fills the connection's [`Handoff`] with the
/// governed upstream socket; hyper writes the response and, seeing the connection
/// end, hands the client socket back to the server side, which drains the hand-off
/// and runs the tunnel on the same task. A filled hand-off is also how the watcher
/// knows the socket is to become a tunnel rather than be parked or closed.
///
/// One connection's slot: filled at most once, by the request path.
#[derive(Default)]
pub struct Handoff(Mutex<Option<Box<TunnelJob>>>);

impl Handoff {
    /// Hands `job` over: the connection turns into its tunnel once the `200` is
    /// written.
    pub fn fill(&self, job: TunnelJob) {
        *self.0.lock() = Some(Box::new(job));
    }

    /// A tunnel is waiting for the socket.
    pub fn is_filled(&self) -> bool {
        self.0.lock().is_some()
    }

    /// The tunnel waiting for the socket, if any.
    pub fn take(&self) -> Option<Box<TunnelJob>> {
        self.0.lock().take()
    }
}

/// One open connection in [`Downstream::counts`].
const ONE_OPEN: u64 = 1;
/// One connection with a request in flight in [`Downstream::counts`].
const ONE_ACTIVE: u64 = 1 << 32;

/// The `active` and `idle` gauges, set from one read of the counts at each render.
impl t::Collect for Downstream {
    fn collect(&self) {
        let counts = self.counts.load(Ordering::Relaxed);
        let (open, active) = (counts & (ONE_ACTIVE - 1), counts >> 32);
        self.active.set(active as f64);
        self.idle.set(open.saturating_sub(active) as f64);
    }
}

impl Downstream {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<Downstream> {
        let downstream = Arc::new(Downstream {
            counts: AtomicU64::new(0),
            active: telemetry.gauge(t::DOWNSTREAM_CONNECTIONS, &[("state", "active")]),
            idle: telemetry.gauge(t::DOWNSTREAM_CONNECTIONS, &[("state", "idle")]),
            parked: telemetry.gauge(t::DOWNSTREAM_PARKED, &[]),
            suspects: telemetry.gauge(t::SUSPECTED_LEAKS, &[]),
            opened: telemetry.counter(t::DOWNSTREAM_OPENED, &[]),
            closed: ClientClose::ALL
                .map(|r| telemetry.counter(t::DOWNSTREAM_CLOSED, &[("reason", r.as_str())])),
            // Every code at zero from the start, so `rate()` sees the first one.
            rejected: Mutex::new(
                ProxyError::CODES
                    .iter()
                    .map(|&code| {
                        let counter =
                            telemetry.counter(t::DOWNSTREAM_REJECTED, &[("reason", code)]);
                        (code, counter)
                    })
                    .collect(),
            ),
            telemetry: telemetry.clone(),
            conns: Mutex::default(),
            freed: Notify::new(),
            ids: AtomicU64::new(1),
            clock: MsClock::new(),
            clients: Default::default(),
        });
        telemetry.collect_on_render(Arc::downgrade(&downstream) as Weak<dyn t::Collect>);
        downstream
    }

    /// Counts a request tether answered with an error of its own, by its
    /// `x-tether-error` code.
    pub fn reject(&self, code: &'static str) {
        self.rejected
            .lock()
            .entry(code)
            .or_insert_with(|| {
                self.telemetry
                    .counter(t::DOWNSTREAM_REJECTED, &[("reason", code)])
            })
            .increment(1);
    }

    pub fn open(&self) -> usize {
        self.conns.lock().len()
    }

    /// Sets `tether_suspected_leaking_clients` from the diagnosis: how many of the
    /// top `config.top_clients` clients look like they leak connections. Called
    /// before each scrape, so the gauge is as fresh as the scrape.
    pub fn count_suspects(&self, config: &crate::config::DiagnosisConfig) {
        let n = self
            .clients
            .top(config)
            .iter()
            .filter(|c| c.suspected_leak)
            .count();
        self.suspects.set(n as f64);
    }

    /// Client connections open from `ip` (what `max_connections_per_client` limits).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.conns.lock().open_from(ip)
    }

    /// The `n` clients holding the most connections, with `limit` (the
    /// `max_connections_per_client` in force) and their evictions.
    pub fn top_by_connections(&self, n: usize, limit: Option<usize>) -> Vec<ClientShare> {
        let mut all: Vec<(IpAddr, ClientCount)> = self
            .conns
            .lock()
            .clients
            .iter()
            .map(|(ip, c)| (*ip, *c))
            .collect();
        all.sort_by(|a, b| b.1.open.cmp(&a.1.open).then(a.0.cmp(&b.0)));
        all.truncate(n);
        all.into_iter()
            .map(|(ip, c)| ClientShare {
                address: ip.to_string(),
                connections_open: c.open,
                limit,
                evicted: c.evicted,
            })
            .collect()
    }

    /// `now` as milliseconds on the connections' clock.
    fn ms_at(&self, now: Instant) -> u64 {
        self.clock.ms(now)
    }

    /// A new connection's state, counted as opened and idle; the caller inserts it
    /// into `conns`.
    pub(super) fn new_conn(self: &Arc<Self>, peer: SocketAddr) -> Arc<ClientConn> {
        let now = self.ms_at(Instant::now());
        let conn = Arc::new(ClientConn {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            peer,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            // A new connection is reading its first head from the start, so a client
            // that connects and sends nothing is closed after header_read_timeout.
            head_started: AtomicU64::new(now + 1),
            reason: AtomicU8::new(ClientClose::ClientClosed as u8),
            evicting: AtomicBool::new(false),
            used: AtomicBool::new(false),
            events: AtomicU8::new(0),
            watcher: AtomicWaker::new(),
            downstream: self.clone(),
            handoff: Handoff::default(),
            parked: Mutex::new(None),
        });
        self.opened.increment(1);
        self.counts.fetch_add(ONE_OPEN, Ordering::Relaxed);
        conn
    }

    /// Registers a connection with no limit (unit tests).
    #[cfg(test)]
    pub(crate) fn register(self: &Arc<Self>, peer: SocketAddr) -> Arc<ClientConn> {
        let conn = self.new_conn(peer);
        self.conns.lock().insert(conn.clone());
        conn
    }

    /// Counts a client connection closed for `reason`.
    pub(super) fn count_close(&self, reason: ClientClose) {
        self.closed[reason as usize].increment(1);
    }
}

impl ClientConn {
    /// Milliseconds on the connections' clock (since their [`Downstream`] began).
    pub(crate) fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `now` as milliseconds on the connection's clock (as [`ClientConn::now_ms`]).
    pub(crate) fn ms_at(&self, now: Instant) -> u64 {
        self.downstream.ms_at(now)
    }

    /// A request is in flight.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) & !CLOSED > 0
    }

    /// How long the connection has been idle at `now_ms` (as [`ClientConn::now_ms`]).
    pub(crate) fn idle_at(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.idle_since.load(Ordering::Relaxed)))
    }

    pub(crate) fn set_reason(&self, reason: ClientClose) {
        self.reason.store(reason as u8, Ordering::Relaxed);
    }

    /// The reason the connection will be counted under when it closes.
    pub(crate) fn reason(&self) -> ClientClose {
        ClientClose::from_u8(self.reason.load(Ordering::Relaxed))
    }

    /// Closes the connection for `reason`: at once if it is parked, otherwise its
    /// task closes it gracefully (an in-flight response is finished first).
    pub(crate) fn close(&self, reason: ClientClose) {
        self.set_reason(reason);
        self.signal(Events::CLOSE);
        // Dropped outside the slot's lock: the socket's guard deregisters it.
        let parked = self.unpark();
        drop(parked);
    }

    /// The clock of a request head that has begun to arrive: milliseconds (as
    /// [`ClientConn::now_ms`]) + 1, or 0 when none has.
    pub(crate) fn head_started(&self) -> u64 {
        self.head_started.load(Ordering::Relaxed)
    }

    /// A request head begins to arrive now: its clock starts.
    pub(crate) fn head_starting(&self) {
        self.head_started
            .store(self.now_ms() + 1, Ordering::Relaxed);
    }

    /// Sets `event` for the watcher, and wakes it unless it is polling hyper (it
    /// reads the events right after; this is how the end of a request, which hyper's
    /// poll drops, costs no second poll of the task).
    fn signal(&self, event: u8) {
        if self.events.fetch_or(event, Ordering::AcqRel) & POLLING == 0 {
            self.watcher.wake();
        }
    }

    /// Runs hyper's poll `f` (for the watcher): an event set meanwhile wakes nobody,
    /// since [`ClientConn::poll_events`] follows.
    pub(crate) fn polling<T>(&self, f: impl FnOnce() -> T) -> T {
        self.events.fetch_or(POLLING, Ordering::AcqRel);
        let out = f();
        self.events.fetch_and(!POLLING, Ordering::AcqRel);
        out
    }

    /// Takes the events set since the last call, and registers the watcher's task to
    /// be woken by the next one.
    pub(crate) fn poll_events(&self, cx: &mut std::task::Context<'_>) -> Events {
        self.watcher.register(cx.waker());
        Events(self.events.swap(0, Ordering::AcqRel) & !POLLING)
    }

    /// The watcher is done with the connection (the socket closes, parks or becomes a
    /// tunnel): the waker it registered is let go. A waker holds its task's memory
    /// (512 bytes for a client task), which a parked socket would keep for as long
    /// as it stays parked.
    pub(crate) fn unwatch(&self) {
        drop(self.watcher.take());
    }

    /// Where a CONNECT's tunnel waits for this connection's socket.
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// Parks `socket` in the connection's slot, unless `readable` says it already
    /// is (then it comes back), or the connection was asked to close (then it drops). `readable` runs under the slot's lock, so that a
    /// wake-up it registers, firing on another thread, finds the socket in place.
    pub(crate) fn park<P: Parked + 'static>(
        &self,
        socket: P,
        readable: impl FnOnce(&P) -> bool,
    ) -> Option<P> {
        let mut slot = self.parked.lock();
        // Asked to close before its watcher saw it (the request to close came as
        // hyper handed the socket back): close now rather than park it until its
        // next request or its idle timeout. Read under the slot's lock, which
        // `close` takes after setting the bit, so one of the two drops the socket.
        if self.events.load(Ordering::Acquire) & Events::CLOSE != 0 {
            drop(slot);
            drop(socket);
            return None;
        }
        if readable(&socket) {
            return Some(socket);
        }
        *slot = Some(Box::new(socket));
        self.downstream.parked.increment(1.0);
        None
    }

    /// The socket is parked.
    #[cfg(test)]
    pub(crate) fn is_parked(&self) -> bool {
        self.parked.lock().is_some()
    }

    /// Takes the parked socket, if there is one, out of its slot.
    pub(super) fn unpark(&self) -> Option<Box<dyn Parked>> {
        let socket = self.parked.lock().take();
        if socket.is_some() {
            self.downstream.parked.decrement(1.0);
        }
        socket
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.begin_request_at(Instant::now())
    }

    /// [`begin_request`](Self::begin_request) for a request that began `started`:
    /// the one clock read its accounting, its access record and its upstream
    /// deadline share.
    pub fn begin_request_at(self: &Arc<Self>, started: Instant) -> RequestGuard {
        self.head_started.store(0, Ordering::Relaxed);
        // Requests on one connection come one at a time; the swap is taken once.
        let first = !self.used.load(Ordering::Relaxed) && !self.used.swap(true, Ordering::Relaxed);
        self.downstream
            .clients
            .request(self.peer.ip(), started, first);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.downstream
                .counts
                .fetch_add(ONE_ACTIVE, Ordering::Relaxed);
        }
        RequestGuard { conn: self.clone() }
    }

    pub(crate) fn bytes_read(&self) {
        if !self.busy() && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }
}

/// The reactor's wake-up for a parked socket: serve it again.
impl std::task::Wake for ClientConn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(socket) = self.unpark() {
            socket.resume(self.clone());
        } // else: already woken, or closed
    }
}

/// A request in flight on a client connection; dropped when its response is done.
pub struct RequestGuard {
    conn: Arc<ClientConn>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.idle_since.store(conn.now_ms(), Ordering::Relaxed);
        // Only while the socket is open: once it has dropped (a client that left
        // mid-request), its guard took the connection out of the counts.
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.downstream
                .counts
                .fetch_sub(ONE_ACTIVE, Ordering::Relaxed);
            conn.signal(Events::REQUEST_ENDED);
        }
    }
}

/// Lives inside the client socket's IO: deregisters and counts the close when the
/// socket is dropped.
pub(crate) struct ClientGuard {
    pub(crate) conn: Arc<ClientConn>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        let d = &conn.downstream;
        d.conns.lock().remove(conn);
        d.clients.closed(conn.peer.ip());
        let gone = if conn.in_flight.fetch_or(CLOSED, Ordering::AcqRel) & !CLOSED > 0 {
            ONE_OPEN + ONE_ACTIVE
        } else {
            ONE_OPEN
        };
        d.counts.fetch_sub(gone, Ordering::Relaxed);
        d.count_close(conn.reason());
        d.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape reads the client connections' states together: while two connections
    /// begin and end requests as fast as they can, `active` and `idle` add up to the
    /// two that are open in every render.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_state_gauges_of_every_scrape_add_up_to_the_open_connections() {
        let telemetry = Telemetry::new();
        let downstream = Downstream::new(telemetry.clone());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conns = [downstream.register(peer), downstream.register(peer)];
        let stop = Arc::new(AtomicBool::new(false));
        let churn = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut cycles = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    drop(conns[(cycles % 2) as usize].begin_request());
                    cycles += 1;
                }
                cycles
            }
        });
        let sums: Vec<f64> = (0..300)
            .map(|_| {
                let text = telemetry.render();
                ["active", "idle"]
                    .iter()
                    .filter_map(|state| {
                        crate::testkit::metric(
                            &text,
                            t::DOWNSTREAM_CONNECTIONS,
                            &[("state", state)],
                        )
                    })
                    .sum()
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        let cycles = churn.join().unwrap();
        assert!(cycles > 300, "requests came and went throughout ({cycles})");
        assert!(
            sums.iter().all(|&s| s == 2.0),
            "client gauges per scrape: {sums:?}"
        );
    }
}
