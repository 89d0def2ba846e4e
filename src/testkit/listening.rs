//! A loopback server that counts its sockets from its own side — how many it accepted,
//! how many are open now, the most ever open at once — so a test can state what an
//! upstream saw rather than what tether believes (linkerd's `Listening`).
//!
//! It serves plain TCP or TLS (tokio-rustls). Over TLS it speaks h2 when ALPN chose
//! `h2` and HTTP/1.1 otherwise; over plain TCP `h2` means prior knowledge. Every
//! accepted socket is counted the same way whatever happens after the accept,
//! including failed TLS handshakes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// The body every testkit server answers with.
pub type Body = BoxBody<Bytes, Infallible>;

/// What a testkit server does with one request.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// How a testkit server speaks.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Serve TLS with this config (its `alpn_protocols` decide what is offered).
    pub tls: Option<Arc<ServerConfig>>,
    /// Speak h2 when no ALPN was negotiated (prior knowledge over plain TCP).
    pub h2: bool,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` of h2 connections (hyper's default otherwise).
    pub h2_max_concurrent_streams: Option<u32>,
    /// Close a connection idle this long (the upstream's own keep-alive timeout).
    pub idle_close_after: Option<Duration>,
    /// Where to listen instead of `127.0.0.1:0`: an address inside a network
    /// namespace a test made (the caller's thread must have entered it).
    pub bind: Option<SocketAddr>,
}

/// A running server and its socket counts.
#[derive(Clone)]
pub struct Listening {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    peak: AtomicUsize,
    requests: AtomicUsize,
    unproxied: AtomicUsize,
    h2: AtomicUsize,
    tls_failures: AtomicUsize,
    tls_resumed: AtomicUsize,
}

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Listening {
    /// Binds `127.0.0.1:0` (or `options.bind`) and serves every connection with
    /// `handler`.
    pub async fn start(options: ServeOptions, handler: Handler) -> Listening {
        let bind = options.bind.unwrap_or(([127, 0, 0, 1], 0).into());
        let listener = TcpListener::bind(bind).await.expect("bind the test server");
        let addr = listener.local_addr().expect("bound");
        let counts = Arc::new(Counts::default());
        let listening = Listening {
            addr,
            counts: counts.clone(),
        };
        let acceptor = options.tls.clone().map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                counts.peak.fetch_max(open, Ordering::SeqCst);
                let conn = Conn {
                    counts: counts.clone(),
                    options: options.clone(),
                    handler: handler.clone(),
                };
                let acceptor = acceptor.clone();
                let counts = counts.clone();
                tokio::spawn(async move {
                    conn.run(stream, acceptor).await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        listening
    }

    /// Sockets accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Sockets open now.
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

    /// Requests that carried no `Via` header: they did not come through a proxy.
    pub fn unproxied_requests(&self) -> usize {
        self.counts.unproxied.load(Ordering::SeqCst)
    }

    /// Connections served as h2.
    pub fn h2_connections(&self) -> usize {
        self.counts.h2.load(Ordering::SeqCst)
    }

    /// Accepted sockets whose TLS handshake failed.
    pub fn tls_failures(&self) -> usize {
        self.counts.tls_failures.load(Ordering::SeqCst)
    }

    /// Accepted sockets whose TLS handshake resumed an earlier session.
    pub fn tls_resumed(&self) -> usize {
        self.counts.tls_resumed.load(Ordering::SeqCst)
    }

    /// `host:port` of the server.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }
}

impl AsRef<Listening> for Listening {
    fn as_ref(&self) -> &Listening {
        self
    }
}

/// One accepted socket.
struct Conn {
    counts: Arc<Counts>,
    options: ServeOptions,
    handler: Handler,
}

impl Conn {
    async fn run(self, stream: TcpStream, acceptor: Option<TlsAcceptor>) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = acceptor else {
            let h2 = self.options.h2;
            return self.serve(stream, h2).await;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    self.counts.tls_resumed.fetch_add(1, Ordering::SeqCst);
                }
                let h2 = match tls.get_ref().1.alpn_protocol() {
                    Some(p) => p == b"h2",
                    None => self.options.h2,
                };
                self.serve(tls, h2).await
            }
            _ => {
                self.counts.tls_failures.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn serve<I>(self, io: I, h2: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let service = {
            let counts = self.counts.clone();
            let in_flight = in_flight.clone();
            let done = done.clone();
            let handler = self.handler.clone();
            service_fn(move |req: Request<Incoming>| {
                counts.requests.fetch_add(1, Ordering::SeqCst);
                if !req.headers().contains_key(http::header::VIA) {
                    counts.unproxied.fetch_add(1, Ordering::SeqCst);
                }
                in_flight.fetch_add(1, Ordering::SeqCst);
                let in_flight = in_flight.clone();
                let done = done.clone();
                let respond = handler(req);
                async move {
                    let resp = respond.await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    done.notify_one();
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let io = TokioIo::new(io);
        let idle = self.options.idle_close_after;
        if h2 {
            self.counts.h2.fetch_add(1, Ordering::SeqCst);
            let mut builder = http2::Builder::new(TokioExecutor::new());
            if let Some(n) = self.options.h2_max_concurrent_streams {
                builder.max_concurrent_streams(n);
            }
            // Boxed as `dyn Send`: otherwise rustc cannot prove the spawned task
            // `Send` through hyper's h2 executor bounds ("higher-ranked lifetime error").
            let conn: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> =
                Box::pin(builder.serve_connection(io, service));
            drive(conn, idle, in_flight, done).await;
        } else {
            let conn = http1::Builder::new().serve_connection(io, service);
            drive(conn, idle, in_flight, done).await;
        }
    }
}

/// Runs a connection to its end, or drops it once it has been idle for `idle`.
async fn drive<F: Future>(
    conn: F,
    idle: Option<Duration>,
    in_flight: Arc<AtomicUsize>,
    done: Arc<Notify>,
) {
    let mut conn = pin!(conn);
    let Some(idle) = idle else {
        conn.await;
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
