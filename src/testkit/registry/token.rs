//! The token server of the registry pair: `GET /token?service=…&scope=…` grants every
//! scope asked for (there is no account to check) and answers
//! `{"token": …, "access_token": …, "expires_in": 300}`; `GET /blobs/<digest>` serves
//! blob storage. Tokens are either opaque strings the paired fake registry looks up,
//! or ES256 JWTs in the form the CNCF distribution registry verifies (`x5c` header
//! naming a certificate that chains to its `rootcertbundle`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::ServerConfig;
use serde::Serialize;
use serde_json::json;

use super::Blob;
use crate::testkit::listening::{Body, Listening, ServeOptions};
use crate::testkit::tls::Identity;

/// How long a token is valid, in seconds.
const TOKEN_LIFETIME: u64 = 300;

/// One granted scope: `repository:<name>:<action>,<action>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    /// Parses one scope. Names may hold `:` (a registry host with a port), so the
    /// type is cut at the first colon and the actions at the last.
    pub fn parse(scope: &str) -> Option<Access> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        Some(Access {
            kind: kind.into(),
            name: name.into(),
            actions: actions.split(',').map(str::to_owned).collect(),
        })
    }

    pub fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.kind == kind
            && self.name == name
            && self.actions.iter().any(|a| a == action || a == "*")
    }
}

/// Opaque tokens handed out, shared with the fake registry that checks them.
#[derive(Default)]
pub struct IssuedTokens {
    tokens: Mutex<HashMap<String, Vec<Access>>>,
    rng: Rng,
}

impl IssuedTokens {
    /// A new token granting `access`.
    pub fn issue(&self, access: Vec<Access>) -> String {
        let mut tokens = self.tokens.lock();
        let token = format!("opaque.{}.{}", tokens.len() + 1, self.rng.hex(12));
        tokens.insert(token.clone(), access);
        token
    }

    /// What `token` grants, if it was issued here.
    pub fn access(&self, token: &str) -> Option<Vec<Access>> {
        self.tokens.lock().get(token).cloned()
    }

    pub fn issued(&self) -> usize {
        self.tokens.lock().len()
    }
}

/// Signs distribution-registry bearer tokens: ES256 JWTs whose `x5c` header carries
/// the signing certificate.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    x5c: Vec<String>,
    issuer: String,
    rng: Rng,
    issued: AtomicUsize,
}

impl JwtSigner {
    /// Signs with `identity`'s P-256 key; `issuer` must equal the registry's
    /// `auth.token.issuer`.
    pub fn new(identity: &Identity, issuer: impl Into<String>) -> JwtSigner {
        let rng = Rng::default();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            identity.key_pkcs8_der(),
            &rng.0,
        )
        .expect("the identity's key is ECDSA P-256 PKCS#8");
        JwtSigner {
            key,
            x5c: identity.chain.iter().map(|c| STANDARD.encode(c)).collect(),
            issuer: issuer.into(),
            rng,
            issued: AtomicUsize::new(0),
        }
    }

    /// A token for `audience` (the registry's `service`) granting `access`.
    pub fn sign(&self, audience: &str, subject: &str, access: &[Access]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": self.x5c});
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + TOKEN_LIFETIME,
            // A little slack for a registry whose clock is behind ours.
            "nbf": now - 10,
            "iat": now,
            "jti": self.rng.hex(16),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng.0, signing_input.as_bytes())
            .expect("ECDSA signing does not fail");
        self.issued.fetch_add(1, Ordering::SeqCst);
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

/// What kind of token the server hands out.
#[derive(Clone)]
pub enum TokenKind {
    Opaque(Arc<IssuedTokens>),
    Jwt(Arc<JwtSigner>),
}

/// How the token server is served.
#[derive(Clone)]
pub struct TokenOptions {
    pub tls: Option<Arc<ServerConfig>>,
    /// The only `service` it issues tokens for.
    pub service: String,
    pub kind: TokenKind,
    /// Blobs served at `/blobs/<digest>`.
    pub storage: Arc<HashMap<String, Blob>>,
}

/// Starts a token server on `127.0.0.1:0`.
pub async fn serve_tokens(options: TokenOptions) -> Listening {
    let tls = options.tls.clone();
    let options = Arc::new(options);
    let handler = Arc::new(move |req: Request<Incoming>| {
        let options = options.clone();
        Box::pin(async move { respond(&options, req) }) as _
    });
    Listening::start(
        ServeOptions {
            tls,
            ..ServeOptions::default()
        },
        handler,
    )
    .await
}

fn respond(options: &TokenOptions, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    let path = req.uri().path();
    if let Some(digest) = path.strip_prefix("/blobs/") {
        return match options.storage.get(digest) {
            Some(blob) => {
                let mut resp = text(StatusCode::OK, "");
                *resp.body_mut() = Full::new(blob.bytes.clone()).boxed();
                let headers = resp.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.bytes.len()));
                resp
            }
            None => text(StatusCode::NOT_FOUND, "no such blob"),
        };
    }
    if path != "/token" {
        return text(StatusCode::NOT_FOUND, "no such path");
    }
    let query = query_pairs(req.uri().query().unwrap_or(""));
    let param = |name: &'static str| query.iter().filter(move |(k, _)| k == name).map(|(_, v)| v);
    if param("service").next() != Some(&options.service) {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("service must be {:?}", options.service),
        );
    }
    let access: Vec<Access> = param("scope")
        .flat_map(|s| s.split(' '))
        .filter_map(Access::parse)
        .collect();
    let subject = param("account").next().map_or("anonymous", |s| s.as_str());
    let token = match &options.kind {
        TokenKind::Opaque(tokens) => tokens.issue(access),
        TokenKind::Jwt(signer) => signer.sign(&options.service, subject, &access),
    };
    let body = json!({"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME});
    let mut resp = text(StatusCode::OK, &body.to_string());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `application/x-www-form-urlencoded` pairs, percent-decoded.
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// ring's system random source, for token ids.
struct Rng(SystemRandom);

impl Default for Rng {
    fn default() -> Self {
        Rng(SystemRandom::new())
    }
}

impl Rng {
    fn hex(&self, bytes: usize) -> String {
        let mut buf = vec![0u8; bytes];
        self.0.fill(&mut buf).expect("system randomness");
        buf.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_with_colons_in_names() {
        let a = Access::parse("repository:host:5000/lib/x:pull,push").unwrap();
        assert_eq!(a.kind, "repository");
        assert_eq!(a.name, "host:5000/lib/x");
        assert_eq!(a.actions, ["pull", "push"]);
        assert!(a.allows("repository", "host:5000/lib/x", "push"));
        assert!(!a.allows("repository", "other", "pull"));
        assert!(Access::parse("nonsense").is_none());
    }

    #[test]
    fn query_pairs_are_percent_decoded() {
        let q =
            query_pairs("service=registry&scope=repository%3Alib%2Fx%3Apull&x=a+b&bad=%zz&end=%4");
        assert_eq!(q[0], ("service".into(), "registry".into()));
        assert_eq!(q[1], ("scope".into(), "repository:lib/x:pull".into()));
        assert_eq!(q[2], ("x".into(), "a b".into()));
        assert_eq!(q[3], ("bad".into(), "%zz".into()));
        assert_eq!(q[4], ("end".into(), "%4".into()));
    }

    #[test]
    fn jwt_has_three_parts_and_verifies_with_the_certificate_key() {
        let ca = crate::testkit::tls::TestCa::new("ca");
        let id = ca.signer("token signer");
        let signer = JwtSigner::new(&id, "issuer");
        let token = signer.sign("svc", "me", &[Access::parse("repository:x:pull").unwrap()]);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["x5c"][0], STANDARD.encode(&id.chain[0]));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "svc");
        assert_eq!(claims["access"][0]["type"], "repository");
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(signature.len(), 64, "JWS ES256 is r||s");
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            ring::signature::KeyPair::public_key(&signer.key).as_ref(),
        )
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .unwrap();
    }
}
