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
