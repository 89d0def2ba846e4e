//! Reference proxies for `benches/compare.sh`: what the stack itself costs, with
//! none of tether's work on top. They show how far tether's numbers can move
//! without leaving its dependencies, so a gap to HAProxy can be split into "tether"
//! and "the stack".
//!
//! ```text
//! floor hyper LISTEN ORIGIN CAP   hyper 1.x HTTP/1.1 server and client, a capped
//!                                 keep-alive pool of CAP sockets, and nothing else
//! floor proxy LISTEN ORIGIN CAP   `hyper`, plus what RFC 9110 asks of every proxy on
//!                                 every message and tether does: hop-by-hop headers
//!                                 removed (tether's own `strip_hop_by_hop`), `Via`
//!                                 added both ways, `Host` naming the origin
//! floor raw   LISTEN ORIGIN CAP   tokio sockets and httparse: request and response
//!                                 bytes forwarded unchanged, Content-Length framing
//! ```
//!
//! Both pick their runtime as tether does (`tether::instance::runtime`): one thread
//! per core the process may use, or `TOKIO_WORKER_THREADS`; one thread is tokio's
//! current-thread scheduler, more the multi-threaded one.
//!
//! tether / floor-hyper is what tether costs over the stack; tether / floor-proxy
//! is what its governance costs (the pool's accounting, timeouts, metrics, access
//! log), the header work every proxy must do being in both.
//!
//! None is a proxy to deploy: no timeouts, no policy, no metrics, and `raw`
//! understands only `Content-Length` bodies (what the bench's nginx origin sends).
//! Built with `cargo build --release --example floor`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The same allocator as tether's binary, so tether / floor-hyper measures tether's
/// own work and not the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idle upstream connections, at most `cap` open (a permit per open socket in use).
struct Pool<C> {
    origin: String,
    /// The origin's `Host`, when the proxy does a proxy's header duties (`proxy`).
    duties: Option<HeaderValue>,
    idle: Mutex<Vec<C>>,
    permits: Arc<Semaphore>,
}

impl<C> Pool<C> {
    fn new(origin: String, cap: usize, duties: bool) -> Arc<Pool<C>> {
        Arc::new(Pool {
            duties: duties.then(|| HeaderValue::from_str(&origin).expect("ORIGIN is a valid Host")),
            origin,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(cap)),
        })
    }

    fn take(&self) -> Option<C> {
        self.idle.lock().unwrap().pop()
    }

    fn put(&self, conn: C) {
        self.idle.lock().unwrap().push(conn);
    }
}

fn main() -> std::io::Result<()> {
    // tether's runtime, so that tether / floor-hyper measures tether's own work.
    tether::instance::runtime(0).build()?.block_on(run())
}

async fn run() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, origin, cap] = args.as_slice() else {
        eprintln!("usage: floor hyper|proxy|raw LISTEN ORIGIN CAP");
        std::process::exit(2);
    };
    let cap: usize = cap.parse().expect("CAP is a number");
    let listener = TcpListener::bind(listen).await?;
    let duties = mode == "proxy";
    let origin = origin.clone();
    match mode.as_str() {
        "hyper" | "proxy" => serve(listener, Pool::new(origin, cap, duties), hyper_client).await,
        "raw" => serve(listener, Pool::new(origin, cap, false), raw_client).await,
        other => panic!("unknown mode {other}"),
    }
}

async fn serve<C, F>(
    listener: TcpListener,
    pool: Arc<Pool<C>>,
    client: fn(TcpStream, Arc<Pool<C>>) -> F,
) -> std::io::Result<()>
where
    C: Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(client(stream, pool.clone()));
    }
}

async fn connect(origin: &str) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(origin).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

// --- hyper ---------------------------------------------------------------------

type Sender = SendRequest<Incoming>;

async fn hyper_client(stream: TcpStream, pool: Arc<Pool<Sender>>) {
    let service = hyper::service::service_fn(move |req| forward(req, pool.clone()));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The `Via` a proxy adds (RFC 9110 §7.6.3).
const VIA: HeaderValue = HeaderValue::from_static("1.1 floor");

async fn forward(
    mut req: http::Request<Incoming>,
    pool: Arc<Pool<Sender>>,
) -> Result<http::Response<Returning>, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(host) = &pool.duties {
        let headers = req.headers_mut();
        tether::proxy::strip_hop_by_hop(headers);
        headers.insert(header::HOST, host.clone());
        headers.append(header::VIA, VIA);
    }
    let permit = pool.permits.clone().acquire_owned().await?;
    let mut sender = match pool.take() {
        Some(sender) => sender,
        None => {
            let io = TokioIo::new(connect(&pool.origin).await?);
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            sender
        }
    };
    sender.ready().await?;
    let mut resp = sender.send_request(req).await?;
    if pool.duties.is_some() {
        let headers = resp.headers_mut();
        tether::proxy::strip_hop_by_hop(headers);
        headers.append(header::VIA, VIA);
    }
    Ok(resp.map(|body| Returning {
        body,
        back: Some((sender, permit)),
        pool,
    }))
}

/// The response body; its connection goes back to the pool once the body is read.
struct Returning {
    body: Incoming,
    back: Option<(Sender, OwnedSemaphorePermit)>,
    pool: Arc<Pool<Sender>>,
}

impl Returning {
    fn release(&mut self) {
        if let Some((sender, _permit)) = self.back.take() {
            self.pool.put(sender);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // hyper stops polling once `is_end_stream` says so: release on either.
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // An unfinished body leaves its connection mid-response: drop it (closed).
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

// --- raw -------------------------------------------------------------------------

/// Forwards requests from one client until it closes; any error closes both sides.
async fn raw_client(mut client: TcpStream, pool: Arc<Pool<TcpStream>>) {
    let mut request = vec![0u8; 16 * 1024];
    let mut response = vec![0u8; 16 * 1024];
    let mut have = 0;
    while let Ok(Some(len)) = read_message(&mut client, &mut request, &mut have, request_len).await
    {
        let Ok(_permit) = pool.permits.acquire().await else {
            return;
        };
        let mut upstream = match pool.take() {
            Some(upstream) => upstream,
            None => match connect(&pool.origin).await {
                Ok(upstream) => upstream,
                Err(_) => return,
            },
        };
        if upstream.write_all(&request[..len]).await.is_err() {
            return;
        }
        request.copy_within(len..have, 0);
        have -= len;
        if relay_response(&mut upstream, &mut client, &mut response)
            .await
            .is_err()
        {
            return;
        }
        pool.put(upstream);
    }
}

/// Reads until `buf[..*have]` holds a whole message (head and body, as `len` sizes
/// it); `Ok(None)` on a clean close between messages.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut [u8],
    have: &mut usize,
    len: fn(&[u8]) -> Option<usize>,
) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(n) = len(&buf[..*have]).filter(|n| *n <= *have) {
            return Ok(Some(n));
        }
        if *have == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        match stream.read(&mut buf[*have..]).await? {
            0 => return Ok(None),
            n => *have += n,
        }
    }
}

/// Copies one response from `upstream` to `client`: the head and as much body as
/// came with it, then the rest of the `Content-Length` as it arrives.
async fn relay_response(
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut have = 0;
    let total = loop {
        if let Some(total) = response_len(&buf[..have]) {
            break total;
        }
        match upstream.read(&mut buf[have..]).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => have += n,
        }
    };
    client.write_all(&buf[..have]).await?;
    let mut left = total.saturating_sub(have);
    while left > 0 {
        let n = match upstream.read(buf).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => n.min(left),
        };
        client.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(())
}

fn request_len(buf: &[u8]) -> Option<usize> {
    message_len(buf, true)
}

fn response_len(buf: &[u8]) -> Option<usize> {
    message_len(buf, false)
}

/// The length of the whole message at the start of `buf` (head and body), once its
/// head has arrived.
fn message_len(buf: &[u8], request: bool) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let (parsed, headers) = if request {
        let mut req = httparse::Request::new(&mut headers);
        (req.parse(buf), req.headers)
    } else {
        let mut resp = httparse::Response::new(&mut headers);
        (resp.parse(buf), resp.headers)
    };
    match parsed.ok()? {
        httparse::Status::Complete(head) => Some(head + content_length(headers)?),
        httparse::Status::Partial => None,
    }
}

/// The `Content-Length`, 0 when absent; `None` (the connection closes) when unreadable.
fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    match headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        Some(h) => std::str::from_utf8(h.value).ok()?.trim().parse().ok(),
        None => Some(0),
    }
}
