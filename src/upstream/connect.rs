//! Opening upstream sockets: DNS, TCP with `TCP_NODELAY`, and TLS origination with
//! rustls (SNI, ALPN, system/webpki roots plus an optional CA file whose certificates
//! are also pinned, see [`verify`]). The connect timeout covers all of it.

mod tickets;
mod verify;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::BufReader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Protocol, UpstreamConfig};
use crate::error::ProxyError;
use crate::policy::{first_refused, Origin};
use verify::{PinningVerifier, Trust};

/// How to reach one origin.
#[derive(Clone)]
pub struct Connector {
    origin: Origin,
    tls: Option<TlsOrigin>,
    protocol: Protocol,
    /// Refuse special-purpose destinations (see [`crate::policy::refusal`]): set for
    /// origins reached by an allow pattern unless `allow_private`.
    deny_private: bool,
}

/// What TLS origination needs: the client config, the name to verify, and what the
/// advice for a refused certificate depends on.
#[derive(Clone)]
struct TlsOrigin {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    trust: Trust,
}

/// A connected upstream socket, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<BufReader<TcpStream>>>),
}

/// The read buffer under a TLS upstream socket: two full TLS records. rustls asks
/// for 4 KiB at a time, so without it a 16 KiB record cost four `recvfrom`s, and a
/// blob over TLS spent its CPU in syscalls (benches/registry.sh: 0.83× HAProxy's
/// throughput). Writes pass straight through.
const TLS_READ_BUFFER: usize = 32 * 1024;

/// What the handshake settled.
pub struct Connected {
    pub io: Io,
    pub local_port: u16,
    /// The server chose h2 by ALPN.
    pub h2: bool,
}

impl Connector {
    /// A connector for a listed upstream whose pool opens up to `max_connections`
    /// sockets: its TLS session store keeps two tickets for each of them (see
    /// [`tickets::TicketStore::for_pool`]).
    pub fn for_upstream(
        origin: Origin,
        config: &UpstreamConfig,
        max_connections: usize,
    ) -> Result<Connector, String> {
        let tls = if config.tls {
            let mut tls_config = client_config(config)?;
            tls_config.resumption = rustls::client::Resumption::store(Arc::new(
                tickets::TicketStore::for_pool(max_connections),
            ));
            let name = config
                .sni
                .clone()
                .unwrap_or_else(|| origin.bare_host().to_string());
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| format!("server name {name:?}: {e}"))?;
            Some(TlsOrigin {
                connector: TlsConnector::from(Arc::new(tls_config)),
                server_name,
                trust: Trust {
                    ca_file: config.ca_file.is_some(),
                    sni: config.sni.is_some(),
                },
            })
        } else {
            None
        };
        Ok(Connector {
            origin,
            tls,
            protocol: config.protocol,
            deny_private: false,
        })
    }

    /// A plain connector for an origin reached through an allow pattern.
    pub fn plain(origin: Origin, deny_private: bool) -> Connector {
        Connector {
            origin,
            tls: None,
            protocol: Protocol::Http1,
            deny_private,
        }
    }

    /// Whether special-purpose destinations are refused (see [`Connector::plain`]).
    pub fn denies_private(&self) -> bool {
        self.deny_private
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The upstream is configured to speak HTTP/2.
    pub fn expects_h2(&self) -> bool {
        self.protocol == Protocol::Http2
    }

    /// `https` when tether originates TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Resolves, connects and (for TLS upstreams) handshakes within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Connected, ProxyError> {
        let origin = self.origin.to_string();
        match tokio::time::timeout(timeout, self.connect_inner()).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::ConnectTimeout { origin, timeout }),
        }
    }

    async fn connect_inner(&self) -> Result<Connected, ProxyError> {
        let tcp = self.connect_tcp().await?;
        let local_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        let Some(setup) = &self.tls else {
            return Ok(Connected {
                io: Io::Plain(tcp),
                local_port,
                // Plain TCP has no ALPN: h2 only by prior knowledge.
                h2: self.protocol == Protocol::Http2,
            });
        };
        let tls = setup
            .connector
            .connect(
                setup.server_name.clone(),
                BufReader::with_capacity(TLS_READ_BUFFER, tcp),
            )
            .await
            .map_err(|e| {
                let origin = self.origin.to_string();
                // Refusing every protocol we offered is the same misconfiguration as
                // not negotiating h2 below, so it gets the same error.
                if refused_alpn(&e) {
                    let offered = match self.protocol {
                        Protocol::Auto => "h2, http/1.1",
                        Protocol::Http1 => "http/1.1",
                        Protocol::Http2 => "h2",
                    };
                    ProxyError::Protocol {
                        origin,
                        reason: format!(
                            "the upstream accepts none of the protocols offered by ALPN ({offered}): no_application_protocol alert"
                        ),
                    }
                } else {
                    ProxyError::Tls {
                        origin,
                        reason: tls_reason(&e, setup.trust),
                    }
                }
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        if self.protocol == Protocol::Http2 && !h2 {
            return Err(ProxyError::Protocol {
                origin: self.origin.to_string(),
                reason: "protocol = \"http2\" but the upstream did not negotiate h2 by ALPN".into(),
            });
        }
        Ok(Connected {
            io: Io::Tls(Box::new(tls)),
            local_port,
            h2,
        })
    }

    /// A raw TCP connection (for CONNECT tunnels: the client speaks TLS end to end).
    pub async fn connect_tcp_within(&self, timeout: Duration) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(timeout, self.connect_tcp()).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::ConnectTimeout {
                origin: self.origin.to_string(),
                timeout,
            }),
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, ProxyError> {
        let origin = self.origin.to_string();
        let connect_err = |source| ProxyError::Connect {
            origin: origin.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = match self.origin.ip() {
            Some(ip) => vec![SocketAddr::new(ip, self.origin.port)],
            None => tokio::net::lookup_host((self.origin.bare_host(), self.origin.port))
                .await
                .map_err(connect_err)?
                .collect(),
        };
        // Checked on the addresses about to be dialled, after resolution, so a name
        // an allow pattern admits cannot lead anywhere private; the same sockets
        // serve HTTP, CONNECT tunnels and intercepted connections.
        if self.deny_private {
            if let Some(refused) = first_refused(addrs.iter().map(SocketAddr::ip)) {
                return Err(ProxyError::DeniedPrivate {
                    origin: origin.to_string(),
                    refusal: refused.to_string(),
                });
            }
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // Requests and responses are small writes; Nagle would hold them back.
                    stream.set_nodelay(true).map_err(connect_err)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }
}

/// The server ended the handshake with a `no_application_protocol` alert.
fn refused_alpn(e: &io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// A one-line cause for a failed handshake, unwrapping rustls' error from io::Error;
/// for a refused certificate, also what to change.
fn tls_reason(e: &io::Error, trust: Trust) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => verify::refusal(cert, trust),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

fn client_config(config: &UpstreamConfig) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut tls = if config.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let roots = system_roots();
        match &config.ca_file {
            // Without ca_file, exactly rustls' WebPKI verification.
            None => builder.with_root_certificates(roots).with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::clone(&roots);
                let pem =
                    std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                let pinned = rustls_pemfile_certs(&pem)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                if pinned.is_empty() {
                    return Err(format!("ca_file {} holds no certificate", path.display()));
                }
                for cert in &pinned {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                }
                let verifier = PinningVerifier::new(pinned, roots, provider.clone())?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        }
    };
    tls.alpn_protocols = match config.protocol {
        Protocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Http2 => vec![b"h2".to_vec()],
    };
    Ok(tls)
}

/// The roots a verifying upstream trusts besides its `ca_file`: rustls' WebPKI set
/// and the system's store, read once per process. Reading the system store is
/// 4–11 ms of file reads and parsing here (151 certificates), and on one runtime
/// thread a reload that read it again would pause serving that long for each TLS
/// upstream it builds. A changed system store is seen on restart; `ca_file` is
/// read at every reload.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate must not stop tether from starting.
                let _ = roots.add(cert);
            }
            Arc::new(roots)
        })
        .clone()
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// `insecure_skip_verify`: accepts any certificate but still checks signatures, so the
/// handshake itself stays sound.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_trust_store_is_read_once_and_shared_by_every_upstream_built_after_it() {
        let first = system_roots();
        let second = system_roots();
        // A reload builds its TLS upstreams from the same store: no second read of
        // the system's certificates on the serving thread.
        assert!(
            Arc::ptr_eq(&first, &second),
            "the system store was read again"
        );
        assert!(first.len() >= webpki_roots::TLS_SERVER_ROOTS.len());
    }
}
