//! A fake container registry and its token server, on loopback, plain or TLS: the two
//! peers of the Dragonfly manager's preheat (`GET /v2/` → 401 Bearer challenge → token
//! from the realm → manifests by tag and by digest; blobs redirect to storage).
//!
//! Both are [`Listening`] servers, so tests read what each saw from its own side:
//! sockets accepted, open and at peak, and requests that came without a `Via` header
//! (not through a proxy). The registry speaks the parts of the distribution API a
//! preheat uses, with the real registry's status codes, headers and error bodies:
//!
//! - `GET /v2/` — 401 `WWW-Authenticate: Bearer realm="<auth>/token",service="…"`
//!   without a valid token, else 200 `{}`
//! - `GET|HEAD /v2/<name>/manifests/<tag>` — the OCI image index of [`Image::sample`]
//!   (404 unless `Accept` allows an index, as distribution 2.8 does)
//! - `GET|HEAD /v2/<name>/manifests/<digest>` — the index or a platform manifest
//! - `GET /v2/<name>/blobs/<digest>` — 307 to `<auth>/blobs/<digest>` (storage lives
//!   on the token server's origin, like a CDN behind a registry)
//!
//! Repository endpoints answer 401 with `scope="repository:<name>:pull"` (and
//! `error="invalid_token"` or `"insufficient_scope"`) unless the bearer token was
//! issued by the paired token server for that repository. Any repository name works.

mod flow;
mod image;
mod push;
mod token;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::ServerConfig;
use serde_json::json;

pub use flow::{
    fetch_blob, fetch_token, parse_challenge, registry_flow, BlobFetch, Challenge, FlowError,
    Preheat, MANIFEST_ACCEPT,
};
pub use image::{digest, media, Blob, Image};
pub use push::push_image;
pub use token::{serve_tokens, Access, IssuedTokens, JwtSigner, TokenKind, TokenOptions};

use super::listening::{Body, Listening, ServeOptions};

/// How the pair is served.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Serve both over TLS with this config (one identity naming `127.0.0.1`).
    pub tls: Option<Arc<ServerConfig>>,
    /// The `service` of the challenge, which the token server insists on.
    pub service: String,
    /// What the tag and digests serve.
    pub image: Image,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            tls: None,
            service: "registry".into(),
            image: Image::sample("default"),
        }
    }
}

/// A running registry and token server.
pub struct FakeRegistry {
    pub registry: Listening,
    /// The token server, which also serves blob storage.
    pub auth: Listening,
    pub image: Arc<Image>,
    tokens: Arc<IssuedTokens>,
    scheme: &'static str,
}

impl FakeRegistry {
    pub async fn start(options: RegistryOptions) -> FakeRegistry {
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let image = Arc::new(options.image);
        let tokens = Arc::new(IssuedTokens::default());
        let storage: HashMap<String, Blob> = image
            .blobs
            .iter()
            .map(|b| (b.digest.clone(), b.clone()))
            .collect();
        let auth = serve_tokens(TokenOptions {
            tls: options.tls.clone(),
            service: options.service.clone(),
            kind: TokenKind::Opaque(tokens.clone()),
            storage: Arc::new(storage),
        })
        .await;
        let auth_url = format!("{scheme}://{}", auth.addr);
        let state = Arc::new(State {
            image: image.clone(),
            tokens: tokens.clone(),
            realm: format!("{auth_url}/token"),
            service: options.service,
            storage_url: auth_url,
        });
        let handler = Arc::new(move |req: Request<Incoming>| {
            let state = state.clone();
            Box::pin(async move { state.respond(req) }) as _
        });
        let registry = Listening::start(
            ServeOptions {
                tls: options.tls,
                ..ServeOptions::default()
            },
            handler,
        )
        .await;
        FakeRegistry {
            registry,
            auth,
            image,
            tokens,
            scheme,
        }
    }

    /// `<scheme>://127.0.0.1:<port>` of the registry.
    pub fn registry_url(&self) -> String {
        format!("{}://{}", self.scheme, self.registry.addr)
    }

    /// `<scheme>://127.0.0.1:<port>` of the token server.
    pub fn auth_url(&self) -> String {
        format!("{}://{}", self.scheme, self.auth.addr)
    }

    /// The realm the registry's challenges name.
    pub fn realm(&self) -> String {
        format!("{}/token", self.auth_url())
    }

    /// Tokens the token server issued.
    pub fn tokens_issued(&self) -> usize {
        self.tokens.issued()
    }
}

struct State {
    image: Arc<Image>,
    tokens: Arc<IssuedTokens>,
    realm: String,
    service: String,
    storage_url: String,
}

/// Where a repository request is going.
enum Route<'a> {
    Base,
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    if path == "/v2/" || path == "/v2" {
        return Route::Base;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Unknown;
    };
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Route::Manifest { name, reference };
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Route::Blob { name, digest };
    }
    Route::Unknown
}

impl State {
    fn respond(&self, req: Request<Incoming>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only");
        }
        let token = bearer(&req);
        match route(req.uri().path()) {
            Route::Base => match token.filter(|t| self.tokens.access(t).is_some()) {
                Some(_) => json_response(StatusCode::OK, Bytes::from_static(b"{}")),
                None => self.challenge(None, token.map(|_| "invalid_token")),
            },
            Route::Manifest { name, reference } => {
                if let Some(refusal) = self.refusal(token, name) {
                    return refusal;
                }
                let manifest = if reference.starts_with("sha256:") {
                    self.image.manifest(reference)
                } else if accepts(&req, media::OCI_INDEX) {
                    Some(&self.image.index)
                } else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "OCI index found, but accept header does not support OCI indexes",
                    );
                };
                match manifest {
                    Some(m) => content(m, head),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown",
                    ),
                }
            }
            Route::Blob { name, digest } => {
                if let Some(refusal) = self.refusal(token, name) {
                    return refusal;
                }
                match self.image.blobs.iter().find(|b| b.digest == digest) {
                    Some(b) if head => content(b, true),
                    Some(b) => {
                        let mut resp = empty(StatusCode::TEMPORARY_REDIRECT);
                        let location =
                            format!("{}/blobs/{}?expires=300", self.storage_url, b.digest);
                        resp.headers_mut().insert(
                            header::LOCATION,
                            HeaderValue::from_str(&location).expect("valid URL"),
                        );
                        resp
                    }
                    None => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown"),
                }
            }
            Route::Unknown => error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such route"),
        }
    }

    /// The 401 to send unless `token` grants pull on repository `name`.
    fn refusal(&self, token: Option<&str>, name: &str) -> Option<Response<Body>> {
        let scope = format!("repository:{name}:pull");
        let Some(token) = token else {
            return Some(self.challenge(Some(&scope), None));
        };
        match self.tokens.access(token) {
            None => Some(self.challenge(Some(&scope), Some("invalid_token"))),
            Some(access) if access.iter().any(|a| a.allows("repository", name, "pull")) => None,
            Some(_) => Some(self.challenge(Some(&scope), Some("insufficient_scope"))),
        }
    }

    fn challenge(&self, scope: Option<&str>, error_code: Option<&str>) -> Response<Body> {
        let mut value = format!(
            r#"Bearer realm="{}",service="{}""#,
            self.realm, self.service
        );
        if let Some(scope) = scope {
            value.push_str(&format!(r#",scope="{scope}""#));
        }
        if let Some(code) = error_code {
            value.push_str(&format!(r#",error="{code}""#));
        }
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).expect("valid challenge"),
        );
        resp
    }
}

/// The bearer token of a request, if any.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether any `Accept` header line lists `media_type`.
fn accepts(req: &Request<Incoming>, media_type: &str) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == media_type)
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    resp
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut resp = empty(status);
    *resp.body_mut() = Full::new(body).boxed();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// A distribution-style error body.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({"errors": [{"code": code, "message": message, "detail": null}]});
    json_response(
        status,
        Bytes::from(serde_json::to_vec(&body).expect("JSON serialises")),
    )
}

/// A manifest or blob with its digest; no body for `HEAD`.
fn content(blob: &Blob, head: bool) -> Response<Body> {
    let mut resp = empty(StatusCode::OK);
    if !head {
        *resp.body_mut() = Full::new(blob.bytes.clone()).boxed();
    }
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(blob.media_type),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.bytes.len()));
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&blob.digest).expect("hex digest"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_names_with_slashes() {
        assert!(matches!(route("/v2/"), Route::Base));
        match route("/v2/library/alpine/manifests/3.20") {
            Route::Manifest { name, reference } => {
                assert_eq!((name, reference), ("library/alpine", "3.20"))
            }
            _ => panic!("not a manifest route"),
        }
        match route("/v2/a/b/c/blobs/sha256:00") {
            Route::Blob { name, digest } => assert_eq!((name, digest), ("a/b/c", "sha256:00")),
            _ => panic!("not a blob route"),
        }
        assert!(matches!(route("/v1/x"), Route::Unknown));
    }
}
