//! The response body of a pooled exchange. It streams frames through untouched and
//! returns the connection to the pool when the body ends, or closes it when the
//! client goes away mid-body or the request deadline passes.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::pool::{CloseReason, Pooled};
use crate::error::BoxError;

pin_project! {
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        pooled: Option<Pooled>,
        // Keep the connection after the body ends (no `Connection: close`).
        reusable: bool,
        #[pin]
        deadline: Sleep,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(pooled) = this.pooled.take() {
                if *this.reusable && this.inner.is_end_stream() {
                    pooled.check_in();
                } else if this.inner.is_end_stream() {
                    pooled.discard(CloseReason::RemoteClosed);
                } else {
                    pooled.discard(CloseReason::Error);
                }
            }
        }
    }
}

/// The request deadline passed while the body was still streaming.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response did not finish before the request timeout")]
pub struct BodyTimeout;

impl UpstreamBody {
    pub fn new(inner: Incoming, pooled: Pooled, reusable: bool, deadline: Instant) -> UpstreamBody {
        UpstreamBody {
            inner,
            pooled: Some(pooled),
            reusable,
            deadline: tokio::time::sleep_until(deadline),
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
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                if let Some(pooled) = this.pooled.take() {
                    if *this.reusable {
                        pooled.check_in();
                    } else {
                        pooled.discard(CloseReason::RemoteClosed);
                    }
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
                ready!(this.deadline.poll(cx));
                if let Some(pooled) = this.pooled.take() {
                    pooled.discard(CloseReason::Error);
                }
                Poll::Ready(Some(Err(BodyTimeout.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
