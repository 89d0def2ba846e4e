//! HTTP/2 stream sharing.
//!
//! An HTTP/2 connection is shared: it stays `active` while any stream is open and
//! serves up to `max_streams_per_connection` streams. A request takes a stream on the
//! oldest shared connection with one free, so that surplus connections fall idle and
//! are reaped; a further connection opens only when every open one is saturated, the
//! ones being opened cannot take the requests already waiting, and the cap allows.
//!
//! These are the rules over the connection table; the pool applies them under its
//! lock and wraps the streams in [`Pooled`](super::Pooled) handles.

use hyper::client::conn::http2;

use super::client::Client;
use super::metrics::ConnState;
use super::table::{Entry, Limits, Table};
use crate::upstream::request::RequestBody;

/// Fresh connection `id` speaks HTTP/2 and carries its first stream: share it.
pub(super) fn share(table: &mut Table, id: u64, value: http2::SendRequest<RequestBody>) {
    table.share(id, value);
    if let Some(entry) = table.get_mut(id) {
        entry.streams = 1;
    }
}

/// The shared connection the next stream goes on: the oldest with a free stream
/// that is still open.
pub(super) fn pick(table: &Table, limits: &Limits) -> Option<u64> {
    table.sharing().iter().copied().find(|&id| {
        table.get(id).is_some_and(|e| {
            e.streams < limits.max_streams_per_connection
                && e.shared().is_some_and(|c| !c.is_closed())
        })
    })
}

/// Connection `id` may take one more stream.
pub(super) fn has_free_stream(table: &Table, id: u64, limits: &Limits) -> bool {
    table
        .get(id)
        .is_some_and(|e| e.streams < limits.max_streams_per_connection)
}

/// Opens one more stream on shared connection `id`: its sender, and whether the
/// connection had served a request before (the stream is then a reuse).
pub(super) fn open_stream(table: &mut Table, id: u64) -> Option<(Client, bool)> {
    let value = table.shared(id)?.clone();
    let entry = table.set_state(id, ConnState::Active)?;
    entry.streams += 1;
    let reused = entry.requests > 0 || entry.streams > 1;
    Some((Client::H2(value), reused))
}

/// A stream of `entry` ended. Whether it was the last one open.
pub(super) fn end_stream(entry: &mut Entry) -> bool {
    entry.streams = entry.streams.saturating_sub(1);
    entry.streams == 0
}

/// The streams that connections being opened will offer once they are up, when the
/// upstream is known to speak HTTP/2: a request beyond them opens a connection of
/// its own, one within them waits for a stream.
pub(super) fn streams_coming(table: &Table, limits: &Limits, h2_known: bool) -> usize {
    if !h2_known {
        return 0;
    }
    table
        .count(ConnState::Connecting)
        .saturating_mul(limits.max_streams_per_connection)
}

/// Shared connections with no stream open: the drain's and the reaper's to close.
pub(super) fn unused(table: &Table) -> Vec<u64> {
    table
        .sharing()
        .iter()
        .copied()
        .filter(|&id| table.get(id).is_some_and(|e| e.streams == 0))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{closed, pool, settle};
    use crate::testkit::memory::connect_h2;
    use crate::upstream::pool::{Checkout, CloseReason, Pool, Pooled};

    async fn checkout(pool: &Pool) -> Checkout {
        pool.checkout().await.expect("within the queue's limits")
    }

    async fn stream(pool: &Pool) -> Pooled {
        match checkout(pool).await {
            Checkout::Reused(p) => p,
            Checkout::Connect(_) => panic!("expected a stream on an open connection"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_connection_stays_active_while_any_stream_is_open() {
        let (pool, _) = pool(|c| c.max_streams_per_connection = 3);
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (first, _far) = connect_h2(&pool, slot).await;
        let (second, third) = (stream(&pool).await, stream(&pool).await);
        assert_eq!(
            (first.id(), second.id()),
            (third.id(), third.id()),
            "one connection"
        );
        assert!(second.reused && third.reused);
        first.check_in();
        second.check_in();
        let counts = pool.counts();
        assert_eq!((counts.active, counts.idle, counts.open()), (1, 0, 1));
        third.check_in();
        let counts = pool.counts();
        assert_eq!((counts.active, counts.idle, counts.open()), (0, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_connection_opens_only_once_every_open_one_is_saturated() {
        let (pool, _) = pool(|c| {
            c.max_streams_per_connection = 2;
            c.max_connections = 4;
        });
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (first, _far) = connect_h2(&pool, slot).await;
        let second = stream(&pool).await;
        assert_eq!(second.id(), first.id());
        assert!(matches!(checkout(&pool).await, Checkout::Connect(_)));
        drop(second); // unsent: its stream is free again
        let again = stream(&pool).await;
        assert_eq!(
            again.id(),
            first.id(),
            "a free stream is used before a new socket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_a_request_waits_for_a_stream_rather_than_a_socket() {
        let (pool, _) = pool(|c| {
            c.max_streams_per_connection = 1;
            c.max_connections = 1;
        });
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (mut first, _far) = connect_h2(&pool, slot).await;
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { stream(&pool).await.id() }
        });
        settle().await;
        assert_eq!(pool.counts().queued, 1);
        let id = first.id();
        first.send();
        first.check_in();
        assert_eq!(waiter.await.unwrap(), id, "handed the stream at check-in");
        assert_eq!(pool.counts().open(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_the_streams_of_a_connection_being_opened() {
        let (pool, _) = pool(|c| {
            c.max_streams_per_connection = 2;
            c.max_connections = 4;
        });
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (first, _far) = connect_h2(&pool, slot).await; // the upstream speaks h2
        let _second = stream(&pool).await;
        let Checkout::Connect(opening) = checkout(&pool).await else {
            panic!("saturated: a second connection opens")
        };
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { stream(&pool).await.id() }
        });
        settle().await;
        assert_eq!(
            pool.counts().queued,
            1,
            "waits for the opening connection's streams"
        );
        assert_eq!(pool.counts().open(), 2);
        let (fresh, _far2) = connect_h2(&pool, opening).await;
        assert_eq!(waiter.await.unwrap(), fresh.id());
        assert_ne!(fresh.id(), first.id());
        assert_eq!(pool.counts().open(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_pool_closes_a_shared_connection_when_its_last_stream_ends() {
        let (pool, telemetry) = pool(|c| c.max_streams_per_connection = 2);
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (mut first, _far) = connect_h2(&pool, slot).await;
        let mut second = stream(&pool).await;
        pool.drain();
        first.send();
        first.check_in();
        settle().await;
        assert_eq!(pool.counts().open(), 1, "a stream is still open");
        second.send();
        second.check_in();
        settle().await;
        assert_eq!(pool.counts().open(), 0);
        assert_eq!(closed(&telemetry, CloseReason::Shutdown.as_str()), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_closes_a_shared_connection_idle_past_idle_timeout() {
        let (pool, telemetry) = pool(|c| c.idle_timeout = Duration::from_secs(30));
        let Checkout::Connect(slot) = checkout(&pool).await else {
            panic!("an empty pool connects")
        };
        let (mut first, _far) = connect_h2(&pool, slot).await;
        first.send();
        first.check_in();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(pool.reap(), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(pool.reap(), 1);
        settle().await;
        assert_eq!(pool.counts().open(), 0);
        assert_eq!(closed(&telemetry, "idle_timeout"), 1.0);
    }
}
