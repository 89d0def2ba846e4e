//! The client half of a pooled connection, HTTP/1.1 or HTTP/2, behind one type.

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};

use std::sync::Arc;

use super::head::HeadWatch;
use crate::upstream::request::RequestBody;

/// The client half of a pooled connection: HTTP/1.1 (one exchange at a time, with
/// the watch on its response-head deadline) or HTTP/2 (shared by up to
/// `max_streams_per_connection` streams).
pub enum Client {
    H1(http1::SendRequest<RequestBody>, Arc<HeadWatch>),
    H2(http2::SendRequest<RequestBody>),
}

impl Client {
    /// An HTTP/1.1 connection's client half.
    pub fn h1(send: http1::SendRequest<RequestBody>) -> Client {
        Client::H1(send, Arc::default())
    }

    /// The watch on the response-head deadline of the exchange in flight (HTTP/1.1).
    pub fn head(&self) -> Option<&Arc<HeadWatch>> {
        match self {
            Client::H1(_, head) => Some(head),
            Client::H2(_) => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Client::H1(c, _) => c.is_closed(),
            Client::H2(c) => c.is_closed(),
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Client::H2(_))
    }

    /// Waits until the connection can take a request; an error means it closed.
    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Client::H1(c, _) => c.ready().await,
            Client::H2(c) => c.ready().await,
        }
    }

    /// Sends `req`; on failure before any byte was written the request comes back.
    pub fn try_send_request(
        &mut self,
        req: Request<RequestBody>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>
    {
        match self {
            Client::H1(c, _) => Either::Left(c.try_send_request(req)),
            Client::H2(c) => Either::Right(c.try_send_request(req)),
        }
    }
}

/// The HTTP/1.1 sender kept on the idle list.
pub type SendRequest = Client;
