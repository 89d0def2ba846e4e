//! An origin on loopback that counts its sockets from its own side: how many it
//! accepted, how many are open now, the most ever open at once. It speaks HTTP/1.1, or
//! over TLS h1/h2 by ALPN (see [`OriginOptions`]). What it serves is chosen by the
//! request path:
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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use rustls::ServerConfig;

use super::listening::{Body, Listening, ServeOptions};

/// How the origin behaves.
#[derive(Debug, Clone, Default)]
pub struct OriginOptions {
    /// Close a keep-alive connection idle this long (the upstream's own timeout).
    pub idle_close_after: Option<Duration>,
    /// Advertise `Keep-Alive: timeout=N` on responses.
    pub advertise_keep_alive: Option<u64>,
    /// Serve TLS with this config; see [`crate::testkit::tls`]. Its ALPN list decides
    /// whether h2 is offered.
    pub tls: Option<Arc<ServerConfig>>,
    /// Speak h2 where ALPN did not decide: prior knowledge over plain TCP.
    pub h2: bool,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` on h2 connections.
    pub h2_max_concurrent_streams: Option<u32>,
    /// Listen here instead of `127.0.0.1:0` (see [`ServeOptions::bind`]).
    pub bind: Option<SocketAddr>,
}

/// A running origin and its socket counts.
#[derive(Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    listening: Listening,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_with(OriginOptions::default()).await
    }

    pub async fn start_with(options: OriginOptions) -> Origin {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let keep_alive = options.advertise_keep_alive;
        let handler = {
            let gate = gate.clone();
            Arc::new(move |req: Request<Incoming>| {
                let gate = gate.clone();
                Box::pin(async move {
                    let mut resp = respond(req, &gate).await;
                    if let Some(t) = keep_alive {
                        resp.headers_mut().insert(
                            "keep-alive",
                            HeaderValue::from_str(&format!("timeout={t}")).expect("valid"),
                        );
                    }
                    resp
                }) as _
            })
        };
        let listening = Listening::start(
            ServeOptions {
                tls: options.tls,
                h2: options.h2,
                h2_max_concurrent_streams: options.h2_max_concurrent_streams,
                idle_close_after: options.idle_close_after,
                bind: options.bind,
            },
            handler,
        )
        .await;
        Origin {
            addr: listening.addr,
            listening,
            gate,
        }
    }

    /// Sockets this origin accepted so far.
    pub fn accepted(&self) -> usize {
        self.listening.accepted()
    }

    /// Sockets open to this origin now.
    pub fn open(&self) -> usize {
        self.listening.open()
    }

    /// The most sockets ever open at once.
    pub fn peak(&self) -> usize {
        self.listening.peak()
    }

    /// Requests served.
    pub fn requests(&self) -> usize {
        self.listening.requests()
    }

    /// Lets one `/gated/N` response send the rest of its body.
    pub fn open_gate(&self) {
        self.gate.add_permits(1);
    }

    /// `host:port` of the origin.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// The origin's counts, including h2 and TLS figures.
    pub fn listening(&self) -> &Listening {
        &self.listening
    }
}

impl AsRef<Listening> for Origin {
    fn as_ref(&self) -> &Listening {
        &self.listening
    }
}

async fn respond(req: Request<Incoming>, gate: &Arc<tokio::sync::Semaphore>) -> Response<Body> {
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
            let gate = gate.clone();
            let rest = futures_util::stream::once(async move {
                let permit = gate.acquire().await.expect("gate open");
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
