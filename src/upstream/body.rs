//! The response body of a pooled exchange. It streams frames through untouched and
//! returns the connection to the pool when the body ends, or closes it when the
//! request deadline passes.
//!
//! A client that gives up on a response should not cost a new upstream socket: when
//! it goes away before the head ([`InFlight`]) or mid-body, the HTTP/1.1 exchange is
//! finished in the background if that is quick (a known remainder of at most 1 MiB,
//! within a second) and the socket is reused; otherwise it is closed.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::pool::{CloseReason, Pooled};
use super::request::RequestBody;
use crate::error::BoxError;

/// The most of an abandoned response tether reads to keep its socket.
const DRAIN_MAX_BYTES: u64 = 1024 * 1024;
/// How long it may take; never past the request's own deadline.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(1);

pin_project! {
    pub struct UpstreamBody {
        // Taken only by a drain, in drop.
        inner: Option<Incoming>,
        pooled: Option<Pooled>,
        // Why the connection closes after the body ends, if it does
        // ([`super::close_after`]); `None` keeps it.
        close: Option<CloseReason>,
        deadline_at: Instant,
        // Armed the first time the body has to wait: most small bodies come with
        // their head and never do, and every move of the response carries this.
        deadline: Option<Pin<Box<Sleep>>>,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(pooled), Some(inner)) = (this.pooled.take(), this.inner.take()) {
                settle(inner, pooled, *this.close, *this.deadline_at);
            }
        }
    }
}

/// Settles the socket of a response nobody reads any more: back to the pool when the
/// body is complete and nothing asks to `close` it, or after reading a short
/// remainder in the background (within [`DRAIN_MAX_TIME`], never past `deadline`);
/// otherwise closed.
fn settle(body: Incoming, pooled: Pooled, close: Option<CloseReason>, deadline: Instant) {
    if body.is_end_stream() {
        return finish(pooled, close);
    }
    if !(close.is_none() && drainable(&body, &pooled)) {
        return pooled.discard(CloseReason::Error);
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let until = (Instant::now() + DRAIN_MAX_TIME).min(deadline);
            runtime.spawn(drain(body, pooled, until));
        }
        Err(_) => pooled.discard(CloseReason::Error),
    }
}

/// An HTTP/1.1 remainder of known, small length. (HTTP/2 bodies are not drained:
/// dropping one resets its stream, not the connection.)
fn drainable(body: &Incoming, pooled: &Pooled) -> bool {
    !pooled.is_h2()
        && body
            .size_hint()
            .upper()
            .is_some_and(|left| left <= DRAIN_MAX_BYTES)
}

/// An exchange awaiting its response head, owning its socket. If it is dropped
/// (the client left), the exchange is finished in the background — the head and a
/// short body within [`DRAIN_MAX_TIME`], as in [`UpstreamBody`]'s drop — and the
/// socket goes back to the pool; otherwise it is closed.
pub(super) struct InFlight {
    exchange: Pin<Box<dyn Future<Output = Exchange> + Send>>,
    pooled: Option<Pooled>,
    /// The request's own deadline, which the background finish never passes.
    deadline: Instant,
}

type Exchange =
    Result<http::Response<Incoming>, hyper::client::conn::TrySendError<http::Request<RequestBody>>>;

impl InFlight {
    pub(super) fn new(
        exchange: impl Future<Output = Exchange> + Send + 'static,
        pooled: Pooled,
        deadline: Instant,
    ) -> InFlight {
        InFlight {
            exchange: Box::pin(exchange),
            pooled: Some(pooled),
            deadline,
        }
    }

    /// The socket, once the exchange is over (or given up on).
    pub(super) fn pooled(&mut self) -> Pooled {
        self.pooled.take().expect("taken once")
    }

    /// The socket's response-head watch (HTTP/1.1).
    pub(super) fn head(&self) -> Option<&super::pool::HeadWatch> {
        self.pooled.as_ref().and_then(Pooled::head)
    }
}

impl Future for InFlight {
    type Output = Exchange;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exchange> {
        self.exchange.as_mut().poll(cx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(pooled) = self.pooled.take() else {
            return;
        };
        // The background finish has a timer of its own.
        if let Some(head) = pooled.head() {
            head.disarm();
        }
        if pooled.is_h2() {
            return; // dropping the exchange resets its stream only
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return pooled.discard(CloseReason::Error);
        };
        let exchange = std::mem::replace(&mut self.exchange, Box::pin(std::future::pending()));
        let until = (Instant::now() + DRAIN_MAX_TIME).min(self.deadline);
        runtime.spawn(async move {
            match tokio::time::timeout_at(until, exchange).await {
                Ok(Ok(resp)) => {
                    let close = super::close_after(resp.headers());
                    settle(resp.into_body(), pooled, close, until);
                }
                _ => pooled.discard(CloseReason::Error),
            }
        });
    }
}

/// Reads the rest of an abandoned response, then returns the socket to the pool;
/// closes it if the rest does not come by `until` or the read fails.
async fn drain(mut rest: Incoming, pooled: Pooled, until: Instant) {
    let read = tokio::time::timeout_at(until, async {
        while let Some(frame) = rest.frame().await {
            frame?;
        }
        Ok::<_, hyper::Error>(())
    });
    match read.await {
        Ok(Ok(())) => pooled.check_in(),
        _ => pooled.discard(CloseReason::Error),
    }
}

/// A complete exchange's socket: back to the pool, or closed for `close`.
fn finish(pooled: Pooled, close: Option<CloseReason>) {
    match close {
        None => pooled.check_in(),
        Some(reason) => pooled.discard(reason),
    }
}

/// The request deadline passed while the body was still streaming.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response did not finish before the request timeout")]
pub struct BodyTimeout;

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        pooled: Pooled,
        close: Option<CloseReason>,
        deadline: Instant,
    ) -> UpstreamBody {
        UpstreamBody {
            inner: Some(inner),
            pooled: Some(pooled),
            close,
            deadline_at: deadline,
            deadline: None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                if let Some(pooled) = this.pooled.take() {
                    finish(pooled, *this.close);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                if let Some(pooled) = this.pooled.take() {
                    pooled.discard(CloseReason::Error);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let at = *this.deadline_at;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                ready!(deadline.as_mut().poll(cx));
                if let Some(pooled) = this.pooled.take() {
                    pooled.discard(CloseReason::Error);
                }
                Poll::Ready(Some(Err(BodyTimeout.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
