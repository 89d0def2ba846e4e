//! The request head as the upstream gets it: no hop-by-hop headers (RFC 9110
//! §7.6.1), `Host` naming the upstream, `Via` added. (A response loses its hop-by-hop
//! headers in [`Upstream::send`], in the pass that reads what its head says about
//! its socket, and gets its `Via` in `handle`.)

use http::header::{self, HeaderValue};
use http::Request;
use hyper::body::Incoming;

use super::checks::{check_framing, RequestNotes};
use crate::error::ProxyError;
use crate::upstream::Upstream;

pub(super) const VIA: HeaderValue = HeaderValue::from_static("1.1 tether");

/// Turns the client's request headers into the ones the upstream gets: `Host`
/// naming the upstream (or the client's own, with `keep_host`, when it has one), no
/// hop-by-hop headers, `Via` added. `notes` are the head's, read once
/// ([`RequestNotes`]). The target's form is the upstream's to choose, per
/// connection (see [`Upstream::send`]).
pub(super) fn prepare_request(
    req: &mut Request<Incoming>,
    notes: &RequestNotes,
    upstream: &Upstream,
    keep_host: bool,
) -> Result<(), ProxyError> {
    if notes.framed() {
        check_framing(req.headers())?;
    }
    let headers = req.headers_mut();
    notes.hop_by_hop.strip(headers);
    if !(keep_host && headers.contains_key(header::HOST)) {
        headers.insert(header::HOST, upstream.host_header()?);
    }
    headers.append(header::VIA, VIA);
    Ok(())
}
