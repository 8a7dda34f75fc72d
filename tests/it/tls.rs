//! TLS (feature `tls`): the engine serving https with a self-signed certificate made here, its
//! nodes verifying it (the Rust agent in-process and as `taskflyd agent` processes, and the
//! shell bootstrap through curl), the CLI verifying it with `--ca-file`, and every client that
//! does not trust it refused.

use std::path::PathBuf;
use std::time::Duration;

use taskfly::Client;

use crate::support::cli_daemon::{path_str, Daemon, DaemonOptions};
use crate::support::cli_run;
use crate::support::{local_yml, Project, TestEngine, API_TOKEN};

/// Prints one line per node on stdout and one on stderr, then exits 0.
const HELLO_SCRIPT: &str = "#!/bin/sh\necho \"hello from node $TASKFLY_NODE_INDEX\"\n\
                            echo \"to stderr from node $TASKFLY_NODE_INDEX\" >&2\n";

/// How long one of these tiny deployments may take (the machine is shared).
const DEPLOYMENT_LIMIT: Duration = Duration::from_secs(60);

/// A self-signed certificate for 127.0.0.1 and localhost and its key, as PEM files that live
/// as long as the value. The certificate file is also the CA file its clients trust.
struct SelfSigned {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl SelfSigned {
    fn new() -> SelfSigned {
        let made = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("a self-signed certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, made.cert.pem()).expect("write the certificate");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write the key");
        SelfSigned {
            _dir: dir,
            cert,
            key,
        }
    }
}

/// `count` local nodes run by `agent` (`rust` or `script`), each running [`HELLO_SCRIPT`].
fn hello_project(count: u32, agent: &str) -> Project {
    let yml = format!(
        "{}instance_config:\n  local:\n    agent: {agent}\n",
        local_yml(count, "")
    );
    Project::new(&yml).script(HELLO_SCRIPT)
}

/// Runs `project` on `engine` and checks that every node completed and sent both its lines.
async fn assert_runs_to_completion(engine: &TestEngine, project: &Project, count: u32) {
    let view = tokio::time::timeout(DEPLOYMENT_LIMIT, engine.run(project.path()))
        .await
        .expect("the deployment ends in time");
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert_eq!(view.nodes_completed, count, "{view:#?}");
    let logs = engine.all_logs(&view.deployment_id).await;
    for index in 0..count {
        for (stream, line) in [
            ("stdout", format!("hello from node {index}")),
            ("stderr", format!("to stderr from node {index}")),
        ] {
            assert!(
                logs.iter()
                    .any(|l| l.node_index == index && l.stream == stream && l.line == line),
                "node {index} sent {line:?} on {stream}: {logs:#?}"
            );
        }
    }
}

// ----- the engine in-process -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_engine_runs_a_deployment_whose_agents_verify_it() {
    let certificate = SelfSigned::new();
    let engine = TestEngine::start_tls(&certificate.cert, &certificate.key, |config| config).await;
    assert!(
        engine.url.starts_with("https://127.0.0.1:"),
        "{}",
        engine.url
    );

    assert_runs_to_completion(&engine, &hello_project(3, "rust"), 3).await;

    // A client trusting the certificate sees the deployment over https.
    let client = Client::new(&engine.url, Some(API_TOKEN.to_owned()))
        .expect("client")
        .with_ca_file(&certificate.cert)
        .expect("the certificate as CA file");
    client.health().await.expect("healthy over https");
    let deployments = client.deployments().await.expect("deployments");
    assert_eq!(deployments.len(), 1);
    assert_eq!(deployments[0].status.as_str(), "completed");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_trust_the_certificate_or_speak_http_are_refused() {
    let certificate = SelfSigned::new();
    let engine = TestEngine::start_tls(&certificate.cert, &certificate.key, |config| config).await;

    // The platform's trust store does not know a certificate made by this test.
    let untrusting = Client::new(&engine.url, Some(API_TOKEN.to_owned())).expect("client");
    let error = untrusting
        .health()
        .await
        .expect_err("untrusted certificate");
    assert!(error.is_transport() && error.is_certificate(), "{error:?}");
    let text = error.report().to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("unknown issuer"), "{text}");
    assert!(text.contains(&engine.url), "names the daemon: {text}");
    assert!(!text.contains(API_TOKEN), "{text}");

    // A CA file holding some other certificate is no better.
    let other = SelfSigned::new();
    let error = Client::new(&engine.url, None)
        .expect("client")
        .with_ca_file(&other.cert)
        .expect("a valid CA file")
        .health()
        .await
        .expect_err("signed by someone else");
    assert!(error.is_certificate(), "{error:?}");

    // Plain http to the TLS port gets no answer it can use.
    let plain_url = engine.url.replacen("https://", "http://", 1);
    let error = tokio::time::timeout(
        Duration::from_secs(20),
        Client::new(&plain_url, Some(API_TOKEN.to_owned()))
            .expect("client")
            .health(),
    )
    .await
    .expect("refused at once")
    .expect_err("plain http to a TLS port");
    assert!(error.is_transport() && !error.is_certificate(), "{error:?}");

    // The engine still serves a client that trusts it.
    Client::new(&engine.url, None)
        .expect("client")
        .with_ca_file(&certificate.cert)
        .expect("CA file")
        .health()
        .await
        .expect("still serving");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_a_plain_http_engine_is_a_handshake_failure_not_retried() {
    let certificate = SelfSigned::new();
    let engine = TestEngine::start().await;
    let https_url = engine.url.replacen("http://", "https://", 1);
    let client = Client::new(&https_url, None)
        .expect("client")
        .with_ca_file(&certificate.cert)
        .expect("CA file");
    let started = std::time::Instant::now();
    // A node-side call retries transient failures for two minutes; a failed handshake is not
    // transient.
    let error = client.register("00ff").await.expect_err("no TLS there");
    assert!(started.elapsed() < Duration::from_secs(20), "{error:?}");
    assert!(error.is_transport() && !error.is_certificate(), "{error:?}");
    assert!(error.to_string().contains("TLS handshake"), "{error}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_bootstrap_verifies_the_engine_with_curl() {
    let certificate = SelfSigned::new();
    let engine = TestEngine::start_tls(&certificate.cert, &certificate.key, |config| config).await;
    assert_runs_to_completion(&engine, &hello_project(2, "script"), 2).await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_stops_the_server_from_starting() {
    use taskfly::{Config, Orchestrator, Server, ServerConfig};
    let certificate = SelfSigned::new();
    let data_dir = tempfile::tempdir().expect("temp dir");
    let missing = data_dir.path().join("missing.pem");
    let engine = Orchestrator::new(Config::new(data_dir.path())).expect("engine");
    let error = Server::new(
        engine.clone(),
        ServerConfig::default().tls(&certificate.cert, &missing),
    )
    .expect_err("no key file");
    assert!(error.is_io(), "{error:?}");
    assert!(error.to_string().contains("missing.pem"), "{error}");
    let error = Server::new(
        engine.clone(),
        ServerConfig::default().tls(&certificate.key, &certificate.key),
    )
    .expect_err("the key is no certificate");
    assert!(error.is_invalid_input(), "{error:?}");
    assert!(error.to_string().contains("key.pem"), "{error}");
    engine.shutdown().await;
    // Nodes sent to a name the certificate does not name would refuse it.
    let engine = Orchestrator::new(
        Config::new(data_dir.path()).advertise_url("https://daemon.example:8443"),
    )
    .expect("engine");
    let error = Server::new(
        engine.clone(),
        ServerConfig::default().tls(&certificate.cert, &certificate.key),
    )
    .expect_err("a name the certificate does not name");
    assert!(error.is_invalid_input(), "{error:?}");
    assert!(
        error.to_string().contains("would refuse the certificate"),
        "{error}"
    );
    engine.shutdown().await;
}

// ----- the real binaries -----

#[test]
fn taskflyd_with_tls_runs_taskfly_up_wait_with_the_ca_file() {
    let certificate = SelfSigned::new();
    let daemon = Daemon::start_with_args(
        DaemonOptions::default(),
        &[
            "--tls-cert",
            path_str(&certificate.cert),
            "--tls-key",
            path_str(&certificate.key),
        ],
    );
    assert!(daemon.url.starts_with("https://"), "{}", daemon.url);
    let project = hello_project(3, "rust");

    // Local nodes are `taskflyd agent` processes, told the https advertise URL (the default,
    // as none is given) and the daemon's certificate as their CA file.
    let ran = cli_run::run_with_limit(
        &mut daemon.taskfly(&[
            "--ca-file",
            path_str(&certificate.cert),
            "up",
            path_str(project.path()),
            "--wait",
            "--output",
            "json",
        ]),
        DEPLOYMENT_LIMIT,
    );
    ran.expect_success();
    let view = ran.json();
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["nodes_completed"], 3, "{view:#}");

    // The CA file may come from the environment too.
    let ran = cli_run::run(
        daemon
            .taskfly(&["list", "--output", "json"])
            .env("TASKFLY_CA_FILE", &certificate.cert),
    );
    ran.expect_success();
    assert_eq!(
        ran.json().as_array().map(Vec::len),
        Some(1),
        "{}",
        ran.show()
    );

    // Without it, the system's trust store refuses the certificate: exit 3, one line saying so.
    let ran = daemon.cli(&["list"]);
    ran.expect_code(3);
    let lines = ran.stderr_lines();
    assert_eq!(lines.len(), 1, "one line\n{}", ran.show());
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(lines[0].contains("certificate"), "{}", lines[0]);
    assert!(lines[0].contains("unknown issuer"), "{}", lines[0]);
    assert!(
        lines[0].contains("--ca-file"),
        "says what to do: {}",
        lines[0]
    );
    assert!(!lines[0].contains("start a daemon"), "{}", lines[0]);

    // A CA file that does not exist is a usage error naming it.
    let ran = daemon.cli(&["--ca-file", "/nonexistent/ca.pem", "list"]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("/nonexistent/ca.pem"), "{}", ran.show());

    let (status, stderr) = daemon.stop();
    assert!(status.success(), "{status:?}\n{}", stderr.join("\n"));
    let key = std::fs::read_to_string(&certificate.key).expect("key");
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !stderr.iter().any(|line| line.contains(&key_body[..32])),
        "the private key never reaches the log"
    );
}

#[test]
fn taskflyd_refuses_to_start_with_a_bad_key_or_a_certificate_nodes_would_refuse() {
    let certificate = SelfSigned::new();
    let home = tempfile::tempdir().expect("temp HOME");
    let data_dir = tempfile::tempdir().expect("temp data dir");
    let ran = cli_run::run(
        cli_run::command("taskflyd", home.path())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .args(["--tls-cert", path_str(&certificate.cert), "--tls-key"])
            .arg(&certificate.cert),
    );
    assert_ne!(ran.code(), 0, "{}", ran.show());
    assert!(ran.stderr.contains("no PEM private key"), "{}", ran.show());
    assert!(ran.stderr.contains("cert.pem"), "{}", ran.show());

    // A certificate its nodes would refuse for the advertise URL: said at start, not left to
    // every node's registration.
    let ran = cli_run::run(
        cli_run::command("taskflyd", home.path())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .args(["--advertise-url", "https://daemon.example:8443"])
            .args(["--tls-cert", path_str(&certificate.cert)])
            .args(["--tls-key", path_str(&certificate.key)]),
    );
    assert_ne!(ran.code(), 0, "{}", ran.show());
    assert!(
        ran.stderr.contains("would refuse the certificate") && ran.stderr.contains("cert.pem"),
        "{}",
        ran.show()
    );

    // Each flag needs the other.
    let ran = cli_run::run(
        cli_run::command("taskflyd", home.path())
            .args(["--data-dir"])
            .arg(data_dir.path())
            .args(["--tls-cert", path_str(&certificate.cert)]),
    );
    ran.expect_code(2);
    assert!(ran.stderr.contains("--tls-key"), "{}", ran.show());
}
