//! An HTTP/1.1 origin on loopback that counts its sockets from its own side: how many
//! it accepted, how many are open now, the most ever open at once. What it serves is
//! chosen by the request path:
//!
//! - `/bytes/N` — N bytes of body (`Content-Length`)
//! - `/stream/N` — N bytes, chunked, in 64 KiB pieces as fast as the reader takes them
//! - `/gated/N` — the first 64 KiB of N bytes at once, the rest after [`Origin::open_gate`]
//! - `/delay/MS` — waits MS milliseconds, then answers `ok`
//! - `/status/CODE` — an empty response with that status
//! - `/close` — answers with `Connection: close`
//! - `/echo` — the request head as text, then the request body
//! - anything else — `ok`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Body = BoxBody<Bytes, Infallible>;

/// How the origin treats idle keep-alive connections.
#[derive(Debug, Clone, Default)]
pub struct OriginOptions {
    /// Close a keep-alive connection idle this long (the upstream's own timeout).
    pub idle_close_after: Option<Duration>,
    /// Advertise `Keep-Alive: timeout=N` on responses.
    pub advertise_keep_alive: Option<u64>,
}

/// A running origin and its socket counts.
#[derive(Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
}

struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    peak: AtomicUsize,
    requests: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_with(OriginOptions::default()).await
    }

    pub async fn start_with(options: OriginOptions) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let counts = Arc::new(Counts {
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let origin = Origin {
            addr,
            counts: counts.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                counts.peak.fetch_max(open, Ordering::SeqCst);
                let counts = counts.clone();
                let options = options.clone();
                tokio::spawn(async move {
                    serve(stream, &counts, &options).await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        origin
    }

    /// Sockets this origin accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Sockets open to this origin now.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// The most sockets ever open at once.
    pub fn peak(&self) -> usize {
        self.counts.peak.load(Ordering::SeqCst)
    }

    /// Requests served.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Lets one `/gated/N` response send the rest of its body.
    pub fn open_gate(&self) {
        self.counts.gate.add_permits(1);
    }

    /// `host:port` of the origin.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }
}

async fn serve(stream: tokio::net::TcpStream, counts: &Arc<Counts>, options: &OriginOptions) {
    let _ = stream.set_nodelay(true);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let service = {
        let counts = counts.clone();
        let in_flight = in_flight.clone();
        let done = done.clone();
        let keep_alive = options.advertise_keep_alive;
        service_fn(move |req| {
            counts.requests.fetch_add(1, Ordering::SeqCst);
            in_flight.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            let in_flight = in_flight.clone();
            let done = done.clone();
            async move {
                let mut resp = respond(req, &counts).await;
                if let Some(t) = keep_alive {
                    resp.headers_mut().insert(
                        "keep-alive",
                        HeaderValue::from_str(&format!("timeout={t}")).expect("valid"),
                    );
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
                done.notify_one();
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    let Some(idle) = options.idle_close_after else {
        let _ = conn.await;
        return;
    };
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = done.notified() => {}
            _ = tokio::time::sleep(idle) => {
                if in_flight.load(Ordering::SeqCst) == 0 {
                    // Like an upstream's keep-alive timeout: close without warning.
                    return;
                }
            }
        }
    }
}

async fn respond(req: Request<Incoming>, counts: &Arc<Counts>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (head, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match head {
        "bytes" => {
            let n: usize = arg.parse().unwrap_or(0);
            full(StatusCode::OK, Bytes::from(vec![b'x'; n]))
        }
        "stream" => {
            let n: usize = arg.parse().unwrap_or(0);
            const CHUNK: usize = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            let frames = stream::iter((0..n.div_ceil(CHUNK)).map(move |i| {
                let len = CHUNK.min(n - i * CHUNK);
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            }));
            Response::new(StreamBody::new(frames).boxed())
        }
        "gated" => {
            let n: usize = arg.parse().unwrap_or(0);
            let first = n.min(64 * 1024);
            let counts = counts.clone();
            let rest = futures_util::stream::once(async move {
                let permit = counts.gate.acquire().await.expect("gate open");
                permit.forget();
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; n - first])))
            });
            let head = stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from(vec![
                b'x';
                first
            ])))]);
            let mut resp =
                Response::new(StreamBody::new(futures_util::StreamExt::chain(head, rest)).boxed());
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            resp
        }
        "delay" => {
            let ms: u64 = arg.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, Bytes::from_static(b"ok"))
        }
        "status" => {
            let code = arg
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            full(code, Bytes::new())
        }
        "close" => {
            let mut resp = full(StatusCode::OK, Bytes::from_static(b"ok"));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        "echo" => {
            let mut text = format!("{} {}\n", req.method(), req.uri());
            for (name, value) in req.headers() {
                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            text.push('\n');
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut all = text.into_bytes();
            all.extend_from_slice(&body);
            full(StatusCode::OK, Bytes::from(all))
        }
        _ => full(StatusCode::OK, Bytes::from_static(b"ok")),
    }
}

fn full(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    resp
}
