//! Governed CONNECT tunnels. tether cannot pool inside a tunnel, but it counts each
//! one against its upstream's cap, closes it after `tunnel_idle_timeout` without a
//! byte either way, and — when a new CONNECT arrives at the cap — closes an idle
//! pooled socket or the tunnel idle longest instead of making the new client wait.
//!
//! Tunnels own their eviction and use only the pool's public face: a place under its
//! cap ([`Pool::checkout_slot`]), its idle sockets ([`Pool::evict_idle`]), and the
//! state and close reason of their own sockets.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::pool::{CloseReason, Pool, Slot};
use crate::clock::MsClock;
use crate::error::ProxyError;

/// The live tunnels of one upstream, for idle-first eviction.
#[derive(Clone)]
pub struct Tunnels {
    pool: Pool,
    live: Arc<Mutex<HashMap<u64, Arc<Activity>>>>,
}

/// Shared between a tunnel's two copy directions and its watcher.
pub struct Activity {
    clock: MsClock,
    /// Milliseconds on `clock` of the last byte either way.
    last: AtomicU64,
    /// The watcher marked the tunnel idle; the next byte wakes it.
    idle: AtomicBool,
    wake: Notify,
    kill: Notify,
    /// Bytes relayed: `[client→upstream, upstream→client]`.
    bytes: [AtomicU64; 2],
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            clock: MsClock::new(),
            last: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            wake: Notify::new(),
            kill: Notify::new(),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    fn touch(&self) {
        self.last.store(self.clock.now_ms(), Ordering::Relaxed);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    fn idle_for(&self) -> Duration {
        let idle = self
            .clock
            .now_ms()
            .saturating_sub(self.last.load(Ordering::Relaxed));
        Duration::from_millis(idle)
    }
}

impl Tunnels {
    pub fn new(pool: Pool) -> Tunnels {
        Tunnels {
            pool,
            live: Arc::default(),
        }
    }

    /// A place under the upstream's cap for a new tunnel: at once under the cap; at
    /// it, by closing an idle pooled socket, else the tunnel idle longest (at least
    /// `min_idle_for_eviction`), tried again while the request waits in the queue.
    pub async fn checkout(&self) -> Result<Slot, ProxyError> {
        let config = self.pool.config();
        let tick = (config.min_idle_for_eviction / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        let make_room = async {
            loop {
                if !self.pool.evict_idle() {
                    self.evict_longest_idle(config.min_idle_for_eviction);
                }
                tokio::time::sleep(tick).await;
            }
        };
        self.pool.checkout_slot(make_room).await
    }

    /// Closes the tunnel idle longest, if it has been idle at least `min_idle`.
    /// Returns whether one was chosen; its place frees when its task ends.
    pub fn evict_longest_idle(&self, min_idle: Duration) -> bool {
        let victim = {
            let live = self.live.lock();
            live.iter()
                .map(|(id, a)| (*id, a.idle_for(), a.clone()))
                .filter(|(_, idle, _)| *idle >= min_idle)
                .max_by_key(|(_, idle, _)| *idle)
        };
        match victim {
            Some((id, _, activity)) => {
                self.pool.close_reason(id, CloseReason::Evicted);
                activity.kill.notify_one();
                true
            }
            None => false,
        }
    }

    /// Relays bytes between `client` and `upstream` until either side closes, the
    /// tunnel idles out, or it is evicted. Half-close is passed through: a client that
    /// shuts down writing still receives the rest of the response. One access-log
    /// line says how it ended, also when this future is dropped (shutdown).
    pub async fn run<C, U>(&self, client: C, upstream: super::Tracked<U>, log: TunnelLog)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let id = upstream.slot().id();
        let pool = self.pool.clone();
        let activity = Activity::new();
        self.live.lock().insert(id, activity.clone());
        let _registered = Registered { tunnels: self, id };
        let mut end = TunnelEnd {
            log,
            activity: activity.clone(),
            reason: CloseReason::Shutdown,
        };
        let metrics = self.pool.metrics();
        let mut client = Counted {
            io: client,
            activity: activity.clone(),
            bytes: metrics.tunnel_bytes[0].clone(),
            direction: 0,
        };
        let mut upstream = Counted {
            io: upstream,
            activity: activity.clone(),
            bytes: metrics.tunnel_bytes[1].clone(),
            direction: 1,
        };
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let mut marked_idle = false;
        loop {
            let config = self.pool.config();
            let idle_for = activity.idle_for();
            if idle_for >= config.tunnel_idle_timeout {
                pool.close_reason(id, CloseReason::IdleTimeout);
                end.reason = CloseReason::IdleTimeout;
                break;
            }
            let now_idle = idle_for >= config.min_idle_for_eviction;
            if now_idle != marked_idle {
                marked_idle = now_idle;
                activity.idle.store(now_idle, Ordering::Release);
                self.pool.set_tunnel_idle(id, now_idle);
            }
            let next = if now_idle {
                config.tunnel_idle_timeout - idle_for
            } else {
                config.min_idle_for_eviction.min(config.tunnel_idle_timeout) - idle_for
            };
            tokio::select! {
                result = &mut copy => {
                    let reason = if result.is_ok() { CloseReason::RemoteClosed } else { CloseReason::Error };
                    pool.close_reason(id, reason);
                    end.reason = reason;
                    break;
                }
                _ = tokio::time::sleep(next) => {}
                _ = activity.wake.notified(), if now_idle => {}
                _ = activity.kill.notified() => {
                    end.reason = CloseReason::Evicted;
                    break;
                }
            }
        }
    }
}

/// What the access-log line of a tunnel names, besides what the tunnel counts.
pub struct TunnelLog {
    pub client: std::net::SocketAddr,
    /// The `host:port` the client asked for (CONNECT), or the address it dialled
    /// (an intercepted connection).
    pub target: String,
    pub upstream: Arc<str>,
    /// When the tunnel's request arrived.
    pub started: Instant,
}

/// Writes a tunnel's access-log line when the tunnel ends, however it ends.
struct TunnelEnd {
    log: TunnelLog,
    activity: Arc<Activity>,
    /// Why it closed; a tunnel dropped from outside is one shut down.
    reason: CloseReason,
}

impl Drop for TunnelEnd {
    fn drop(&mut self) {
        let [up, down] = &self.activity.bytes;
        tracing::info!(
            target: "tether::access",
            client = %self.log.client,
            upstream = &*self.log.upstream,
            target = self.log.target.as_str(),
            method = "CONNECT",
            status = 200u16,
            close = self.reason.as_str(),
            duration_ms = crate::telemetry::millis(self.log.started.elapsed()),
            bytes_in = up.load(Ordering::Relaxed),
            bytes_out = down.load(Ordering::Relaxed),
            "tunnel closed"
        );
    }
}

/// Removes a tunnel from the eviction registry however its task ends.
struct Registered<'a> {
    tunnels: &'a Tunnels,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.tunnels.live.lock().remove(&self.id);
    }
}

pin_project! {
    /// Counts bytes read from one side and notes the activity.
    struct Counted<T> {
        #[pin]
        io: T,
        activity: Arc<Activity>,
        bytes: metrics::Counter,
        // Index into `Activity::bytes`.
        direction: usize,
    }
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.activity.touch();
            this.bytes.increment(n as u64);
            this.activity.bytes[*this.direction].fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
