//! A client that leaks connections the way the Dragonfly manager did: every job
//! builds a new HTTP client (a new TCP connection), uses it, and never closes it.
//! Only the server side closing a socket makes it go away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The leaked clients of one run, and how many of their sockets are still open.
#[derive(Default)]
pub struct LeakyClient {
    held: Vec<http1::SendRequest<Empty<Bytes>>>,
    open: Arc<AtomicUsize>,
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

    /// One job: connect to `addr`, send `GET target` with `Host: host`, read the
    /// whole response, and keep the connection forever.
    pub async fn job(
        &mut self,
        addr: SocketAddr,
        host: &str,
        target: &str,
    ) -> std::io::Result<JobResult> {
        let stream = TcpStream::connect(addr).await?;
        let (mut send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let open = self.open.clone();
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = conn.await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
        let req = Request::get(target)
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())
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

    /// Sockets of this client still open (closed only by the server side).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Clients created so far (one per job).
    pub fn leaked(&self) -> usize {
        self.held.len()
    }
}
