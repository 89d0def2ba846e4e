//! Certificates made at run time for TLS peers on loopback: a throwaway CA, leaf
//! identities it signs, and rustls server configs that offer chosen ALPN protocols.
//!
//! Nothing is read from or left on disk except the PEM files callers ask for, which
//! are temporary and removed when their handle drops. Keys are ECDSA P-256, the
//! algorithm every peer we test against (rustls, Go's crypto/tls, the distribution
//! registry's token verifier) accepts.

use std::io::Write;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use tempfile::TempPath;

/// ALPN offering HTTP/1.1 only.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN offering h2 only.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];
/// ALPN preferring h2, falling back to HTTP/1.1 (what most TLS servers offer).
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A certificate authority that exists for one test run.
pub struct TestCa {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate chain (leaf first) and its private key.
#[derive(Clone)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
}

impl TestCa {
    /// A new CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::new()).expect("no names to check");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate a P-256 key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate as DER.
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Writes the CA certificate to a temporary PEM file (for `ca_file` or a
    /// `rootcertbundle`); the file is removed when the returned path drops.
    pub fn pem_file(&self) -> std::io::Result<TempPath> {
        write_temp(self.pem().as_bytes(), ".pem")
    }

    /// A server identity for `names` (DNS names or IP addresses, which become IP SANs).
    pub fn server(&self, names: &[&str]) -> Identity {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid subject names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("tether test server", String::as_str),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A signing identity with no names (e.g. for a token server's JWT `x5c`).
    pub fn signer(&self, common_name: &str) -> Identity {
        let mut params = CertificateParams::new(Vec::new()).expect("no names to check");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Identity {
        let key = KeyPair::generate().expect("generate a P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign with the test CA");
        Identity {
            chain: vec![cert.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }
}

impl Identity {
    /// A self-signed server certificate for `names` made the way
    /// `openssl req -x509 -newkey ... -nodes -subj /CN=x -addext subjectAltName=...`
    /// makes one: its own issuer, basicConstraints `CA:TRUE` (critical), no key usage
    /// or extended key usage. Stock WebPKI refuses such a certificate as an end entity
    /// (`CaUsedAsEndEntity`) even when it is a trust anchor; private registries are
    /// commonly set up with exactly this. Valid from 1975 to 4096.
    pub fn self_signed_ca(names: &[&str]) -> Identity {
        Identity::self_signed_ca_valid(names, (1975, 1, 1), (4096, 1, 1))
    }

    /// [`Identity::self_signed_ca`] valid from `not_before` to `not_after`, both
    /// `(year, month, day)` at midnight UTC (rcgen writes UTCTime before 2050 and
    /// GeneralizedTime from then on, as RFC 5280 requires).
    pub fn self_signed_ca_valid(
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Identity {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid subject names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("tether self-signed", String::as_str),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().expect("generate a P-256 key");
        let cert = params.self_signed(&key).expect("self-sign the certificate");
        Identity {
            chain: vec![cert.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// Writes the chain to a temporary PEM file (for `ca_file`, to pin a self-signed
    /// certificate); the file is removed when the returned path drops.
    pub fn cert_pem_file(&self) -> std::io::Result<TempPath> {
        write_temp(self.cert_pem().as_bytes(), ".pem")
    }

    /// The private key, PKCS#8 DER.
    pub fn key_pkcs8_der(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// The private key for rustls.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The chain as PEM, leaf first.
    pub fn cert_pem(&self) -> String {
        self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }

    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", &self.key_pkcs8)
    }

    /// A rustls server config presenting this identity and offering `alpn` (empty:
    /// no ALPN at all, like a server that predates it).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .expect("the key matches the certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `contents` to a new temporary file removed when the path drops.
pub fn write_temp(contents: &[u8], suffix: &str) -> std::io::Result<TempPath> {
    let mut file = tempfile::Builder::new()
        .prefix("tether-test-")
        .suffix(suffix)
        .tempfile()?;
    file.write_all(contents)?;
    file.flush()?;
    Ok(file.into_temp_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_rustls_parsing() {
        use rustls::pki_types::pem::PemObject;
        let ca = TestCa::new("test ca");
        let id = ca.server(&["127.0.0.1", "localhost"]);
        let certs: Vec<_> = CertificateDer::pem_slice_iter(id.cert_pem().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs, id.chain);
        let key = PrivateKeyDer::from_pem_slice(id.key_pem().as_bytes()).unwrap();
        assert_eq!(key.secret_der(), id.key_pkcs8_der());
        let ca_der = CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
        assert_eq!(ca_der, ca.der());
    }
}
