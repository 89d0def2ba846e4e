//! Client connections: accept loops, the per-connection watcher that enforces
//! `header_read_timeout` and `client_idle_timeout`, the `max_client_connections`
//! limit (closing the longest-idle client first), and downstream accounting.
//!
//! Every accepted socket is registered here and carries a [`ClientGuard`] inside its
//! IO, so the `tether_downstream_connections` gauge falls exactly when the socket is
//! dropped — also when it was upgraded into a CONNECT tunnel.
//!
//! A connection's life: accepted and admitted ([`accept_admitted`]), served by hyper
//! on a task ([`serve_io`]) until it has been idle for [`PARK_AFTER`], then parked:
//! the task ends and the bare socket waits in its [`ClientConn`] until the reactor
//! reports it readable, when a new task serves it ([`ClientConn`]'s `Wake`). Parked
//! sockets are closed by [`sweep_parked`] (idle timeout), eviction or shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::{self, Mode};
use crate::telemetry::{self as t, Telemetry};
use crate::Shared;

/// Why a client connection closed: the `reason` label of the closed counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientClose {
    ClientClosed = 0,
    IdleTimeout = 1,
    HeaderTimeout = 2,
    Evicted = 3,
    Shutdown = 4,
    Error = 5,
    /// Refused at accept: `max_client_connections` reached and none idle.
    Limit = 6,
    /// A redirected connection whose original destination the egress policy does
    /// not allow (or that was not redirected at all): closed without a byte.
    Denied = 7,
}

const CLOSE_REASONS: [&str; 8] = [
    "client_closed",
    "idle_timeout",
    "header_timeout",
    "evicted",
    "shutdown",
    "error",
    "limit",
    "denied",
];

/// Downstream accounting shared by all listeners.
pub struct Downstream {
    active: Gauge,
    idle: Gauge,
    /// Idle connections held as bare sockets (a subset of `idle`).
    parked: Gauge,
    opened: Counter,
    closed: [Counter; 8],
    rejected: Mutex<HashMap<&'static str, Counter>>,
    telemetry: Arc<Telemetry>,
    conns: Mutex<HashMap<u64, Arc<ClientConn>>>,
    /// Woken whenever a client socket drops: admission waits on it for its victim.
    freed: Notify,
    ids: AtomicU64,
    /// Per-client-address counters for leak diagnosis.
    pub clients: crate::diagnosis::Clients,
}

/// Set in [`ClientConn::in_flight`] when the socket drops: the request guards still
/// alive (hyper may drop a response body after the socket) then leave the gauges alone.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// One client connection's shared state.
pub struct ClientConn {
    pub id: u64,
    pub peer: SocketAddr,
    base: Instant,
    /// Requests in flight, plus [`CLOSED`] once the socket has dropped.
    in_flight: AtomicUsize,
    /// Milliseconds since `base` when the connection last went idle.
    idle_since: AtomicU64,
    /// Milliseconds since `base` (+1, 0 = none) when the first byte of a request
    /// head arrived on an idle connection.
    head_started: AtomicU64,
    reason: AtomicU8,
    /// Chosen as an eviction victim: never chosen again.
    evicting: AtomicBool,
    /// Woken when the last request in flight ends: the parking countdown starts.
    request_ended: Notify,
    kill: Notify,
    downstream: Arc<Downstream>,
    /// A CONNECT answered `200`: the tunnel to run once hyper hands the socket back.
    tunnel: Mutex<Option<Box<TunnelJob>>>,
    /// The socket while it is parked: no task and no HTTP state, only this slot and
    /// the reactor's wake-up (see [`park`]).
    parked: Mutex<Option<ParkedSocket>>,
}

/// An idle client socket held with no task: what it takes to serve it again.
struct ParkedSocket {
    io: ClientIo,
    /// Weak: a parked socket must not keep a stopped instance alive.
    shared: std::sync::Weak<Shared>,
    mode: Mode,
    stop: CancellationToken,
}

/// What a client socket becomes after `CONNECT`: the other end and the tunnel governor.
pub struct TunnelJob {
    pub tunnels: crate::upstream::tunnel::Tunnels,
    pub upstream: crate::upstream::Tracked<TcpStream>,
    /// Keeps the client connection counted as active for the tunnel's life.
    pub busy: RequestGuard,
}

impl Downstream {
    pub fn new(telemetry: Arc<Telemetry>) -> Arc<Downstream> {
        Arc::new(Downstream {
            active: telemetry.gauge(t::DOWNSTREAM_CONNECTIONS, &[("state", "active")]),
            idle: telemetry.gauge(t::DOWNSTREAM_CONNECTIONS, &[("state", "idle")]),
            parked: telemetry.gauge(t::DOWNSTREAM_PARKED, &[]),
            opened: telemetry.counter(t::DOWNSTREAM_OPENED, &[]),
            closed: CLOSE_REASONS
                .map(|r| telemetry.counter(t::DOWNSTREAM_CLOSED, &[("reason", r)])),
            rejected: Mutex::default(),
            telemetry,
            conns: Mutex::default(),
            freed: Notify::new(),
            ids: AtomicU64::new(1),
            clients: Default::default(),
        })
    }

    /// Counts a request refused before it reached an upstream, by its error code.
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

    /// A new connection's state, counted as opened and idle; the caller inserts it
    /// into `conns`.
    fn new_conn(self: &Arc<Self>, peer: SocketAddr) -> Arc<ClientConn> {
        let base = Instant::now();
        let conn = Arc::new(ClientConn {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            peer,
            base,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection is reading its first head from the start, so a client
            // that connects and sends nothing is closed after header_read_timeout.
            head_started: AtomicU64::new(1),
            reason: AtomicU8::new(ClientClose::ClientClosed as u8),
            evicting: AtomicBool::new(false),
            request_ended: Notify::new(),
            kill: Notify::new(),
            downstream: self.clone(),
            tunnel: Mutex::new(None),
            parked: Mutex::new(None),
        });
        self.opened.increment(1);
        self.idle.increment(1.0);
        conn
    }

    /// Registers a connection with no limit (unit tests).
    #[cfg(test)]
    fn register(self: &Arc<Self>, peer: SocketAddr) -> Arc<ClientConn> {
        let conn = self.new_conn(peer);
        self.conns.lock().insert(conn.id, conn.clone());
        conn
    }

    /// Registers a just-accepted client connection under `max_client_connections`.
    ///
    /// The check and the registration happen under one lock, so the registered count
    /// never exceeds the limit, whichever listeners accept at once. At the limit, one
    /// connection with no request in flight is evicted (see [`Downstream::victim`])
    /// and the newcomer waits, at most [`EVICTION_WAIT`], for a place to free: it is
    /// admitted only once its victim's socket is gone. `None` (counted, logged) when
    /// no connection can be evicted. The caller must wrap the socket in a
    /// [`ClientIo`] at once, so the registration ends when the socket drops.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        config: &crate::config::Config,
    ) -> Option<Arc<ClientConn>> {
        let limit = config.proxy.max_client_connections;
        let deadline = Instant::now() + EVICTION_WAIT;
        loop {
            // Armed before the count is read, so a place freed in between is seen.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (victim, pending) = {
                let mut conns = self.conns.lock();
                if conns.len() < limit {
                    let conn = self.new_conn(peer);
                    conns.insert(conn.id, conn.clone());
                    drop(conns);
                    self.clients.opened(peer.ip(), &config.diagnosis);
                    return Some(conn);
                }
                let victim = Self::victim(&conns);
                let pending = conns.values().any(|c| c.evicting.load(Ordering::Relaxed));
                (victim, pending)
            };
            match victim {
                // Closed outside the lock: a parked victim's socket drops right here,
                // and its guard takes the lock to deregister.
                Some(victim) => victim.close(ClientClose::Evicted),
                None if pending => {} // an earlier victim is still closing: wait for it
                None => return self.refuse(peer, limit),
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.refuse(peer, limit);
            }
        }
    }

    fn refuse(&self, peer: SocketAddr, limit: usize) -> Option<Arc<ClientConn>> {
        self.closed[ClientClose::Limit as usize].increment(1);
        tracing::warn!(client = %peer, limit, "max_client_connections reached and no idle client to close: refusing");
        None
    }

    /// The connection to evict to make room, marked so that it is never chosen
    /// twice: one with no request in flight, idle longest (a half-sent head counts
    /// as idle since its last request; it holds nothing a client is waiting for).
    fn victim(conns: &HashMap<u64, Arc<ClientConn>>) -> Option<Arc<ClientConn>> {
        let victim = conns
            .values()
            .filter(|c| !c.busy() && !c.evicting.load(Ordering::Relaxed))
            .max_by_key(|c| c.idle_for())?;
        victim.evicting.store(true, Ordering::Relaxed);
        Some(victim.clone())
    }

    /// Asks every idle client connection to close (shutdown).
    pub fn close_idle(&self) {
        let all: Vec<_> = self.conns.lock().values().cloned().collect();
        for c in all {
            c.close(ClientClose::Shutdown);
        }
    }

    /// Closes parked sockets idle for `idle_timeout`, and those whose listener has
    /// stopped (a route removed by a reload). A parked socket has no task and so no
    /// timer of its own: [`sweep_parked`] calls this on a short tick.
    pub fn expire_parked(&self, idle_timeout: Duration) {
        let expired: Vec<_> = self
            .conns
            .lock()
            .values()
            .filter_map(|c| {
                let parked = c.parked.lock();
                let socket = parked.as_ref()?;
                if socket.stop.is_cancelled() {
                    Some((c.clone(), ClientClose::Shutdown))
                } else if c.idle_for() >= idle_timeout {
                    Some((c.clone(), ClientClose::IdleTimeout))
                } else {
                    None
                }
            })
            .collect();
        for (c, reason) in expired {
            c.close(reason);
        }
    }
}

/// Expires parked client sockets (idle timeout, stopped listeners) until the
/// instance is gone, ticking at a tenth of `client_idle_timeout` (10 ms to 1 s).
pub(crate) async fn sweep_parked(shared: std::sync::Weak<Shared>, stop: CancellationToken) {
    loop {
        let tick = match shared.upgrade() {
            Some(shared) => {
                let idle_timeout = shared.table().config.proxy.client_idle_timeout;
                shared.downstream.expire_parked(idle_timeout);
                (idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
            }
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
    }
}

impl ClientConn {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// A request is in flight.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) & !CLOSED > 0
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.idle_since.load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn set_reason(&self, reason: ClientClose) {
        self.reason.store(reason as u8, Ordering::Relaxed);
    }

    /// Closes the connection for `reason`: at once if it is parked, otherwise its
    /// task closes it gracefully (an in-flight response is finished first).
    fn close(&self, reason: ClientClose) {
        self.set_reason(reason);
        self.kill.notify_one();
        // Dropped outside the slot's lock: the socket's guard deregisters it.
        let parked = self.unpark();
        drop(parked);
    }

    /// Takes the parked socket, if there is one, out of its slot.
    fn unpark(&self) -> Option<ParkedSocket> {
        let socket = self.parked.lock().take();
        if socket.is_some() {
            self.downstream.parked.decrement(1.0);
        }
        socket
    }

    /// Turns this connection into a tunnel once its `200` response is written.
    pub fn start_tunnel(&self, job: TunnelJob) {
        *self.tunnel.lock() = Some(Box::new(job));
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.head_started.store(0, Ordering::Relaxed);
        self.downstream.clients.request(self.peer.ip());
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.downstream.idle.decrement(1.0);
            self.downstream.active.increment(1.0);
        }
        RequestGuard { conn: self.clone() }
    }

    fn bytes_read(&self) {
        if !self.busy() && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
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
        // mid-request), its guard took the connection out of the gauges.
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.downstream.active.decrement(1.0);
            conn.downstream.idle.increment(1.0);
            conn.request_ended.notify_one();
        }
    }
}

/// Lives inside the client socket's IO: deregisters and counts the close when the
/// socket is dropped.
struct ClientGuard {
    conn: Arc<ClientConn>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        let d = &conn.downstream;
        d.conns.lock().remove(&conn.id);
        d.clients.closed(conn.peer.ip());
        if conn.in_flight.fetch_or(CLOSED, Ordering::AcqRel) & !CLOSED > 0 {
            d.active.decrement(1.0);
        } else {
            d.idle.decrement(1.0);
        }
        d.closed[conn.reason.load(Ordering::Relaxed) as usize].increment(1);
        d.freed.notify_waiters();
    }
}

pin_project! {
    /// The client socket, noting when a request head starts arriving. `prefix` holds
    /// bytes hyper had read past the last request when the socket was parked.
    pub struct ClientIo {
        #[pin]
        stream: TcpStream,
        guard: ClientGuard,
        prefix: Bytes,
    }
}

impl ClientIo {
    /// `stream`, registered as `conn` until it drops.
    pub(crate) fn new(stream: TcpStream, conn: Arc<ClientConn>) -> ClientIo {
        ClientIo {
            stream,
            guard: ClientGuard { conn },
            prefix: Bytes::new(),
        }
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = this.stream.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.guard.conn.bytes_read();
        }
        result
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

/// The next client connection on `listener` that admission lets in (limit and
/// eviction, registration, leak diagnosis), with `TCP_NODELAY` set; `None` once
/// `stop` fires. Shared by every listener.
pub(crate) async fn accept_admitted(
    listener: &TcpListener,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<(TcpStream, Arc<ClientConn>)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return None,
        };
        let (stream, peer) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                let addr = listener.local_addr().ok();
                tracing::warn!(error = %e, listener = ?addr, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = shared.table().config.clone();
        let Some(conn) = shared.downstream.admit(peer, &config).await else {
            continue; // refused: the socket drops here
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, conn));
    }
}

/// Accepts client connections on `listener` until `stop` fires.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mode: Mode,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((stream, conn)) = accept_admitted(&listener, &shared, &stop).await {
        tracker.spawn(serve(stream, conn, shared.clone(), mode, stop.clone()));
    }
}

/// An idle client connection is taken back from hyper after this long and parked as
/// a bare socket: a leaky client parks thousands, and a parked socket holds no
/// buffers and no task. A keep-alive client that sends its next request sooner never
/// parks; one that waits longer pays for a fresh hyper connection (a few
/// microseconds). Short, so that a burst of leaked connections does not leave
/// hyper's buffers scattered through the allocator.
const PARK_AFTER: Duration = Duration::from_millis(10);

/// The longest [`drive`] sleeps before it looks at a connection again. Only the end of
/// a request wakes it (parking must follow [`PARK_AFTER`] closely, or a burst of
/// leaked connections holds hyper's buffers long enough to fragment the heap); a head
/// starting or a request beginning wake nobody, which saves two wake-ups and timer
/// re-arms per request. The watcher reads the connection's clocks when its one timer
/// fires, at the next deadline it knows of or after this, whichever comes first.
const RECHECK: Duration = Duration::from_millis(100);

/// How long an idle connection that was asked to close (evicted, shutting down,
/// timed out) may take to go: hyper flushes what it has written, then drops it.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// How long a connection admitted at `max_client_connections` waits for its
/// eviction victim to close before it is refused instead. A victim with no request
/// in flight closes within [`CLOSE_GRACE`]; one whose request began after it was
/// chosen finishes that request first.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Why [`drive`] stopped.
enum Ended {
    /// Closed (by the client, a timeout, eviction or shutdown): drop the socket.
    Closed,
    /// Idle: park the socket until its next request.
    Parked,
    /// A CONNECT was answered: the socket becomes a tunnel.
    Tunnel,
}

fn serve(
    stream: TcpStream,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    mode: Mode,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let io = ClientIo::new(stream, conn.clone());
    serve_io(io, conn, shared, mode, stop)
}

/// Serves HTTP/1.1 on a registered client socket until it closes or parks,
/// enforcing the head and idle timeouts.
///
/// A socket idle past [`PARK_AFTER`] is taken back from hyper and parked: the task
/// ends, and the socket waits in its [`ClientConn`] with no task, no timer and no
/// buffers until the reactor reports it readable, when [`ClientConn::wake`] serves
/// it on a new task. A leaky client parks thousands of sockets; each costs its
/// `ClientConn` and its registration with the reactor.
#[allow(clippy::manual_async_fn)] // an async fn would store its arguments twice
pub(crate) fn serve_io(
    mut io: ClientIo,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    mode: Mode,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send {
    async move {
        loop {
            io = match Box::pin(serve_http(io, &conn, &shared, mode, &stop)).await {
                Some(idle) => idle,
                None => return,
            };
            if io.prefix.is_empty() {
                let socket = ParkedSocket {
                    io,
                    shared: Arc::downgrade(&shared),
                    mode,
                    stop: stop.clone(),
                };
                io = match idle(&conn, socket).await {
                    Some(io) => io,
                    None => return, // parked (the reactor wakes it), or closed
                };
            } else {
                // The next request's first bytes already came with the last one.
                conn.head_started
                    .store(conn.now_ms() + 1, Ordering::Relaxed);
            }
        }
    }
}

/// Parks `socket` in `conn` until it turns readable; gives it back if it already is.
fn park(conn: &Arc<ClientConn>, socket: ParkedSocket) -> Option<ParkedSocket> {
    let waker = std::task::Waker::from(conn.clone());
    let mut cx = Context::from_waker(&waker);
    let mut probe = [0u8; 1];
    // Registered under the slot's lock, so a wake-up on another thread finds the
    // socket in place. Unconstrained: with the task's cooperative budget spent,
    // tokio would wake this waker at once, and the wake-up would wait on this lock.
    let mut slot = conn.parked.lock();
    let peek = tokio::task::unconstrained(std::future::poll_fn(|cx| {
        socket
            .io
            .stream
            .poll_peek(cx, &mut ReadBuf::new(&mut probe))
    }));
    if std::pin::pin!(peek).poll(&mut cx).is_ready() {
        return Some(socket);
    }
    *slot = Some(socket);
    conn.downstream.parked.increment(1.0);
    None
}

/// Parks an idle socket; or, when its next request is already arriving, gives it
/// back to be served (`None`: parked, or closed because the client went away).
async fn idle(conn: &Arc<ClientConn>, socket: ParkedSocket) -> Option<ClientIo> {
    let mut io = park(conn, socket)?.io;
    request_arrives(&mut io, conn).await.then_some(io)
}

/// A parked socket turned readable: true when a request head is arriving (its
/// clock starts now), false on EOF or an error (the client went away).
async fn request_arrives(io: &mut ClientIo, conn: &ClientConn) -> bool {
    let mut probe = [0u8; 1];
    // Peeked, not read: the byte belongs to hyper's parse of the head.
    let peeked =
        std::future::poll_fn(|cx| io.stream.poll_peek(cx, &mut ReadBuf::new(&mut probe))).await;
    match peeked {
        Ok(0) => false,
        Ok(_) => {
            conn.head_started
                .store(conn.now_ms() + 1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            // A reset while idle is the client going away, as EOF is.
            tracing::debug!(client = %conn.peer, error = %e, "parked client connection failed");
            false
        }
    }
}

/// The reactor's wake-up for a parked socket: serve it on a new task.
impl std::task::Wake for ClientConn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(socket) = self.unpark() else {
            return; // already woken, or closed
        };
        let Some(shared) = socket.shared.upgrade() else {
            return; // the instance is gone: the socket drops
        };
        let conn = self.clone();
        let (mode, stop) = (socket.mode, socket.stop.clone());
        let resume = {
            let shared = shared.clone();
            async move {
                // Through `idle` again: a wake-up with nothing to read parks the
                // socket anew instead of holding a task for it.
                if let Some(io) = idle(&conn, socket).await {
                    serve_io(io, conn, shared, mode, stop).await
                }
            }
        };
        shared.tasks.spawn_on(resume, &shared.runtime);
    }
}

/// One hyper connection over `io`, from its first request until it closes or parks
/// (returning the idle socket, with any read-ahead in its prefix); a socket that
/// answered CONNECT runs its tunnel here to the end.
async fn serve_http(
    io: ClientIo,
    conn: &Arc<ClientConn>,
    shared: &Arc<Shared>,
    mode: Mode,
    stop: &CancellationToken,
) -> Option<ClientIo> {
    let proxy_config = shared.table().config.proxy.clone();
    let service = {
        let shared = shared.clone();
        let conn = conn.clone();
        service_fn(move |req| {
            let guard = conn.begin_request();
            let shared = shared.clone();
            let conn = conn.clone();
            // Boxed so hyper can hand the connection back between requests
            // (`poll_without_shutdown` needs an `Unpin` future).
            Box::pin(async move {
                let resp = proxy::handle(req, shared, mode, conn).await;
                Ok::<_, std::convert::Infallible>(resp.map(|b| b.with_guard(guard)))
            })
        })
    };
    let mut connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // tether enforces its own head and idle timeouts (below); hyper's single
        // timer cannot tell the two apart.
        .header_read_timeout(None)
        .max_buf_size(proxy_config.max_header_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    let ended = drive(&mut connection, conn, &proxy_config, stop).await;
    if let Ended::Closed = ended {
        return None;
    }
    let hyper::server::conn::http1::Parts { io, read_buf, .. } = connection.into_parts();
    let mut io = io.into_inner();
    let job = conn.tunnel.lock().take();
    match (ended, job) {
        (Ended::Tunnel, Some(job)) => {
            io.prefix = read_buf;
            let TunnelJob {
                tunnels,
                upstream,
                busy,
            } = *job;
            tunnels.run(io, upstream).await;
            drop(busy);
            None
        }
        (Ended::Parked, _) => {
            // Copied, and hyper's buffer dropped here: a slice of it, even an empty
            // one, would keep the whole buffer alive while the socket is parked.
            io.prefix = Bytes::copy_from_slice(&read_buf);
            Some(io)
        }
        _ => None,
    }
}

/// Runs hyper over the socket until it closes, parks, or turns into a tunnel,
/// enforcing the head and idle timeouts.
///
/// The clocks hold in every state, also once the connection has been asked to close
/// (`closing`: evicted, shutting down, idle-timed-out, or parking): a graceful
/// shutdown lets hyper finish a response in flight, but hyper waits for a head it
/// has begun to read, so a connection with no request in flight is never left to
/// hyper alone. Such a connection closes at once if a head has begun (nothing is
/// owed to it), and within [`CLOSE_GRACE`] otherwise (hyper flushes what it wrote).
/// Parking is the one graceful shutdown that may meet a new head: hyper either
/// hands the bytes back or serves the request, and the head clock still runs.
async fn drive<S>(
    connection: &mut http1::Connection<TokioIo<ClientIo>, S>,
    conn: &Arc<ClientConn>,
    config: &crate::config::ProxyConfig,
    stop: &CancellationToken,
) -> Ended
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::ProxyBody> + Unpin,
    S::Future: Send + Unpin + 'static,
{
    let mut closing = false;
    let mut parking = false;
    let mut killed = false;
    let mut stopping = false;
    // Milliseconds (as `now_ms`) by which an idle connection that was asked to close
    // must be gone.
    let mut close_by: Option<u64> = None;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let now = conn.now_ms();
        let head = conn.head_started.load(Ordering::Relaxed);
        let wait = if conn.busy() {
            RECHECK
        } else if head != 0 {
            let elapsed = Duration::from_millis(now.saturating_sub(head - 1));
            if closing && !parking {
                return Ended::Closed; // asked to close with a half-sent head: nothing is owed
            }
            if elapsed >= config.header_read_timeout {
                conn.set_reason(ClientClose::HeaderTimeout);
                return Ended::Closed; // slowloris: drop the socket, no graceful close
            }
            config.header_read_timeout - elapsed
        } else {
            let elapsed = conn.idle_for();
            if !closing && elapsed >= config.client_idle_timeout {
                conn.set_reason(ClientClose::IdleTimeout);
                closing = true;
                Pin::new(&mut *connection).graceful_shutdown();
            } else if !closing && elapsed >= PARK_AFTER {
                // Hand the idle socket back: hyper stops reading and returns it.
                parking = true;
                closing = true;
                Pin::new(&mut *connection).graceful_shutdown();
            }
            if closing {
                let by = *close_by.get_or_insert(now + CLOSE_GRACE.as_millis() as u64);
                if now >= by {
                    return Ended::Closed;
                }
                Duration::from_millis(by - now)
            } else {
                PARK_AFTER
                    .min(config.client_idle_timeout)
                    .saturating_sub(elapsed)
            }
        };
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + wait.min(RECHECK));
        tokio::select! {
            result = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    if conn.reason.load(Ordering::Relaxed) == ClientClose::ClientClosed as u8 && !e.is_incomplete_message() {
                        conn.set_reason(ClientClose::Error);
                    }
                    tracing::debug!(client = %conn.peer, error = %e, "client connection ended with an error");
                    return Ended::Closed;
                }
                if conn.tunnel.lock().is_some() {
                    return Ended::Tunnel;
                }
                // A parked socket comes back only if nothing else asked it to close.
                return if parking && !killed && !stopping {
                    Ended::Parked
                } else {
                    Ended::Closed
                };
            }
            _ = &mut timer => {}
            _ = conn.request_ended.notified() => {}
            _ = conn.kill.notified(), if !killed => {
                killed = true;
                parking = false;
                if !closing {
                    closing = true;
                    Pin::new(&mut *connection).graceful_shutdown();
                }
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.set_reason(ClientClose::Shutdown);
                parking = false;
                if !closing {
                    closing = true;
                    Pin::new(&mut *connection).graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection task can park its socket after spending its whole cooperative
    /// budget on a busy poll. tokio must not then schedule a wake-up of the parked
    /// socket's waker: the socket would leave its slot with nothing to read.
    #[tokio::test]
    async fn parking_with_the_task_budget_spent_keeps_the_socket_parked() {
        let (client, server, peer) = crate::testkit::tcp_pair().await;
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let conn = downstream.register(peer);
        let socket = ParkedSocket {
            io: ClientIo::new(server, conn.clone()),
            shared: std::sync::Weak::new(),
            mode: Mode::Forward,
            stop: CancellationToken::new(),
        };
        let parker = conn.clone();
        let parked = tokio::spawn(async move {
            for _ in 0..128 {
                tokio::task::consume_budget().await;
            }
            park(&parker, socket).is_none()
        })
        .await
        .unwrap();
        assert!(parked, "an idle socket with nothing to read is parked");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(conn.parked.lock().is_some(), "still parked");
        assert_eq!(downstream.open(), 1);
        conn.close(ClientClose::Shutdown);
        assert_eq!(downstream.open(), 0, "closing a parked socket drops it");
        drop(client);
    }

    #[tokio::test]
    async fn an_eviction_victim_is_never_chosen_twice() {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (a, b) = (downstream.register(peer), downstream.register(peer));
        let busy = downstream.register(peer);
        let _request = busy.begin_request();
        let chosen: Vec<u64> = std::iter::from_fn(|| Downstream::victim(&downstream.conns.lock()))
            .map(|c| c.id)
            .collect();
        let mut expected = vec![a.id, b.id];
        let mut got = chosen.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            got, expected,
            "each idle connection once, never the busy one"
        );
    }
}
