//! Hostile responses from a raw origin, through the route listener and the forward
//! listener: what the client gets (status, framing, bytes on the wire), and that the
//! upstream socket that misbehaved is never reused — the next request gets a fresh,
//! clean socket, with tether's gauges agreeing with the origin's own count.
//!
//! HTTP framing is hyper's on both sides; these cases pin down what tether adds on
//! top (RFC 9112 §6.3: an intermediary removes `Content-Length` from a message that
//! also has `Transfer-Encoding`, and a connection whose framing was ambiguous is not
//! reused).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use support::*;
use tether::config::{Config, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The answer to every request but the scripted first one.
const CLEAN: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext";

/// What the origin does after its scripted first answer.
#[derive(Clone)]
enum Then {
    /// Answers the socket's next requests with [`CLEAN`].
    Serve,
    /// Closes the socket.
    Close,
    /// Writes these bytes once the test calls [`RawOrigin::release`], then serves.
    Write(Vec<u8>),
}

/// A loopback origin that answers the first request on its first connection with
/// exact bytes and every other request with [`CLEAN`].
struct RawOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// `(connection number, request number on it)` of each request, in order.
    served: Arc<Mutex<Vec<(usize, usize)>>>,
    release: Arc<Notify>,
}

impl RawOrigin {
    async fn start(first: Vec<u8>, then: Then) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = RawOrigin {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            open: Arc::default(),
            served: Arc::default(),
            release: Arc::default(),
        };
        let (accepted, open) = (origin.accepted.clone(), origin.open.clone());
        let script = Arc::new(Script {
            first,
            then,
            served: origin.served.clone(),
            release: origin.release.clone(),
        });
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let conn = accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (open, script) = (open.clone(), script.clone());
                tokio::spawn(async move {
                    script.serve(socket, conn).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        origin
    }

    /// Lets a [`Then::Write`] origin write its late bytes.
    fn release(&self) {
        self.release.notify_one();
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Where the latest request was served.
    fn last_served(&self) -> Option<(usize, usize)> {
        self.served.lock().last().copied()
    }
}

struct Script {
    first: Vec<u8>,
    then: Then,
    served: Arc<Mutex<Vec<(usize, usize)>>>,
    release: Arc<Notify>,
}

impl Script {
    /// Reads request heads (the cases send no request bodies) and answers each; the
    /// socket drops when the peer closes or the script says so.
    async fn serve(&self, mut socket: TcpStream, conn: usize) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        for request in 0.. {
            let end = loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            buf.drain(..end);
            self.served.lock().push((conn, request));
            let scripted = conn == 0 && request == 0;
            let reply = if scripted { &self.first[..] } else { CLEAN };
            if socket.write_all(reply).await.is_err() {
                return;
            }
            if scripted {
                match &self.then {
                    Then::Serve => {}
                    Then::Close => return,
                    Then::Write(late) => {
                        self.release.notified().await;
                        if socket.write_all(late).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// How the client reaches tether.
#[derive(Debug, Clone, Copy)]
enum Via {
    Route,
    Forward,
}

const BOTH: [Via; 2] = [Via::Route, Via::Forward];

struct Case {
    tether: tether::Running,
    origin: RawOrigin,
    via: Via,
}

impl Case {
    async fn start(via: Via, first: &[u8], then: Then) -> Case {
        let origin = RawOrigin::start(first.to_vec(), then).await;
        let mut cfg: Config = config(&[]);
        cfg.upstream
            .push(UpstreamConfig::new("up", origin.addr.to_string()));
        route(&mut cfg, "up");
        Case {
            tether: start(cfg).await,
            origin,
            via,
        }
    }

    /// One request on a new client connection that asks tether to close it after the
    /// response, so everything tether wrote is read up to its end of stream.
    async fn get(&self, path: &str) -> Wire {
        let (addr, target) = match self.via {
            Via::Route => (self.tether.route_addrs[0], path.to_owned()),
            Via::Forward => (
                self.tether.proxy_addr,
                format!("http://{}{path}", self.origin.addr),
            ),
        };
        let head = format!(
            "GET {target} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.origin.addr
        );
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 8192];
            loop {
                match socket.read(&mut chunk).await {
                    Ok(0) => return false,
                    Ok(n) => raw.extend_from_slice(&chunk[..n]),
                    // tether aborts a client connection whose response broke off.
                    Err(_) => return true,
                }
            }
        })
        .await;
        let reset = read.expect("tether ends the client connection");
        Wire::parse(raw, reset)
    }

    /// Waits until tether's gauge, its pool, the origin and `ss` agree that `open`
    /// upstream sockets are open; false if they do not within [`WAIT`].
    async fn settles_at(&self, open: usize) -> bool {
        eventually(WAIT, || async {
            let gauge = upstream_gauge(&self.tether.metrics(), "up");
            let pool = self.tether.pool_counts("up").map_or(0, |c| c.open());
            let ss = ss_established_to(self.origin.addr.port()).unwrap_or(open);
            gauge == open as f64 && pool == open && self.origin.open() == open && ss == open
        })
        .await
    }

    fn closed(&self, reason: &str) -> f64 {
        closed_total(&self.tether, "up", reason)
    }

    /// After a misbehaving first response: its socket is gone, counted once with
    /// `reason`, and the next request goes out on a fresh socket and gets the origin's
    /// clean answer.
    async fn assert_next_request_gets_a_fresh_socket(&self, reason: &str) {
        assert!(
            self.settles_at(0).await,
            "{:?}: the misbehaving socket is still open (gauge {}, origin {})",
            self.via,
            upstream_gauge(&self.tether.metrics(), "up"),
            self.origin.open()
        );
        assert_eq!(
            self.closed(reason),
            1.0,
            "{:?}: closed as {reason}",
            self.via
        );
        let next = self.get("/next").await;
        assert_eq!(next.status, 200, "{:?}: {next:?}", self.via);
        assert_eq!(next.body, b"next", "{:?}: {next:?}", self.via);
        assert!(next.complete, "{:?}: {next:?}", self.via);
        assert_eq!(self.origin.last_served(), Some((1, 0)), "{:?}", self.via);
        assert_eq!(self.origin.accepted(), 2, "{:?}", self.via);
    }
}

/// A response as the client received it.
struct Wire {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    /// The body, de-chunked when chunked.
    body: Vec<u8>,
    /// The body ended as its framing says (all of its `Content-Length`, or the last
    /// chunk), rather than by the connection breaking off.
    complete: bool,
    /// The connection was reset rather than closed.
    reset: bool,
}

impl Wire {
    fn parse(raw: Vec<u8>, reset: bool) -> Wire {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "the client got no response head ({other:?}): {:?}",
                String::from_utf8_lossy(&raw)
            ),
        };
        let headers: Vec<(String, Vec<u8>)> = resp
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        let status = resp.code.unwrap();
        let rest = &raw[head_len..];
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let (body, complete) = if value("transfer-encoding").is_some_and(|te| te == "chunked") {
            dechunk(rest)
        } else if let Some(len) = value("content-length") {
            let len: usize = len.parse().unwrap();
            (rest.to_vec(), rest.len() == len)
        } else {
            (rest.to_vec(), !reset)
        };
        Wire {
            status,
            headers,
            body,
            complete,
            reset,
        }
    }

    fn header(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    fn tether_error(&self) -> Option<String> {
        self.header("x-tether-error").pop()
    }
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        f.debug_struct("Wire")
            .field("status", &self.status)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", text(v)))
                    .collect::<Vec<_>>(),
            )
            .field("body", &text(&self.body))
            .field("complete", &self.complete)
            .field("reset", &self.reset)
            .finish()
    }
}

/// A chunked body's data, and whether its last chunk arrived.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, rest.starts_with(b"\r\n"));
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[tokio::test]
async fn a_clean_response_leaves_its_socket_for_the_next_request() {
    for via in BOTH {
        let case = Case::start(
            via,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
            Then::Serve,
        )
        .await;
        let first = case.get("/first").await;
        assert_eq!((first.status, &first.body[..]), (200, &b"first"[..]));
        assert!(first.complete && !first.reset, "{via:?}: {first:?}");
        assert_eq!(first.header("content-length"), ["5"]);
        assert!(case.settles_at(1).await, "{via:?}: the idle socket is kept");
        let next = case.get("/next").await;
        assert_eq!((next.status, &next.body[..]), (200, &b"next"[..]));
        assert_eq!(case.origin.last_served(), Some((0, 1)), "{via:?}: reused");
        assert_eq!(case.origin.accepted(), 1, "{via:?}");
    }
}

/// RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields of a response, and those
/// its `Connection` header names, before forwarding it, and keeps everything else.
/// The origin's socket stays in the pool: a `Connection` that lists options is no
/// reason to close it.
#[tokio::test]
async fn a_responses_hop_by_hop_fields_and_those_connection_names_never_reach_the_client() {
    let hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\
        connection: keep-alive, X-Hop-Secret\r\nkeep-alive: timeout=30\r\n\
        x-hop-secret: token\r\nproxy-authenticate: Basic realm=x\r\n\
        trailer: x-checksum\r\nx-kept: 1\r\n\r\nok";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Serve).await;
        let first = case.get("/first").await;
        assert_eq!(
            (first.status, &first.body[..]),
            (200, &b"ok"[..]),
            "{via:?}"
        );
        let names: Vec<&str> = first.headers.iter().map(|(n, _)| n.as_str()).collect();
        for hop in [
            "keep-alive",
            "x-hop-secret",
            "proxy-authenticate",
            "trailer",
        ] {
            assert!(
                !names.contains(&hop),
                "{via:?}: {hop} was forwarded: {first:?}"
            );
        }
        // The client's own `connection: close` is answered, not the origin's list.
        assert!(
            first.header("connection").iter().all(|v| v == "close"),
            "{via:?}: {first:?}"
        );
        assert_eq!(first.header("x-kept"), ["1"], "{via:?}");
        assert_eq!(first.header("via"), ["1.1 tether"], "{via:?}");
        assert!(case.settles_at(1).await, "{via:?}: the socket is kept");
        let next = case.get("/next").await;
        assert_eq!(
            case.origin.last_served(),
            Some((0, 1)),
            "{via:?}: reused: {next:?}"
        );
    }
}

/// The hostile response `response` gets 502 `upstream_error` through both listeners,
/// and its socket is closed: the next request gets a fresh one.
async fn refused_as_upstream_error(response: &[u8]) {
    for via in BOTH {
        let case = Case::start(via, response, Then::Serve).await;
        let reply = case.get("/").await;
        assert_eq!(reply.status, 502, "{via:?}: {reply:?}");
        assert_eq!(reply.tether_error().as_deref(), Some("upstream_error"));
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

#[tokio::test]
async fn a_bad_status_line_is_502_upstream_error_and_its_socket_is_closed() {
    refused_as_upstream_error(b"HTTP/1.1 2x0 OK\r\ncontent-length: 2\r\n\r\nok").await;
}

/// RFC 9112 §6.3: `Transfer-Encoding` overrides `Content-Length`, and the length must
/// go before the message is forwarded. hyper's client reads the chunked body but
/// leaves the length in the header map; forwarded as it was, it would frame the
/// client's copy: here 3 bytes of an 11-byte body.
#[tokio::test]
async fn a_response_with_content_length_and_chunked_reaches_the_client_chunked_in_full() {
    let hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
        5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Serve).await;
        let reply = case.get("/").await;
        assert_eq!(reply.status, 200, "{via:?}: {reply:?}");
        assert!(
            reply.header("content-length").is_empty(),
            "{via:?}: {reply:?}"
        );
        assert_eq!(reply.header("transfer-encoding"), ["chunked"], "{via:?}");
        assert_eq!(reply.body, b"hello world", "{via:?}: {reply:?}");
        assert!(reply.complete && !reply.reset, "{via:?}: {reply:?}");
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

/// The same with a length longer than the body: the client must not wait for bytes
/// that never come, nor see its connection break.
#[tokio::test]
async fn a_response_with_a_long_content_length_and_chunked_reaches_the_client_in_full() {
    let hostile = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Serve).await;
        let reply = case.get("/").await;
        assert_eq!(reply.status, 200, "{via:?}: {reply:?}");
        assert!(
            reply.header("content-length").is_empty(),
            "{via:?}: {reply:?}"
        );
        assert_eq!(reply.body, b"hello", "{via:?}: {reply:?}");
        assert!(reply.complete && !reply.reset, "{via:?}: {reply:?}");
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

#[tokio::test]
async fn differing_content_lengths_are_502_upstream_error_and_the_socket_is_closed() {
    let hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk";
    refused_as_upstream_error(hostile).await;
}

/// Repeating one length is not ambiguous (RFC 9110 §8.6 lets a recipient take it as
/// one): the client gets one `Content-Length` and the socket stays in the pool.
#[tokio::test]
async fn a_repeated_identical_content_length_is_forwarded_once_and_the_socket_kept() {
    let repeated = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok";
    for via in BOTH {
        let case = Case::start(via, repeated, Then::Serve).await;
        let reply = case.get("/").await;
        assert_eq!(
            (reply.status, &reply.body[..]),
            (200, &b"ok"[..]),
            "{via:?}"
        );
        assert_eq!(reply.header("content-length"), ["2"], "{via:?}: {reply:?}");
        assert!(reply.complete && !reply.reset, "{via:?}: {reply:?}");
        assert!(case.settles_at(1).await, "{via:?}: the idle socket is kept");
        let next = case.get("/next").await;
        assert_eq!((next.status, &next.body[..]), (200, &b"next"[..]));
        assert_eq!(case.origin.last_served(), Some((0, 1)), "{via:?}: reused");
    }
}

/// Bytes after a complete body, written with it, look like the answer to the next
/// request (a response-splitting attempt): they must never be read as one.
#[tokio::test]
async fn bytes_after_a_content_length_body_are_never_read_as_the_next_response() {
    let hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
        HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Serve).await;
        let reply = case.get("/").await;
        assert_eq!(
            (reply.status, &reply.body[..]),
            (200, &b"ok"[..]),
            "{via:?}"
        );
        assert_eq!(reply.header("content-length"), ["2"], "{via:?}: {reply:?}");
        assert!(reply.complete && !reply.reset, "{via:?}: {reply:?}");
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

/// The same bytes arriving later, while the socket waits idle in the pool: hyper's
/// client treats bytes on an idle connection as an error and closes it.
#[tokio::test]
async fn bytes_arriving_on_an_idle_pooled_socket_close_it() {
    let late = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled".to_vec();
    for via in BOTH {
        let first = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let case = Case::start(via, first, Then::Write(late.clone())).await;
        let reply = case.get("/").await;
        assert_eq!(
            (reply.status, &reply.body[..]),
            (200, &b"ok"[..]),
            "{via:?}"
        );
        assert!(case.settles_at(1).await, "{via:?}: idle in the pool");
        case.origin.release();
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

/// More header lines than hyper's client parses (100).
#[tokio::test]
async fn a_response_with_too_many_headers_is_502_and_its_socket_is_closed() {
    let mut hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    for i in 0..200 {
        hostile.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
    }
    hostile.extend_from_slice(b"\r\nok");
    refused_as_upstream_error(&hostile).await;
}

/// A head longer than hyper's client buffers (about 400 KiB).
#[tokio::test]
async fn a_response_head_larger_than_the_read_buffer_is_502_and_its_socket_is_closed() {
    let mut hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ".to_vec();
    hostile.resize(hostile.len() + 1024 * 1024, b'a');
    hostile.extend_from_slice(b"\r\n\r\nok");
    refused_as_upstream_error(&hostile).await;
}

/// The head went out before the upstream broke off; the client must see the break,
/// not a message that looks complete.
#[tokio::test]
async fn a_close_in_a_content_length_body_breaks_off_the_clients_copy() {
    let hostile = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Close).await;
        let reply = case.get("/").await;
        assert_eq!(reply.status, 200, "{via:?}: {reply:?}");
        assert_eq!(
            reply.header("content-length"),
            ["100"],
            "{via:?}: {reply:?}"
        );
        assert!(!reply.complete, "{via:?}: {reply:?}");
        assert!(reply.body.len() <= 10, "{via:?}: {reply:?}");
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}

#[tokio::test]
async fn a_close_in_a_chunked_body_breaks_off_the_clients_copy_without_a_last_chunk() {
    let hostile = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
    for via in BOTH {
        let case = Case::start(via, hostile, Then::Close).await;
        let reply = case.get("/").await;
        assert_eq!(reply.status, 200, "{via:?}: {reply:?}");
        assert_eq!(reply.header("transfer-encoding"), ["chunked"], "{via:?}");
        assert!(!reply.complete, "{via:?}: {reply:?}");
        case.assert_next_request_gets_a_fresh_socket("error").await;
    }
}
