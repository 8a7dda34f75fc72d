//! TLS for the HTTP API (feature `tls`), on rustls with its `ring` backend.
//!
//! The server side ([`ServerTls`]) loads the certificate chain and private key named by
//! [`crate::ServerConfig::tls`] once, when the [`crate::Server`] is made, and hands its accept
//! loop an acceptor. It also keeps the chain as PEM text: nodes are given exactly those
//! certificates to trust, so a self-signed certificate works without any other set-up.
//!
//! The client side ([`client_config`], [`platform_client_config`]) builds what
//! [`crate::Client`] verifies the daemon with: either the certificates of one PEM file (a
//! private CA, or the daemon's self-signed certificate), which then are the only ones trusted,
//! or the platform's trust store.
//!
//! Invariants:
//! - The private key is read once, handed to rustls, and never logged, stored elsewhere or
//!   quoted in an error message; only its file name is.
//! - Every loading error names the file it is about.
//! - No other module names a rustls type, except the client's error classification
//!   ([`rustls_error`]).

use std::error::Error as StdError;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// The largest certificate or key file read (a chain is a few KiB; this refuses a wrong file).
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// The daemon's side of TLS: the acceptor its server wraps connections in, and the
/// certificates it serves.
pub(crate) struct ServerTls {
    acceptor: TlsAcceptor,
    /// The chain served, server certificate first.
    chain: Vec<CertificateDer<'static>>,
    certificates_pem: String,
    /// The file the chain came from, for messages.
    cert_file: std::path::PathBuf,
}

impl fmt::Debug for ServerTls {
    /// Shows how many certificates are served; the key is not shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field(
                "certificates",
                &self.certificates_pem.matches("-----BEGIN").count(),
            )
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the PEM certificate chain in `cert_file` (the server's certificate first, then
    /// any intermediates) and the PEM private key in `key_file` (PKCS#8, PKCS#1 or SEC1).
    ///
    /// Errors: a file that cannot be read ([`Error::is_io`]); one that holds no certificate or
    /// no key, malformed PEM, or a key that does not belong to the certificate
    /// ([`Error::is_invalid_input`]). Each names the file.
    pub(crate) fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls> {
        let chain = parse_certificates(&read_pem_file(cert_file, "TLS certificate")?, cert_file)?;
        let key = parse_private_key(&read_pem_file(key_file, "TLS private key")?, key_file)?;
        let certificates_pem = to_pem(&chain);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_error(&e))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => Error::invalid_input(format!(
                    "the private key in {} does not belong to the certificate in {}",
                    key_file.display(),
                    cert_file.display()
                )),
                other => Error::invalid_input(format!(
                    "cannot serve TLS with the certificate {} and the key {}: {other}",
                    cert_file.display(),
                    key_file.display()
                )),
            })?;
        // The server speaks HTTP/1.1 only; saying so lets a client that offers h2 as well
        // (curl does) settle on it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            chain,
            certificates_pem,
            cert_file: cert_file.to_path_buf(),
        })
    }

    /// Checks that a node sent to `daemon_url` will accept the served chain, as it verifies it:
    /// trusting only [`ServerTls::certificates_pem`], for the URL's host, now. Catches at start
    /// what would otherwise leave every node unable to register: a certificate issued for
    /// other names, an expired one, a self-signed one marked as a CA (which rustls refuses as
    /// a server's certificate), or a CA-issued one without its chain.
    ///
    /// Errors ([`Error::is_invalid_input`]): the certificate would be refused, with what to do.
    pub(crate) fn check_for_nodes(&self, daemon_url: &str) -> Result<()> {
        use rustls::client::danger::ServerCertVerifier as _;
        let refused = |why: String, hint: &str| {
            Error::invalid_input(format!(
                "nodes told to call {daemon_url} would refuse the certificate in {}: {why}{hint}",
                self.cert_file.display()
            ))
        };
        let host = daemon_url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_owned))
            .ok_or_else(|| refused("the URL has no host".to_owned(), ""))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| refused(format!("its host is not a valid name: {e}"), ""))?;
        let (end_entity, intermediates) = match self.chain.split_first() {
            Some(split) => split,
            None => return Err(refused("it holds no certificate".to_owned(), "")),
        };
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(self.chain.iter().cloned());
        if added == 0 {
            return Err(refused(
                "none of its certificates can be a trust anchor".to_owned(),
                "",
            ));
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| refused(e.to_string(), ""))?;
        match verifier.verify_server_cert(
            end_entity,
            intermediates,
            &server_name,
            &[],
            rustls::pki_types::UnixTime::now(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                let why = describe_certificate_problem(&e);
                let hint = match &e {
                    _ if is_ca_used_as_end_entity(&e) => {
                        "; make the self-signed certificate with basicConstraints CA:FALSE \
                         (openssl: -addext basicConstraints=critical,CA:FALSE), or have a CA \
                         sign a server certificate"
                    }
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. },
                    ) => "; advertise a URL whose host the certificate names, or reissue it",
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                        "; nodes trust the certificates of that file only, so it must hold the \
                         whole chain up to the CA (a fullchain.pem)"
                    }
                    _ => "",
                };
                Err(refused(why, hint))
            }
        }
    }

    /// What the server wraps each accepted connection in.
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The certificates the daemon serves, as PEM text (no key): what its nodes trust.
    pub(crate) fn certificates_pem(&self) -> &str {
        &self.certificates_pem
    }
}

/// A client configuration trusting exactly the certificates in the PEM file `ca_file`: a
/// private CA, or the daemon's own self-signed certificate. The platform's trust store is not
/// consulted (as with curl's `--cacert`).
///
/// Errors: the file cannot be read ([`Error::is_io`]), holds no certificate or one that is not
/// X.509 ([`Error::is_invalid_input`]). Each names the file.
pub(crate) fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>> {
    let certificates = parse_certificates(&read_pem_file(ca_file, "CA file")?, ca_file)?;
    let mut roots = RootCertStore::empty();
    for (number, certificate) in certificates.into_iter().enumerate() {
        roots.add(certificate).map_err(|e| {
            Error::invalid_input(format!(
                "certificate {} in the CA file {} cannot be used as a trust anchor: {e}",
                number + 1,
                ca_file.display()
            ))
        })?;
    }
    build_client_config(roots)
}

/// A client configuration trusting the platform's certificate store (`/etc/ssl/certs` and
/// the like; `SSL_CERT_FILE` / `SSL_CERT_DIR` override it). Loaded once per process.
pub(crate) fn platform_client_config() -> Result<Arc<ClientConfig>> {
    static PLATFORM: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(config) = PLATFORM.get() {
        return Ok(config.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(error = %error, "a certificate of the platform's store was skipped");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            ignored,
            "no trusted root certificate was found on this system; verifying a daemon's \
             certificate needs a CA file"
        );
    }
    let config = build_client_config(roots)?;
    Ok(PLATFORM.get_or_init(|| config).clone())
}

/// A client configuration for a daemon reached over plain `http://`: it never verifies
/// anything, so it trusts nothing.
pub(crate) fn plain_client_config() -> Result<Arc<ClientConfig>> {
    build_client_config(RootCertStore::empty())
}

/// The rustls error somewhere in `error`'s chain of causes, if a TLS handshake failed.
///
/// `std::io::Error` hides the error it wraps from `source()` (it returns that error's own
/// source), so wrapped I/O errors are opened with `get_ref` as well.
pub(crate) fn rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| rustls_error(inner))
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Whether `error` says the peer's certificate was refused (unknown issuer, expired, not valid
/// for the name, ...), as opposed to another handshake failure.
pub(crate) fn is_certificate_problem(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
}

/// A sentence about a refused certificate, plainer than rustls' own for the usual cases.
pub(crate) fn describe_certificate_problem(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "invalid peer certificate: unknown issuer (it is self-signed or signed by a CA \
             this client does not trust)"
                .to_owned()
        }
        _ if is_ca_used_as_end_entity(error) => {
            "invalid peer certificate: it is marked as a CA certificate, which a server's own \
             certificate must not be (CaUsedAsEndEntity)"
                .to_owned()
        }
        other => other.to_string(),
    }
}

/// Whether webpki refused a server certificate for being a CA certificate (as `openssl req
/// -x509` makes self-signed ones by default). webpki's error type is not re-exported by
/// rustls, so its name is matched.
fn is_ca_used_as_end_entity(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
            if format!("{other:?}").contains("CaUsedAsEndEntity")
    )
}

/// The one crypto provider TaskFly uses, named explicitly: another dependency may enable
/// rustls' aws-lc-rs backend too, and then rustls cannot pick a default by itself.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup_error(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// rustls refused its own default settings: a build problem, not the user's.
fn setup_error(error: &rustls::Error) -> Error {
    Error::invalid_input(format!("cannot set up TLS: {error}"))
}

/// The contents of a PEM file, refusing one far larger than any certificate or key.
fn read_pem_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let cannot_read = |e| Error::io(format!("cannot read the {what} {}", path.display()), e);
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(Error::invalid_input(format!(
            "the {what} {} is larger than {} KiB; is it the right file?",
            path.display(),
            MAX_PEM_FILE / 1024
        )));
    }
    Ok(bytes)
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
fn parse_certificates(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::invalid_input(format!(
                "{} is not a valid PEM file: {}",
                path.display(),
                describe_pem_error(&e)
            ))
        })?;
    if certificates.is_empty() {
        return Err(Error::invalid_input(format!(
            "{} holds no PEM certificate (a block starting with -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certificates)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn parse_private_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::invalid_input(format!(
            "{} holds no PEM private key (a block starting with -----BEGIN PRIVATE KEY-----, \
             -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----)",
            path.display()
        )),
        other => Error::invalid_input(format!(
            "{} is not a valid PEM file: {}",
            path.display(),
            describe_pem_error(&other)
        )),
    })
}

/// What is wrong with a PEM file, without quoting its contents: a key file's line must not
/// end up in a message or a log.
fn describe_pem_error(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a block has no -----END line",
        pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a block is not valid base64",
        pem::Error::NoItemsFound => "it holds nothing of the expected kind",
        pem::Error::SectionTooLarge => "a block is too large",
        _ => "it cannot be parsed",
    }
}

/// `certificates` as PEM text: one `CERTIFICATE` block each, base64 in lines of 64.
fn to_pem(certificates: &[CertificateDer<'_>]) -> String {
    let mut text = String::new();
    for certificate in certificates {
        text.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = crate::encode::base64(certificate.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            // Base64 output is ASCII, so every chunk is valid UTF-8.
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        text.push_str("-----END CERTIFICATE-----\n");
    }
    text
}

#[cfg(test)]
mod tests;
