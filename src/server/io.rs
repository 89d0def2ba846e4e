//! The client socket as hyper sees it: it notes when a request head starts arriving
//! (the head clock), hands back bytes read ahead before parking, and carries the
//! connection's [`ClientGuard`], so the socket and its accounting drop together.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::downstream::{ClientConn, ClientGuard};

pin_project! {
    /// The client socket, noting when a request head starts arriving. `prefix` holds
    /// bytes hyper had read past the last request when the socket was parked.
    pub struct ClientIo {
        #[pin]
        pub(super) stream: TcpStream,
        guard: ClientGuard,
        pub(super) prefix: Bytes,
    }
}

impl ClientIo {
    /// `stream`, registered as `conn` until it drops.
    pub(crate) fn new(stream: TcpStream, conn: Arc<ClientConn>) -> ClientIo {
        ClientIo {
            stream,
            guard: ClientGuard { conn },
            prefix: Bytes::new(),
        }
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = this.stream.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.guard.conn.bytes_read();
        }
        result
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}
