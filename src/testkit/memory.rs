//! Pool connections over in-memory pipes, for unit tests in paused time and for
//! benches: the pool's bookkeeping runs exactly as with sockets, but nothing touches
//! the network and no clock but tokio's matters.

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::DuplexStream;

use crate::upstream::pool::{Client, ConnState};
use crate::upstream::{Pool, Pooled, Slot, Tracked};

/// Opens an HTTP/1.1 "connection" for `slot` over an in-memory pipe. Returns the
/// checked-out connection and the far end of the pipe; dropping the far end is the
/// upstream closing the socket.
pub async fn connect(pool: &Pool, slot: Slot) -> (Pooled, DuplexStream) {
    let (near, far) = tokio::io::duplex(1024);
    let id = slot.id();
    pool.connected(id, 0, ConnState::Active);
    let (send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(Tracked::new(near, slot)))
            .await
            .expect("an in-memory handshake does no I/O");
    let driver_pool = pool.clone();
    tokio::spawn(async move {
        let result = conn.await;
        driver_pool.driver_ended(id, result.is_err());
    });
    (pool.fresh(id, Client::h1(send)), far)
}

/// Opens an HTTP/2 "connection" for `slot` over an in-memory pipe, with no server
/// at the far end: the client preface fits in the pipe and nothing is ever sent, which
/// is all the pool's stream sharing needs. Returns the checked-out first stream and
/// the far end of the pipe; dropping the far end is the upstream closing.
pub async fn connect_h2(pool: &Pool, slot: Slot) -> (Pooled, DuplexStream) {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let id = slot.id();
    pool.connected(id, 0, ConnState::Active);
    let io = TokioIo::new(Tracked::new(near, slot));
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("the client preface fits in the pipe");
    let driver_pool = pool.clone();
    tokio::spawn(async move {
        let result = conn.await;
        driver_pool.driver_ended(id, result.is_err());
    });
    (pool.fresh(id, Client::H2(send)), far)
}

/// Fills `pool` with `n` idle connections; returns the far ends to keep them open.
pub async fn fill_idle(pool: &Pool, n: usize) -> Vec<DuplexStream> {
    let mut held = Vec::with_capacity(n);
    let mut pooled = Vec::with_capacity(n);
    for _ in 0..n {
        let slot = match pool.checkout().await.expect("under the cap") {
            crate::upstream::Checkout::Connect(slot) => slot,
            crate::upstream::Checkout::Reused(_) => panic!("the pool was expected to be empty"),
        };
        let (p, far) = connect(pool, slot).await;
        pooled.push(p);
        held.push(far);
    }
    for p in pooled {
        p.check_in();
    }
    held
}
