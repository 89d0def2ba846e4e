//! Errors a request can meet on its way through tether, and the one place that maps
//! them to what the client sees: a status, an `x-tether-error` code and a plain-text
//! body naming the cause.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Header naming the cause of a response tether synthesised itself.
pub const ERROR_HEADER: &str = "x-tether-error";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why tether could not (or would not) forward a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request target: {0}")]
    BadTarget(String),
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("only the chunked transfer coding is supported on requests")]
    UnsupportedCoding,
    #[error("method {0} is not supported here")]
    MethodNotAllowed(http::Method),
    #[error("{origin} is not allowed by the egress policy")]
    Denied { origin: String },
    #[error("{origin} resolves to {refusal}: allow patterns may not reach special-purpose addresses unless [egress] allow_private = true")]
    DeniedPrivate {
        origin: String,
        /// Which special-purpose block the address is in, and why (its RFC).
        refusal: String,
    },
    #[error("too many requests are already waiting for a connection to {upstream}")]
    QueueFull { upstream: String },
    #[error("no connection to {upstream} became free within {:?}", .timeout)]
    QueueTimeout { upstream: String, timeout: Duration },
    #[error("connecting to {origin} took longer than {:?}", .timeout)]
    ConnectTimeout { origin: String, timeout: Duration },
    #[error("could not connect to {origin}: {source}")]
    Connect {
        origin: String,
        source: std::io::Error,
    },
    #[error("TLS with {origin} failed: {reason}")]
    Tls { origin: String, reason: String },
    #[error("{origin} cannot speak the configured protocol: {reason}")]
    Protocol { origin: String, reason: String },
    #[error("{origin} sent no response head within {:?}", .timeout)]
    ResponseHeaderTimeout { origin: String, timeout: Duration },
    #[error("the exchange with {origin} took longer than {:?}", .timeout)]
    RequestTimeout { origin: String, timeout: Duration },
    #[error("upstream {origin} failed: {source}")]
    Upstream {
        origin: String,
        source: hyper::Error,
    },
    #[error("the request body could not be read: {}", root_cause(.source))]
    RequestBody { source: hyper::Error },
    #[error("upstream {origin} kept closing pooled connections before the request could be sent")]
    UpstreamClosed { origin: String },
    #[error("tether is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    /// The status and `x-tether-error` code for this error. The single place where
    /// failures are classified.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        use ProxyError::*;
        match self {
            BadTarget(_) => (StatusCode::BAD_REQUEST, "bad_target"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            UnsupportedCoding => (StatusCode::NOT_IMPLEMENTED, "unsupported_transfer_coding"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Denied { .. } | DeniedPrivate { .. } => (StatusCode::FORBIDDEN, "denied"),
            QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            QueueTimeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_timeout"),
            ConnectTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_connect_timeout"),
            Connect { .. } => (StatusCode::BAD_GATEWAY, "upstream_connect"),
            Tls { .. } => (StatusCode::BAD_GATEWAY, "upstream_tls"),
            Protocol { .. } => (StatusCode::BAD_GATEWAY, "upstream_protocol"),
            ResponseHeaderTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            RequestTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
            RequestBody { .. } => (StatusCode::BAD_REQUEST, "bad_request_body"),
            Upstream { .. } | UpstreamClosed { .. } => (StatusCode::BAD_GATEWAY, "upstream_error"),
            ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        }
    }

    /// A failed HTTP exchange with `origin`, by whose fault it failed. hyper's client
    /// reports an error reading the body it was sending as a user error caused by
    /// the body's own error; for a request body that is the `hyper::Error` tether's
    /// server side met decoding the client's bytes (a malformed chunk, the client
    /// leaving mid-body). That is the client's error, not the upstream's.
    pub fn exchange(origin: String, source: hyper::Error) -> ProxyError {
        let from_request_body = source.is_user()
            && std::error::Error::source(&source).is_some_and(|cause| cause.is::<hyper::Error>());
        if from_request_body {
            ProxyError::RequestBody { source }
        } else {
            ProxyError::Upstream { origin, source }
        }
    }

    /// The response the client sees.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let (status, code) = self.classify();
        let mut body = self.to_string();
        body.push('\n');
        let mut resp = Response::new(B::from(Bytes::from(body)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A waiting client should come back once the pool has had time to drain.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The innermost cause of `e`: hyper's own messages name only their layer ("error
/// from user's Body stream"), the cause says what was wrong.
fn root_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut e = e;
    while let Some(cause) = e.source() {
        e = cause;
    }
    e
}
