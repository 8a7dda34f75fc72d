use super::*;

/// A self-signed certificate for 127.0.0.1 and localhost, written to `dir`: (cert, key).
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".into()])
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
