//! Client connections, from accept to close: accepting and admission under
//! `max_client_connections` (the decisions and the connection's state are in
//! [`crate::downstream`]), the socket wrapper hyper reads ([`io`]), serving with
//! hyper ([`serve`]) under the watcher that keeps the clocks ([`watcher`]), and
//! parking idle sockets with no task ([`park`]).
//!
//! Every accepted socket is registered and carries a guard inside its IO, so the
//! `tether_downstream_connections` gauge falls exactly when the socket is dropped —
//! also when it was turned into a CONNECT tunnel.
//!
//! A connection's life: accepted and admitted ([`accept_admitted`]), served by hyper
//! on a task until it has been idle for a few milliseconds, then parked: the task
//! ends and the bare socket waits in its [`ClientConn`] until the reactor reports it
//! readable, when a new task serves it. Parked sockets are closed by
//! [`sweep_parked`] (idle timeout), eviction or shutdown.

mod io;
mod park;
mod serve;
pub mod transparent;
mod watcher;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::downstream::{ClientClose, ClientConn, Downstream, RequestGuard, TunnelJob};
pub use io::ClientIo;
pub(crate) use park::sweep_parked;
pub(crate) use serve::serve_io;

use crate::route::Mode;
use crate::Shared;

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
                tracing::warn!(error = %e, listener = addr.map(tracing::field::display), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = shared.table().config.clone();
        let Some(conn) = shared.downstream().admit(peer, &config).await else {
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
        tracker.spawn(serve::serve(
            stream,
            conn,
            shared.clone(),
            mode,
            stop.clone(),
        ));
    }
}
