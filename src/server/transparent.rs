//! The transparent listener: connections that iptables redirected to tether from a
//! client that was never told about a proxy.
//!
//! For each accepted connection tether reads the destination the client dialled
//! (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6), applies the egress policy
//! to it, and then looks at the first bytes without consuming them:
//!
//! - plain HTTP/1.x is served exactly like a route listener serves it
//!   ([`Mode::Intercept`]): full pooling under the matched upstream's cap;
//! - anything else (a TLS ClientHello, or silence past `peek_timeout` from a protocol
//!   where the server speaks first) becomes a governed tunnel, the same kind a
//!   `CONNECT` opens: counted against the cap, reaped when idle, evicted idle-first.
//!
//! A connection whose destination is not allowed — or that reached the listener
//! without being redirected, which could only loop — is closed without a byte and
//! counted as `tether_downstream_connections_closed_total{reason="denied"}`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{accept_admitted, serve_io, ClientIo};
use crate::downstream::{ClientClose, ClientConn};
use crate::error::ErrorKind;
use crate::route::{self, Mode};
use crate::telemetry::Throttle;
use crate::upstream::tunnel::TunnelLog;
use crate::upstream::{CloseReason, Upstream};
use crate::Shared;

/// Accepts redirected connections on `listener` until `stop` fires.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let refusals = Arc::new(Refusals::default());
    while let Some((stream, conn)) = accept_admitted(&listener, &shared, &stop).await {
        let io = ClientIo::new(stream, conn.clone());
        let serve = serve(io, conn, shared.clone(), stop.clone(), refusals.clone());
        tracker.spawn(async move {
            // Boxed: the classification's state (and a tunnel's) is not carried
            // by the task while it serves HTTP.
            if let Some(http) = Box::pin(serve).await {
                http.await
            }
        });
    }
}

/// Any local process can open connections that end up refused here (the listener's
/// port is reachable without iptables, and iptables redirects whatever a pod dials),
/// so those warnings are throttled per listener: one line per interval, with the
/// count left out. Every such connection is still counted (`reason="denied"`).
struct Refusals {
    not_redirected: Throttle,
    denied: Throttle,
}

impl Default for Refusals {
    fn default() -> Refusals {
        Refusals {
            not_redirected: Throttle::new(REFUSAL_LOG_INTERVAL),
            denied: Throttle::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Classifies a redirected connection and runs it as a tunnel, or returns the
/// HTTP server to run it with.
async fn serve(
    io: ClientIo,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    refusals: Arc<Refusals>,
) -> Option<impl std::future::Future<Output = ()> + Send> {
    let client = conn.peer;
    let destination = match original_destination(io.stream()) {
        Ok(destination) => destination,
        Err(e) => {
            conn.set_reason(ClientClose::Denied);
            if let Some(left_out) = refusals.not_redirected.admit() {
                tracing::warn!(%client, error = %e, left_out, "closing a connection to the transparent listener that iptables did not redirect (left_out: how many more since the last such line)");
            }
            return None;
        }
    };
    let table = shared.table();
    let upstream = match route::by_destination(&shared, &table, destination).await {
        Ok(upstream) => upstream,
        Err(e) => {
            conn.set_reason(ClientClose::Denied);
            if let Some(left_out) = refusals.denied.admit() {
                tracing::warn!(%client, %destination, error = %e, left_out, "redirected connection closed (left_out: how many more since the last such line)");
            }
            return None;
        }
    };
    let peek_timeout = table.config.transparent.peek_timeout;
    drop(table);
    let kind = tokio::select! {
        kind = first_bytes(io.stream(), peek_timeout) => kind,
        _ = stop.cancelled() => {
            conn.set_reason(ClientClose::Shutdown);
            return None;
        }
    };
    match kind {
        Ok(Kind::Http) => {
            tracing::debug!(%client, %destination, upstream = %upstream.name, "intercepted plain HTTP");
            drop(upstream); // matched again per request, so a reload applies
            return Some(serve_io(
                io,
                conn,
                shared,
                Mode::Intercept(destination),
                stop,
            ));
        }
        Ok(Kind::Opaque) => tunnel(io, conn, &shared, &upstream, destination, stop).await,
        Ok(Kind::Closed) => {}
        Err(e) => {
            conn.set_reason(ClientClose::Error);
            tracing::debug!(%client, error = %e, "redirected connection failed before its first byte");
        }
    }
    None
}

/// Relays an intercepted connection that is not plain HTTP through a governed tunnel
/// to `upstream`. On shutdown the tunnel closes at once: a byte stream has no
/// boundary at which to finish it gracefully.
async fn tunnel(
    io: ClientIo,
    conn: Arc<ClientConn>,
    shared: &Shared,
    upstream: &Upstream,
    destination: SocketAddr,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let upstream_io = match upstream.open_tunnel().await {
        Ok(upstream_io) => upstream_io,
        Err(e) => {
            let class = e.classify();
            shared.downstream().reject(class.code);
            upstream.pool.metrics().error(class.kind);
            conn.set_reason(if class.kind == ErrorKind::Denied {
                ClientClose::Denied
            } else {
                ClientClose::Error
            });
            tracing::warn!(client = %conn.peer, %destination, upstream = %upstream.name, error = %e, "intercepted connection closed: no tunnel");
            return;
        }
    };
    let id = upstream_io.slot().id();
    let log = TunnelLog {
        client: conn.peer,
        target: destination.to_string(),
        upstream: upstream.name.clone(),
        started,
    };
    tracing::debug!(client = %conn.peer, %destination, upstream = %upstream.name, "intercepted connection tunnelled");
    // The client connection stays "active" for the tunnel's lifetime.
    let _busy = conn.begin_request();
    tokio::select! {
        () = upstream.tunnels.run(io, upstream_io, log) => {}
        _ = stop.cancelled() => {
            upstream.pool.close_reason(id, CloseReason::Shutdown);
            conn.set_reason(ClientClose::Shutdown);
        }
    }
}

/// The destination the client dialled before iptables redirected it here. A
/// connection made to the listener itself has no other destination and is refused:
/// relaying it would connect tether to itself.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
    let local = stream.local_addr()?;
    let found = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst)
            .map(|raw| SocketAddr::from(SockaddrIn::from(raw))),
        // A dual-stack listener sees IPv4 clients as v4-mapped addresses, and
        // their conntrack entries are IPv4 ones.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => {
            getsockopt(stream, sockopt::OriginalDst)
                .map(|raw| SocketAddr::from(SockaddrIn::from(raw)))
        }
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .map(|raw| SocketAddr::from(SockaddrIn6::from(raw))),
    };
    let destination = found.map_err(|errno| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no original destination ({errno}): not redirected by iptables"),
        )
    })?;
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    if same(destination, local) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("dialled the transparent listener {local} itself, not redirected"),
        ));
    }
    Ok(destination)
}

/// What the first bytes of a redirected connection say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An HTTP/1.x request line.
    Http,
    /// Anything else, or nothing yet: relayed as bytes.
    Opaque,
    /// The client closed before sending a byte.
    Closed,
}

/// What a prefix of the first bytes shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniff {
    Http,
    Other,
    /// A proper prefix of a request line's method: wait for more.
    NeedMore,
}

/// Methods an HTTP/1.x request line may start with. HTTP/2's prior-knowledge
/// preface (`PRI * HTTP/2.0`) is not among them: it is relayed, not parsed.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

fn sniff(bytes: &[u8]) -> Sniff {
    if METHODS.iter().any(|m| bytes.starts_with(m)) {
        Sniff::Http
    } else if METHODS.iter().any(|m| m.starts_with(bytes)) {
        Sniff::NeedMore
    } else {
        Sniff::Other
    }
}

/// Peeks at the first bytes (leaving them for whoever reads next) until they tell
/// HTTP from anything else, or `within` passes.
async fn first_bytes(stream: &TcpStream, within: Duration) -> io::Result<Kind> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 16];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(peeked) => peeked?,
            Err(_) => return Ok(Kind::Opaque),
        };
        if n == 0 {
            return Ok(Kind::Closed);
        }
        match sniff(&buf[..n]) {
            Sniff::Http => return Ok(Kind::Http),
            Sniff::Other => return Ok(Kind::Opaque),
            Sniff::NeedMore if Instant::now() >= deadline => return Ok(Kind::Opaque),
            // The rest of the method is in flight; peeking again at once would only
            // see the same bytes.
            Sniff::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http_and_a_client_hello_is_not() {
        assert_eq!(sniff(b"GET /v2/ HTTP/1.1\r\n"), Sniff::Http);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1"), Sniff::Http);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00\x01\x00\x01"), Sniff::Other);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniff::Other);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniff::Other);
        assert_eq!(
            sniff(b"get / HTTP/1.1"),
            Sniff::Other,
            "methods are case-sensitive"
        );
        assert_eq!(sniff(b"GETX / HTTP/1.1"), Sniff::Other);
    }

    #[test]
    fn a_partial_method_waits_for_more() {
        assert_eq!(sniff(b"G"), Sniff::NeedMore);
        assert_eq!(sniff(b"DELE"), Sniff::NeedMore);
        assert_eq!(sniff(b"POST"), Sniff::NeedMore);
        assert_eq!(sniff(b"POSX"), Sniff::Other);
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_peek_timeout_and_bytes_are_left_unread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut server, _) = crate::testkit::tcp_pair().await;
        let silent = first_bytes(&server, Duration::from_millis(50)).await;
        assert_eq!(silent.unwrap(), Kind::Opaque);
        client.write_all(b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            client
        });
        let kind = first_bytes(&server, Duration::from_secs(5)).await;
        assert_eq!(kind.unwrap(), Kind::Http);
        let mut client = writer.await.unwrap();
        let mut line = [0u8; 16];
        server.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET / HTTP/1.1\r\n", "peeking consumed nothing");
        drop(client.shutdown().await);
        drop(client);
        assert_eq!(
            first_bytes(&server, Duration::from_secs(5)).await.unwrap(),
            Kind::Closed
        );
    }

    #[tokio::test]
    async fn a_listed_host_name_matches_the_addresses_it_resolves_to() {
        use crate::policy::Origin;
        use crate::upstream::connect::Connector;
        let upstream = |host: &str| {
            let origin = Origin::parse_authority(host).unwrap();
            Upstream::new(
                "up",
                Connector::plain(origin, false),
                crate::config::PoolConfig::default(),
                &crate::telemetry::Telemetry::new(),
            )
        };
        let by_name = upstream("localhost:8080");
        assert!(by_name.resolves_to("127.0.0.1".parse().unwrap()).await);
        assert!(!by_name.resolves_to("10.0.0.1".parse().unwrap()).await);
        let literal = upstream("10.0.0.1:8080");
        assert!(literal.resolves_to("10.0.0.1".parse().unwrap()).await);
    }

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let (_client, server, _) = crate::testkit::tcp_pair().await;
        assert!(original_destination(&server).is_err());
    }
}
