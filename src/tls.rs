//! TLS with rustls: [`SslOptions`] (pika's `SSLOptions(context,
//! server_hostname)`), built from a `rustls::ClientConfig` or from PEM
//! files, and the non-blocking TLS session a connection runs over.
//!
//! ```no_run
//! use pika::{ConnectionParameters, SslOptions};
//!
//! // Verify the broker against a private CA, and present a client
//! // certificate (for mutual TLS, and SASL EXTERNAL).
//! let tls = SslOptions::from_pem_files(
//!     Some("ca.pem".as_ref()),
//!     Some(("client.pem".as_ref(), "client.key".as_ref())),
//! )?;
//! let mut params = ConnectionParameters::new();
//! params.set_host("rabbit1")?.set_ssl_options(Some(tls));
//! assert_eq!(params.port(), 5671);
//! # Ok::<(), pika::Error>(())
//! ```
//!
//! Without a CA, the broker is verified against the Mozilla roots bundled
//! by the `webpki-roots` crate (not the operating system's store), so the
//! same program behaves the same on every machine.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::Error;

/// TLS settings of a connection: a rustls client configuration and, when
/// the certificate names the broker differently from the host connected
/// to, the name to verify (pika's `server_hostname`).
#[derive(Clone)]
pub struct SslOptions {
    config: Arc<ClientConfig>,
    server_hostname: Option<String>,
    verification_disabled: bool,
}

impl fmt::Debug for SslOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SslOptions")
            .field("server_hostname", &self.server_hostname)
            .field("verify_peer", &!self.verification_disabled)
            .field(
                "client_certificate",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish()
    }
}

fn tls_error(what: impl Into<String>) -> Error {
    Error::Tls {
        reason: what.into(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl SslOptions {
    /// TLS with a configuration the caller built (pika's
    /// `SSLOptions(context, server_hostname)`).
    pub fn new(config: Arc<ClientConfig>, server_hostname: Option<String>) -> SslOptions {
        SslOptions {
            config,
            server_hostname,
            verification_disabled: false,
        }
    }

    /// TLS verifying the broker against the bundled Mozilla roots
    /// (`webpki-roots`), without a client certificate.
    pub fn with_webpki_roots() -> SslOptions {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        // The ring provider supports the default versions; a failure here
        // would be a build of rustls without TLS 1.2 and 1.3.
        match config {
            Ok(config) => SslOptions::new(Arc::new(config), None),
            Err(e) => unreachable_config(e),
        }
    }

    /// TLS from PEM files: `ca_certs` to verify the broker (the bundled
    /// Mozilla roots when `None`), and an optional client certificate
    /// chain and its private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// [`Error::Tls`] naming the file that cannot be read or holds no
    /// certificate or key.
    pub fn from_pem_files(
        ca_certs: Option<&Path>,
        client_cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<SslOptions, Error> {
        Self::build(ca_certs, client_cert_and_key, true)
    }

    /// Like [`SslOptions::from_pem_files`], but without verifying the
    /// broker's certificate at all (pika's `cert_reqs=CERT_NONE`). Anyone
    /// between client and broker can then read and change the traffic; a
    /// warning is logged on every connect.
    ///
    /// # Errors
    /// As [`SslOptions::from_pem_files`].
    pub fn without_verification(
        client_cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<SslOptions, Error> {
        Self::build(None, client_cert_and_key, false)
    }

    fn build(
        ca_certs: Option<&Path>,
        client_cert_and_key: Option<(&Path, &Path)>,
        verify: bool,
    ) -> Result<SslOptions, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(format!("TLS configuration: {e}")))?;
        let builder = if verify {
            let mut roots = RootCertStore::empty();
            match ca_certs {
                Some(path) => {
                    let certs = read_certs(path, "ca_certs")?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(tls_error(format!(
                            "ca_certs {}: no usable CA certificate",
                            path.display()
                        )));
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        };
        let config = match client_cert_and_key {
            Some((cert_path, key_path)) => {
                let chain = read_certs(cert_path, "certfile")?;
                let key = PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|e| tls_error(format!("keyfile {}: {e}", key_path.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(format!("certfile/keyfile: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(SslOptions {
            config: Arc::new(config),
            server_hostname: None,
            verification_disabled: !verify,
        })
    }

    /// Verifies the broker's certificate for `name` instead of the host
    /// connected to.
    pub fn with_server_hostname(mut self, name: impl Into<String>) -> SslOptions {
        self.server_hostname = Some(name.into());
        self
    }

    /// The name the broker's certificate is verified for, when set.
    pub fn server_hostname(&self) -> Option<&str> {
        self.server_hostname.as_deref()
    }

    /// Whether the broker's certificate is verified.
    pub fn verifies_peer(&self) -> bool {
        !self.verification_disabled
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// A client session for a connection to `host`.
    pub(crate) fn session(&self, host: &str) -> Result<ClientConnection, Error> {
        if self.verification_disabled {
            log::warn!(
                "TLS to {host}: the broker's certificate is NOT verified (cert_reqs=CERT_NONE)"
            );
        }
        let name = self.server_hostname.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| tls_error(format!("server name {name:?}: {e}")))?;
        ClientConnection::new(self.config.clone(), server_name)
            .map_err(|e| tls_error(format!("TLS session: {e}")))
    }
}

fn unreachable_config(e: rustls::Error) -> SslOptions {
    // Documented as impossible with the ring provider; still no panic.
    log::error!("TLS configuration failed: {e}");
    SslOptions::new(
        Arc::new(
            ClientConfig::builder()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        ),
        None,
    )
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(format!("{what} {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "{what} {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// Accepts any server certificate (`cert_reqs=CERT_NONE`), still checking
/// the handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
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
