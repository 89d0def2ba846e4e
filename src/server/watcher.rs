//! The watcher: runs hyper over one client connection and keeps its clocks
//! (`header_read_timeout`, `client_idle_timeout`), its eviction and the instance's
//! shutdown, and decides when the idle socket is handed back to be parked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::io::ClientIo;
use super::park::PARK_AFTER;
use crate::downstream::{ClientClose, ClientConn};

/// The longest [`drive`] sleeps before it looks at a connection again (and at the
/// listener's stop, which it reads rather than waits on). Only the end of a request
/// and a request to close wake it (parking must follow [`PARK_AFTER`] closely, or a burst of
/// leaked connections holds hyper's buffers long enough to fragment the heap); a head
/// starting or a request beginning wake nobody, which saves two wake-ups and timer
/// re-arms per request. The watcher reads the connection's clocks when its one timer
/// fires, at the next deadline it knows of or after this, whichever comes first.
const RECHECK: Duration = Duration::from_millis(100);

/// How long an idle connection that was asked to close (evicted, shutting down,
/// timed out) may take to go: hyper flushes what it has written, then drops it.
pub(super) const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Why [`drive`] stopped.
pub(super) enum Ended {
    /// Closed (by the client, a timeout, eviction or shutdown): drop the socket.
    Closed,
    /// Idle: park the socket until its next request.
    Parked,
    /// A CONNECT was answered: the socket becomes a tunnel.
    Tunnel,
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
pub(super) async fn drive<S>(
    connection: &mut http1::Connection<TokioIo<ClientIo>, S>,
    conn: &Arc<ClientConn>,
    config: &crate::config::ProxyConfig,
    stop: &CancellationToken,
) -> Ended
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::proxy::body::ProxyBody>
        + Unpin,
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
        // The listener's stop is read here, not waited on: every state below wakes
        // within RECHECK, and waiting would cost two lock round trips per poll.
        if !stopping && stop.is_cancelled() {
            stopping = true;
            conn.set_reason(ClientClose::Shutdown);
            parking = false;
            if !closing {
                closing = true;
                Pin::new(&mut *connection).graceful_shutdown();
            }
        }
        let instant = tokio::time::Instant::now();
        let now = conn.ms_at(instant);
        let head = conn.head_started();
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
            let elapsed = conn.idle_at(now);
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
        // Moved later, as at most request ends, re-arming is a compare-and-swap; the
        // timer wheel is touched only when it must fire sooner.
        timer.as_mut().reset(instant + wait.min(RECHECK));
        let wake = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.polling(|| connection.poll_without_shutdown(cx)) {
                return Poll::Ready(Wake::Hyper(result));
            }
            let events = conn.poll_events(cx);
            if !events.is_empty() {
                return Poll::Ready(Wake::Events(events));
            }
            timer.as_mut().poll(cx).map(|()| Wake::Timer)
        })
        .await;
        match wake {
            Wake::Hyper(result) => {
                if let Err(e) = result {
                    if conn.reason() == ClientClose::ClientClosed && !e.is_incomplete_message() {
                        conn.set_reason(ClientClose::Error);
                    }
                    tracing::debug!(client = %conn.peer, error = %e, "client connection ended with an error");
                    return Ended::Closed;
                }
                if conn.handoff().is_filled() {
                    return Ended::Tunnel;
                }
                // A parked socket comes back only if nothing else asked it to close.
                return if parking && !killed && !stopping {
                    Ended::Parked
                } else {
                    Ended::Closed
                };
            }
            Wake::Events(events) if events.close_requested() && !killed => {
                killed = true;
                parking = false;
                if !closing {
                    closing = true;
                    Pin::new(&mut *connection).graceful_shutdown();
                }
            }
            // A request ended (the parking countdown starts) or the timer fired: the
            // clocks are read again at the top.
            Wake::Events(_) | Wake::Timer => {}
        }
    }
}

/// What brought [`drive`] back from its wait.
enum Wake {
    /// hyper's connection finished: closed, or handed back by a graceful shutdown.
    Hyper(hyper::Result<()>),
    Events(crate::downstream::Events),
    Timer,
}
