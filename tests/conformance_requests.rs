//! Request conformance: what tether does with hostile or unusual HTTP/1.1 requests.
//!
//! Each test is one behaviour. Its request goes raw, on a fresh client connection, to
//! the forward listener (absolute-form, `{abs}` expands to `http://origin`) and to a
//! route listener (origin-form, `{abs}` expands to nothing), in front of an origin
//! that records the exact bytes each of its sockets received. A case states the
//! status the client gets and exactly what reaches the origin: nothing, the request
//! as tether normalises it, or (a body that fails half-way) a cut-off request on a
//! socket tether then closes. After every case a plain request must be served clean:
//! on the same pooled upstream socket (the origin accepted no new one), or, after a
//! cut-off request, on exactly one new socket.
//!
//! HTTP framing is hyper's: many answers below are hyper's own (the 400s for
//! conflicting lengths, obs-fold, bare CR, NUL; 431; the CRLF it writes whatever
//! line ends it read). The cases pin them anyway, because a client relies on the
//! answer, not on who gives it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use support::*;
use tether::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The upstream's name in every config here.
const UPSTREAM: &str = "origin";
/// `header_read_timeout` of the instance for a case that expects no answer (a head
/// that stops arriving): short, so the case is quick. Every other case keeps the
/// default, so a loaded machine cannot turn a slow write into a slowloris.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(300);
/// Not a power of two, nor hyper's 8 KiB buffer floor: the limit must hold exactly
/// where it is set, not where hyper's read buffer happens to end.
const MAX_HEADER_BYTES: usize = 10_000;
/// The recording origin's answer to every complete request: small, keep-alive.
const ORIGIN_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

// ---------------------------------------------------------------------------------
// The recording origin.

/// What one upstream socket carried to the origin.
#[derive(Debug, Clone, Default)]
struct Socket {
    bytes: Vec<u8>,
    closed: bool,
}

/// A loopback origin that records the exact bytes of each socket it accepts and
/// answers each complete request with [`ORIGIN_RESPONSE`]. It finds a request's end
/// itself (`Content-Length`, or chunked framing), so a request cut off half-way is
/// recorded as it arrived and never answered.
#[derive(Clone)]
struct RecordingOrigin {
    addr: SocketAddr,
    sockets: Arc<Mutex<Vec<Socket>>>,
}

impl RecordingOrigin {
    async fn start() -> RecordingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let sockets: Arc<Mutex<Vec<Socket>>> = Arc::default();
        let recorded = sockets.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut all = recorded.lock();
                    all.push(Socket::default());
                    all.len() - 1
                };
                tokio::spawn(record(stream, recorded.clone(), index));
            }
        });
        RecordingOrigin { addr, sockets }
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn sockets(&self) -> Vec<Socket> {
        self.sockets.lock().clone()
    }
}

async fn record(mut stream: TcpStream, sockets: Arc<Mutex<Vec<Socket>>>, index: usize) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        sockets.lock()[index].bytes.extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        while let Some(len) = request_len(&pending) {
            pending.drain(..len);
            if stream.write_all(ORIGIN_RESPONSE).await.is_err() {
                break;
            }
        }
    }
    sockets.lock()[index].closed = true;
}

/// The length of the first complete request in `buf`, if it holds one. Knows only
/// the framing tether sends (CRLF lines, `content-length` or chunked).
fn request_len(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .map(str::to_owned)
    };
    if header("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        let mut at = head_end;
        loop {
            let line_end = at + find(&buf[at..], b"\r\n")?;
            let line = std::str::from_utf8(&buf[at..line_end]).ok()?;
            let size = u64::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                return if buf.get(at..at + 2)? == b"\r\n" {
                    Some(at + 2)
                } else {
                    Some(at + find(&buf[at..], b"\r\n\r\n")? + 4)
                };
            }
            at = at
                .checked_add(usize::try_from(size).ok()?)?
                .checked_add(2)?;
            if at > buf.len() {
                return None;
            }
        }
    }
    let length: usize = header("content-length").map_or(Some(0), |v| v.parse().ok())?;
    (buf.len() >= head_end + length).then_some(head_end + length)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------
// The client side.

/// What a raw client saw for one request.
#[derive(Debug)]
struct Answer {
    /// The status of the first response, `None` when the connection closed first.
    status: Option<u16>,
    /// Everything read, for messages.
    bytes: Vec<u8>,
    /// The connection was closed by tether after the response (or without one).
    closed: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.bytes).to_ascii_lowercase();
        let head = text.split("\r\n\r\n").next()?.to_owned();
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .map(str::to_owned)
    }
}

/// Writes `request` on a new connection to `addr` and reads one response: its head,
/// then a `content-length` body. Then watches `linger` for tether closing the
/// connection.
async fn exchange(addr: SocketAddr, request: &[u8], linger: Duration) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect to tether");
    // tether may answer (431) and close before it has read everything.
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    let mut closed = false;
    let complete = |bytes: &[u8]| {
        let end = find(bytes, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap_or(0));
        (bytes.len() >= end + length).then_some(())
    };
    while complete(&bytes).is_none() {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no answer within {WAIT:?}; read so far: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    if !closed {
        closed = matches!(
            tokio::time::timeout(linger, stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
    }
    let status = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    Answer {
        status,
        bytes,
        closed,
    }
}

// ---------------------------------------------------------------------------------
// Cases.

/// What a case expects to reach the origin.
#[derive(Debug, Clone, Copy)]
enum Upstream {
    /// Not a byte.
    Nothing,
    /// Exactly these bytes (with `{origin}` expanded), on the pooled socket.
    Exactly(&'static str),
    /// A request cut off on the pooled socket: at most this head (whether hyper had
    /// flushed it before the body failed is a race) and part of its body, never a
    /// complete request. tether closes that socket; the next request opens a new one.
    CutOff(&'static str),
}

/// How tether treats the client connection after answering.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Client {
    /// Either way: the case does not decide it.
    Any,
    /// Closed after the answer (framing that cannot be trusted, or HTTP/1.0).
    Closed,
}

#[derive(Debug, Clone)]
struct Case {
    /// The raw request: `{abs}` is `http://origin` on the forward listener and empty
    /// on the route listener; `{origin}` the origin's `host:port`; `{host}` the
    /// address the client connected to.
    request: String,
    /// The status the client gets; `None`: closed without a response.
    status: Option<u16>,
    /// The `x-tether-error` of that answer, for the ones tether writes itself.
    error: Option<&'static str>,
    upstream: Upstream,
    client: Client,
    /// Pad the request at `{fill}` to exactly this many bytes (the same padding
    /// fills `{fill}` in what the origin is to receive).
    size: Option<usize>,
}

const FORWARDED_GET: &str = "GET /x HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\n\r\n";
/// The head tether sends upstream for a chunked `POST /x`.
const CHUNKED_HEAD: &str =
    "POST /x HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\ntransfer-encoding: chunked\r\n\r\n";

impl Case {
    fn answered(request: impl Into<String>, status: u16) -> Case {
        Case {
            request: request.into(),
            status: Some(status),
            error: None,
            upstream: Upstream::Nothing,
            client: Client::Any,
            size: None,
        }
    }

    fn forwarded(request: impl Into<String>, upstream: &'static str) -> Case {
        Case {
            upstream: Upstream::Exactly(upstream),
            ..Case::answered(request, 200)
        }
    }

    fn error(self, code: &'static str) -> Case {
        Case {
            error: Some(code),
            ..self
        }
    }

    fn closing(self) -> Case {
        Case {
            client: Client::Closed,
            ..self
        }
    }

    /// Runs the case on the forward listener, then on the route listener; gives back
    /// the instance for a look at its metrics.
    async fn check(self) -> Harness {
        let harness = Harness::start(&self).await;
        harness.run(&self, Listener::Forward).await;
        harness.run(&self, Listener::Route).await;
        harness
    }

    /// Runs the case only on `listener` (a request that means something else on the
    /// other one).
    async fn check_on(self, listener: Listener) -> Harness {
        let harness = Harness::start(&self).await;
        harness.run(&self, listener).await;
        harness
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Listener {
    Forward,
    Route,
}

struct Harness {
    origin: RecordingOrigin,
    tether: Running,
}

impl Harness {
    async fn start(case: &Case) -> Harness {
        let origin = RecordingOrigin::start().await;
        let mut config = tether::config::Config::default();
        config.proxy.listen = "127.0.0.1:0".parse().unwrap();
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        if case.status.is_none() {
            config.proxy.header_read_timeout = HEADER_READ_TIMEOUT;
        }
        config.proxy.max_header_bytes = MAX_HEADER_BYTES;
        config.upstream = vec![tether::config::UpstreamConfig::new(
            UPSTREAM,
            origin.authority(),
        )];
        route(&mut config, UPSTREAM);
        let tether = start(config).await;
        Harness { origin, tether }
    }

    fn addr(&self, listener: Listener) -> SocketAddr {
        match listener {
            Listener::Forward => self.tether.proxy_addr,
            Listener::Route => self.tether.route_addrs[0],
        }
    }

    fn expand(&self, template: &str, listener: Listener) -> String {
        let origin = self.origin.authority();
        let abs = match listener {
            Listener::Forward => format!("http://{origin}"),
            Listener::Route => String::new(),
        };
        template
            .replace("{abs}", &abs)
            .replace("{origin}", &origin)
            .replace("{host}", &self.addr(listener).to_string())
    }

    /// `requests` bad request bodies were counted as the client's: rejected with
    /// `bad_request_body`, their upstream sockets closed as `request_aborted`, and no
    /// upstream socket closed as an `error`.
    fn assert_client_blamed(&self, requests: usize) {
        let metrics = self.tether.metrics();
        let rejected = metric(
            &metrics,
            "tether_downstream_requests_rejected_total",
            &[("reason", "bad_request_body")],
        );
        assert_eq!(rejected, Some(requests as f64), "{metrics}");
        assert_eq!(
            closed_total(&self.tether, UPSTREAM, "request_aborted"),
            requests as f64,
            "{metrics}"
        );
        assert_eq!(
            closed_total(&self.tether, UPSTREAM, "error"),
            0.0,
            "{metrics}"
        );
    }

    /// Waits until no upstream socket is connecting or in use: a finished exchange
    /// has checked its socket in (or closed it), so the next request can reuse it.
    async fn settled(&self) {
        let settled = eventually(WAIT, || async {
            self.tether
                .pool_counts(UPSTREAM)
                .is_some_and(|c| c.active == 0 && c.connecting == 0)
        })
        .await;
        assert!(
            settled,
            "upstream sockets still busy: {:?}",
            self.tether.pool_counts(UPSTREAM)
        );
    }

    /// A plain GET that must succeed, on a fresh client connection.
    async fn plain_get(&self, listener: Listener, path: &str) {
        let request = self.expand(
            &format!("GET {{abs}}{path} HTTP/1.1\r\nHost: {{host}}\r\n\r\n"),
            listener,
        );
        let answer = exchange(self.addr(listener), request.as_bytes(), Duration::ZERO).await;
        assert_eq!(
            answer.status,
            Some(200),
            "{listener:?}: a plain GET {path} after the case: {:?}",
            String::from_utf8_lossy(&answer.bytes)
        );
        self.settled().await;
    }

    async fn run(&self, case: &Case, listener: Listener) {
        // One pooled socket, idle, before the case.
        self.plain_get(listener, "/warm").await;
        let before = self.origin.sockets();
        let request = self.expand(&case.request, listener);
        let fill = case
            .size
            .map(|size| "p".repeat(size + "{fill}".len() - request.len()))
            .unwrap_or_default();
        let request = request.replace("{fill}", &fill);
        let started = Instant::now();
        let linger = match case.client {
            Client::Closed => WAIT,
            Client::Any => Duration::ZERO,
        };
        let answer = exchange(self.addr(listener), request.as_bytes(), linger).await;
        let took = started.elapsed();
        self.settled().await;
        self.plain_get(listener, "/next").await;
        let after = self.origin.sockets();

        // What each socket received during the case and the follow-up.
        let received: Vec<(usize, Vec<u8>, bool)> = after
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let old = before.get(i).map_or(0, |b| b.bytes.len());
                (i, s.bytes[old..].to_vec(), s.closed)
            })
            .filter(|(_, bytes, _)| !bytes.is_empty())
            .collect();
        let show = |bytes: &[u8]| format!("{:?}", String::from_utf8_lossy(bytes));
        let summary: Vec<String> = received
            .iter()
            .map(|(i, b, closed)| {
                format!(
                    "socket {i}{}: {}",
                    if *closed { " (closed)" } else { "" },
                    show(b)
                )
            })
            .collect();
        // One line per case and listener: what happened, for the record.
        eprintln!(
            "CASE {listener:?} {:?} -> status {:?} error {:?} closed {} | origin: {}",
            case.request,
            answer.status,
            answer.header("x-tether-error"),
            answer.closed,
            summary.join(" ; ")
        );
        let context = format!(
            "{listener:?}: {request:?}\n  answer: {}\n  origin: {}",
            show(&answer.bytes),
            summary.join("\n          ")
        );

        assert_eq!(answer.status, case.status, "status\n{context}");
        if let Some(code) = case.error {
            assert_eq!(
                answer.header("x-tether-error").as_deref(),
                Some(code),
                "x-tether-error\n{context}"
            );
        }
        if case.client == Client::Closed {
            assert!(answer.closed, "the client connection is closed\n{context}");
        }
        if case.status.is_none() {
            assert!(
                took >= HEADER_READ_TIMEOUT,
                "closed only at header_read_timeout, not after {took:?}\n{context}"
            );
        }
        let follow_up = self.expand(
            "GET /next HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\n\r\n",
            listener,
        );
        let pooled = before.len() - 1;
        match case.upstream {
            Upstream::Nothing => {
                assert_eq!(
                    after.len(),
                    before.len(),
                    "no new upstream socket\n{context}"
                );
                assert_eq!(
                    received,
                    vec![(pooled, follow_up.into_bytes(), false)],
                    "only the follow-up reached the origin, on the pooled socket\n{context}"
                );
            }
            Upstream::Exactly(bytes) => {
                let expected = self.expand(bytes, listener).replace("{fill}", &fill) + &follow_up;
                assert_eq!(
                    after.len(),
                    before.len(),
                    "no new upstream socket\n{context}"
                );
                assert_eq!(
                    received,
                    vec![(pooled, expected.into_bytes(), false)],
                    "the normalised request, then the follow-up, on the pooled socket\n{context}"
                );
            }
            Upstream::CutOff(head) => {
                let head = self.expand(head, listener);
                let cut = &after[pooled];
                let sent = &cut.bytes[before[pooled].bytes.len()..];
                assert!(
                    head.as_bytes().starts_with(sent) || sent.starts_with(head.as_bytes()),
                    "at most the request's head and a part of its body\n{context}"
                );
                assert_eq!(
                    request_len(sent),
                    None,
                    "the request never completed\n{context}"
                );
                assert!(
                    cut.closed,
                    "tether closed the socket of the cut-off request\n{context}"
                );
                assert_eq!(
                    after.len(),
                    before.len() + 1,
                    "the follow-up needed a new socket\n{context}"
                );
                let fresh = &after[pooled + 1];
                assert_eq!(
                    (fresh.bytes.as_slice(), fresh.closed),
                    (follow_up.as_bytes(), false),
                    "the follow-up, clean, on the new socket\n{context}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Well-formed requests, as a baseline: they reach the origin normalised.

#[tokio::test]
async fn a_plain_get_is_forwarded_in_origin_form_with_the_upstreams_host() {
    Case::forwarded(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\n\r\n",
        FORWARDED_GET,
    )
    .check()
    .await;
}

#[tokio::test]
async fn a_chunked_body_is_forwarded_chunked() {
    Case::forwarded(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .check()
    .await;
}

#[tokio::test]
async fn transfer_encoding_chunked_is_matched_without_regard_to_case_or_spaces() {
    Case::forwarded(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:  CHUNKED \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .check()
    .await;
}

#[tokio::test]
async fn repeated_identical_content_lengths_are_forwarded_as_one() {
    Case::forwarded(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST /x HTTP/1.1\r\nhost: {origin}\r\ncontent-length: 5\r\nvia: 1.1 tether\r\n\r\nhello",
    )
    .check()
    .await;
}

#[tokio::test]
async fn bare_lf_line_ends_in_a_head_are_accepted_and_forwarded_as_crlf() {
    // RFC 9112 §2.2: a recipient MAY recognise a single LF as a line terminator.
    Case::forwarded("GET {abs}/x HTTP/1.1\nHost: {host}\n\n", FORWARDED_GET)
        .check()
        .await;
}

#[tokio::test]
async fn an_http_1_0_request_without_host_is_forwarded_with_the_upstreams_host() {
    // RFC 9112 §3.2 requires Host of HTTP/1.1 requests only.
    Case::forwarded("GET {abs}/x HTTP/1.0\r\n\r\n", FORWARDED_GET)
        .closing()
        .check()
        .await;
}

#[tokio::test]
async fn a_connection_header_naming_host_leaves_the_upstream_its_own_host() {
    // RFC 9110 §7.6.1: the fields Connection names are removed, Host included; the
    // upstream still gets a Host (RFC 9112 §3.2), the one naming it.
    Case::forwarded(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nConnection: host\r\n\r\n",
        FORWARDED_GET,
    )
    .check()
    .await;
}

#[tokio::test]
async fn an_absolute_form_target_wins_over_a_differing_host() {
    // RFC 9112 §3.2.2: the Host is ignored for the target's authority, on both
    // listeners (a route listener must accept absolute-form too).
    Case::forwarded(
        "GET http://{origin}/x HTTP/1.1\r\nHost: elsewhere.invalid\r\n\r\n",
        FORWARDED_GET,
    )
    .check()
    .await;
}

// ---------------------------------------------------------------------------------
// Request targets.

#[tokio::test]
async fn a_fragment_right_after_the_authority_is_forwarded_as_slash() {
    // A fragment is no part of a request-target (absolute-form is an absolute-URI,
    // RFC 9112 §3.2.2, which has none) and hyper's parser drops it; the path left is
    // empty, which origin-form sends as `/` (RFC 9112 §3.2.1). That is also what the
    // access log names: see the test below.
    Case::forwarded(
        "GET http://{origin}#x HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\n\r\n",
    )
    .check()
    .await;
}

#[tokio::test]
async fn a_query_right_after_the_authority_is_forwarded_after_slash() {
    Case::forwarded(
        "GET http://{origin}?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /?q=1 HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\n\r\n",
    )
    .check()
    .await;
}

#[tokio::test]
async fn an_asterisk_target_on_anything_but_options_gets_400() {
    Case::answered("GET * HTTP/1.1\r\nHost: {host}\r\n\r\n", 400)
        .error("bad_target")
        .check()
        .await;
}

#[tokio::test]
async fn options_asterisk_on_a_route_listener_is_forwarded_as_asterisk() {
    // RFC 9112 §3.2.4: the asterisk-form is for a server-wide OPTIONS; the route's
    // upstream is that server. (The forward listener is no origin: 400 there.)
    Case::forwarded(
        "OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\n\r\n",
    )
    .check_on(Listener::Route)
    .await;
    Case::answered("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n", 400)
        .error("bad_target")
        .check_on(Listener::Forward)
        .await;
}

#[tokio::test]
async fn an_authority_form_target_on_anything_but_connect_gets_400() {
    Case::answered("GET {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n", 400)
        .error("bad_target")
        .check()
        .await;
}

#[tokio::test]
async fn connect_on_a_route_listener_gets_405() {
    Case::answered("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n", 405)
        .error("method_not_allowed")
        .check_on(Listener::Route)
        .await;
}

// ---------------------------------------------------------------------------------
// Host (RFC 9112 §3.2).

#[tokio::test]
async fn an_http_1_1_request_without_host_gets_400() {
    Case::answered("GET {abs}/x HTTP/1.1\r\n\r\n", 400)
        .error("bad_request")
        .check()
        .await;
}

#[tokio::test]
async fn a_request_with_two_host_headers_gets_400() {
    Case::answered(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",
        400,
    )
    .error("bad_request")
    .check()
    .await;
}

#[tokio::test]
async fn a_host_that_is_not_a_host_and_port_gets_400() {
    Case::answered("GET {abs}/x HTTP/1.1\r\nHost: user@{host}\r\n\r\n", 400)
        .error("bad_request")
        .check()
        .await;
}

// ---------------------------------------------------------------------------------
// Message framing (RFC 9112 §6).

#[tokio::test]
async fn content_length_with_transfer_encoding_is_forwarded_chunked_and_the_client_closed() {
    // RFC 9112 §6.1: process by Transfer-Encoding alone, drop Content-Length, and
    // close the connection after responding (hyper does all three).
    Case::forwarded(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nhost: {origin}\r\nvia: 1.1 tether\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn differing_duplicate_content_lengths_get_400() {
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_content_length_list_gets_400() {
    // RFC 9110 §8.6 lets a recipient reject `5, 5` as invalid; hyper does.
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_transfer_coding_before_chunked_gets_501() {
    // RFC 9112 §6.1: a coding the server does not understand SHOULD get 501. tether
    // re-frames bodies and cannot carry gzip to every upstream (HTTP/2 has no
    // transfer codings): refusing beats silently dropping it.
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        501,
    )
    .error("unsupported_transfer_coding")
    .check()
    .await;
}

#[tokio::test]
async fn a_transfer_coding_on_its_own_header_line_before_chunked_gets_501() {
    // The same list split over two lines (RFC 9110 §5.3): hyper reads only the last.
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        501,
    )
    .error("unsupported_transfer_coding")
    .check()
    .await;
}

#[tokio::test]
async fn chunked_applied_twice_gets_400() {
    // RFC 9112 §7: a sender MUST NOT apply chunked more than once; the body's
    // length cannot be told.
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .error("bad_request")
    .check()
    .await;
}

#[tokio::test]
async fn transfer_encoding_on_an_http_1_0_request_gets_400() {
    // HTTP/1.0 has no transfer codings (RFC 9112 §6.1: a server MUST NOT assume
    // an HTTP/1.0 client can parse them, and the length is unknowable): hyper
    // refuses it.
    Case::answered(
        "POST {abs}/x HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn chunked_followed_by_identity_gets_400() {
    // RFC 9112 §6.3: chunked is not the final coding, so the length cannot be
    // determined: 400 and close (hyper answers before tether sees the request).
    Case::answered(
        "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_chunk_size_line_ending_in_a_bare_lf_gets_400_and_the_upstream_is_not_blamed() {
    // RFC 9112 §7.1: a chunk-size line ends in CRLF. hyper finds the error while
    // tether streams the body upstream; the client gets 400 (no response head has
    // been forwarded yet), the half-sent upstream socket is closed.
    let harness = Case {
        upstream: Upstream::CutOff(CHUNKED_HEAD),
        ..Case::answered(
            "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            400,
        )
    }
    .error("bad_request_body")
    .closing()
    .check()
    .await;
    harness.assert_client_blamed(2);
}

#[tokio::test]
async fn an_overflowing_chunk_size_gets_400_and_the_upstream_is_not_blamed() {
    let harness = Case {
        upstream: Upstream::CutOff(CHUNKED_HEAD),
        ..Case::answered(
            "POST {abs}/x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nhello\r\n0\r\n\r\n",
            400,
        )
    }
    .error("bad_request_body")
    .closing()
    .check()
    .await;
    harness.assert_client_blamed(2);
}

// ---------------------------------------------------------------------------------
// Field syntax (RFC 9112 §5, RFC 9110 §5.5).

#[tokio::test]
async fn an_obs_fold_gets_400() {
    // RFC 9112 §5.2: reject with 400, or replace the fold by spaces; hyper rejects.
    Case::answered(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n\r\n",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_bare_cr_in_a_field_value_gets_400() {
    // RFC 9112 §2.2: a bare CR makes the element invalid.
    Case::answered(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Cr: a\rb\r\n\r\n",
        400,
    )
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_nul_in_a_field_value_gets_400() {
    // RFC 9110 §5.5: NUL is never valid in a field value.
    Case::answered(
        "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Nul: a\0b\r\n\r\n",
        400,
    )
    .closing()
    .check()
    .await;
}

// ---------------------------------------------------------------------------------
// Heads too large or too slow.

#[tokio::test]
async fn a_head_of_exactly_max_header_bytes_is_forwarded() {
    Case {
        size: Some(MAX_HEADER_BYTES),
        ..Case::forwarded(
            "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Pad: {fill}\r\n\r\n",
            "GET /x HTTP/1.1\r\nhost: {origin}\r\nx-pad: {fill}\r\nvia: 1.1 tether\r\n\r\n",
        )
    }
    .check()
    .await;
}

#[tokio::test]
async fn a_head_one_byte_over_max_header_bytes_gets_431() {
    Case {
        size: Some(MAX_HEADER_BYTES + 1),
        ..Case::answered(
            "GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Pad: {fill}\r\n\r\n",
            431,
        )
    }
    .closing()
    .check()
    .await;
}

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431() {
    let pad = "p".repeat(MAX_HEADER_BYTES);
    let request = format!("GET {{abs}}/x HTTP/1.1\r\nHost: {{host}}\r\nX-Pad: {pad}\r\n\r\n");
    Case::answered(request, 431).closing().check().await;
}

#[tokio::test]
async fn a_request_line_over_max_header_bytes_gets_431() {
    let path = "p".repeat(MAX_HEADER_BYTES);
    let request = format!("GET {{abs}}/{path} HTTP/1.1\r\nHost: {{host}}\r\n\r\n");
    Case::answered(request, 431).closing().check().await;
}

#[tokio::test]
async fn a_head_with_more_than_100_fields_gets_431() {
    let fields: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let request = format!("GET {{abs}}/x HTTP/1.1\r\nHost: {{host}}\r\n{fields}\r\n");
    Case::answered(request, 431).closing().check().await;
}

#[tokio::test]
async fn a_head_that_stops_arriving_is_closed_at_header_read_timeout() {
    Case {
        status: None,
        ..Case::answered("GET {abs}/x HTTP/1.1\r\nHost: {host}\r\nX-Slow: ", 0)
    }
    .closing()
    .check()
    .await;
}
