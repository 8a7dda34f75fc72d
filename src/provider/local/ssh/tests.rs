use std::sync::Arc;

use super::batch::Job as _;
use super::master::{self, Login, Masters, Via};
use super::*;

#[test]
fn home_is_expanded_in_key_paths_only_at_the_start() {
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    assert_eq!(expand_home("~/.ssh/id"), home.join(".ssh/id"));
    assert_eq!(expand_home("~"), home);
    assert_eq!(expand_home("/keys/~/id"), PathBuf::from("/keys/~/id"));
    assert_eq!(expand_home("~other/id"), PathBuf::from("~other/id"));
}

#[tokio::test]
async fn records_are_private_listed_as_owned_and_unknown_ids_need_no_host() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().expect("temp dir");
    let hosts = SshHosts::new(root.path());
    assert!(hosts.owned().await.expect("no records yet").is_empty());
    let record = Record {
        deployment_id: "dep-1".into(),
        node_id: "dep-1-0".into(),
        host: "10.0.0.5".into(),
        port: 22,
        user: "ops".into(),
        key_path: Some("/keys/id".into()),
    };
    hosts
        .write_record("ssh-dep-1-0-1", &record)
        .await
        .expect("written");
    let dir = root.path().join(RECORDS);
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ssh-dep-1-0-1.json")), 0o600);
    // A partial write left by a crash, and files that are no record, are not instances.
    std::fs::write(dir.join("ssh-dep-1-1-1.json.partial"), "{").expect("written");
    std::fs::write(dir.join("notes.txt"), "").expect("written");
    let owned = hosts.owned().await.expect("listed");
    assert_eq!(
        owned,
        vec![OwnedInstance {
            instance: InstanceRef {
                id: "ssh-dep-1-0-1".into(),
                locator: serde_json::to_string(&record).expect("json"),
            },
            owner: OwnedBy::Deployment {
                deployment_id: "dep-1".into(),
                node_id: Some("dep-1-0".into()),
            },
            state: InstanceState::Running,
        }]
    );
    // The locator is the record: it names where to reach the instance.
    let located: Record = serde_json::from_str(&owned[0].instance.locator).expect("a record");
    assert_eq!(located.target(), "ops@10.0.0.5:22");
    // Ids with no record and no locator (or that could name another file) are unknown:
    // nothing to reach.
    for unknown in ["ssh-dep-9-0-1", "ssh-../x", "local-dep-1-0-1"] {
        let unknown = InstanceRef {
            id: unknown.into(),
            locator: String::new(),
        };
        hosts
            .terminate(&unknown, Duration::from_secs(1))
            .await
            .expect("nothing to terminate");
    }
    // A locator that is no record is refused rather than guessed at.
    let garbled = InstanceRef {
        id: "ssh-dep-1-0-1".into(),
        locator: "ops@nowhere".into(),
    };
    assert!(hosts
        .terminate(&garbled, Duration::from_secs(1))
        .await
        .is_err());
    hosts.remove_record("ssh-dep-1-0-1").await;
    assert!(hosts.owned().await.expect("listed").is_empty());
}

#[test]
fn a_pool_slot_starts_on_the_first_host_and_its_record_names_no_deployment() {
    let local = crate::config::LocalConfig {
        hosts: vec!["h1".into(), "h2".into()],
        ssh_user: Some("ops".into()),
        ..crate::config::LocalConfig::default()
    };
    let node = Owner::Node {
        deployment_id: "dep".into(),
        node_id: "dep-1".into(),
        node_index: 1,
        attempt: 1,
    };
    assert_eq!(record_for(&local, &node).target(), "ops@h2:22");
    assert_eq!(
        instance_kind(&local, &node).as_str(),
        "ssh ops@h2:22 key default"
    );
    let slot = Owner::Pool {
        slot: "pool-abc".into(),
    };
    let record = record_for(&local, &slot);
    assert_eq!(
        (record.target().as_str(), record.deployment_id.as_str()),
        ("ops@h1:22", POOL_RECORD)
    );
}

#[test]
fn instance_ids_must_be_plain_words() {
    assert!(is_plain_word("ssh-dep-0a1b-3-1"));
    for bad in ["", "-x", ".x", "a/b", "a b", "a'b", "a$b", "a\nb"] {
        assert!(!is_plain_word(bad), "{bad:?}");
    }
}

#[test]
fn failures_name_the_host_and_what_ssh_said_and_only_connection_trouble_is_retried() {
    let record = Record {
        deployment_id: "dep".into(),
        node_id: "dep-0".into(),
        host: "10.0.0.5".into(),
        port: 2222,
        user: "ops".into(),
        key_path: None,
    };
    let output = |status, stderr: &str| Output {
        status,
        stdout: String::new(),
        stderr: stderr.to_owned(),
    };
    let denied = failure(
        &record,
        "start the node",
        &output(
            Some(255),
            "Warning: Permanently added '[10.0.0.5]:2222' (ED25519) to the list of known hosts.\n\
                 ops@10.0.0.5: Permission denied (publickey).\n",
        ),
    );
    let denied = denied
        .downcast_ref::<ProviderError>()
        .expect("a provider error");
    assert_eq!(
        denied.message,
        "cannot start the node on ops@10.0.0.5:2222 over ssh (exit status 255): \
             ops@10.0.0.5: Permission denied (publickey). (check instance_config.local.ssh_user \
             and ssh_key_path)"
    );
    assert!(!denied.retryable);
    let refused = failure(
        &record,
        "start the node",
        &output(
            Some(255),
            "ssh: connect to host 10.0.0.5 port 2222: Connection refused\n",
        ),
    );
    assert!(
        refused
            .downcast_ref::<ProviderError>()
            .expect("provider error")
            .retryable
    );
    let missing = failure(
            &record,
            "start the node",
            &output(Some(3), "curl is not installed on this host; the node bootstrap needs sh, curl, tar, gzip and setsid\n"),
        );
    let missing = missing
        .downcast_ref::<ProviderError>()
        .expect("a provider error");
    assert_eq!(missing.code, "SshHostFailed");
    assert!(missing.message.ends_with("curl is not installed on this host; the node bootstrap needs sh, curl, tar, gzip and setsid"));
    assert!(!missing.retryable);
}

fn login(user: &str, host: &str, port: u16, key: Option<&str>) -> Login {
    Login {
        user: user.into(),
        host: host.into(),
        port,
        key_path: key.map(PathBuf::from),
    }
}

#[test]
fn control_sockets_are_short_hashes_of_the_login_in_the_work_roots_folder() {
    let dir = Path::new("/var/lib/taskfly/work/cm");
    let ops = login("ops", "10.0.0.5", 22, Some("/keys/id"));
    let path = master::control_path(dir, &ops).expect("a short path");
    assert_eq!(path.parent(), Some(dir));
    let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
    assert_eq!(name.len(), 16, "{name}");
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
    assert_eq!(master::control_path(dir, &ops.clone()), Some(path.clone()));
    // Every part of the login has a master of its own: a key the host refuses never rides
    // on a connection another key opened.
    for other in [
        login("root", "10.0.0.5", 22, Some("/keys/id")),
        login("ops", "10.0.0.6", 22, Some("/keys/id")),
        login("ops", "10.0.0.5", 2222, Some("/keys/id")),
        login("ops", "10.0.0.5", 22, Some("/keys/other")),
        login("ops", "10.0.0.5", 22, None),
        login("ops1", "0.0.0.5", 22, Some("/keys/id")),
    ] {
        assert_ne!(
            master::control_path(dir, &other),
            Some(path.clone()),
            "{other:?}"
        );
    }
    // The longest work root that fits a socket's address with ssh's temporary suffix, and one
    // byte more; paths ssh's configuration would read as more than a path.
    let fitting = Path::new("/")
        .join("w".repeat(90 - 1 - 16 - 1 - 3))
        .join("cm");
    let fits = master::control_path(&fitting, &ops).expect("fits");
    assert_eq!(fits.as_os_str().len(), 90);
    let longer = Path::new("/").join("w".repeat(90 - 16 - 1 - 3)).join("cm");
    assert_eq!(master::control_path(&longer, &ops), None);
    for odd in ["/srv/my work/cm", "/srv/100%C/cm", "/srv/\"q\"/cm"] {
        assert_eq!(master::control_path(Path::new(odd), &ops), None, "{odd}");
    }
}

#[tokio::test]
async fn the_users_own_multiplexing_options_turn_the_masters_off() {
    for theirs in [
        "ControlPath=/tmp/cm-%C",
        "controlmaster auto",
        " ControlPersist=20",
    ] {
        assert!(master::user_multiplexes(&[theirs.to_owned()]), "{theirs}");
    }
    let others = [
        "UserKnownHostsFile=/etc/taskfly/known_hosts".to_owned(),
        "ProxyJump=bastion".to_owned(),
    ];
    assert!(!master::user_multiplexes(&others));
    let root = tempfile::tempdir().expect("temp dir");
    let theirs = ["ControlPath=/tmp/cm-%C".to_owned()];
    let masters = Masters::new(root.path(), &theirs);
    let ops = login("ops", "10.0.0.5", 22, None);
    let host = masters.host(&ops);
    // No master, no ssh run: every call connects as the user's options say.
    assert_eq!(
        masters.via(&host, &ops, &theirs).await.expect("direct"),
        Via::Direct
    );
    assert!(!root.path().join(master::FOLDER).exists());
}

#[tokio::test]
async fn each_login_has_its_own_cap_of_calls_at_once() {
    let root = tempfile::tempdir().expect("temp dir");
    let masters = Masters::new(root.path(), &[]);
    let first = login("ops", "10.0.0.5", 22, None);
    let host = masters.host(&first);
    assert!(Arc::ptr_eq(&host, &masters.host(&first.clone())));
    let held: Vec<_> = (0..master::SESSIONS_PER_HOST)
        .map(|_| host.sessions.try_acquire().expect("a free session"))
        .collect();
    assert!(
        masters.host(&first).sessions.try_acquire().is_err(),
        "one call more than the cap waits"
    );
    let second = masters.host(&login("ops", "10.0.0.6", 22, None));
    assert!(
        second.sessions.try_acquire().is_ok(),
        "another host is not held up"
    );
    drop(held);
    assert!(host.sessions.try_acquire().is_ok());
}

#[tokio::test]
async fn stopping_the_masters_removes_a_socket_left_by_a_killed_run_and_later_calls_go_direct() {
    let root = tempfile::tempdir().expect("temp dir");
    let masters = Masters::new(root.path(), &[]);
    let ops = login("ops", "10.0.0.5", 22, None);
    let dir = root.path().join(master::FOLDER);
    std::fs::create_dir(&dir).expect("mkdir cm");
    // A socket whose master was killed: nothing listens on it any more.
    let stale = master::control_path(&dir, &ops).expect("a short path");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    masters.stop_all().await;
    assert!(!dir.exists(), "the folder is removed with its last socket");
    let host = masters.host(&ops);
    assert_eq!(
        masters.via(&host, &ops, &[]).await.expect("direct"),
        Via::Direct
    );
}

fn launch(instance_id: &str, script: &str) -> batch::Launch {
    batch::Launch {
        instance_id: instance_id.into(),
        grace_ms: "5000".into(),
        script: script.into(),
    }
}

#[test]
fn a_batch_takes_its_own_start_first_then_the_oldest_and_a_dropped_start_leaves_the_queue() {
    let launches = batch::Queue::<batch::Launch>::default();
    let (first, _first_answer) = launches.enqueue(launch("ssh-a", ""));
    let (second, mut second_answer) = launches.enqueue(launch("ssh-b", ""));
    let (dropped, _) = launches.enqueue(launch("ssh-c", ""));
    drop(dropped);
    let queued: Vec<_> = (0..batch::MAX_BATCH + 3)
        .map(|i| launches.enqueue(launch(&format!("ssh-n{i}"), "")))
        .collect();

    let taken = second.take_batch().expect("its own start is still queued");
    let ids: Vec<&str> = taken.iter().map(|t| t.job.instance_id.as_str()).collect();
    let mut expected = vec!["ssh-b", "ssh-a"];
    let rest: Vec<String> = (0..batch::MAX_BATCH - 2)
        .map(|i| format!("ssh-n{i}"))
        .collect();
    expected.extend(rest.iter().map(String::as_str));
    assert_eq!(ids, expected, "own first, then the oldest, none dropped");
    // Taken by another: the first start waits for its answer, which the taker sends.
    assert!(first.take_batch().is_none());
    let rest = queued[batch::MAX_BATCH - 2].0.take_batch().expect("queued");
    assert_eq!(rest.len(), 5);
    drop(taken);
    assert!(
        matches!(
            second_answer.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ),
        "a batch dropped before it answered closes its starts' answers"
    );
}

#[test]
fn a_batch_result_per_node_comes_from_its_tagged_lines_and_a_missing_one_is_the_sessions() {
    let launches = [
        launch("ssh-a", ""),
        launch("ssh-b", ""),
        launch("ssh-c", ""),
    ];
    let session = Output {
        status: Some(255),
        stdout: "Welcome from .bashrc\n\
                 O ssh-a started 42\n\
                 R ssh-a 0\n\
                 O ssh-x started 7\n\
                 E ssh-b mkdir: cannot create directory: File exists\n\
                 E ssh-b \n\
                 R ssh-b 3\n"
            .into(),
        stderr: "Connection to 127.0.0.1 closed by remote host.\n".into(),
    };
    let outputs = batch::parse(&launches, &session);
    assert_eq!(outputs[0].status, Some(0));
    assert_eq!(outputs[0].stdout, "started 42\n");
    assert_eq!(outputs[0].stderr, "");
    assert_eq!(outputs[1].status, Some(3));
    assert_eq!(outputs[1].stdout, "");
    assert_eq!(
        outputs[1].stderr,
        "mkdir: cannot create directory: File exists\n\n"
    );
    // The session ended before the third node's turn: it gets the session's failure.
    assert_eq!(outputs[2].status, Some(255));
    assert_eq!(outputs[2].stderr, session.stderr);
    assert_eq!(outputs[2].stdout, "");
}

#[test]
fn a_batch_program_starts_each_node_with_its_exact_script_and_reports_a_failed_one_alone() {
    let missing: Vec<&str> = ["setsid", "curl", "tar", "gzip"]
        .into_iter()
        .filter(|tool| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("skipped: LAUNCH needs {missing:?}, not installed here");
        return;
    }
    let home = tempfile::tempdir().expect("temp dir");
    // The first would-be delimiter occurs in a script, as a line of its own.
    let tricky = "#!/bin/sh\ncat <<'TASKFLY_END_clash'\nit's $HOME `x`\nTASKFLY_END_clash\n";
    let no_newline = "#!/bin/sh\nexit 0";
    let launches = [
        launch("ssh-dep-0-1", tricky),
        launch("ssh-dep-1-1", "#!/bin/sh\nexit 0\n"),
        launch("ssh-dep-2-1", no_newline),
    ];
    // The second node's folder cannot be made: a file is in its way.
    let nodes = home.path().join(".taskfly/nodes");
    std::fs::create_dir_all(&nodes).expect("mkdir");
    std::fs::write(nodes.join("ssh-dep-1-1"), "in the way").expect("write");
    let mut words = ["TASKFLY_END_clash", "TASKFLY_END_fresh"].into_iter();
    let program = batch::Launch::program(&launches, || words.next().expect("a word").to_owned());
    assert_eq!(
        program
            .matches("2>\"$b/e\" <<'TASKFLY_END_fresh'\n")
            .count(),
        3,
        "{program}"
    );
    assert_eq!(program.matches("TASKFLY_END_clash").count(), 2, "{program}");

    let session = run_locally(&program, home.path());
    assert_eq!(session.status, Some(0), "{session:?}");
    let outputs = batch::parse(&launches, &session);

    let mut pids = Vec::new();
    for (index, output) in outputs.iter().enumerate() {
        if index == 1 {
            assert_eq!(output.status, Some(3), "{output:?}");
            assert_eq!(output.stdout, "", "{output:?}");
            assert!(output.stderr.contains("ssh-dep-1-1"), "{output:?}");
            continue;
        }
        assert_eq!(output.status, Some(0), "{output:?}");
        let pid = output
            .stdout
            .strip_prefix("started ")
            .and_then(|rest| rest.trim().parse::<i32>().ok())
            .unwrap_or_else(|| panic!("{output:?}"));
        pids.push(pid);
        assert_eq!(output.stderr, "", "{output:?}");
    }
    let written = |id: &str| {
        std::fs::read_to_string(nodes.join(id).join("bootstrap.sh")).expect("bootstrap.sh")
    };
    assert_eq!(written("ssh-dep-0-1"), tricky);
    assert_eq!(written("ssh-dep-2-1"), format!("{no_newline}\n"));
    // The batch's own folder is gone.
    let left: Vec<_> = std::fs::read_dir(home.path().join(".taskfly"))
        .expect("listed")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("nodes")]);
    // The bootstraps end by themselves at once; the folder goes after them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(pid);
        while nix::sys::signal::kill(pid, None).is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn a_batch_removes_the_folders_of_earlier_batches_whose_shell_is_gone() {
    let home = tempfile::tempdir().expect("temp dir");
    let taskfly = home.path().join(".taskfly");
    // A shell that was killed outright left its folder; its pid is no longer running.
    let mut ended = std::process::Command::new("true").spawn().expect("true");
    let gone_pid = ended.id();
    ended.wait().expect("true ended");
    let gone = taskfly.join(format!("batch-{gone_pid}"));
    std::fs::create_dir_all(&gone).expect("mkdir");
    std::fs::write(gone.join("0.o"), "output of a node").expect("write");
    // A batch under way in another session (its shell: this test's process) keeps its own.
    let live = taskfly.join(format!("batch-{}", std::process::id()));
    std::fs::create_dir_all(&live).expect("mkdir");

    let stops = [batch::Stop {
        instance_id: "ssh-dep-0-1".into(),
        node_id: "dep-0".into(),
        tenths: "10".into(),
    }];
    let program = batch::Stop::program(&stops, || unreachable!("stops have no here-document"));
    let session = run_locally(&program, home.path());
    assert_eq!(session.status, Some(0), "{session:?}");
    assert!(!gone.exists(), "the dead session's folder is removed");
    assert!(live.exists(), "the live session's folder is kept");
}

/// Runs a batch `program` locally as `sh -s` would on a host, with `home` as `$HOME`.
fn run_locally(program: &str, home: &Path) -> Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sh")
        .arg("-s")
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(program.as_bytes())
        .expect("program");
    Output::from(child.wait_with_output().expect("sh ran"))
}

#[test]
fn a_batch_of_stops_stops_each_nodes_group_and_removes_each_folder() {
    let home = tempfile::tempdir().expect("temp dir");
    let nodes = home.path().join(".taskfly/nodes");
    // A node whose bootstrap runs in a process group of its own, as LAUNCH starts it.
    let mut running = std::process::Command::new("setsid")
        .args(["sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .expect("setsid sleep");
    let running_dir = nodes.join("ssh-dep-0-1");
    std::fs::create_dir_all(&running_dir).expect("mkdir");
    std::fs::write(running_dir.join("pid"), running.id().to_string()).expect("pid");
    // One that ended, and one never started (no folder).
    std::fs::create_dir_all(nodes.join("ssh-dep-1-1")).expect("mkdir");
    let stop = |instance_id: &str, node_id: &str| batch::Stop {
        instance_id: instance_id.into(),
        node_id: node_id.into(),
        // The sleep, a child of this test until it is waited for, counts as alive until then.
        tenths: "10".into(),
    };
    let stops = [
        stop("ssh-dep-0-1", "dep-0"),
        stop("ssh-dep-1-1", "dep-1"),
        stop("ssh-dep-2-1", "dep-2"),
    ];
    let program = batch::Stop::program(&stops, || unreachable!("stops have no here-document"));
    let session = run_locally(&program, home.path());
    assert_eq!(session.status, Some(0), "{session:?}");
    for output in batch::parse(&stops, &session) {
        assert_eq!(output.status, Some(0), "{output:?}");
        assert_eq!(output.stdout, "terminated\n", "{output:?}");
    }
    let status = running.wait().expect("the sleep ended");
    assert!(!status.success(), "stopped by a signal: {status:?}");
    let left: Vec<_> = std::fs::read_dir(&nodes)
        .expect("listed")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!home
        .path()
        .join(".taskfly")
        .read_dir()
        .expect("listed")
        .any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with("batch-")));
}
