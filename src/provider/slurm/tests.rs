//! The provider against fake Slurm commands (shell scripts in a temporary `bin_dir`) that log
//! their arguments: how requests are gathered into arrays, what sbatch is given, and how its
//! refusals come back. The real Slurm is in tests/it/slurm.rs.

use std::os::unix::fs::PermissionsExt as _;

use super::*;
use crate::secret::Secret;

const TOKEN: &str = "00112233445566778899aabbccddeeff";

/// A temporary folder with fake `sbatch`, `squeue` and `scancel`: sbatch logs its arguments
/// (one call a line), its environment and its standard input, and answers job id 4242 (or fails with
/// `sbatch_error` when set); squeue lists `queue` (a file the test writes); scancel logs.
struct FakeSlurm {
    dir: tempfile::TempDir,
}

impl FakeSlurm {
    fn new(sbatch_error: Option<&str>) -> FakeSlurm {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        let sbatch = match sbatch_error {
            None => format!(
                "#!/bin/sh\necho \"$*\" >>'{0}/sbatch.calls'\nenv >'{0}/sbatch.env'\ncat >'{0}/sbatch.stdin'\necho 4242\n",
                dir.path().display()
            ),
            Some(error) => format!("#!/bin/sh\ncat >/dev/null\necho '{error}' >&2\nexit 1\n"),
        };
        let squeue = format!(
            "#!/bin/sh\necho \"$*\" >>'{0}/squeue.calls'\ncat '{0}/queue' 2>/dev/null\nexit 0\n",
            dir.path().display()
        );
        let scancel = format!(
            "#!/bin/sh\necho \"$*\" >>'{0}/scancel.calls'\n",
            dir.path().display()
        );
        for (name, text) in [("sbatch", sbatch), ("squeue", squeue), ("scancel", scancel)] {
            let path = bin.join(name);
            std::fs::write(&path, text).expect("fake command");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("executable");
        }
        FakeSlurm { dir }
    }

    fn provider(&self) -> SlurmProvider {
        SlurmProvider::new(self.dir.path().join("work"))
            .owner("daemon-1")
            .gather_window(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(20))
    }

    fn settings(&self, extra: &str) -> ProviderSettings {
        let yaml = format!(
            "bin_dir: {}\npartition: debug\ntime_limit: '10'\n{extra}",
            self.dir.path().join("bin").display()
        );
        ProviderSettings::new("slurm", serde_yaml::from_str(&yaml).expect("settings"))
    }

    fn calls(&self, program: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(format!("{program}.calls")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn spec(settings: &ProviderSettings, index: u32, attempt: u32) -> InstanceSpec {
    InstanceSpec::new(
        Owner::Node {
            deployment_id: "dep".into(),
            node_id: format!("dep-{index}"),
            node_index: index,
            attempt,
        },
        InstanceKind::new("slurm"),
        "http://10.0.0.1:8080",
        Secret::new(TOKEN),
        settings.clone(),
    )
}

#[tokio::test]
async fn a_deployments_nodes_become_one_array_and_a_retry_is_submitted_alone() {
    let slurm = FakeSlurm::new(None);
    let provider = slurm.provider();
    let settings = slurm.settings("max_parallel: 3\nextra_args: ['--nodes=1']\n");
    let provisions = (0..5).map(|index| provider.provision(spec(&settings, index, 1)));
    let instances = futures_util::future::join_all(provisions).await;
    let ids: Vec<String> = instances
        .into_iter()
        .map(|instance| instance.expect("provisioned").reference.id)
        .collect();
    assert_eq!(ids, ["4242_0", "4242_1", "4242_2", "4242_3", "4242_4"]);
    let calls = slurm.calls("sbatch");
    assert_eq!(
        calls.len(),
        1,
        "one sbatch for the whole deployment: {calls:?}"
    );
    let args: Vec<&str> = calls[0].split(' ').collect();
    assert!(args.contains(&"--array=0-4%3"), "{args:?}");
    assert!(args.contains(&"--partition=debug"), "{args:?}");
    assert!(args.contains(&"--time=10"), "{args:?}");
    assert!(args.contains(&"--nodes=1"), "{args:?}");
    assert!(args.contains(&"--job-name=taskfly-dep"), "{args:?}");
    // The job gets sbatch's environment, which holds nothing of the daemon's but the basics.
    assert!(args.contains(&"--export=ALL"), "{args:?}");
    let env = std::fs::read_to_string(slurm.dir.path().join("sbatch.env")).expect("env");
    for line in env.lines().filter(|line| line.contains('=')) {
        let name = line.split('=').next().unwrap_or_default();
        // The shell running the fake sbatch sets a few of its own.
        let shells_own = ["PWD", "OLDPWD", "SHLVL", "_"].contains(&name);
        assert!(
            shells_own || commands::passes(commands::Environment::Job, name),
            "sbatch ran with {name}: {env}"
        );
    }
    assert!(
        args.iter()
            .any(|a| a.starts_with("--comment=taskfly:owner=daemon-1;deployment=dep;batch=dep-")),
        "{args:?}"
    );
    // The script sbatch reads holds no token; each task's bootstrap does, in a private file.
    let script = std::fs::read_to_string(slurm.dir.path().join("sbatch.stdin")).expect("script");
    assert!(script.starts_with("#!/bin/sh\n"));
    assert!(!script.contains(TOKEN));
    assert!(!calls[0].contains(TOKEN));
    let batch = std::fs::read_dir(slurm.dir.path().join("work"))
        .expect("work dir")
        .next()
        .expect("a batch folder")
        .expect("entry")
        .path();
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&batch), 0o700);
    assert_eq!(mode(&batch.join("3.sh")), 0o600);
    assert!(std::fs::read_to_string(batch.join("3.sh"))
        .expect("bootstrap")
        .contains(TOKEN));

    let retried = provider
        .provision(spec(&settings, 3, 2))
        .await
        .expect("retried");
    assert_eq!(retried.reference.id, "4242_3");
    let calls = slurm.calls("sbatch");
    assert_eq!(calls.len(), 2);
    assert!(calls[1].contains("--array=3 "), "{}", calls[1]);
    assert!(calls[1].contains(";node=dep-3"), "{}", calls[1]);

    provider
        .terminate(&retried.reference)
        .await
        .expect("terminated");
    assert_eq!(slurm.calls("scancel"), ["4242_3"]);
}

#[tokio::test]
async fn sbatchs_refusal_fails_every_node_with_its_message() {
    let slurm = FakeSlurm::new(Some(
        "sbatch: error: Batch job submission failed: Invalid partition name specified",
    ));
    let provider = slurm.provider();
    let settings = slurm.settings("");
    let (a, b) = tokio::join!(
        provider.provision(spec(&settings, 0, 1)),
        provider.provision(spec(&settings, 1, 1))
    );
    for result in [a, b] {
        let error = result.expect_err("refused");
        let error = error
            .downcast_ref::<ProviderError>()
            .expect("a provider error");
        assert!(!error.retryable);
        assert!(
            error.message.contains("Invalid partition name specified"),
            "{error}"
        );
    }
    // Nothing is left of the submission.
    let left = std::fs::read_dir(slurm.dir.path().join("work")).map_or(0, Iterator::count);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_pending_task_shows_slurms_reason_until_it_starts() {
    let slurm = FakeSlurm::new(None);
    let provider = Arc::new(slurm.provider());
    let settings = slurm.settings("");
    let queue = slurm.dir.path().join("queue");
    std::fs::write(
        &queue,
        "4242|0|PENDING|Resources|taskfly:owner=daemon-1;deployment=dep;batch=x\n",
    )
    .expect("queue");
    let waiting = {
        let provider = provider.clone();
        let spec = spec(&settings, 0, 1);
        tokio::spawn(async move { provider.provision(spec).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while provider.queue_reason("dep-0").is_none() {
        assert!(Instant::now() < deadline, "no queue reason shown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(provider.queue_reason("dep-0").as_deref(), Some("Resources"));
    assert!(!waiting.is_finished());
    std::fs::write(
        &queue,
        "4242|0|RUNNING|None|taskfly:owner=daemon-1;deployment=dep;batch=x\n",
    )
    .expect("queue");
    let instance = waiting.await.expect("joined").expect("provisioned");
    assert_eq!(instance.reference.id, "4242_0");
    assert_eq!(provider.queue_reason("dep-0"), None);
}

#[tokio::test]
async fn the_queue_timeout_cancels_a_task_that_never_starts() {
    let slurm = FakeSlurm::new(None);
    let provider = slurm.provider();
    let settings = slurm.settings("queue_timeout: 1s\n");
    std::fs::write(
        slurm.dir.path().join("queue"),
        "4242|0|PENDING|Priority|taskfly:owner=daemon-1;deployment=dep;batch=x\n",
    )
    .expect("queue");
    let error = provider
        .provision(spec(&settings, 0, 1))
        .await
        .expect_err("timed out");
    let error = error
        .downcast_ref::<ProviderError>()
        .expect("a provider error");
    assert_eq!(error.code, "SlurmQueueTimeout");
    assert!(error.message.contains("Priority"), "{error}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while slurm.calls("scancel").is_empty() {
        assert!(Instant::now() < deadline, "the task was not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slurm.calls("scancel"), ["4242_0"]);
}

#[tokio::test]
async fn owned_instances_are_this_owners_tasks_with_their_nodes() {
    let slurm = FakeSlurm::new(None);
    let provider = slurm.provider().bin_dir(slurm.dir.path().join("bin"));
    let batch = slurm.dir.path().join("work").join("dep-1-0");
    std::fs::create_dir_all(&batch).expect("batch folder");
    std::fs::write(batch.join("nodes"), "0 dep-0\n1 dep-1\n").expect("nodes");
    std::fs::write(
        slurm.dir.path().join("queue"),
        "7|0|RUNNING|None|taskfly:owner=daemon-1;deployment=dep;batch=dep-1-0\n\
         7|1|PENDING|Priority|taskfly:owner=daemon-1;deployment=dep;batch=dep-1-0\n\
         8|2|RUNNING|None|taskfly:owner=daemon-1;deployment=dep;batch=dep-2-0;node=dep-2\n\
         9|0|RUNNING|None|taskfly:owner=other;deployment=dep;batch=b\n\
         10|0|RUNNING|None|not ours\n",
    )
    .expect("queue");
    let owned = provider.owned_instances().await.expect("listed");
    let summary: Vec<(String, OwnedBy, InstanceState)> = owned
        .into_iter()
        .map(|o| (o.instance.id, o.owner, o.state))
        .collect();
    let by = |node: &str| OwnedBy::Deployment {
        deployment_id: "dep".into(),
        node_id: Some(node.into()),
    };
    assert_eq!(
        summary,
        [
            ("7_0".to_owned(), by("dep-0"), InstanceState::Running),
            ("7_1".to_owned(), by("dep-1"), InstanceState::Pending),
            ("8_2".to_owned(), by("dep-2"), InstanceState::Running),
        ]
    );
}

#[tokio::test]
async fn a_task_slurm_will_never_start_fails_at_once_with_slurms_reason() {
    let slurm = FakeSlurm::new(None);
    let provider = slurm.provider();
    let settings = slurm.settings("");
    std::fs::write(
        slurm.dir.path().join("queue"),
        "4242|0|PENDING|PartitionTimeLimit|taskfly:owner=daemon-1;deployment=dep;batch=x\n",
    )
    .expect("queue");
    let error = provider
        .provision(spec(&settings, 0, 1))
        .await
        .expect_err("refused");
    let error = error
        .downcast_ref::<ProviderError>()
        .expect("a provider error");
    assert_eq!(error.code, "SlurmWillNotStart");
    assert!(!error.retryable);
    assert!(
        error.message.contains("PartitionTimeLimit")
            && error.message.contains("instance_config.slurm.time_limit"),
        "{error}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while slurm.calls("scancel").is_empty() {
        assert!(Instant::now() < deadline, "the task was not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_controller_down_while_a_task_waits_is_asked_again_not_given_up() {
    let slurm = FakeSlurm::new(None);
    // squeue fails its first three calls as it does while slurmctld is down.
    let count = slurm.dir.path().join("squeue.count");
    let squeue = format!(
        "#!/bin/sh\nn=$(($(cat '{0}' 2>/dev/null || echo 0) + 1))\necho $n >'{0}'\n\
         if [ $n -le 3 ]; then\n  echo 'squeue: error: Unable to contact slurm controller (connect failure)' >&2\n  exit 1\nfi\n\
         echo '4242|0|RUNNING|None|taskfly:owner=daemon-1;deployment=dep;batch=x'\n",
        count.display()
    );
    std::fs::write(slurm.dir.path().join("bin").join("squeue"), squeue).expect("fake squeue");
    let provider = slurm.provider();
    let settings = slurm.settings("");
    let instance = provider
        .provision(spec(&settings, 0, 1))
        .await
        .expect("provisioned once the controller answered");
    assert_eq!(instance.reference.id, "4242_0");
    let calls: u32 = std::fs::read_to_string(&count)
        .expect("squeue calls")
        .trim()
        .parse()
        .expect("a count");
    assert!(calls > 3, "squeue was asked {calls} times");
    assert_eq!(
        slurm.calls("sbatch").len(),
        1,
        "the task was not submitted again"
    );
    assert!(
        slurm.calls("scancel").is_empty(),
        "the task was not cancelled: {:?}",
        slurm.calls("scancel")
    );
}
