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
    let _watching = Watching(conn);
    let mut closing = false;
    let mut parking = false;
    let mut killed = false;
    let mut stopping = false;
    // Milliseconds (as `now_ms`) by which an idle connection that was asked to close
    // must be gone.
    let mut close_by: Option<u64> = None;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // hyper returned `Pending` in the poll that brought the watcher back (the events
    // and the timer are read after it), and the watcher has not changed its state
    // since: its wakers are set, so the next round does not poll it again until the
    // task is woken. This saves a whole poll of hyper's connection (and of a request
    // in flight) per request: the end of every response comes back as an event.
    let mut hyper_waiting = false;
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
                hyper_waiting = false;
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
                hyper_waiting = false;
            } else if !closing && elapsed >= PARK_AFTER {
                // Hand the idle socket back: hyper stops reading and returns it.
                parking = true;
                closing = true;
                Pin::new(&mut *connection).graceful_shutdown();
                hyper_waiting = false;
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
            if !std::mem::take(&mut hyper_waiting) {
                if let Poll::Ready(result) = conn.polling(|| connection.poll_without_shutdown(cx)) {
                    return Poll::Ready(Wake::Hyper(result));
                }
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
                // hyper_waiting stays false (every wait takes it): hyper is polled
                // next round and sees the shutdown.
                if !closing {
                    closing = true;
                    Pin::new(&mut *connection).graceful_shutdown();
                }
            }
            // A request ended (the parking countdown starts) or the timer fired: the
            // clocks are read again at the top. hyper was polled just before and is
            // waiting; nothing here has changed that.
            Wake::Events(_) | Wake::Timer => hyper_waiting = true,
        }
    }
}

/// Lets go of the task's waker, which [`drive`] registers in the connection, when
/// it returns (or is dropped).
struct Watching<'a>(&'a ClientConn);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.unwatch();
    }
}

/// What brought [`drive`] back from its wait.
enum Wake {
    /// hyper's connection finished: closed, or handed back by a graceful shutdown.
    Hyper(hyper::Result<()>),
    Events(crate::downstream::Events),
    Timer,
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::task::{Context, Wake, Waker};

    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::park::{park, ParkedSocket};
    use super::*;
    use crate::downstream::Downstream;
    use crate::proxy::body::ProxyBody;

    /// The waker of the task that serves a connection: it wakes the test's task, and
    /// counts as held for as long as anything keeps a clone of it.
    struct TaskWaker(Waker);

    impl Wake for TaskWaker {
        fn wake(self: Arc<Self>) {
            self.0.wake_by_ref();
        }
    }

    /// A parked socket keeps nothing of the task that served it. A waker keeps its
    /// task's memory (512 bytes for a client task) until the last clone drops; the
    /// watcher's, left in the connection, cost every parked socket that much.
    #[tokio::test]
    async fn a_parked_socket_holds_no_waker_of_the_task_that_served_it() {
        let (mut client, server, peer) = crate::testkit::tcp_pair().await;
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let conn = downstream.register(peer);
        let served = conn.clone();
        let service = service_fn(move |_req| {
            let guard = served.begin_request();
            std::future::ready(Ok::<_, Infallible>(hyper::Response::new(
                ProxyBody::empty().with_guard(guard),
            )))
        });
        let mut connection = http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(ClientIo::new(server, conn.clone())), service);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
            .await
            .unwrap();
        let config = crate::config::ProxyConfig::default();
        let stop = CancellationToken::new();

        let task =
            std::future::poll_fn(|cx| Poll::Ready(Arc::new(TaskWaker(cx.waker().clone())))).await;
        let waker = Waker::from(task.clone());
        let ended = {
            let mut drive = std::pin::pin!(drive(&mut connection, &conn, &config, &stop));
            std::future::poll_fn(|_| drive.as_mut().poll(&mut Context::from_waker(&waker))).await
        };
        assert!(
            matches!(ended, Ended::Parked),
            "the idle connection is handed back"
        );
        let mut response = [0u8; 12];
        client.read_exact(&mut response).await.unwrap();
        assert_eq!(&response, b"HTTP/1.1 200");

        let socket = ParkedSocket::of_no_instance(connection.into_parts().io.into_inner());
        assert!(park(&conn, socket).is_none(), "nothing to read: parked");
        drop(waker);
        assert_eq!(
            Arc::strong_count(&task),
            1,
            "the parked socket holds a clone of the serving task's waker"
        );
        assert!(conn.is_parked());
    }
}
