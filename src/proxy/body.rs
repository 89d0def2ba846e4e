//! The body of every response tether sends to a client: a streamed upstream body or
//! a small one tether wrote itself, plus the guard that marks the client connection
//! idle again when the response is done.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::downstream::RequestGuard;
use crate::error::BoxError;
use crate::upstream::UpstreamBody;

pin_project! {
    pub struct ProxyBody {
        #[pin]
        kind: Kind,
        guard: Option<RequestGuard>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Upstream { #[pin] body: UpstreamBody },
        Full { data: Option<Bytes> },
    }
}

impl ProxyBody {
    pub fn upstream(body: UpstreamBody) -> ProxyBody {
        ProxyBody {
            kind: Kind::Upstream { body },
            guard: None,
        }
    }

    pub fn full(data: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            guard: None,
        }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::full(Bytes::new())
    }

    /// Holds `guard` until the body is finished or dropped.
    pub fn with_guard(mut self, guard: RequestGuard) -> ProxyBody {
        self.guard = Some(guard);
        self
    }
}

impl From<Bytes> for ProxyBody {
    fn from(data: Bytes) -> ProxyBody {
        ProxyBody::full(data)
    }
}

impl From<String> for ProxyBody {
    fn from(data: String) -> ProxyBody {
        ProxyBody::full(Bytes::from(data))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Upstream { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = polled {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
