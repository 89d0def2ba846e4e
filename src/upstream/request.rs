//! The body of a request on its way upstream: the client's own, passed through,
//! with its bytes counted for the access log.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The body of a request on its way upstream: the client's, with its bytes counted
/// for the access log. A request without a body costs no counter.
pub struct RequestBody {
    inner: Incoming,
    sent: Option<Arc<AtomicU64>>,
}

impl RequestBody {
    /// `inner`, and the count of its bytes as they are read (none when it is empty).
    pub fn counted(inner: Incoming) -> (RequestBody, BodyBytes) {
        let sent = (!inner.is_end_stream()).then(Arc::default);
        let bytes = BodyBytes(sent.clone());
        (RequestBody { inner, sent }, bytes)
    }
}

/// How many bytes of a request body have gone upstream so far.
#[derive(Debug, Default)]
pub struct BodyBytes(Option<Arc<AtomicU64>>);

impl BodyBytes {
    pub fn get(&self) -> u64 {
        self.0.as_ref().map_or(0, |n| n.load(Ordering::Relaxed))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(sent)) = (&polled, &self.sent) {
            if let Some(data) = frame.data_ref() {
                sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
