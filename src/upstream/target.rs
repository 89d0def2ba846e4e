//! The request-target as tether sends it over HTTP/1.1: origin-form, with an empty
//! path sent as `/`, only `http` and `https` absolute forms taken, and the framing
//! of a body of unknown length made explicit.

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Uri};

use crate::error::ProxyError;

/// Puts `req` in the form tether sends over HTTP/1.1: the target ([`h1_target`]),
/// the version, and the framing of a body of unknown length. Public so the
/// `request_head` fuzz check runs the very transformation the request path does.
pub fn h1_form<B: http_body::Body>(req: &mut Request<B>) -> Result<(), ProxyError> {
    if let Some(target) = h1_target(req.uri())? {
        *req.uri_mut() = target;
    }
    *req.version_mut() = http::Version::HTTP_11;
    // A body of unknown length came chunked, and tether removed the client's
    // Transfer-Encoding with the other hop-by-hop headers. hyper's client chunks such
    // a body itself, except for GET, HEAD and CONNECT, where it assumes there is
    // none and sends no body unless the header is set.
    let body = req.body();
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    Ok(())
}

/// The target an HTTP/1.1 request for `uri` carries, when it is not `uri` itself: a
/// client's origin-form target goes as it is (`None`); any other becomes
/// [`forwarded_path`].
pub fn h1_target(uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    let origin_form = uri.scheme().is_none()
        && uri.authority().is_none()
        && uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'));
    if origin_form {
        return Ok(None);
    }
    Uri::builder()
        .path_and_query(forwarded_path(uri)?)
        .build()
        .map(Some)
        .map_err(|e| ProxyError::BadTarget(e.to_string()))
}

/// [`target_path`] for a target that names a resource: absolute-form with an http or
/// https scheme, origin-form or asterisk-form. Any other is refused rather than sent
/// upstream as `/` or as its bare path, a resource the client never asked for:
/// authority-form (`GET host:port`, CONNECT's alone, RFC 9112 §3.2.3; `proxy`
/// refuses it first, this is the last step before the bytes are written) and other
/// schemes, which `http::Uri` accepts even empty (`://host/path`).
pub(super) fn forwarded_path(uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let absolute = uri
        .scheme()
        .is_some_and(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS)
        && uri.authority().is_some();
    let bare = uri.scheme().is_none() && uri.authority().is_none();
    if !(absolute || bare) {
        return Err(ProxyError::BadTarget(format!(
            "{uri} is not an origin-form, absolute-form (http or https) or * target"
        )));
    }
    target_path(uri).map_err(|e| ProxyError::BadTarget(e.to_string()))
}

/// A target's path and query as an origin server is sent them: an empty path as `/`
/// (RFC 9112 §3.2.1), also before a query; the asterisk-form stays `*`. `http` reads
/// an empty path as `/` but writes it as nothing, so `http://host#x` (its fragment
/// dropped by the parser) went out as `GET  HTTP/1.1`: such a path is rebuilt.
fn target_path(uri: &Uri) -> Result<PathAndQuery, http::uri::InvalidUri> {
    match uri.path_and_query() {
        Some(p) if p.path() != "/" => Ok(p.clone()),
        Some(p) => match p.query() {
            Some(query) => format!("/?{query}").parse(),
            None => Ok(PathAndQuery::from_static("/")),
        },
        None => Ok(PathAndQuery::from_static("/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<Option<String>, ProxyError> {
        h1_target(&uri.parse().unwrap()).map(|t| t.map(|u| u.to_string()))
    }

    #[test]
    fn an_origin_form_target_goes_as_it_is_and_an_absolute_one_as_its_path() {
        assert_eq!(target("/v2/?n=1").unwrap(), None);
        assert_eq!(target("//x/y").unwrap(), None);
        assert_eq!(
            target("http://a:80/v2/?n=1").unwrap().as_deref(),
            Some("/v2/?n=1")
        );
        assert_eq!(target("HTTPS://a").unwrap().as_deref(), Some("/"));
        assert_eq!(target("http://a?q=1").unwrap().as_deref(), Some("/?q=1"));
        assert_eq!(target("*").unwrap().as_deref(), Some("*"));
    }

    #[test]
    fn an_absolute_target_with_only_a_fragment_after_the_host_goes_as_slash() {
        // `http::Uri` gives it an empty path that prints as an empty target (#16.2).
        assert_eq!(target("http://a#frag").unwrap().as_deref(), Some("/"));
        assert_eq!(target("http://a:8#0").unwrap().as_deref(), Some("/"));
    }

    #[test]
    fn a_target_that_names_no_resource_is_refused() {
        for uri in ["a.com:80", "h", "://b/c", "ftp://a/b"] {
            assert!(
                matches!(target(uri), Err(ProxyError::BadTarget(_))),
                "{uri}: {:?}",
                target(uri)
            );
        }
    }

    #[test]
    fn a_get_with_a_body_of_unknown_length_goes_chunked() {
        let body = http_body_util::StreamBody::new(futures_util::stream::empty::<
            Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
        >());
        let mut req = Request::get("/").body(body).unwrap();
        h1_form(&mut req).unwrap();
        assert_eq!(req.headers()[header::TRANSFER_ENCODING], "chunked");

        // A known length (hyper writes Content-Length) or no body at all: no header.
        let sized = http_body_util::Full::new(bytes::Bytes::from_static(b"ab"));
        let mut req = Request::post("/").body(sized).unwrap();
        h1_form(&mut req).unwrap();
        assert!(!req.headers().contains_key(header::TRANSFER_ENCODING));
        let mut req = Request::get("/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        h1_form(&mut req).unwrap();
        assert!(!req.headers().contains_key(header::TRANSFER_ENCODING));
    }
}
