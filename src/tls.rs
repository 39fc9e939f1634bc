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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
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
    /// chain and its private key (PKCS#8, PKCS#1 or SEC1, unencrypted; a
    /// URL's `ssl_options` can give the password of an encrypted PKCS#8
    /// key).
    ///
    /// # Errors
    /// [`Error::Tls`] naming the file that cannot be read, holds no
    /// certificate or key, or holds an encrypted key.
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
        let mut sources = PemSources {
            verify,
            ..PemSources::default()
        };
        if let Some(path) = ca_certs {
            sources.ca_files.push(("ca_certs", path.to_path_buf()));
        }
        sources.client = client_cert_and_key.map(|(cert, key)| ClientPem {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            password: None,
        });
        Self::from_sources(&sources)
    }

    /// TLS from the certificate and key sources a URL's `ssl_options`
    /// names: every CA source is loaded (and each must give at least one
    /// usable certificate); with none, the bundled Mozilla roots are used.
    pub(crate) fn from_sources(sources: &PemSources) -> Result<SslOptions, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(format!("TLS configuration: {e}")))?;
        // The CA sources are loaded even without verification, so that a
        // wrong path is reported rather than silently unused.
        let mut roots = RootCertStore::empty();
        let mut add = |what: String, certs: Vec<CertificateDer<'static>>| {
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(tls_error(format!("{what}: no usable CA certificate")));
            }
            Ok(())
        };
        for (key, path) in &sources.ca_files {
            add(format!("{key} {}", path.display()), read_certs(path, key)?)?;
        }
        for (key, dir) in &sources.ca_dirs {
            add(format!("{key} {}", dir.display()), read_cert_dir(dir, key)?)?;
        }
        for (key, text) in &sources.ca_pem {
            add((*key).to_owned(), read_inline_certs(text, key)?)?;
        }
        let builder = if sources.verify {
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        };
        let config = match &sources.client {
            Some(client) => {
                let chain = read_certs(&client.cert, "certfile")?;
                let key = read_key(&client.key, client.password.as_deref())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_error(format!("certfile/keyfile: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(SslOptions {
            config: Arc::new(config),
            server_hostname: None,
            verification_disabled: !sources.verify,
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

/// Where the certificates and keys of a TLS configuration come from, as
/// a URL's `ssl_options` names them. Each source carries the key it was
/// given under, for error messages.
#[derive(Default)]
pub(crate) struct PemSources {
    /// PEM files of CA certificates (`ca_certs`, `cafile`).
    pub(crate) ca_files: Vec<(&'static str, PathBuf)>,
    /// Directories of PEM CA files (`ca_path`, `capath`).
    pub(crate) ca_dirs: Vec<(&'static str, PathBuf)>,
    /// PEM text of CA certificates (`ca_data`, `cadata`).
    pub(crate) ca_pem: Vec<(&'static str, String)>,
    /// The client certificate chain and key.
    pub(crate) client: Option<ClientPem>,
    /// Whether the broker's certificate is verified.
    pub(crate) verify: bool,
}

/// A client certificate chain and its private key, in PEM files; the key
/// may be an encrypted PKCS#8 key, opened with `password`. (No `Debug`:
/// it would print the password.)
pub(crate) struct ClientPem {
    /// The certificate chain (`certfile`).
    pub(crate) cert: PathBuf,
    /// The private key (`keyfile`).
    pub(crate) key: PathBuf,
    /// The passphrase of an encrypted key (`password`).
    pub(crate) password: Option<String>,
}

/// Every certificate in the `*.pem` and `*.crt` files of `dir` (files
/// without a certificate, such as a key, add none).
fn read_cert_dir(dir: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        tls_error(format!(
            "{what} {}: cannot read the directory: {e}",
            dir.display()
        ))
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            tls_error(format!(
                "{what} {}: cannot read the directory: {e}",
                dir.display()
            ))
        })?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("pem") || e.eq_ignore_ascii_case("crt"));
        // metadata() follows symbolic links, as c_rehash directories use.
        if wanted && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    let mut certs = Vec::new();
    for path in &files {
        let found = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_error(format!("{what} {}: {e}", path.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_error(format!("{what} {}: {e}", path.display())))?;
        certs.extend(found);
    }
    if certs.is_empty() {
        return Err(tls_error(format!(
            "{what} {}: no certificate in any *.pem or *.crt file of the directory",
            dir.display()
        )));
    }
    Ok(certs)
}

/// Every certificate in PEM text given inline.
fn read_inline_certs(text: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "{what}: no certificate in the PEM text (expected -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(certs)
}

const ENCRYPTED_PKCS8_BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_PKCS8_END: &str = "-----END ENCRYPTED PRIVATE KEY-----";

/// The private key in the PEM file `path`: plain PKCS#8, PKCS#1 or SEC1,
/// or encrypted PKCS#8 opened with `password`.
fn read_key(path: &Path, password: Option<&str>) -> Result<PrivateKeyDer<'static>, Error> {
    let failed = |why: String| tls_error(format!("keyfile {}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    if let Some(begin) = text.find(ENCRYPTED_PKCS8_BEGIN) {
        let Some(password) = password else {
            return Err(failed(
                "the private key is encrypted (ENCRYPTED PRIVATE KEY) and no password was \
                 given for it"
                    .into(),
            ));
        };
        let Some(end) = text[begin..].find(ENCRYPTED_PKCS8_END) else {
            return Err(failed(format!("missing {ENCRYPTED_PKCS8_END}")));
        };
        let block = &text[begin..begin + end + ENCRYPTED_PKCS8_END.len()];
        return decrypt_pkcs8(block, password).map_err(failed);
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(failed(
            "the private key is encrypted in OpenSSL's legacy PEM format (Proc-Type and \
             DEK-Info headers), which is not supported; convert it to an encrypted PKCS#8 key \
             with `openssl pkcs8 -topk8 -v2 aes-256-cbc`"
                .into(),
        ));
    }
    if password.is_some() {
        log::warn!(
            "keyfile {}: the private key is not encrypted; the password is not used",
            path.display()
        );
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => failed("no private key in the file".into()),
        other => failed(other.to_string()),
    })
}

/// Decrypts one `ENCRYPTED PRIVATE KEY` PEM block (PKCS#8 with PBES2:
/// PBKDF2-HMAC-SHA256 or scrypt, and AES-CBC or AES-GCM) with the
/// RustCrypto `pkcs8` crate.
fn decrypt_pkcs8(block: &str, password: &str) -> Result<PrivateKeyDer<'static>, String> {
    use pkcs8::EncryptedPrivateKeyInfoRef;
    use pkcs8::der::Document;

    const SUPPORTED: &str = "supported: PBES2 with PBKDF2-HMAC-SHA256 or scrypt, and AES; \
        re-encrypt with `openssl pkcs8 -topk8 -v2 aes-256-cbc`";
    let (_, document) = Document::from_pem(block)
        .map_err(|e| format!("malformed ENCRYPTED PRIVATE KEY block: {e}"))?;
    // PBES1 and ciphers other than AES fail here, as unknown identifiers.
    let info = EncryptedPrivateKeyInfoRef::try_from(document.as_bytes()).map_err(|e| {
        format!(
            "cannot decrypt the private key: unsupported or malformed encryption: {e} ({SUPPORTED})"
        )
    })?;
    let plain = info.decrypt(password.as_bytes()).map_err(|e| match e {
        // A wrong password shows as bad padding, or as a plaintext that
        // is not a PKCS#8 structure.
        pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::DecryptFailed)
        | pkcs8::Error::Asn1(_) => {
            "cannot decrypt the private key: wrong password (or a damaged key)".to_owned()
        }
        other => format!("cannot decrypt the private key: {other} ({SUPPORTED})"),
    })?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        plain.as_bytes().to_vec(),
    )))
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

/// Certificates, keys and temporary files for the TLS tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A directory under the system's temporary directory, removed when
    /// dropped.
    pub(crate) struct TempDir {
        path: PathBuf,
    }

    impl TempDir {
        /// A new, empty directory whose name contains `tag`.
        pub(crate) fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "pika-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&path).expect("the temporary directory is made");
            TempDir { path }
        }

        /// The directory.
        pub(crate) fn path(&self) -> &Path {
            &self.path
        }

        /// Writes `contents` to the file `name` in the directory.
        pub(crate) fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.path.join(name);
            std::fs::write(&path, contents).expect("the file is written");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// A CA certificate made for one test, in PEM, and a client
    /// certificate it signed, with the client's key (plain PKCS#8 DER).
    pub(crate) struct Minted {
        pub(crate) ca_pem: String,
        pub(crate) client_cert_pem: String,
        pub(crate) client_key_der: Vec<u8>,
    }

    impl Minted {
        /// Mints a fresh CA and client identity with rcgen.
        pub(crate) fn new() -> Minted {
            let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.distinguished_name
                .push(DnType::CommonName, "pika unit-test CA");
            let ca_key = KeyPair::generate().expect("a CA key");
            let ca_cert = ca.self_signed(&ca_key).expect("a CA certificate");
            let issuer = Issuer::new(ca, ca_key);
            let mut client =
                CertificateParams::new(vec!["client".to_string()]).expect("client parameters");
            client
                .distinguished_name
                .push(DnType::CommonName, "pika unit-test client");
            let client_key = KeyPair::generate().expect("a client key");
            let client_cert = client
                .signed_by(&client_key, &issuer)
                .expect("a client certificate");
            Minted {
                ca_pem: ca_cert.pem(),
                client_cert_pem: client_cert.pem(),
                client_key_der: client_key.serialize_der(),
            }
        }

        /// The client key as plain PKCS#8 PEM.
        pub(crate) fn client_key_pem(&self) -> String {
            pkcs8::der::Document::try_from(self.client_key_der.as_slice())
                .and_then(|d| d.to_pem("PRIVATE KEY", pkcs8::LineEnding::LF))
                .expect("the key encodes as PEM")
        }

        /// The client key encrypted with `password` (PBES2: PBKDF2-HMAC-
        /// SHA256 and AES-128-CBC, fixed salt and IV: test data only), as
        /// `ENCRYPTED PRIVATE KEY` PEM.
        pub(crate) fn encrypted_client_key_pem(&self, password: &str) -> String {
            let info = pkcs8::PrivateKeyInfoRef::try_from(self.client_key_der.as_slice())
                .expect("rcgen writes PKCS#8");
            let params = pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes128cbc(
                2048,
                b"pika-test-salt",
                [7; 16],
            )
            .expect("PBES2 parameters");
            let encrypted = info
                .encrypt_with_params(params, password)
                .expect("the key encrypts");
            encrypted
                .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
                .expect("the encrypted key encodes as PEM")
                .to_string()
        }
    }

    /// A throwaway client certificate and its key encrypted by `openssl
    /// pkcs8 -topk8 -v2 aes-256-cbc` (PBKDF2-HMAC-SHA256, 2048 rounds),
    /// checked in under `tests/data/tls/`: generated once for these tests,
    /// used nowhere else.
    pub(crate) const OPENSSL_CLIENT_CERT: &str = include_str!("../tests/data/tls/client-ec.crt");
    /// The encrypted key of [`OPENSSL_CLIENT_CERT`].
    pub(crate) const OPENSSL_ENCRYPTED_KEY: &str =
        include_str!("../tests/data/tls/client-ec.key.enc.pem");
    /// The passphrase of [`OPENSSL_ENCRYPTED_KEY`].
    pub(crate) const OPENSSL_KEY_PASSWORD: &str = "throwaway-test-passphrase";
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn tls_err(result: Result<SslOptions, Error>) -> String {
        match result {
            Ok(opts) => panic!("expected an error, got {opts:?}"),
            Err(Error::Tls { reason }) => reason,
            Err(other) => panic!("expected Error::Tls, got {other:?}"),
        }
    }

    fn client(dir: &TempDir, cert: &str, key: &str, password: Option<&str>) -> PemSources {
        PemSources {
            client: Some(ClientPem {
                cert: dir.write("client.crt", cert),
                key: dir.write("client.key", key),
                password: password.map(str::to_owned),
            }),
            verify: true,
            ..PemSources::default()
        }
    }

    #[test]
    fn a_key_encrypted_by_openssl_pkcs8_v2_aes_256_cbc_opens_with_its_password() {
        let dir = TempDir::new("tls-openssl-key");
        let sources = client(
            &dir,
            OPENSSL_CLIENT_CERT,
            OPENSSL_ENCRYPTED_KEY,
            Some(OPENSSL_KEY_PASSWORD),
        );
        let opts = SslOptions::from_sources(&sources).expect("the key decrypts");
        assert!(opts.config().client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_key_encrypted_by_the_pkcs8_crate_opens_with_its_password() {
        let minted = Minted::new();
        let dir = TempDir::new("tls-pkcs8-key");
        let pem = minted.encrypted_client_key_pem("s3cret");
        assert!(pem.starts_with(ENCRYPTED_PKCS8_BEGIN), "{pem}");
        // Surrounding text and other sections do not matter.
        let key_file = format!("Bag Attributes: x\n{pem}\n{}", minted.client_cert_pem);
        let sources = client(&dir, &minted.client_cert_pem, &key_file, Some("s3cret"));
        let opts = SslOptions::from_sources(&sources).expect("the key decrypts");
        assert!(opts.config().client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_wrong_password_is_an_error_saying_so() {
        let dir = TempDir::new("tls-wrong-password");
        let sources = client(
            &dir,
            OPENSSL_CLIENT_CERT,
            OPENSSL_ENCRYPTED_KEY,
            Some("not-the-passphrase"),
        );
        let e = tls_err(SslOptions::from_sources(&sources));
        assert!(
            e.contains("client.key: cannot decrypt the private key: wrong password"),
            "{e}"
        );
        assert!(!e.contains("not-the-passphrase"), "{e}");
    }

    #[test]
    fn an_encrypted_key_without_a_password_is_an_error_not_a_panic() {
        let dir = TempDir::new("tls-no-password");
        let sources = client(&dir, OPENSSL_CLIENT_CERT, OPENSSL_ENCRYPTED_KEY, None);
        let e = tls_err(SslOptions::from_sources(&sources));
        assert!(
            e.contains(
                "client.key: the private key is encrypted (ENCRYPTED PRIVATE KEY) and no \
                 password was given for it"
            ),
            "{e}"
        );
        // The public constructor says the same.
        let e = tls_err(SslOptions::from_pem_files(
            None,
            Some((
                &dir.path().join("client.crt"),
                &dir.path().join("client.key"),
            )),
        ));
        assert!(e.contains("no password was given"), "{e}");
    }

    #[test]
    fn a_legacy_openssl_encrypted_key_is_refused_with_the_conversion_to_use() {
        let dir = TempDir::new("tls-legacy-key");
        let legacy = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                      DEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\n\
                      AAAA\n-----END EC PRIVATE KEY-----\n";
        let sources = client(&dir, OPENSSL_CLIENT_CERT, legacy, Some("pw"));
        let e = tls_err(SslOptions::from_sources(&sources));
        assert!(
            e.contains("legacy PEM format") && e.contains("openssl pkcs8 -topk8 -v2 aes-256-cbc"),
            "{e}"
        );
    }

    #[test]
    fn a_plain_key_with_a_password_loads_and_the_password_is_unused() {
        let minted = Minted::new();
        let dir = TempDir::new("tls-plain-key");
        let sources = client(
            &dir,
            &minted.client_cert_pem,
            &minted.client_key_pem(),
            Some("unused"),
        );
        SslOptions::from_sources(&sources).expect("the plain key loads");
    }

    #[test]
    fn a_key_file_without_a_key_is_an_error_naming_it() {
        let minted = Minted::new();
        let dir = TempDir::new("tls-no-key");
        let sources = client(&dir, &minted.client_cert_pem, &minted.client_cert_pem, None);
        let e = tls_err(SslOptions::from_sources(&sources));
        assert!(
            e.contains("keyfile") && e.contains("client.key: no private key in the file"),
            "{e}"
        );
    }

    #[test]
    fn a_ca_directory_loads_every_pem_and_crt_file() {
        let (a, b) = (Minted::new(), Minted::new());
        let dir = TempDir::new("tls-ca-dir");
        dir.write("a.pem", &a.ca_pem);
        dir.write("b.CRT", &b.ca_pem);
        dir.write("notes.txt", "not a certificate");
        dir.write("key.pem", a.client_key_pem());
        let certs = read_cert_dir(dir.path(), "ca_path").expect("the directory loads");
        assert_eq!(certs.len(), 2);
        let sources = PemSources {
            ca_dirs: vec![("ca_path", dir.path().to_path_buf())],
            verify: true,
            ..PemSources::default()
        };
        SslOptions::from_sources(&sources).expect("the CAs are usable");
    }

    #[test]
    fn a_ca_directory_without_certificates_or_unreadable_is_an_error_naming_it() {
        let dir = TempDir::new("tls-ca-dir-empty");
        dir.write("notes.txt", "nothing here");
        let e = read_cert_dir(dir.path(), "capath").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "capath {}: no certificate in any *.pem or *.crt file of the directory",
                dir.path().display()
            )),
            "{e}"
        );
        let missing = dir.path().join("missing");
        let e = read_cert_dir(&missing, "ca_path").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "ca_path {}: cannot read the directory",
                missing.display()
            )),
            "{e}"
        );
        dir.write("broken.pem", "-----BEGIN CERTIFICATE-----\n@@@\n");
        let e = read_cert_dir(dir.path(), "ca_path")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.pem"), "{e}");
    }

    #[test]
    fn inline_ca_pem_loads_and_text_without_a_certificate_is_an_error() {
        let minted = Minted::new();
        assert_eq!(
            read_inline_certs(&minted.ca_pem, "ca_data").unwrap().len(),
            1
        );
        let e = read_inline_certs("hello", "cadata")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cadata: no certificate in the PEM text"), "{e}");
    }

    #[test]
    fn a_ca_source_without_a_usable_certificate_is_an_error_naming_it() {
        let dir = TempDir::new("tls-ca-unusable");
        // A certificate section whose contents are not a certificate.
        let path = dir.write(
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let sources = PemSources {
            ca_files: vec![("cafile", path.clone())],
            verify: true,
            ..PemSources::default()
        };
        let e = tls_err(SslOptions::from_sources(&sources));
        assert!(
            e.contains(&format!(
                "cafile {}: no usable CA certificate",
                path.display()
            )),
            "{e}"
        );
    }
}
