//! The registry client side: the Dragonfly manager's preheat and a blob fetch that
//! follows the storage redirect (the push is in `push.rs`). Every request
//! goes through a [`LeakyClient`], so each is a new connection that is never closed —
//! the way the manager's per-preheat `http.Transport` behaved.
//!
//! The client speaks plain `http://` only: pointed at tether's route listeners it
//! completes a flow only if tether rewrote the registry's `https://` realm and
//! `Location` URLs to routes, which is what the tests want to see.

use std::io;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::{digest, media};
use crate::testkit::leaky::LeakyClient;

/// The `Accept` media types the Dragonfly manager sends for a manifest, one header each.
pub const MANIFEST_ACCEPT: [&str; 5] = [
    media::DOCKER_MANIFEST,
    media::DOCKER_LIST,
    media::OCI_INDEX,
    media::OCI_MANIFEST,
    media::DOCKER_V1_SIGNED,
];

/// Why a flow stopped.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("{step}: status {status} (x-tether-error {tether_error:?}): {body}")]
    Status {
        step: &'static str,
        status: StatusCode,
        tether_error: Option<String>,
        body: String,
    },
    #[error("{step}: {message}")]
    Protocol { step: &'static str, message: String },
}

/// A `Bearer` challenge's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
    pub error: Option<String>,
}

/// What one preheat saw.
#[derive(Debug, Clone)]
pub struct Preheat {
    /// `WWW-Authenticate` of `GET /v2/`, as the client received it.
    pub challenge: String,
    pub realm: String,
    pub token: String,
    /// What the reference resolved to.
    pub digest: String,
    pub media_type: String,
    /// Platform manifests fetched by digest.
    pub manifests: Vec<String>,
    /// Layers the platform manifests list.
    pub layers: Vec<String>,
    /// Requests the preheat made (one connection each).
    pub requests: usize,
}

/// A blob fetch.
#[derive(Debug, Clone)]
pub struct BlobFetch {
    /// The redirect's `Location`, when the registry redirected to storage.
    pub location: Option<String>,
    pub bytes: Bytes,
}

/// The preheat: `GET /v2/`, the token from the challenge's realm, the manifest of
/// `reference` with [`MANIFEST_ACCEPT`], then each platform manifest by digest.
/// Digests are checked against the bodies, so content that passed through a proxy
/// arrived intact.
pub async fn registry_flow(
    client: &mut LeakyClient,
    registry_base_url: &str,
    repository: &str,
    reference: &str,
) -> Result<Preheat, FlowError> {
    let base = registry_base_url.trim_end_matches('/');
    let mut requests = 0;
    let (challenge, parsed) = challenge(client, base, &mut requests).await?;
    let scope = format!("repository:{repository}:pull");
    let token = fetch_token(client, &parsed.realm, parsed.service.as_deref(), &scope).await?;
    requests += 1;

    let step = "manifest";
    let url = format!("{base}/v2/{repository}/manifests/{reference}");
    let resp = get_manifest(client, &url, &token).await.map_err(io(step))?;
    requests += 1;
    let resp = expect(step, resp, StatusCode::OK)?;
    let media_type = content_type(&resp);
    let resolved = digest(resp.body());
    check_digest(step, &resp, &resolved)?;
    let doc = json(step, resp.body())?;

    let mut manifests = Vec::new();
    let mut layers = Vec::new();
    if media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST {
        let step = "platform manifest";
        for entry in doc["manifests"].as_array().into_iter().flatten() {
            let Some(d) = entry["digest"].as_str() else {
                return Err(protocol(step, "an index entry without a digest"));
            };
            let url = format!("{base}/v2/{repository}/manifests/{d}");
            let resp = get_manifest(client, &url, &token).await.map_err(io(step))?;
            requests += 1;
            let resp = expect(step, resp, StatusCode::OK)?;
            if digest(resp.body()) != d {
                return Err(protocol(step, format!("{d}: the body has another digest")));
            }
            layers.extend(layer_digests(&json(step, resp.body())?));
            manifests.push(d.to_owned());
        }
    } else {
        layers.extend(layer_digests(&doc));
    }
    Ok(Preheat {
        challenge,
        realm: parsed.realm,
        token,
        digest: resolved,
        media_type,
        manifests,
        layers,
        requests,
    })
}

/// `GET <realm>?service=…&scope=…` and the token of its JSON (`token`, else
/// `access_token`).
pub async fn fetch_token(
    client: &mut LeakyClient,
    realm: &str,
    service: Option<&str>,
    scope: &str,
) -> Result<String, FlowError> {
    let step = "token";
    let mut url = realm.to_owned();
    let mut sep = if realm.contains('?') { '&' } else { '?' };
    if let Some(service) = service {
        url.push_str(&format!("{sep}service={}", encode(service)));
        sep = '&';
    }
    url.push_str(&format!("{sep}scope={}", encode(scope)));
    let resp = client
        .send(request(Method::GET, &url))
        .await
        .map_err(io(step))?;
    let resp = expect(step, resp, StatusCode::OK)?;
    let doc = json(step, resp.body())?;
    doc["token"]
        .as_str()
        .or(doc["access_token"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| protocol(step, "no token in the answer"))
}

/// Fetches a blob, following one redirect to storage without the registry's token
/// (as Go's client drops `Authorization` on a cross-host redirect).
pub async fn fetch_blob(
    client: &mut LeakyClient,
    registry_base_url: &str,
    repository: &str,
    blob: &str,
    token: &str,
) -> Result<BlobFetch, FlowError> {
    let step = "blob";
    let base = registry_base_url.trim_end_matches('/');
    let url = format!("{base}/v2/{repository}/blobs/{blob}");
    let mut req = request(Method::GET, &url);
    authorize(&mut req, token);
    let resp = client.send(req).await.map_err(io(step))?;
    let (location, resp) = if resp.status().is_redirection() {
        let location = header_str(&resp, header::LOCATION)
            .ok_or_else(|| protocol(step, "a redirect without Location"))?;
        let url = resolve(base, &location);
        let resp = client
            .send(request(Method::GET, &url))
            .await
            .map_err(io("blob storage"))?;
        (Some(location), resp)
    } else {
        (None, resp)
    };
    let resp = expect(step, resp, StatusCode::OK)?;
    if digest(resp.body()) != blob {
        return Err(protocol(
            step,
            format!("{blob}: the body has another digest"),
        ));
    }
    Ok(BlobFetch {
        location,
        bytes: resp.into_body(),
    })
}

/// `GET /v2/`: the challenge as received, and parsed.
pub(super) async fn challenge(
    client: &mut LeakyClient,
    base: &str,
    requests: &mut usize,
) -> Result<(String, Challenge), FlowError> {
    let step = "GET /v2/";
    let resp = client
        .send(request(Method::GET, &format!("{base}/v2/")))
        .await
        .map_err(io(step))?;
    *requests += 1;
    let resp = expect(step, resp, StatusCode::UNAUTHORIZED)?;
    let raw = header_str(&resp, header::WWW_AUTHENTICATE)
        .ok_or_else(|| protocol(step, "401 without WWW-Authenticate"))?;
    let parsed = parse_challenge(&raw)
        .ok_or_else(|| protocol(step, format!("not a Bearer challenge with a realm: {raw}")))?;
    Ok((raw, parsed))
}

/// Parses `Bearer realm="…",service="…",…` (quoted or token values, any order).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let (scheme, mut rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut challenge = Challenge::default();
    loop {
        rest = rest.trim_start_matches([' ', ',', '\t']);
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once('=')?;
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => value.push(chars.next()?.1),
                    (_, c) => value.push(c),
                }
            };
            (value, &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => challenge.realm = value,
            "service" => challenge.service = Some(value),
            "scope" => challenge.scope = Some(value),
            "error" => challenge.error = Some(value),
            _ => {}
        }
        rest = after;
    }
    (!challenge.realm.is_empty()).then_some(challenge)
}

async fn get_manifest(
    client: &mut LeakyClient,
    url: &str,
    token: &str,
) -> io::Result<Response<Bytes>> {
    let mut req = request(Method::GET, url);
    for accept in MANIFEST_ACCEPT {
        req.headers_mut()
            .append(header::ACCEPT, header::HeaderValue::from_static(accept));
    }
    authorize(&mut req, token);
    client.send(req).await
}

pub(super) fn request(method: Method, url: &str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.method_mut() = method;
    // An unparsable URL surfaces as the client's "plain http:// only" error.
    *req.uri_mut() = url.parse().unwrap_or_default();
    req
}

pub(super) fn authorize(req: &mut Request<Full<Bytes>>, token: &str) {
    if let Ok(value) = header::HeaderValue::from_str(&format!("Bearer {token}")) {
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
}

/// An absolute URL for a `Location`, which may be relative to the registry.
pub(super) fn resolve(base: &str, location: &str) -> String {
    if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_owned()
    }
}

pub(super) fn header_str(resp: &Response<Bytes>, name: header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn content_type(resp: &Response<Bytes>) -> String {
    header_str(resp, header::CONTENT_TYPE)
        .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

pub(super) fn check_digest(
    step: &'static str,
    resp: &Response<Bytes>,
    expected: &str,
) -> Result<(), FlowError> {
    match header_str(
        resp,
        header::HeaderName::from_static("docker-content-digest"),
    ) {
        Some(d) if d != expected => Err(protocol(
            step,
            format!("Docker-Content-Digest {d}, expected {expected}"),
        )),
        _ => Ok(()),
    }
}

fn layer_digests(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect()
}

pub(super) fn expect(
    step: &'static str,
    resp: Response<Bytes>,
    status: StatusCode,
) -> Result<Response<Bytes>, FlowError> {
    if resp.status() == status {
        return Ok(resp);
    }
    Err(FlowError::Status {
        step,
        status: resp.status(),
        tether_error: header_str(&resp, header::HeaderName::from_static("x-tether-error")),
        body: String::from_utf8_lossy(resp.body()).into_owned(),
    })
}

fn json(step: &'static str, body: &[u8]) -> Result<serde_json::Value, FlowError> {
    serde_json::from_slice(body).map_err(|e| protocol(step, format!("not JSON: {e}")))
}

pub(super) fn io(step: &'static str) -> impl Fn(io::Error) -> FlowError {
    move |source| FlowError::Io { step, source }
}

pub(super) fn protocol(step: &'static str, message: impl Into<String>) -> FlowError {
    FlowError::Protocol {
        step,
        message: message.into(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, much as Go's
/// `url.QueryEscape` does: `:` and `/` in a scope arrive encoded.
pub(super) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_in_any_order_with_escapes() {
        let c = parse_challenge(
            r#"Bearer service="registry",scope="repository:a/b:pull", realm="http://h:1/t?x=\"1\"",error=invalid_token"#,
        )
        .unwrap();
        assert_eq!(c.realm, r#"http://h:1/t?x="1""#);
        assert_eq!(c.service.as_deref(), Some("registry"));
        assert_eq!(c.scope.as_deref(), Some("repository:a/b:pull"));
        assert_eq!(c.error.as_deref(), Some("invalid_token"));
        assert!(parse_challenge(r#"Basic realm="x""#).is_none());
        assert!(parse_challenge(r#"Bearer service="x""#).is_none());
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn encode_matches_query_escape() {
        assert_eq!(
            encode("repository:lib/x:pull,push"),
            "repository%3Alib%2Fx%3Apull%2Cpush"
        );
        assert_eq!(encode("a b~"), "a%20b~");
    }
}
