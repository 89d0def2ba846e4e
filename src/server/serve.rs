//! Serving HTTP/1.1 on a client socket with hyper: one hyper connection per stretch
//! of activity, parked in between, and the CONNECT hand-off to a tunnel.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::io::ClientIo;
use super::park::{idle, ParkedSocket};
use super::watcher::{drive, Ended};
use crate::downstream::{ClientConn, Parked, TunnelJob};
use crate::proxy;
use crate::route::Mode;
use crate::Shared;

pub(super) fn serve(
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
/// buffers until the reactor reports it readable, when its [`Parked::resume`] serves
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
                conn.head_starting();
            }
        }
    }
}

/// Serving a parked socket again, once the reactor reports it readable.
impl Parked for ParkedSocket {
    fn listener_stopped(&self) -> bool {
        ParkedSocket::listener_stopped(self)
    }

    fn resume(self: Box<Self>, conn: Arc<ClientConn>) {
        let socket = *self;
        let Some(shared) = socket.shared.upgrade() else {
            return; // the instance is gone: the socket drops
        };
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
        shared.spawn_client_task(resume);
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
            let started = Instant::now();
            let guard = conn.begin_request_at(started);
            // Boxed so hyper can hand the connection back between requests
            // (`poll_without_shutdown` needs an `Unpin` future).
            Box::pin(proxy::handle(
                req,
                shared.clone(),
                mode,
                conn.clone(),
                guard,
                started,
            ))
        })
    };
    let mut connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // tether enforces its own head and idle timeouts (below); hyper's single
        // timer cannot tell the two apart.
        .header_read_timeout(None)
        // The head limit, exactly (431 past it). The read buffer only needs to hold
        // a head, and hyper refuses one smaller than 8 KiB.
        .max_header_size(proxy_config.max_header_bytes)
        .max_buf_size(proxy_config.max_header_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    let ended = drive(&mut connection, conn, &proxy_config, stop).await;
    if let Ended::Closed = ended {
        return None;
    }
    let hyper::server::conn::http1::Parts { io, read_buf, .. } = connection.into_parts();
    let mut io = io.into_inner();
    let job = conn.handoff().take();
    match (ended, job) {
        (Ended::Tunnel, Some(job)) => {
            io.prefix = read_buf;
            let TunnelJob {
                tunnels,
                upstream,
                busy,
                log,
            } = *job;
            tunnels.run(io, upstream, log).await;
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
