//! Verifying an upstream's certificate when `ca_file` is set, and saying what to do
//! when a certificate is refused.
//!
//! WebPKI, as rustls implements it, refuses a certificate with basicConstraints
//! `CA:TRUE` as a server's own (`CaUsedAsEndEntity`), even when that certificate is
//! a trust anchor. `openssl req -x509` makes exactly such certificates by default,
//! private registries are commonly set up with one, and curl and Go accept it once it
//! is trusted. So a server certificate byte-identical to one in `ca_file` is *pinned*:
//! the operator trusted that exact certificate, the handshake signature (still checked
//! by WebPKI's code) proves the server holds its key, and what remains to check is the
//! name and the validity period. Every other certificate goes to WebPKI unchanged,
//! and without `ca_file` nothing here is used at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

/// WebPKI, except for a server certificate that is byte-identical to one in `ca_file`.
#[derive(Debug)]
pub(super) struct PinningVerifier {
    pinned: Vec<CertificateDer<'static>>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl PinningVerifier {
    /// `roots` already holds the `pinned` certificates: as trust anchors they keep
    /// working for the certificates they sign.
    pub(super) fn new(
        pinned: Vec<CertificateDer<'static>>,
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<PinningVerifier, String> {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PinningVerifier { pinned, webpki })
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        // The same errors WebPKI gives, so the guidance below reads the same.
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_name(&cert, server_name)?;
        check_validity(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.webpki.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.webpki.root_hint_subjects()
    }
}

/// The validity check WebPKI makes, with its errors: both ends inclusive, and a
/// period that ends before it starts counts as expired.
fn check_validity(der: &[u8], now: UnixTime) -> Result<(), rustls::Error> {
    let (not_before, not_after) = validity(der).ok_or(CertificateError::BadEncoding)?;
    if not_before > not_after {
        return Err(CertificateError::Expired.into());
    }
    if now < not_before {
        return Err(CertificateError::NotValidYetContext {
            time: now,
            not_before,
        }
        .into());
    }
    if now > not_after {
        return Err(CertificateError::ExpiredContext {
            time: now,
            not_after,
        }
        .into());
    }
    Ok(())
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0; // [0] EXPLICIT, constructed
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// notBefore and notAfter of a DER certificate (RFC 5280 4.1): neither rustls nor
/// rustls-webpki exposes them. `None` for anything that is not well-formed.
fn validity(der: &[u8]) -> Option<(UnixTime, UnixTime)> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if let Some((VERSION, _, after)) = tlv(rest) {
        rest = after;
    }
    let (_serial, rest) = expect(rest, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, rest) = tlv(rest)?;
    let not_after = time(tag, not_after)?;
    rest.is_empty().then_some((not_before, not_after))
}

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form; zero length bytes would be BER's indefinite length, and no
        // certificate needs more than four.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |len, &b| len << 8 | usize::from(b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (t, contents, rest) if t == tag => Some((contents, rest)),
        _ => None,
    }
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ`, the only forms
/// RFC 5280 allows, read the way WebPKI reads them (years before 1970 refused).
fn time(tag: u8, s: &[u8]) -> Option<UnixTime> {
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy = number(s.get(..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        GENERALIZED_TIME => (number(s.get(..4)?)?, s.get(4..)?),
        _ => return None,
    };
    if rest.len() != 11 || rest.get(10) != Some(&b'Z') || year < 1970 {
        return None;
    }
    let field = |i: usize, max: u64| number(rest.get(i..i + 2)?).filter(|v| *v <= max);
    let month = field(0, 12).filter(|m| *m >= 1)?;
    let day = field(2, days_in_month(year, month)).filter(|d| *d >= 1)?;
    let (hour, minute, second) = (field(4, 23)?, field(6, 59)?, field(8, 59)?);
    let secs = days_since_epoch(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date in 1970 or later (Howard Hinnant's
/// `days_from_civil`, in unsigned arithmetic since the year is at least 1970).
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    // Years start in March, so the leap day is the last day of the year.
    let year = if month <= 2 { year - 1 } else { year };
    let (era, year_of_era) = (year / 400, year % 400);
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719_468 days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// What the guidance for a refused certificate needs to know of the configuration.
#[derive(Clone, Copy, Debug)]
pub(super) struct Trust {
    /// `ca_file` is set.
    pub ca_file: bool,
    /// The name verified is `sni`, not the origin's host.
    pub sni: bool,
}

/// A refused certificate, said in a line that tells the operator what to change.
/// Starts `invalid certificate: <rustls' name for the cause>` so the cause stays
/// greppable.
pub(super) fn refusal(error: &CertificateError, trust: Trust) -> String {
    let why = match error {
        CertificateError::UnknownIssuer => {
            let searched = if trust.ca_file {
                "ca_file or the system roots"
            } else {
                "the system roots (no ca_file is set)"
            };
            format!(
                "UnknownIssuer: the certificate is not signed by a CA in {searched}: set \
                 ca_file to the CA that signed it, or to the server's own certificate if it \
                 is self-signed"
            )
        }
        // WebPKI's own error, passed through by rustls as `Other`; webpki is not a
        // direct dependency, and its Display is the variant's name.
        CertificateError::Other(other) if other.0.to_string() == "CaUsedAsEndEntity" => {
            let not_pinned = if trust.ca_file {
                "ca_file does not hold that exact certificate"
            } else {
                "no ca_file is set"
            };
            format!(
                "CaUsedAsEndEntity: the server presents a CA certificate (basicConstraints \
                 CA:TRUE, as `openssl req -x509` makes by default) as its own, and \
                 {not_pinned}: if it is the server's self-signed certificate, set ca_file to it"
            )
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let names = if presented.is_empty() {
                "no host (no DNS or IP subjectAltName; its CN is not used)".to_string()
            } else {
                presented
                    .iter()
                    .map(|n| san(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let expected = expected.to_str();
            if trust.sni {
                format!(
                    "NotValidForName: the certificate names {names}, not {expected} (sni): \
                     set sni to one of the names it has"
                )
            } else {
                format!(
                    "NotValidForName: the certificate names {names}, not {expected} (the host \
                     of origin): origin's host must be one of the names it has, or set sni to \
                     one of them"
                )
            }
        }
        CertificateError::ExpiredContext { time, not_after } => format!(
            "Expired: the certificate expired at {} (it is now {}): renew the server's \
             certificate, and replace it in ca_file if that is where it is trusted",
            date(*not_after),
            date(*time)
        ),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "NotValidYet: the certificate is valid only from {} (it is now {}): check the \
             clock of this host and of whoever issued the certificate",
            date(*not_before),
            date(*time)
        ),
        other => format!("{other:?}"),
    };
    format!("invalid certificate: {why}")
}

/// webpki's `DnsName("a")` / `IpAddress(1.2.3.4)` in the `DNS:a` / `IP:1.2.3.4` form
/// operators wrote in `subjectAltName`. The server chose these bytes and they end up
/// in a log line, so control characters are escaped.
fn san(presented: &str) -> String {
    let mut clean = String::with_capacity(presented.len());
    for c in presented.chars() {
        if c.is_control() {
            clean.extend(c.escape_default());
        } else {
            clean.push(c);
        }
    }
    let presented = clean.as_str();
    if let Some(dns) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|s| s.strip_suffix("\")"))
    {
        format!("DNS:{dns}")
    } else if let Some(ip) = presented
        .strip_prefix("IpAddress(")
        .and_then(|s| s.strip_suffix(')'))
    {
        format!("IP:{ip}")
    } else {
        presented.to_string()
    }
}

/// RFC 3339 to the second. humantime refuses anything after 9999 with a formatting
/// error, which `format!` turns into a panic; no certificate date gets there, but
/// the clock is not ours.
fn date(t: UnixTime) -> String {
    const YEAR_10000: u64 = 253_402_300_800;
    let secs = t.as_secs();
    if secs < YEAR_10000 {
        let at: SystemTime = UNIX_EPOCH + Duration::from_secs(secs);
        humantime::format_rfc3339_seconds(at).to_string()
    } else {
        format!("{secs} s after 1970")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::tls::{Identity, TestCa};

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    const JAN_2000: u64 = 946_684_800;
    const JAN_2020: u64 = 1_577_836_800;
    const MAR_2060: u64 = 2_845_324_800;

    fn name(s: &str) -> ServerName<'static> {
        ServerName::try_from(s.to_string()).unwrap()
    }

    /// A verifier pinning (and trusting as roots) exactly `certs`.
    fn pinning(certs: &[CertificateDer<'static>]) -> PinningVerifier {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        PinningVerifier::new(certs.to_vec(), roots, provider).unwrap()
    }

    fn verify(
        verifier: &PinningVerifier,
        id: &Identity,
        host: &str,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verifier.verify_server_cert(&id.chain[0], &[], &name(host), &[], now)
    }

    fn cert_error(result: Result<ServerCertVerified, rustls::Error>) -> CertificateError {
        match result {
            Err(rustls::Error::InvalidCertificate(e)) => e,
            Err(other) => panic!("not a certificate error: {other:?}"),
            Ok(_) => panic!("the certificate was accepted"),
        }
    }

    #[test]
    fn validity_reads_utc_time_and_generalized_time() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from then on.
        let id = Identity::self_signed_ca_valid(&["a.test"], (2000, 1, 1), (2060, 3, 1));
        assert_eq!(validity(&id.chain[0]), Some((at(JAN_2000), at(MAR_2060))));
    }

    #[test]
    fn days_since_epoch_counts_leap_days() {
        assert_eq!(days_since_epoch(1970, 1, 1), 0);
        assert_eq!(days_since_epoch(2000, 3, 1), 11_017);
        assert_eq!(days_since_epoch(2024, 2, 29) * 86_400, 1_709_164_800);
        assert_eq!(days_since_epoch(9999, 12, 31) * 86_400, 253_402_214_400);
    }

    #[test]
    fn times_webpki_refuses_are_refused() {
        let ok = |tag, s: &str| time(tag, s.as_bytes());
        assert_eq!(ok(UTC_TIME, "200101000000Z"), Some(at(JAN_2020)));
        assert_eq!(ok(GENERALIZED_TIME, "20200101000000Z"), Some(at(JAN_2020)));
        assert_eq!(ok(UTC_TIME, "491231235959Z"), Some(at(2_524_607_999)));
        for (tag, bad) in [
            (UTC_TIME, "200230000000Z"),             // 30 February
            (UTC_TIME, "210229000000Z"),             // 29 February, not a leap year
            (UTC_TIME, "200101240000Z"),             // hour 24
            (UTC_TIME, "200101000060Z"),             // second 60
            (UTC_TIME, "2001010000Z"),               // no seconds
            (UTC_TIME, "200101000000"),              // no Z
            (UTC_TIME, "200101000000+0100"),         // an offset
            (UTC_TIME, "691231235959Z"),             // 1969
            (GENERALIZED_TIME, "20200101000000.5Z"), // fractional seconds
            (GENERALIZED_TIME, "2020010100000aZ"),
            (GENERALIZED_TIME, "20201301000000Z"), // month 13
            (GENERALIZED_TIME, "20200001000000Z"), // month 0
            (0x04, "20200101000000Z"),             // not a time
        ] {
            assert_eq!(ok(tag, bad), None, "{bad}");
        }
    }

    #[test]
    fn a_truncated_or_garbled_certificate_has_no_validity_and_no_panic() {
        let der = Identity::self_signed_ca(&["a.test"]).chain[0].to_vec();
        assert!(validity(&der).is_some());
        for len in 0..der.len() {
            assert_eq!(validity(&der[..len]), None, "prefix of {len} bytes");
        }
        for i in 0..der.len() {
            let mut garbled = der.clone();
            garbled[i] ^= 0xff;
            // Must not panic; a flipped byte may still leave a readable validity.
            let _ = validity(&garbled);
        }
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(validity(&[0x30, 0x85, 1, 0, 0, 0, 0]), None);
        assert_eq!(validity(&[0x30, 0x80, 0, 0]), None);
    }

    #[test]
    fn a_pinned_ca_certificate_is_accepted_for_its_names_within_its_validity() {
        let id = Identity::self_signed_ca_valid(
            &["registry.test", "127.0.0.1"],
            (2000, 1, 1),
            (2020, 1, 1),
        );
        let verifier = pinning(&id.chain);
        for host in ["registry.test", "127.0.0.1"] {
            for now in [JAN_2000, JAN_2000 + 86_400, JAN_2020] {
                assert!(
                    verify(&verifier, &id, host, at(now)).is_ok(),
                    "{host} at {now}"
                );
            }
        }
    }

    #[test]
    fn a_pinned_certificate_is_refused_outside_its_validity() {
        let id = Identity::self_signed_ca_valid(&["registry.test"], (2000, 1, 1), (2020, 1, 1));
        let verifier = pinning(&id.chain);
        assert_eq!(
            cert_error(verify(&verifier, &id, "registry.test", at(JAN_2020 + 1))),
            CertificateError::ExpiredContext {
                time: at(JAN_2020 + 1),
                not_after: at(JAN_2020)
            }
        );
        assert_eq!(
            cert_error(verify(&verifier, &id, "registry.test", at(JAN_2000 - 1))),
            CertificateError::NotValidYetContext {
                time: at(JAN_2000 - 1),
                not_before: at(JAN_2000)
            }
        );
    }

    #[test]
    fn a_pinned_certificate_is_refused_for_a_name_it_does_not_have() {
        let id = Identity::self_signed_ca(&["registry.test"]);
        let verifier = pinning(&id.chain);
        let error = cert_error(verify(&verifier, &id, "127.0.0.1", UnixTime::now()));
        assert!(
            matches!(&error, CertificateError::NotValidForNameContext { presented, .. }
                if presented == &["DnsName(\"registry.test\")".to_string()]),
            "{error:?}"
        );
        assert!(verify(&verifier, &id, "other.test", UnixTime::now()).is_err());
    }

    #[test]
    fn certificates_not_pinned_get_webpki_unchanged() {
        let ca = TestCa::new("private CA");
        let stranger = Identity::self_signed_ca(&["127.0.0.1"]);
        let verifier = pinning(&[ca.der()]);
        // A leaf the pinned CA signed: WebPKI accepts it, as before.
        let leaf = ca.server(&["127.0.0.1"]);
        assert!(verify(&verifier, &leaf, "127.0.0.1", UnixTime::now()).is_ok());
        // A CA certificate that is not pinned: WebPKI refuses it, as before.
        let error = cert_error(verify(&verifier, &stranger, "127.0.0.1", UnixTime::now()));
        assert!(
            format!("{error:?}").contains("CaUsedAsEndEntity"),
            "{error:?}"
        );
        // A leaf from another CA.
        let other = TestCa::new("other CA").server(&["127.0.0.1"]);
        assert_eq!(
            cert_error(verify(&verifier, &other, "127.0.0.1", UnixTime::now())),
            CertificateError::UnknownIssuer
        );
    }

    const NO_CA_FILE: Trust = Trust {
        ca_file: false,
        sni: false,
    };

    #[test]
    fn a_name_mismatch_lists_the_names_and_says_which_key_chose_the_name() {
        let error = CertificateError::NotValidForNameContext {
            expected: name("other.test"),
            presented: vec![
                "DnsName(\"registry.test\")".into(),
                "IpAddress(10.0.0.1)".into(),
            ],
        };
        assert_eq!(
            refusal(
                &error,
                Trust {
                    ca_file: true,
                    sni: true
                }
            ),
            "invalid certificate: NotValidForName: the certificate names DNS:registry.test, \
             IP:10.0.0.1, not other.test (sni): set sni to one of the names it has"
        );
        let hostile = CertificateError::NotValidForNameContext {
            expected: name("a.test"),
            presented: vec!["DnsName(\"b.test\nINFO forged\")".into()],
        };
        assert!(
            refusal(&hostile, NO_CA_FILE).contains("names DNS:b.test\\nINFO forged, not"),
            "{}",
            refusal(&hostile, NO_CA_FILE)
        );
        let nameless = CertificateError::NotValidForNameContext {
            expected: name("10.0.0.2"),
            presented: vec![],
        };
        assert_eq!(
            refusal(&nameless, NO_CA_FILE),
            "invalid certificate: NotValidForName: the certificate names no host (no DNS or \
             IP subjectAltName; its CN is not used), not 10.0.0.2 (the host of origin): \
             origin's host must be one of the names it has, or set sni to one of them"
        );
    }

    #[test]
    fn a_certificate_not_valid_yet_says_from_when() {
        let error = CertificateError::NotValidYetContext {
            time: at(JAN_2000),
            not_before: at(JAN_2020),
        };
        assert_eq!(
            refusal(&error, NO_CA_FILE),
            "invalid certificate: NotValidYet: the certificate is valid only from \
             2020-01-01T00:00:00Z (it is now 2000-01-01T00:00:00Z): check the clock of this \
             host and of whoever issued the certificate"
        );
    }

    #[test]
    fn dates_past_year_9999_are_written_without_panicking() {
        assert_eq!(date(at(253_402_214_400)), "9999-12-31T00:00:00Z");
        assert_eq!(date(at(u64::MAX)), format!("{} s after 1970", u64::MAX));
    }

    #[test]
    fn other_refusals_keep_rustls_name_for_the_cause() {
        assert_eq!(
            refusal(&CertificateError::BadSignature, NO_CA_FILE),
            "invalid certificate: BadSignature"
        );
    }
}
