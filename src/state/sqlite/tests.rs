use super::*;
use crate::state::conformance;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn deployment(id: &str, total_nodes: u32) -> Deployment {
    Deployment {
        id: id.to_owned(),
        status: DeploymentStatus::Pending,
        cloud_provider: "local".to_owned(),
        total_nodes,
        retries: 0,
        nodes_completed: 0,
        nodes_failed: 0,
        nodes_terminated: 0,
        created_at: at(0),
        updated_at: at(0),
        completed_at: None,
        error_message: None,
        rerun_of: None,
        cleaned_at: None,
    }
}

fn nodes(id: &str, count: u32) -> Vec<Node> {
    (0..count).map(|i| Node::new(id, i, at(0))).collect()
}

fn status(status: NodeStatus) -> NodeUpdate {
    NodeUpdate::Status {
        status,
        exit_code: None,
        message: None,
    }
}

/// The node's `last_update` as its row holds it, without the heartbeat overlay.
async fn stored_last_update(store: &SqliteStore, node_id: &str) -> SystemTime {
    let node_id = node_id.to_owned();
    let ms: i64 = store
        .run(move |_, conn| {
            Ok(conn.query_row(
                "SELECT last_update FROM nodes WHERE id = ?1",
                [node_id],
                |row| row.get(0),
            )?)
        })
        .await
        .unwrap();
    from_ms(ms).unwrap()
}

#[tokio::test]
async fn in_memory_database_conforms() {
    conformance::check_store(&SqliteStore::open_in_memory().unwrap()).await;
    let capped = SqliteStore::open_in_memory()
        .unwrap()
        .max_log_lines(conformance::LOG_CAP)
        .max_log_lines_per_node(conformance::NODE_LOG_CAP);
    conformance::check_log_cap(&capped).await;
}

#[tokio::test]
async fn file_database_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::check_store(&SqliteStore::open(&dir.path().join("a.db")).unwrap()).await;
    let capped = SqliteStore::open(&dir.path().join("b.db"))
        .unwrap()
        .max_log_lines(conformance::LOG_CAP)
        .max_log_lines_per_node(conformance::NODE_LOG_CAP);
    conformance::check_log_cap(&capped).await;
}

#[tokio::test]
async fn everything_survives_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("taskfly.db");
    let (deployments_before, nodes_before, logs_before) = {
        let store = SqliteStore::open(&path).unwrap();
        conformance::check_store(&store).await;
        store
            .create_deployment(deployment("dep-keep", 3), nodes("dep-keep", 3))
            .await
            .unwrap();
        store
            .update_deployment_status("dep-keep", DeploymentStatus::Provisioning, None, at(1))
            .await
            .unwrap();
        let update = NodeUpdate::ProvisionToken { hash: [7; 32] };
        store
            .update_node("dep-keep-0", update, at(2))
            .await
            .unwrap();
        for update in [
            status(NodeStatus::Provisioning),
            NodeUpdate::Provisioned {
                instance: crate::provider::InstanceRef {
                    id: "pid-1".to_owned(),
                    locator: String::new(),
                },
                ip_address: Some("127.0.0.1".to_owned()),
                attempt: 1,
            },
            NodeUpdate::Registered {
                auth_token_hash: [8; 32],
            },
        ] {
            store
                .update_node("dep-keep-0", update, at(3))
                .await
                .unwrap();
        }
        for update in [
            status(NodeStatus::Provisioning),
            status(NodeStatus::RunningScript),
            NodeUpdate::Status {
                status: NodeStatus::Failed,
                exit_code: Some(3),
                message: Some("exit code 3".to_owned()),
            },
        ] {
            store
                .update_node("dep-keep-1", update, at(4))
                .await
                .unwrap();
        }
        // A heartbeat newer than the row, which only the drop saves.
        store.touch_node("dep-keep-0", at(5)).await.unwrap();
        assert_eq!(stored_last_update(&store, "dep-keep-0").await, at(3));
        let lines = (0..5)
            .map(|i| NewLogLine {
                node_id: "dep-keep-0".to_owned(),
                node_index: 0,
                stream: LogStream::Stdout,
                line: format!("line {i}"),
                timestamp: at(6) + Duration::from_millis(i),
                attempt: 1,
                line_no: Some(i),
            })
            .collect();
        assert_eq!(store.append_logs("dep-keep", lines).await.unwrap(), 5);
        let all = LogQuery {
            limit: 100,
            ..LogQuery::default()
        };
        (
            store.deployments().await.unwrap(),
            store.nodes("dep-keep").await.unwrap(),
            store.logs("dep-keep", all).await.unwrap(),
        )
    };

    let store = SqliteStore::open(&path).unwrap().max_log_lines(3);
    assert_eq!(store.deployments().await.unwrap(), deployments_before);
    let nodes_after = store.nodes("dep-keep").await.unwrap();
    assert_eq!(nodes_after, nodes_before);
    assert_eq!(
        nodes_after[0].last_update,
        at(5),
        "the drop saved the heartbeat"
    );
    assert_eq!(nodes_after[0].auth_token_hash, Some([8; 32]));
    assert_eq!(nodes_after[0].provision_token_hash, None);
    assert_eq!(nodes_after[1].status, NodeStatus::Failed);
    assert_eq!(nodes_after[1].exit_code, Some(3));
    let keep = store.deployment("dep-keep").await.unwrap().unwrap();
    assert_eq!(
        (keep.status, keep.nodes_failed, keep.nodes_completed),
        (DeploymentStatus::Running, 1, 0)
    );
    let found = store.node_by_auth_token(&[8; 32]).await.unwrap().unwrap();
    assert_eq!(found.id, "dep-keep-0");
    let all = LogQuery {
        limit: 100,
        ..LogQuery::default()
    };
    let logs_after = store.logs("dep-keep", all.clone()).await.unwrap();
    assert_eq!(logs_after, logs_before);
    assert_eq!(
        logs_after.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // The sequence carries on where it stopped, and the smaller caps now in force drop
    // the oldest lines (2 per node: the newest dropped one says so, then the new line).
    let line = NewLogLine {
        node_id: "dep-keep-0".to_owned(),
        node_index: 0,
        stream: LogStream::Stderr,
        line: "after".to_owned(),
        timestamp: at(7),
        attempt: 1,
        line_no: Some(5),
    };
    assert_eq!(store.append_logs("dep-keep", vec![line]).await.unwrap(), 6);
    let seqs: Vec<u64> = store
        .logs("dep-keep", all)
        .await
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(seqs, [5, 6]);
}

#[tokio::test]
async fn heartbeats_write_only_when_a_minute_behind() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .create_deployment(deployment("dep-hb", 1), nodes("dep-hb", 1))
        .await
        .unwrap();
    store
        .update_node("dep-hb-0", status(NodeStatus::Provisioning), at(10))
        .await
        .unwrap();
    for secs in [20, 40, 70] {
        store.touch_node("dep-hb-0", at(secs)).await.unwrap();
        let node = store.node("dep-hb-0").await.unwrap().unwrap();
        assert_eq!(node.last_update, at(secs));
        assert_eq!(stored_last_update(&store, "dep-hb-0").await, at(10));
    }
    store.touch_node("dep-hb-0", at(71)).await.unwrap();
    assert_eq!(
        stored_last_update(&store, "dep-hb-0").await,
        at(71),
        "61 s behind: saved"
    );
    store.touch_node("dep-hb-0", at(80)).await.unwrap();
    assert_eq!(stored_last_update(&store, "dep-hb-0").await, at(71));
    // A node update writes the row, which then holds the update's time.
    store
        .update_node("dep-hb-0", status(NodeStatus::Booting), at(90))
        .await
        .unwrap();
    assert_eq!(stored_last_update(&store, "dep-hb-0").await, at(90));
    store.touch_node("dep-hb-0", at(95)).await.unwrap();
    assert_eq!(store.nodes("dep-hb").await.unwrap()[0].last_update, at(95));
    // A final node keeps its time, whatever heartbeat arrives late.
    store
        .update_node("dep-hb-0", status(NodeStatus::Failed), at(100))
        .await
        .unwrap();
    store.touch_node("dep-hb-0", at(500)).await.unwrap();
    assert_eq!(
        store.node("dep-hb-0").await.unwrap().unwrap().last_update,
        at(100)
    );
    assert_eq!(stored_last_update(&store, "dep-hb-0").await, at(100));
    // Deleting the deployment forgets its heartbeats.
    assert!(store.delete_deployment("dep-hb").await.unwrap());
    assert!(store.shared.memory().heartbeats.is_empty());
}

/// [`Store::heartbeat`] keeps [`Store::touch_node`]'s rule (the row written only when a
/// minute behind), also for a node not yet held in memory (a reopened file).
#[tokio::test]
async fn heartbeats_by_token_write_only_when_a_minute_behind() {
    use crate::state::Heartbeat as Beat;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hb.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .create_deployment(deployment("dep-tk", 1), nodes("dep-tk", 1))
        .await
        .unwrap();
    let provisioned = NodeUpdate::Provisioned {
        instance: crate::provider::InstanceRef {
            id: "i-0".to_owned(),
            locator: "here".to_owned(),
        },
        ip_address: None,
        attempt: 1,
    };
    for update in [
        NodeUpdate::ProvisionToken { hash: [1; 32] },
        status(NodeStatus::Provisioning),
        provisioned,
        NodeUpdate::Registered {
            auth_token_hash: [2; 32],
        },
    ] {
        store.update_node("dep-tk-0", update, at(10)).await.unwrap();
    }
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let live = Beat::Live {
        deployment_id: "dep-tk".into(),
        node_index: 0,
    };
    for secs in [20, 40, 70] {
        assert_eq!(store.heartbeat(&[2; 32], at(secs)).await.unwrap(), live);
        let node = store.node("dep-tk-0").await.unwrap().unwrap();
        assert_eq!(node.last_update, at(secs));
        assert_eq!(stored_last_update(&store, "dep-tk-0").await, at(10));
    }
    assert_eq!(store.heartbeat(&[2; 32], at(71)).await.unwrap(), live);
    assert_eq!(
        stored_last_update(&store, "dep-tk-0").await,
        at(71),
        "61 s behind: saved"
    );
    assert_eq!(store.heartbeat(&[2; 32], at(80)).await.unwrap(), live);
    assert_eq!(stored_last_update(&store, "dep-tk-0").await, at(71));
    assert_eq!(
        store.heartbeat(&[3; 32], at(81)).await.unwrap(),
        Beat::UnknownToken
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_keep_the_counters_exact() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let total = 40;
    store
        .create_deployment(deployment("dep-many", total), nodes("dep-many", total))
        .await
        .unwrap();
    store
        .update_deployment_status("dep-many", DeploymentStatus::Provisioning, None, at(1))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let id = format!("dep-many-{index}");
            let last = if index % 10 == 0 {
                NodeStatus::Failed
            } else {
                NodeStatus::Completed
            };
            for update in [
                status(NodeStatus::Provisioning),
                NodeUpdate::Provisioned {
                    instance: crate::provider::InstanceRef {
                        id: format!("i-{index}"),
                        locator: String::new(),
                    },
                    ip_address: None,
                    attempt: 1,
                },
                status(NodeStatus::RunningScript),
                status(last),
            ] {
                store.update_node(&id, update, at(2)).await.unwrap();
                store.touch_node(&id, at(3)).await.unwrap();
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let done = store.deployment("dep-many").await.unwrap().unwrap();
    assert_eq!((done.nodes_completed, done.nodes_failed), (36, 4));
    assert_eq!(done.status, DeploymentStatus::Failed);
    assert_eq!(done.completed_at, Some(at(2)));
}

#[tokio::test]
async fn the_file_is_private_and_its_directory_created() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("state.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .create_deployment(deployment("dep-mode", 1), nodes("dep-mode", 1))
        .await
        .unwrap();
    for file in [path.clone(), path.with_extension("db-wal")] {
        let mode = fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
    drop(store);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let _store = SqliteStore::open(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "reopening tightens the mode");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let error = SqliteStore::open(&path).unwrap_err();
    assert!(error.is_store(), "{error}");
    assert!(
        error.report().to_string().contains("newer taskfly"),
        "{error:?}"
    );
}

/// A database written by taskfly 0.1 (schema 1, no `instance_locator`) opens, is brought
/// to the current schema, keeps its nodes, and stores locators from then on.
#[tokio::test]
async fn a_database_of_taskfly_0_1_is_migrated_and_keeps_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            "INSERT INTO deployments (id, status, cloud_provider, total_nodes, retries, \
             nodes_completed, nodes_failed, nodes_terminated, created_at, updated_at) \
             VALUES ('dep-old', 'running', 'aws', 2, 0, 0, 0, 0, 1000, 2000);
             INSERT INTO nodes (id, deployment_id, node_index, status, attempt, \
             instance_id, last_update) VALUES \
             ('dep-old-0', 'dep-old', 0, 'running_script', 1, 'i-0abc', 2000), \
             ('dep-old-1', 'dep-old', 1, 'provisioning', 1, NULL, 2000);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let nodes = store.nodes("dep-old").await.unwrap();
    assert_eq!(
        nodes[0].instance(),
        Some(crate::provider::InstanceRef {
            id: "i-0abc".to_owned(),
            locator: String::new()
        })
    );
    assert_eq!(nodes[0].instance_locator, None);
    assert_eq!(nodes[0].times, PhaseTimes::default(), "no times recorded");
    let instance = crate::provider::InstanceRef {
        id: "i-0def".to_owned(),
        locator: "us-east-1".to_owned(),
    };
    let provisioned = NodeUpdate::Provisioned {
        instance: instance.clone(),
        ip_address: None,
        attempt: 1,
    };
    let applied = store
        .update_node("dep-old-1", provisioned, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(applied.node.instance(), Some(instance.clone()));
    drop(store);
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    drop(conn);
    let reopened = SqliteStore::open(&path).unwrap();
    let node = reopened.node("dep-old-1").await.unwrap().unwrap();
    assert_eq!(node.instance(), Some(instance));
}

/// A schema 2 database's stored lines are counted per node when it is migrated, so the
/// per-node cap holds for the lines written before.
#[tokio::test]
async fn lines_stored_before_schema_3_count_against_their_node_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute_batch(
            "INSERT INTO deployments (id, status, cloud_provider, total_nodes, retries, \
             nodes_completed, nodes_failed, nodes_terminated, created_at, updated_at, \
             log_seq) VALUES ('dep-old', 'running', 'local', 2, 0, 0, 0, 0, 1000, 2000, 5);
             INSERT INTO nodes (id, deployment_id, node_index, status, attempt, \
             last_update) VALUES \
             ('dep-old-0', 'dep-old', 0, 'running_script', 1, 2000), \
             ('dep-old-1', 'dep-old', 1, 'running_script', 1, 2000);
             INSERT INTO logs (deployment_id, seq, node_id, node_index, stream, line, \
             timestamp, attempt) VALUES \
             ('dep-old', 1, 'dep-old-0', 0, 'stdout', 'a', 2000, 1), \
             ('dep-old', 2, 'dep-old-0', 0, 'stdout', 'b', 2000, 1), \
             ('dep-old', 3, 'dep-old-0', 0, 'stdout', 'c', 2000, 1), \
             ('dep-old', 4, 'dep-old-0', 0, 'stdout', 'd', 2000, 1), \
             ('dep-old', 5, 'dep-old-1', 1, 'stdout', 'e', 2000, 1);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path)
        .unwrap()
        .max_log_lines(10)
        .max_log_lines_per_node(3);
    let line = |index: u32| NewLogLine {
        node_id: format!("dep-old-{index}"),
        node_index: index,
        stream: LogStream::Stdout,
        line: "new".to_owned(),
        timestamp: at(3),
        attempt: 1,
        line_no: None,
    };
    assert_eq!(
        store.append_logs("dep-old", vec![line(1)]).await.unwrap(),
        6
    );
    assert_eq!(
        store.append_logs("dep-old", vec![line(0)]).await.unwrap(),
        7
    );
    let all = LogQuery {
        limit: 100,
        ..LogQuery::default()
    };
    let lines = store.logs("dep-old", all).await.unwrap();
    let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    assert_eq!(lines[0].line, crate::state::dropped_lines_marker(0, 3));
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    fs::write(&path, vec![b'x'; 4096]).unwrap();
    let error = SqliteStore::open(&path).unwrap_err();
    assert!(error.is_store(), "{error}");
}

#[tokio::test]
async fn corrupt_rows_are_store_errors_not_panics() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .create_deployment(deployment("dep-bad", 2), nodes("dep-bad", 2))
        .await
        .unwrap();
    store
        .run(|_, conn| {
            conn.execute_batch(
                "UPDATE nodes SET status = 'dancing' WHERE id = 'dep-bad-0';
                 UPDATE nodes SET attempt = -1 WHERE id = 'dep-bad-1';
                 UPDATE deployments SET created_at = 'yesterday' WHERE id = 'dep-bad';",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let error = store.node("dep-bad-0").await.unwrap_err();
    assert!(error.is_store(), "{error}");
    assert!(error.report().to_string().contains("dancing"), "{error:?}");
    let error = store.nodes("dep-bad").await.unwrap_err();
    assert!(error.is_store(), "{error}");
    let error = store.deployments().await.unwrap_err();
    assert!(error.is_store(), "{error}");
    let error = store
        .update_node("dep-bad-0", status(NodeStatus::Provisioning), at(1))
        .await
        .unwrap_err();
    assert!(error.is_store(), "{error}");
}

#[test]
fn times_round_trip_at_millisecond_precision() {
    for time in [
        UNIX_EPOCH,
        at(0) + Duration::from_millis(123),
        UNIX_EPOCH - Duration::from_millis(5_000),
    ] {
        assert_eq!(from_ms(to_ms(time)), Some(time));
    }
    let fine = at(0) + Duration::from_nanos(1_500_000);
    assert_eq!(from_ms(to_ms(fine)), Some(at(0) + Duration::from_millis(1)));
}

/// Holds the writer thread inside a call of its own until the returned sender is used or
/// dropped: every write queued meanwhile is taken in the writer's next batch.
async fn hold_writer(store: &SqliteStore) -> std::sync::mpsc::Sender<()> {
    let (started, has_started) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    store
        .writer
        .send(writer::Job::Alone(Box::new(move |_, _| {
            let _ = started.send(());
            let _ = released.recv();
        })))
        .unwrap();
    has_started.await.unwrap();
    release
}

type Call<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>;

/// Polls each call once, in order: each queues its job with the (held) writer.
async fn queue_all<T>(calls: &mut [Call<'_, T>]) {
    std::future::poll_fn(|cx| {
        for call in calls.iter_mut() {
            assert!(
                call.as_mut().poll(cx).is_pending(),
                "no call is answered while the writer is held"
            );
        }
        std::task::Poll::Ready(())
    })
    .await;
}

fn batch_commits(store: &SqliteStore) -> u64 {
    store
        .shared
        .batch_commits
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Updates of many nodes, several of the same node, a refused one and a log append, queued
/// together, are written in one transaction: each caller gets its own answer, the updates of
/// one node apply in the order they were made, the refused one changes nothing.
#[tokio::test]
async fn updates_queued_together_share_one_commit() {
    let store = SqliteStore::open_in_memory().unwrap();
    let total = 20;
    store
        .create_deployment(deployment("dep-batch", total), nodes("dep-batch", total))
        .await
        .unwrap();
    store
        .update_deployment_status("dep-batch", DeploymentStatus::Provisioning, None, at(1))
        .await
        .unwrap();
    let ids: Vec<String> = (0..total).map(|i| format!("dep-batch-{i}")).collect();
    let release = hold_writer(&store).await;
    let mut calls: Vec<Call<'_, Applied>> = ids
        .iter()
        .map(|id| store.update_node(id, status(NodeStatus::Provisioning), at(2)))
        .collect();
    for update in [
        NodeUpdate::Provisioned {
            instance: crate::provider::InstanceRef {
                id: "i-0".to_owned(),
                locator: String::new(),
            },
            ip_address: None,
            attempt: 1,
        },
        status(NodeStatus::RunningScript),
        status(NodeStatus::Completed),
    ] {
        calls.push(store.update_node("dep-batch-0", update, at(3)));
    }
    // Node 2 never had a provision token: its registration is refused.
    calls.push(store.update_node(
        "dep-batch-2",
        NodeUpdate::Registered {
            auth_token_hash: [2; 32],
        },
        at(3),
    ));
    let line = NewLogLine {
        node_id: "dep-batch-0".to_owned(),
        node_index: 0,
        stream: LogStream::Stdout,
        line: "hello".to_owned(),
        timestamp: at(3),
        attempt: 1,
        line_no: Some(0),
    };
    let mut append: Vec<Call<'_, u64>> = vec![store.append_logs("dep-batch", vec![line])];
    queue_all(&mut calls).await;
    queue_all(&mut append).await;
    let commits_before = batch_commits(&store);
    release.send(()).unwrap();

    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await);
    }
    assert_eq!(append.pop().unwrap().await.unwrap(), 1);
    assert_eq!(batch_commits(&store) - commits_before, 1, "one commit");
    let refused = answers.pop().unwrap().unwrap_err();
    assert!(refused.is_invalid_transition(), "{refused}");
    for answer in &answers {
        assert!(answer.is_ok(), "{answer:?}");
    }
    assert_eq!(
        answers[total as usize + 2].as_ref().unwrap().node.status,
        NodeStatus::Completed
    );
    let nodes = store.nodes("dep-batch").await.unwrap();
    assert_eq!(nodes[0].status, NodeStatus::Completed);
    assert!(nodes[1..]
        .iter()
        .all(|node| node.status == NodeStatus::Provisioning));
    assert_eq!(
        nodes[2].auth_token_hash, None,
        "the refused update wrote nothing"
    );
    let done = store.deployment("dep-batch").await.unwrap().unwrap();
    assert_eq!(
        (done.nodes_completed, done.status),
        (1, DeploymentStatus::Running)
    );
}

/// A caller that stops waiting does not take its queued update back, nor the others of its
/// batch: the update is written, and the store goes on.
#[tokio::test]
async fn a_dropped_caller_leaves_its_batch_whole() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .create_deployment(deployment("dep-drop", 3), nodes("dep-drop", 3))
        .await
        .unwrap();
    let ids: Vec<String> = (0..3).map(|i| format!("dep-drop-{i}")).collect();
    let release = hold_writer(&store).await;
    let mut calls: Vec<Call<'_, Applied>> = ids
        .iter()
        .map(|id| store.update_node(id, status(NodeStatus::Provisioning), at(2)))
        .collect();
    queue_all(&mut calls).await;
    drop(calls.remove(1));
    release.send(()).unwrap();
    for call in calls {
        call.await.unwrap();
    }
    let nodes = store.nodes("dep-drop").await.unwrap();
    assert!(nodes
        .iter()
        .all(|node| node.status == NodeStatus::Provisioning));
    // The next update of the dropped caller's node finds its update applied.
    let applied = store
        .update_node("dep-drop-1", status(NodeStatus::Booting), at(3))
        .await
        .unwrap();
    assert_eq!(applied.previous, NodeStatus::Provisioning);
}

/// Many tasks updating the same node and different nodes at once: every update is applied
/// exactly once, whatever batches they fell into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_one_node_apply_each_once() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    store
        .create_deployment(deployment("dep-same", 2), nodes("dep-same", 2))
        .await
        .unwrap();
    // 50 tasks each give node 0 a provision token of their own; 50 more race node 1 from
    // pending to provisioning, which only one of them can do.
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..50u8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let token = NodeUpdate::ProvisionToken { hash: [task; 32] };
            store.update_node("dep-same-0", token, at(2)).await.unwrap();
            store
                .update_node("dep-same-1", status(NodeStatus::Provisioning), at(2))
                .await
                .unwrap()
                .previous
        });
    }
    let mut moved = 0;
    while let Some(previous) = tasks.join_next().await {
        moved += usize::from(previous.unwrap() == NodeStatus::Pending);
    }
    assert_eq!(moved, 1, "one update moved node 1, the others repeated it");
    let node = store.node("dep-same-0").await.unwrap().unwrap();
    let token = node.provision_token_hash.unwrap();
    assert!(token.iter().all(|byte| *byte == token[0]));
    assert_eq!(
        store
            .node_by_provision_token(&token)
            .await
            .unwrap()
            .unwrap()
            .id,
        "dep-same-0"
    );
}

/// An answered update is in the file: another connection reads it while the store is still
/// open (nothing waits for a later commit or for the store's drop).
#[tokio::test]
async fn an_answered_update_is_committed_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .create_deployment(deployment("dep-durable", 2), nodes("dep-durable", 2))
        .await
        .unwrap();
    for index in 0..2 {
        let id = format!("dep-durable-{index}");
        store
            .update_node(&id, status(NodeStatus::Provisioning), at(2))
            .await
            .unwrap();
    }
    let reader = Connection::open(&path).unwrap();
    let statuses: Vec<String> = reader
        .prepare("SELECT status FROM nodes WHERE deployment_id = 'dep-durable' ORDER BY node_index")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(statuses, ["provisioning", "provisioning"]);
    drop(store);
}

/// A call that panics on the writer thread fails alone: the writer goes on with the others.
#[tokio::test]
async fn a_panicking_call_does_not_stop_the_writer() {
    let store = SqliteStore::open_in_memory().unwrap();
    let error = store
        .run(|_, _| -> Result<(), DbError> { panic!("a call that panics (on purpose)") })
        .await
        .unwrap_err();
    assert!(error.is_store(), "{error}");
    store
        .create_deployment(deployment("dep-after", 1), nodes("dep-after", 1))
        .await
        .unwrap();
    assert!(store.deployment("dep-after").await.unwrap().is_some());
}

/// The deployment as its row holds it, read by a connection of its own (what a restarted
/// daemon would find): status, counters and `updated_at`.
fn deployment_row(path: &Path, id: &str) -> (String, u32, u32, SystemTime) {
    let reader = Connection::open(path).unwrap();
    let (status, completed, failed, updated_ms): (String, u32, u32, i64) = reader
        .query_row(
            "SELECT status, nodes_completed, nodes_failed, updated_at FROM deployments WHERE id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    (status, completed, failed, from_ms(updated_ms).unwrap())
}

/// Updates of one deployment's nodes committed together write its row once, with what the
/// last of them left: the file holds the right counters, status and `updated_at` as soon as
/// they are answered, and after the store is reopened.
#[tokio::test]
async fn a_deployment_written_once_per_commit_holds_its_last_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .create_deployment(deployment("dep-once", 3), nodes("dep-once", 3))
        .await
        .unwrap();
    store
        .update_deployment_status("dep-once", DeploymentStatus::Provisioning, None, at(1))
        .await
        .unwrap();
    let release = hold_writer(&store).await;
    let ids: Vec<String> = (0..3).map(|index| format!("dep-once-{index}")).collect();
    let mut calls: Vec<Call<'_, Applied>> = Vec::new();
    for (id, seconds) in ids.iter().zip([2, 3, 4]) {
        for update in [
            status(NodeStatus::Provisioning),
            status(NodeStatus::RunningScript),
        ] {
            calls.push(store.update_node(id, update, at(seconds)));
        }
    }
    calls.push(store.update_node("dep-once-1", status(NodeStatus::Completed), at(5)));
    queue_all(&mut calls).await;
    let commits_before = batch_commits(&store);
    release.send(()).unwrap();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(batch_commits(&store) - commits_before, 1, "one commit");
    assert_eq!(
        deployment_row(&path, "dep-once"),
        ("running".to_owned(), 1, 0, at(5)),
        "the row holds the last update, before the store is closed"
    );
    let held = store.deployment("dep-once").await.unwrap().unwrap();
    assert_eq!((held.nodes_completed, held.updated_at), (1, at(5)));
    // The last two nodes end in one more commit: the deployment is final in the file.
    for (index, exit_code) in [(0, 0), (2, 1)] {
        let update = NodeUpdate::Status {
            status: if exit_code == 0 {
                NodeStatus::Completed
            } else {
                NodeStatus::Failed
            },
            exit_code: Some(exit_code),
            message: None,
        };
        store
            .update_node(&format!("dep-once-{index}"), update, at(6))
            .await
            .unwrap();
    }
    drop(store);
    assert_eq!(
        deployment_row(&path, "dep-once"),
        ("failed".to_owned(), 2, 1, at(6))
    );
    let reopened = SqliteStore::open(&path).unwrap();
    let done = reopened.deployment("dep-once").await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.nodes_completed, done.nodes_failed),
        (DeploymentStatus::Failed, 2, 1)
    );
    assert_eq!((done.updated_at, done.completed_at), (at(6), Some(at(6))));
}

/// A write that fails after it has changed rows (here a log append whose second line cannot
/// be stored) is undone, and the writes queued with it are still written and answered: the
/// transaction is rolled back and its writes are made again without it.
#[tokio::test]
async fn a_write_failing_halfway_changes_nothing_and_spares_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .create_deployment(deployment("dep-half", 2), nodes("dep-half", 2))
        .await
        .unwrap();
    let line = |line_no: u64, text: &str| NewLogLine {
        node_id: "dep-half-0".to_owned(),
        node_index: 0,
        stream: LogStream::Stdout,
        line: text.to_owned(),
        timestamp: at(2),
        attempt: 1,
        line_no: Some(line_no),
    };
    let release = hold_writer(&store).await;
    let mut updates: Vec<Call<'_, Applied>> = vec![
        store.update_node("dep-half-0", status(NodeStatus::Provisioning), at(2)),
        store.update_node("dep-half-1", status(NodeStatus::Provisioning), at(2)),
    ];
    let mut appends: Vec<Call<'_, u64>> = vec![
        store.append_logs("dep-half", vec![line(0, "first")]),
        // Its first line is inserted before its second is found out of range.
        store.append_logs(
            "dep-half",
            vec![line(1, "stored, then undone"), line(u64::MAX, "x")],
        ),
        store.append_logs("dep-half", vec![line(2, "after")]),
    ];
    updates.push(store.update_node("dep-half-1", status(NodeStatus::Booting), at(3)));
    queue_all(&mut updates).await;
    queue_all(&mut appends).await;
    let commits_before = batch_commits(&store);
    release.send(()).unwrap();
    for update in updates {
        update.await.unwrap();
    }
    let mut answers = Vec::new();
    for append in appends {
        answers.push(append.await);
    }
    assert_eq!(answers[0].as_ref().unwrap(), &1);
    let error = answers[1].as_ref().unwrap_err();
    assert!(error.is_store(), "{error}");
    assert_eq!(answers[2].as_ref().unwrap(), &2);
    assert_eq!(
        batch_commits(&store) - commits_before,
        5,
        "the batch was rolled back and its five other writes made one by one"
    );
    let lines: Vec<String> = store
        .logs(
            "dep-half",
            LogQuery {
                limit: 10,
                ..LogQuery::default()
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|line| line.line)
        .collect();
    assert_eq!(lines, ["first", "after"]);
    let nodes = store.nodes("dep-half").await.unwrap();
    assert_eq!(
        (nodes[0].status, nodes[1].status),
        (NodeStatus::Provisioning, NodeStatus::Booting)
    );
    drop(store);
    let reader = Connection::open(&path).unwrap();
    let (log_seq, log_stored): (i64, i64) = reader
        .query_row(
            "SELECT log_seq, log_stored FROM deployments WHERE id = 'dep-half'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (log_seq, log_stored),
        (2, 2),
        "the failed append left no trace"
    );
}

/// A batched write queued while a batch is being written joins that batch's commit instead of
/// waiting for the next one.
#[tokio::test]
async fn a_write_queued_during_a_batch_joins_its_commit() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .create_deployment(deployment("dep-late", 2), nodes("dep-late", 2))
        .await
        .unwrap();
    let mark = |conn: &Connection, id: &str| -> Result<(), DbError> {
        conn.execute(
            "UPDATE nodes SET error_message = 'marked' WHERE id = ?1",
            [id],
        )?;
        Ok(())
    };
    let (late_answer, late_answered) = tokio::sync::oneshot::channel();
    let mut late = Some(writer::Job::Batched(Box::new(writer::Write {
        write: move |_: &Shared, conn: &Connection, _: &mut Pending| mark(conn, "dep-late-1"),
        answer: late_answer,
        written: None,
    })));
    let sender = store.writer.sender();
    let commits_before = batch_commits(&store);
    store
        .write(move |_, conn, _| {
            // Queued while this batch is being written, as a request arriving meanwhile.
            if let Some(job) = late.take() {
                sender.send(job).unwrap();
            }
            mark(conn, "dep-late-0")
        })
        .await
        .unwrap();
    late_answered.await.unwrap().unwrap();
    assert_eq!(batch_commits(&store) - commits_before, 1, "one commit");
    let nodes = store.nodes("dep-late").await.unwrap();
    assert!(nodes
        .iter()
        .all(|node| node.error_message.as_deref() == Some("marked")));
}
