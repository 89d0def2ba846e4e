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

/// What kind of failure an error is: the `kind` label of the per-upstream response
/// and error counters, and the `error` field of the access log. Coarser than the
/// `x-tether-error` code, and bounded: every value is in [`ErrorKind::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was refused as malformed, or cannot be forwarded faithfully.
    BadRequest,
    /// Refused by the egress policy.
    Denied,
    /// The pool's queue was full.
    QueueFull,
    /// No socket came free within `queue_timeout`.
    QueueTimeout,
    /// TCP to the origin failed (refused, unreachable).
    Connect,
    /// TCP to the origin took longer than `connect_timeout`.
    ConnectTimeout,
    /// The TLS handshake with the origin failed.
    Tls,
    /// The origin cannot speak the configured protocol, or sent an unparsable response.
    Protocol,
    /// No response head within `response_header_timeout`, or the exchange outlived
    /// `request_timeout` (also mid-body).
    Timeout,
    /// The origin closed or reset the connection mid-exchange.
    Reset,
    /// The client's side failed: its request body broke off, or it left before the
    /// response was complete.
    ClientAborted,
    /// tether is shutting down.
    ShuttingDown,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::BadRequest,
        ErrorKind::Denied,
        ErrorKind::QueueFull,
        ErrorKind::QueueTimeout,
        ErrorKind::Connect,
        ErrorKind::ConnectTimeout,
        ErrorKind::Tls,
        ErrorKind::Protocol,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::ClientAborted,
        ErrorKind::ShuttingDown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Denied => "denied",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::QueueTimeout => "queue_timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::ClientAborted => "client_aborted",
            ErrorKind::ShuttingDown => "shutting_down",
        }
    }

    /// The status class (1..=5) tether answers a failure of this kind with, when it
    /// answers before any response head went out. [`ProxyError::classify`] keeps to
    /// it (a test checks every variant), so the per-upstream response counter needs
    /// one series per kind, not one per kind and class.
    pub fn status_class(self) -> usize {
        match self {
            ErrorKind::BadRequest | ErrorKind::Denied | ErrorKind::ClientAborted => 4,
            _ => 5,
        }
    }
}

/// What [`ProxyError::classify`] says of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    /// The `x-tether-error` code.
    pub code: &'static str,
    pub kind: ErrorKind,
}

impl ProxyError {
    /// Every `x-tether-error` code [`ProxyError::classify`] gives, for counters
    /// registered at zero.
    pub const CODES: [&'static str; 16] = [
        "bad_target",
        "bad_request",
        "unsupported_transfer_coding",
        "method_not_allowed",
        "denied",
        "queue_full",
        "queue_timeout",
        "upstream_connect_timeout",
        "upstream_connect",
        "upstream_tls",
        "upstream_protocol",
        "upstream_timeout",
        "request_timeout",
        "bad_request_body",
        "upstream_error",
        "shutting_down",
    ];

    /// The status, `x-tether-error` code and kind of this error. The single place
    /// where failures are classified.
    pub fn classify(&self) -> Class {
        use ErrorKind as K;
        use ProxyError::*;
        use StatusCode as S;
        let (status, code, kind) = match self {
            BadTarget(_) => (S::BAD_REQUEST, "bad_target", K::BadRequest),
            BadRequest(_) => (S::BAD_REQUEST, "bad_request", K::BadRequest),
            UnsupportedCoding => (
                S::NOT_IMPLEMENTED,
                "unsupported_transfer_coding",
                K::BadRequest,
            ),
            MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method_not_allowed", K::BadRequest),
            Denied { .. } | DeniedPrivate { .. } => (S::FORBIDDEN, "denied", K::Denied),
            QueueFull { .. } => (S::SERVICE_UNAVAILABLE, "queue_full", K::QueueFull),
            QueueTimeout { .. } => (S::SERVICE_UNAVAILABLE, "queue_timeout", K::QueueTimeout),
            ConnectTimeout { .. } => (
                S::GATEWAY_TIMEOUT,
                "upstream_connect_timeout",
                K::ConnectTimeout,
            ),
            Connect { .. } => (S::BAD_GATEWAY, "upstream_connect", K::Connect),
            Tls { .. } => (S::BAD_GATEWAY, "upstream_tls", K::Tls),
            Protocol { .. } => (S::BAD_GATEWAY, "upstream_protocol", K::Protocol),
            ResponseHeaderTimeout { .. } => (S::GATEWAY_TIMEOUT, "upstream_timeout", K::Timeout),
            RequestTimeout { .. } => (S::GATEWAY_TIMEOUT, "request_timeout", K::Timeout),
            RequestBody { .. } => (S::BAD_REQUEST, "bad_request_body", K::ClientAborted),
            Upstream { source, .. } if source.is_parse() => {
                (S::BAD_GATEWAY, "upstream_error", K::Protocol)
            }
            Upstream { .. } | UpstreamClosed { .. } => (S::BAD_GATEWAY, "upstream_error", K::Reset),
            ShuttingDown => (S::SERVICE_UNAVAILABLE, "shutting_down", K::ShuttingDown),
        };
        Class { status, code, kind }
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
        let Class { status, code, .. } = self.classify();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each error a request can meet once its upstream is chosen (the
    /// hyper-error variants aside: they cannot be built outside hyper).
    fn at_an_upstream() -> Vec<ProxyError> {
        let origin = || "o:1".to_string();
        let timeout = Duration::from_secs(1);
        vec![
            ProxyError::BadTarget("x".into()),
            ProxyError::QueueFull { upstream: origin() },
            ProxyError::QueueTimeout {
                upstream: origin(),
                timeout,
            },
            ProxyError::ConnectTimeout {
                origin: origin(),
                timeout,
            },
            ProxyError::Connect {
                origin: origin(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            },
            ProxyError::Tls {
                origin: origin(),
                reason: "x".into(),
            },
            ProxyError::Protocol {
                origin: origin(),
                reason: "x".into(),
            },
            ProxyError::ResponseHeaderTimeout {
                origin: origin(),
                timeout,
            },
            ProxyError::RequestTimeout {
                origin: origin(),
                timeout,
            },
            ProxyError::UpstreamClosed { origin: origin() },
            ProxyError::ShuttingDown,
        ]
    }

    #[test]
    fn each_kind_is_answered_with_the_status_class_its_counter_is_registered_under() {
        for e in at_an_upstream() {
            let class = e.classify();
            assert_eq!(
                (class.status.as_u16() / 100) as usize,
                class.kind.status_class(),
                "{e}"
            );
            assert!(ProxyError::CODES.contains(&class.code), "{}", class.code);
        }
    }

    #[test]
    fn error_kinds_are_listed_in_declaration_order() {
        for (i, kind) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{}", kind.as_str());
        }
    }
}
