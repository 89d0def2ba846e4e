//! The body of every response tether sends to a client: a streamed upstream body or
//! a small one tether wrote itself, plus the guard that marks the client connection
//! idle again when the response is done, and the exchange whose access-log line it
//! writes then (finished, broken off, or abandoned by the client).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::access::Exchange;
use crate::downstream::RequestGuard;
use crate::error::{BoxError, ErrorKind};
use crate::upstream::body::BodyTimeout;
use crate::upstream::UpstreamBody;

pin_project! {
    pub struct ProxyBody {
        #[pin]
        kind: Kind,
        guard: Option<RequestGuard>,
        // Boxed: the body is moved several times on its way into hyper, and the
        // exchange is most of its size.
        exchange: Option<Box<Exchange>>,
    }

    impl PinnedDrop for ProxyBody {
        fn drop(this: Pin<&mut Self>) {
            let ended = this.is_end_stream();
            let this = this.project();
            if let Some(exchange) = this.exchange.as_mut() {
                if !ended {
                    exchange.broke_off(ErrorKind::ClientAborted);
                }
                exchange.finish();
            }
        }
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
    pub fn full(data: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            guard: None,
            exchange: None,
        }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::full(Bytes::new())
    }

    /// Holds `guard` until the body is finished or dropped, and writes `exchange`'s
    /// access-log line then, if there is one. In place: a response moved to add
    /// them is a 248-byte copy each time.
    pub(super) fn attach(&mut self, guard: RequestGuard, exchange: Option<Box<Exchange>>) {
        self.guard = Some(guard);
        self.exchange = exchange;
    }

    /// Holds `guard` until the body is finished or dropped.
    pub fn with_guard(mut self, guard: RequestGuard) -> ProxyBody {
        self.guard = Some(guard);
        self
    }
}

impl From<UpstreamBody> for ProxyBody {
    fn from(body: UpstreamBody) -> ProxyBody {
        ProxyBody {
            kind: Kind::Upstream { body },
            guard: None,
            exchange: None,
        }
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
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(exchange), Some(data)) = (this.exchange.as_mut(), frame.data_ref()) {
                    exchange.response_bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut exchange) = this.exchange.take() {
                    exchange.broke_off(if e.is::<BodyTimeout>() {
                        ErrorKind::Timeout
                    } else {
                        ErrorKind::Reset
                    });
                    exchange.finish();
                }
                this.guard.take();
            }
            Poll::Ready(None) => {
                if let Some(exchange) = this.exchange.take() {
                    exchange.finish();
                }
                this.guard.take();
            }
            Poll::Pending => {}
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
