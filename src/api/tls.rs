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
mod tests {
    use super::*;

    /// A self-signed certificate for 127.0.0.1 and localhost, written to `dir`: (cert, key).
    fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let made =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".into()])
                .expect("certificate");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, made.cert.pem()).expect("write cert");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
        (cert, key)
    }

    #[test]
    fn a_self_signed_pair_loads_and_its_pem_round_trips_without_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let server = ServerTls::load(&cert, &key).expect("loads");
        let pem = server.certificates_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 1);
        assert!(!pem.contains("PRIVATE KEY"), "{pem}");
        let original =
            parse_certificates(&std::fs::read(&cert).expect("read"), &cert).expect("certificates");
        let again = parse_certificates(pem.as_bytes(), Path::new("again")).expect("reparsed");
        assert_eq!(original, again);
        assert!(pem.lines().all(|line| line.len() <= 64));
        assert!(!format!("{server:?}").contains("PRIVATE"));
        // The same file serves as a client's CA file.
        client_config(&cert).expect("a CA file");
    }

    #[test]
    fn missing_files_are_io_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let missing = dir.path().join("nope.pem");
        let error = ServerTls::load(&missing, &key).expect_err("no cert file");
        assert!(error.is_io(), "{error}");
        assert!(error.message().contains("nope.pem"), "{error}");
        let error = ServerTls::load(&cert, &missing).expect_err("no key file");
        assert!(
            error.is_io() && error.message().contains("nope.pem"),
            "{error}"
        );
        let error = client_config(&missing).expect_err("no CA file");
        assert!(
            error.is_io() && error.message().contains("nope.pem"),
            "{error}"
        );
    }

    #[test]
    fn files_without_the_expected_block_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        // The certificate given as the key, and the key as the certificate.
        let error = ServerTls::load(&cert, &cert).expect_err("no key");
        assert!(error.is_invalid_input(), "{error}");
        assert!(
            error.message().contains("cert.pem") && error.message().contains("no PEM private key"),
            "{error}"
        );
        let error = ServerTls::load(&key, &key).expect_err("no certificate");
        assert!(
            error.message().contains("key.pem") && error.message().contains("no PEM certificate"),
            "{error}"
        );
        let error = client_config(&key).expect_err("a key is no CA");
        assert!(
            error.is_invalid_input() && error.message().contains("key.pem"),
            "{error}"
        );
    }

    #[test]
    fn garbage_is_refused_by_name_without_quoting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate at all\n\0\x01secret-ish").expect("write");
        for error in [
            ServerTls::load(&garbage, &key).expect_err("garbage cert"),
            ServerTls::load(&cert, &garbage).expect_err("garbage key"),
            client_config(&garbage).expect_err("garbage CA"),
        ] {
            assert!(error.is_invalid_input(), "{error}");
            assert!(error.message().contains("garbage.pem"), "{error}");
            assert!(!error.to_string().contains("secret-ish"), "{error}");
        }
        // A block whose body is not base64.
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN PRIVATE KEY-----\n!!!! hidden key text !!!!\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let error = ServerTls::load(&cert, &broken).expect_err("broken key");
        assert!(error.message().contains("broken.pem"), "{error}");
        assert!(!error.to_string().contains("hidden key text"), "{error}");
        // A well-formed block that is no certificate.
        let fake = dir.path().join("fake.pem");
        std::fs::write(
            &fake,
            "-----BEGIN CERTIFICATE-----\nZm9vYmFy\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let error = ServerTls::load(&fake, &key).expect_err("not X.509");
        assert!(
            error.is_invalid_input() && error.message().contains("fake.pem"),
            "{error}"
        );
        let error = client_config(&fake).expect_err("not X.509");
        assert!(
            error.is_invalid_input() && error.message().contains("fake.pem"),
            "{error}"
        );
    }

    /// A certificate for `names` signed by `issuer`, or self-signed, with `ca` set as given:
    /// (certificate PEM, key PEM).
    fn certificate(
        names: &[&str],
        ca: bool,
        issuer: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    ) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("params");
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = match issuer {
            Some(issuer) => params.signed_by(&key, issuer).expect("signed"),
            None => params.self_signed(&key).expect("self-signed"),
        };
        (cert.pem(), key.serialize_pem())
    }

    fn load_pems(dir: &Path, cert_pem: &str, key_pem: &str) -> ServerTls {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, cert_pem).expect("write cert");
        std::fs::write(&key, key_pem).expect("write key");
        ServerTls::load(&cert, &key).expect("loads")
    }

    #[test]
    fn the_start_check_accepts_what_nodes_accept_and_says_what_to_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let server = ServerTls::load(&cert, &key).expect("loads");
        server
            .check_for_nodes("https://127.0.0.1:8443")
            .expect("an IP the certificate names");
        server
            .check_for_nodes("https://localhost:8443/base")
            .expect("a name it names");
        let error = server
            .check_for_nodes("https://daemon.example:8443")
            .expect_err("a name it does not name");
        assert!(error.is_invalid_input(), "{error}");
        assert!(
            error.message().contains("cert.pem") && error.message().contains("advertise a URL"),
            "{error}"
        );

        // A self-signed certificate marked as a CA, as `openssl req -x509` makes by default.
        let (cert_pem, key_pem) = certificate(&["127.0.0.1"], true, None);
        let error = load_pems(dir.path(), &cert_pem, &key_pem)
            .check_for_nodes("https://127.0.0.1:8443")
            .expect_err("a CA as the server's certificate");
        assert!(error.message().contains("CA:FALSE"), "{error}");

        // A certificate signed by a CA: the file must hold the chain, not the leaf alone.
        let ca_params = {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            // Another name than the leaf's (rcgen gives every certificate the same one).
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "TaskFly test CA");
            params
        };
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let (leaf_pem, leaf_key) = certificate(&["127.0.0.1"], false, Some(&issuer));
        let error = load_pems(dir.path(), &leaf_pem, &leaf_key)
            .check_for_nodes("https://127.0.0.1:8443")
            .expect_err("the leaf alone");
        assert!(error.message().contains("whole chain"), "{error}");
        let chained = load_pems(
            dir.path(),
            &format!("{leaf_pem}{}", ca_cert.pem()),
            &leaf_key,
        );
        chained
            .check_for_nodes("https://127.0.0.1:8443")
            .expect("the leaf and its CA");
        assert_eq!(
            chained
                .certificates_pem()
                .matches("BEGIN CERTIFICATE")
                .count(),
            2
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = self_signed(dir.path());
        let other = tempfile::tempdir().expect("tempdir");
        let (_, other_key) = self_signed(other.path());
        let error = ServerTls::load(&cert, &other_key).expect_err("mismatch");
        assert!(error.is_invalid_input(), "{error}");
        assert!(error.message().contains("does not belong"), "{error}");
    }
}
