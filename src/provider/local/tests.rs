use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use tokio::time::Instant;

use super::*;
use crate::agent::tests::{bundle, fake_daemon, registration, Daemon};
use crate::provider::InstanceState;
use crate::secret::Secret;

fn instance(daemon_url: &str) -> InstanceSpec {
    instance_attempt(daemon_url, 1)
}

fn instance_attempt(daemon_url: &str, attempt: u32) -> InstanceSpec {
    InstanceSpec {
        owner: Owner::Node {
            deployment_id: "dep".into(),
            node_id: "dep-1".into(),
            node_index: 1,
            attempt,
        },
        kind: InstanceKind::new("local rust"),
        daemon_url: daemon_url.into(),
        ca_pem: None,
        provision_token: Secret::new("provision"),
        settings: ProviderSettings::new("local", serde_yaml::Value::Null),
    }
}

/// The instance `local-dep-1-<attempt>` as the provider named it.
fn reference(attempt: u32) -> InstanceRef {
    InstanceRef {
        id: format!("local-dep-1-{attempt}"),
        locator: "dep-1".into(),
    }
}

/// How the provider tracks the instance: `None` once it forgot it.
fn tracked_state(provider: &LocalProvider, instance_id: &str) -> Option<InstanceState> {
    provider.agents().get(instance_id).map(|agent| {
        if agent.finished.is_cancelled() {
            InstanceState::Terminated
        } else {
            InstanceState::Running
        }
    })
}

/// Polls `condition` every 20 ms for up to 20 s: for what no event tells, like a process
/// group's last member being reaped by init.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn terminate_stops_the_agent_and_its_script() {
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("echo $$ > ../script.pid\necho up\nsleep 100\n"),
        registration: Some(registration(&[])),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let root = tempfile::tempdir().expect("tempdir");
    let provider =
        LocalProvider::new(root.path().to_path_buf()).grace_period(Duration::from_millis(200));

    let info = provider
        .provision(instance(&url))
        .await
        .expect("provisioned");
    assert_eq!(info.reference, reference(1));
    assert_eq!(info.ip_address.as_deref(), Some("127.0.0.1"));
    Daemon::wait_until(&daemon, "the script runs", |d| {
        d.lines.iter().any(|l| l.line == "up")
    })
    .await;
    assert_eq!(
        tracked_state(&provider, "local-dep-1-1"),
        Some(InstanceState::Running)
    );
    let work_dir = root.path().join("dep").join("1-1");
    let pid: i32 = std::fs::read_to_string(work_dir.join("script.pid"))
        .expect("the script ran in the node's work directory")
        .trim()
        .parse()
        .expect("a pid");

    provider.terminate(&reference(1)).await.expect("terminated");
    assert_eq!(tracked_state(&provider, "local-dep-1-1"), None);
    // The script's group is gone (zombie orphans wait for init, hence the polling).
    eventually("the script's process group is gone", || {
        killpg(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
    })
    .await;
    let statuses: Vec<String> = daemon
        .lock()
        .expect("lock")
        .statuses
        .iter()
        .map(|s| s.status.as_str().to_owned())
        .collect();
    assert_eq!(statuses, ["downloading_assets", "running_script"]);
    provider.terminate(&reference(1)).await.expect("idempotent");
    provider.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_finished_node_is_described_as_terminated_and_shutdown_waits_for_all() {
    let daemon = Arc::new(Mutex::new(Daemon {
        bundle: bundle("echo done\n"),
        registration: Some(registration(&[])),
        ..Daemon::default()
    }));
    let (url, server) = fake_daemon(daemon.clone()).await;
    let root = tempfile::tempdir().expect("tempdir");
    let provider = LocalProvider::new(root.path().to_path_buf());

    provider
        .provision(instance(&url))
        .await
        .expect("provisioned");
    let finished = provider
        .agents()
        .get("local-dep-1-1")
        .map(|agent| agent.finished.clone())
        .expect("the agent is tracked");
    tokio::time::timeout(Duration::from_secs(20), finished.cancelled())
        .await
        .expect("the first node finishes");
    assert_eq!(
        tracked_state(&provider, "local-dep-1-1"),
        Some(InstanceState::Terminated)
    );
    assert!(daemon
        .lock()
        .expect("lock")
        .statuses
        .iter()
        .any(|s| s.status == crate::state::model::NodeStatus::Completed));

    let second = instance_attempt(&url, 2);
    daemon.lock().expect("lock").bundle = bundle("echo sleeping\nsleep 100\n");
    let id = provider
        .provision(second)
        .await
        .expect("provisioned")
        .reference;
    assert_eq!(id, reference(2));
    Daemon::wait_until(&daemon, "the second script runs", |d| {
        d.lines.iter().any(|l| l.line == "sleeping")
    })
    .await;

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), provider.shutdown())
        .await
        .expect("shutdown ends: the sleeping node is stopped");
    assert!(started.elapsed() < Duration::from_secs(25));
    let error = provider
        .provision(instance(&url))
        .await
        .expect_err("shut down");
    assert!(error.to_string().contains("shutting down"), "{error}");
    server.abort();
}

#[test]
fn deployment_ids_must_be_plain_names() {
    assert!(is_plain_name("dep-20240101-abc"));
    for bad in ["", ".", "..", "a/b", "../x", "a\\b"] {
        assert!(!is_plain_name(bad), "{bad}");
    }
}

#[tokio::test]
async fn unknown_instances_are_fine_to_terminate() {
    let root = tempfile::tempdir().expect("tempdir");
    let provider = LocalProvider::new(root.path().to_path_buf());
    let unknown = InstanceRef {
        id: "local-nope-1".into(),
        locator: "nope".into(),
    };
    provider.terminate(&unknown).await.expect("idempotent");
    assert_eq!(tracked_state(&provider, "local-nope-1"), None);
    provider.shutdown().await;
}
