//! A client that leaks connections the way the Dragonfly manager did: every job
//! builds a new HTTP client (a new TCP connection), uses it, and never closes it.
//! Only the server side closing a socket makes it go away.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The leaked clients of one run, and how many of their sockets are still open.
#[derive(Default)]
pub struct LeakyClient {
    held: Vec<http1::SendRequest<Full<Bytes>>>,
    open: Arc<AtomicUsize>,
    /// Every address a connection was opened to, in order.
    connected: Vec<SocketAddr>,
    /// Local address to connect from (another loopback address stands for
    /// another client host).
    source: Option<std::net::IpAddr>,
}

/// What one job saw.
#[derive(Debug)]
pub struct JobResult {
    pub status: u16,
    pub body_len: usize,
    /// `x-tether-error`, when tether refused the request.
    pub tether_error: Option<String>,
}

impl LeakyClient {
    pub fn new() -> LeakyClient {
        LeakyClient::default()
    }

    /// A leaky client whose connections come from `source` (e.g. `127.0.0.2`).
    pub fn from_source(source: std::net::IpAddr) -> LeakyClient {
        LeakyClient {
            source: Some(source),
            ..LeakyClient::default()
        }
    }

    /// One job: connect to `addr`, send `GET target` with `Host: host`, read the
    /// whole response, and keep the connection forever.
    pub async fn job(
        &mut self,
        addr: SocketAddr,
        host: &str,
        target: &str,
    ) -> std::io::Result<JobResult> {
        let mut send = self.connect(addr).await?;
        let req = Request::get(target)
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        let resp = send
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        let tether_error = resp
            .headers()
            .get(crate::error::ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        self.held.push(send);
        Ok(JobResult {
            status,
            body_len: body.len(),
            tether_error,
        })
    }

    /// Sends `req`, whose target is an absolute `http://` URL, on a new connection to
    /// the URL's authority, reads the whole response, and keeps the connection forever
    /// (the way a client with a new `http.Transport` per job does). `Host` is set from
    /// the URL unless the request has one.
    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> io::Result<Response<Bytes>> {
        let uri = req.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uri}: this client speaks plain http:// only"),
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no authority"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(authority.as_str()).map_err(io::Error::other)?;
            req.headers_mut().insert(header::HOST, host);
        }
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(target).map_err(io::Error::other)?;
        let mut send = self.connect(addr).await?;
        let resp = send.send_request(req).await.map_err(io::Error::other)?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
        self.held.push(send);
        Ok(Response::from_parts(parts, body))
    }

    /// A new connection to `addr`, counted until the server side closes it.
    async fn connect(&mut self, addr: SocketAddr) -> io::Result<http1::SendRequest<Full<Bytes>>> {
        let stream = match self.source {
            Some(ip) => super::connect_from(ip, addr).await?,
            None => TcpStream::connect(addr).await?,
        };
        self.connected.push(addr);
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let open = self.open.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = conn.await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(send)
    }

    /// Every address this client opened a connection to, in order.
    pub fn connected_to(&self) -> &[SocketAddr] {
        &self.connected
    }

    /// Sockets of this client still open (closed only by the server side).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Clients created so far (one per job).
    pub fn leaked(&self) -> usize {
        self.held.len()
    }
}
