//! Parking: an idle client socket is taken back from hyper and held with no task, no
//! timer and no buffers, only its slot in the [`ClientConn`] and its registration
//! with the reactor, until it turns readable; then it is served on a new task. A
//! leaky client parks thousands of sockets. Parked sockets have no clock of their
//! own: [`sweep_parked`] closes those idle past `client_idle_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio_util::sync::CancellationToken;

use super::io::ClientIo;
use crate::downstream::ClientConn;
use crate::route::Mode;
use crate::Shared;

/// An idle client connection is taken back from hyper after this long and parked as
/// a bare socket: a leaky client parks thousands, and a parked socket holds no
/// buffers and no task. A keep-alive client that sends its next request sooner never
/// parks; one that waits longer pays for a fresh hyper connection (a few
/// microseconds). Short, so that a burst of leaked connections does not leave
/// hyper's buffers scattered through the allocator.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(10);

/// An idle client socket held with no task: what it takes to serve it again.
pub(super) struct ParkedSocket {
    pub(super) io: ClientIo,
    /// Weak: a parked socket must not keep a stopped instance alive.
    pub(super) shared: std::sync::Weak<Shared>,
    pub(super) mode: Mode,
    pub(super) stop: CancellationToken,
}

impl ParkedSocket {
    /// A forward-proxy socket of no instance, for unit tests: resuming it drops it.
    #[cfg(test)]
    pub(super) fn of_no_instance(io: ClientIo) -> ParkedSocket {
        ParkedSocket {
            io,
            shared: std::sync::Weak::new(),
            mode: Mode::Forward,
            stop: CancellationToken::new(),
        }
    }

    pub(super) fn listener_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }
}

/// Parks `socket` in `conn` until it turns readable; gives it back if it already is.
pub(super) fn park(conn: &Arc<ClientConn>, socket: ParkedSocket) -> Option<ParkedSocket> {
    let waker = std::task::Waker::from(conn.clone());
    let mut cx = Context::from_waker(&waker);
    let mut probe = [0u8; 1];
    // The peek registers the wake-up. Unconstrained: with the task's cooperative
    // budget spent, tokio would wake this waker at once, and the wake-up would wait
    // on the slot's lock.
    conn.park(socket, |socket| {
        let peek = tokio::task::unconstrained(std::future::poll_fn(|cx| {
            socket
                .io
                .stream
                .poll_peek(cx, &mut ReadBuf::new(&mut probe))
        }));
        std::pin::pin!(peek).poll(&mut cx).is_ready()
    })
}

/// Parks an idle socket; or, when its next request is already arriving, gives it
/// back to be served (`None`: parked, or closed because the client went away).
pub(super) async fn idle(conn: &Arc<ClientConn>, socket: ParkedSocket) -> Option<ClientIo> {
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
            conn.head_starting();
            true
        }
        Err(e) => {
            // A reset while idle is the client going away, as EOF is.
            tracing::debug!(client = %conn.peer, error = %e, "parked client connection failed");
            false
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
                shared.downstream().expire_parked(idle_timeout);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::downstream::{ClientClose, Downstream};

    /// The server side of a fresh client connection, registered and ready to park.
    fn idle_socket(
        server: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) -> (Arc<Downstream>, Arc<ClientConn>, ParkedSocket) {
        let downstream = Downstream::new(crate::telemetry::Telemetry::new());
        let conn = downstream.register(peer);
        let socket = ParkedSocket::of_no_instance(ClientIo::new(server, conn.clone()));
        (downstream, conn, socket)
    }

    /// A connection task can park its socket after spending its whole cooperative
    /// budget on a busy poll. tokio must not then schedule a wake-up of the parked
    /// socket's waker: the socket would leave its slot with nothing to read.
    #[tokio::test]
    async fn parking_with_the_task_budget_spent_keeps_the_socket_parked() {
        let (client, server, peer) = crate::testkit::tcp_pair().await;
        let (downstream, conn, socket) = idle_socket(server, peer);
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
        assert!(conn.is_parked(), "still parked");
        assert_eq!(downstream.open(), 1);
        conn.close(ClientClose::Shutdown);
        assert_eq!(downstream.open(), 0, "closing a parked socket drops it");
        drop(client);
    }

    /// A close request (an eviction) that arrives as hyper hands the idle socket back
    /// is not lost: the socket is closed instead of parked, so the newcomer waiting
    /// for its place gets it.
    #[tokio::test]
    async fn a_socket_asked_to_close_before_it_parks_is_closed_not_parked() {
        let (mut client, server, peer) = crate::testkit::tcp_pair().await;
        let (downstream, conn, socket) = idle_socket(server, peer);
        conn.close(ClientClose::Evicted); // nothing parked yet: only the bit is set
        assert_eq!(downstream.open(), 1);
        assert!(park(&conn, socket).is_none());
        assert!(!conn.is_parked(), "not parked");
        assert_eq!(downstream.open(), 0, "the socket dropped");
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt;
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "the client sees EOF"
        );
    }
}
