//! The engine end to end: deployments on real local processes, the node protocol driven over
//! real HTTP, hostile bundles, secrets, and what is left behind afterwards (SPEC §1–§4).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use hyper::Method;
use taskfly::wire::{DeploymentView, NodeView, StatusRequest};
use taskfly::{Client, DeploymentConfig};

use crate::support::engine_http::{node_calls, raw_get, raw_request, RawResponse};
use crate::support::engine_provider::{Provisioned, RecordingProvider};
use crate::support::engine_util::{
    client_bundle, dir_names, find_named, global_metadata_yml, hex, metadata_values_to_misread,
    node_lines, poll_nodes_status, poll_until, print_hex_of, raw_bundle, secret_metadata,
    unique_marker, RawEntry, SECRET, SECRET_SCRIPT,
};
use crate::support::{
    local_yml, marker_metadata, processes_with_env, Project, TestEngine, API_TOKEN,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A status report as an agent sends it.
fn status(status: &str, exit_code: Option<i32>, message: Option<&str>) -> StatusRequest {
    StatusRequest {
        status: status.parse().expect("a node status"),
        message: message.map(str::to_owned),
        exit_code,
    }
}

/// `local_yml` whose bundle also holds `data.txt`.
fn yml_with_data(count: u32, nodes_extra: &str) -> String {
    local_yml(count, nodes_extra).replace(
        "application_files: [setup.sh]",
        "application_files: [setup.sh, data.txt]",
    )
}

/// The single node of a one-node view.
fn only_node(view: &DeploymentView) -> &NodeView {
    assert_eq!(view.nodes.len(), 1, "{view:#?}");
    &view.nodes[0]
}

/// Deploys `project` on an engine whose provider only records, waits until its `count` nodes
/// are `booting` (so the engine has recorded every instance), and returns the provision calls.
async fn deploy_recorded(
    engine: &TestEngine,
    provider: &RecordingProvider,
    project: &Project,
    count: usize,
) -> (String, Vec<Provisioned>) {
    let id = engine.deploy(project.path()).await;
    let calls = provider.wait_for_provisioned(&id, count).await;
    assert_eq!(calls.len(), count);
    poll_nodes_status(engine, &id, "booting").await;
    (id, calls)
}

/// The deployment's folder in the engine's data dir.
fn deployment_dir(engine: &TestEngine, id: &str) -> std::path::PathBuf {
    engine.data_dir.path().join("deployments").join(id)
}

fn assert_status(response: &RawResponse, expected: u16, what: &str) {
    assert_eq!(
        response.status,
        expected,
        "{what}: expected {expected}, got {} {}",
        response.status,
        response.text()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Happy path
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_complete_and_each_sees_its_own_slice() {
    let project = Project::new(&local_yml(
        5,
        "distributed_lists:\n  shard: [s0.csv, s1.csv, s2.csv, s3.csv, s4.csv]",
    ))
    .script(
        "#!/bin/sh\n\
         echo \"shard=$SHARD index=$TASKFLY_NODE_INDEX total=$TASKFLY_TOTAL_NODES\"\n\
         echo \"node=$TASKFLY_NODE_ID deployment=$TASKFLY_DEPLOYMENT_ID\"\n",
    );
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    let id = view.deployment_id.clone();
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert_eq!(view.cloud_provider, "local");
    assert_eq!(
        (view.total_nodes, view.nodes_completed, view.nodes_failed),
        (5, 5, 0)
    );
    assert!(view.completed_at.is_some());
    assert_eq!(view.error_message, None);
    assert_eq!(view.nodes.len(), 5);
    for (index, node) in view.nodes.iter().enumerate() {
        assert_eq!(node.node_index as usize, index);
        assert_eq!(node.node_id, format!("{id}-{index}"));
        assert_eq!(node.status.as_str(), "completed", "{node:#?}");
        assert_eq!(node.exit_code, Some(0));
        assert_eq!(node.error_message, None);
        assert_eq!(
            node.instance_id.as_deref(),
            Some(format!("local-{id}-{index}-1").as_str())
        );
    }

    let logs = engine.all_logs(&id).await;
    assert_eq!(logs.len(), 10, "{logs:#?}");
    assert!(logs.iter().all(|l| l.stream == "stdout"));
    for index in 0..5u32 {
        assert_eq!(
            node_lines(&logs, index),
            [
                format!("shard=s{index}.csv index={index} total=5"),
                format!("node={id}-{index} deployment={id}"),
            ]
        );
    }
    // The HTTP API shows the same outcome.
    let over_http = engine
        .client()
        .deployment(&id)
        .await
        .expect("GET deployment");
    assert_eq!(over_http.status.as_str(), "completed");
    assert_eq!(over_http.nodes_completed, 5);
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A failing node
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_exiting_3_fails_the_deployment_with_its_code_and_last_stderr_line() {
    let project = Project::new(&local_yml(5, "")).script(
        "#!/bin/sh\n\
         if [ \"$TASKFLY_NODE_INDEX\" = 2 ]; then\n\
           echo 'first complaint' >&2\n\
           echo 'disk full on node 2' >&2\n\
           exit 3\n\
         fi\n\
         echo fine\n",
    );
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "failed", "{view:#?}");
    assert_eq!((view.nodes_completed, view.nodes_failed), (4, 1));
    assert_eq!(view.error_message.as_deref(), Some("1 of 5 nodes failed"));
    for node in &view.nodes {
        if node.node_index == 2 {
            assert_eq!(node.status.as_str(), "failed", "{node:#?}");
            assert_eq!(node.exit_code, Some(3));
            let message = node.error_message.as_deref().expect("error message");
            assert!(message.contains("code 3"), "{message}");
            assert!(message.contains("disk full on node 2"), "{message}");
            assert!(!message.contains("first complaint"), "{message}");
        } else {
            assert_eq!(node.status.as_str(), "completed", "{node:#?}");
            assert_eq!(node.exit_code, Some(0));
            assert_eq!(node.error_message, None);
        }
    }
    let logs = engine.all_logs(&view.deployment_id).await;
    let failed: Vec<(String, String)> = logs
        .iter()
        .filter(|l| l.node_index == 2)
        .map(|l| (l.stream.clone(), l.line.clone()))
        .collect();
    assert_eq!(
        failed,
        [
            ("stderr".to_owned(), "first complaint".to_owned()),
            ("stderr".to_owned(), "disk full on node 2".to_owned()),
        ]
    );
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Values reach the script byte for byte, never evaluated
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_values_reach_the_script_byte_for_byte_and_nothing_is_evaluated() {
    let marker = unique_marker();
    let pwned = format!("PWNED_{marker}");
    let mut values = metadata_values_to_misread(&pwned);
    values.insert("sq", "it's 'quoted'".to_owned());
    let extra = global_metadata_yml(&values);
    let mut script = String::from("#!/bin/sh\n");
    for key in values.keys() {
        script.push_str(&print_hex_of(key));
    }
    script.push_str("printf 'raw uni=%s\\n' \"$UNI\"\nprintf '%s\\n' \"$NL\"\n");
    let project = Project::new(&local_yml(1, &extra)).script(&script);
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    let lines = node_lines(&engine.all_logs(&view.deployment_id).await, 0);
    for (key, value) in &values {
        let expected = format!("{}={}", key.to_ascii_uppercase(), hex(value.as_bytes()));
        assert!(
            lines.contains(&expected),
            "{key}: expected {expected} ({value:?}) in {lines:#?}"
        );
    }
    assert!(
        lines.contains(&"raw uni=héllo ✓ — 日本".to_owned()),
        "{lines:#?}"
    );
    // The multi-line value comes back as consecutive log lines.
    let start = lines
        .iter()
        .position(|l| l == "first line")
        .expect("first line of NL");
    assert_eq!(lines[start..].join("\n"), values["nl"]);

    // Nothing was executed: no PWNED file anywhere the script, the agent or the engine works.
    let mut places = vec![
        engine.data_dir.path().to_path_buf(),
        project.path().to_path_buf(),
    ];
    let mut found = Vec::new();
    for place in &places {
        found.extend(find_named(place, &pwned));
    }
    places.push(std::env::current_dir().expect("cwd"));
    places.push(std::env::temp_dir());
    for place in &places {
        for suffix in ["_sub", "_bt", "_semi", "_redirect"] {
            let path = place.join(format!("{pwned}{suffix}"));
            if path.exists() {
                found.push(path);
            }
        }
    }
    assert!(found.is_empty(), "a value was evaluated: {found:?}");
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Distributed lists shorter and longer than the node count
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_lists_cycle_when_short_and_group_when_long() {
    let short = Project::new(&local_yml(5, "distributed_lists:\n  pair: [x, y]"))
        .script("#!/bin/sh\nprintf 'PAIR=%s\\n' \"$PAIR\"\n");
    let long = Project::new(&local_yml(
        3,
        "distributed_lists:\n  letters: [a, b, c, d, e, f, g]",
    ))
    .script("#!/bin/sh\nprintf 'LETTERS=%s\\n' \"$LETTERS\"\n");
    let engine = TestEngine::start().await;

    let (short_view, long_view) = tokio::join!(engine.run(short.path()), engine.run(long.path()));
    assert_eq!(short_view.status.as_str(), "completed", "{short_view:#?}");
    assert_eq!(long_view.status.as_str(), "completed", "{long_view:#?}");

    let logs = engine.all_logs(&short_view.deployment_id).await;
    for index in 0..5u32 {
        let expected = if index % 2 == 0 { "PAIR=x" } else { "PAIR=y" };
        assert_eq!(node_lines(&logs, index), [expected], "node {index}");
    }
    let logs = engine.all_logs(&long_view.deployment_id).await;
    let expected = [
        r#"LETTERS=["a","d","g"]"#,
        r#"LETTERS=["b","e"]"#,
        r#"LETTERS=["c","f"]"#,
    ];
    for (index, expected) in expected.iter().enumerate() {
        assert_eq!(node_lines(&logs, index as u32), [*expected], "node {index}");
    }
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Templates: dependency order, cycles, unknown placeholders
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_resolve_in_dependency_order_not_declaration_order() {
    // `a` uses `b` uses `c`: declared in the opposite order of resolution.
    let project = Project::new(&local_yml(
        2,
        "global_metadata: {bucket: data-bkt}\n\
         config_template:\n  \
           a: \"{b}/a\"\n  \
           b: \"{c}/b\"\n  \
           c: \"s3://{bucket}/{node_index}\"\n  \
           d: \"{{literal}} of {total_nodes}\"",
    ))
    .script("#!/bin/sh\nprintf 'A=%s B=%s C=%s D=%s\\n' \"$A\" \"$B\" \"$C\" \"$D\"\n");
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    let logs = engine.all_logs(&view.deployment_id).await;
    for index in 0..2u32 {
        let c = format!("s3://data-bkt/{index}");
        assert_eq!(
            node_lines(&logs, index),
            [format!("A={c}/b/a B={c}/b C={c} D={{literal}} of 2")]
        );
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_cycle_and_an_unknown_placeholder_are_refused_together() {
    let yml = local_yml(
        2,
        "config_template:\n  x: \"{y}-x\"\n  y: \"{x}-y\"\n  out: \"{nope}/out\"",
    );
    let check_details = |details: &[String]| {
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("nodes.config_template.x:")
                    && d.contains("cycle")
                    && d.contains("x -> y -> x")),
            "no cycle problem in {details:#?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("nodes.config_template.out:")
                    && d.contains("unknown placeholder {nope}")),
            "no unknown placeholder problem in {details:#?}"
        );
    };

    // Parsing alone reports both problems at once.
    let error = DeploymentConfig::from_yaml(&yml).expect_err("invalid templates");
    assert!(error.is_invalid_config(), "{error}");
    check_details(error.details());

    // So does the daemon, to a bundle uploaded over HTTP.
    let project = Project::new(&yml).script("#!/bin/sh\necho never\n");
    let bundle = client_bundle(project.path(), &["setup.sh"]);
    let engine = TestEngine::start().await;
    let error = engine
        .client()
        .create_deployment(Bytes::from(bundle.clone()))
        .await
        .expect_err("refused");
    assert!(error.is_invalid_config(), "{error}");
    check_details(error.details());
    let response = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/deployments",
        Some(API_TOKEN),
        Some(("application/gzip", bundle)),
    )
    .await;
    assert_status(&response, 400, "POST /deployments with bad templates");
    assert_eq!(response.content_type, "application/json");
    check_details(&response.details());

    // Nothing was kept.
    assert!(engine.engine.deployments().await.expect("list").is_empty());
    assert_eq!(
        dir_names(&engine.data_dir.path().join("deployments")),
        Vec::<String>::new()
    );
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile client bundles
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_absolute_and_symlink_escaping_bundles_are_refused_and_write_nothing() {
    let marker = unique_marker();
    let sandbox = tempfile::tempdir().expect("sandbox");
    let yml = local_yml(1, "");
    let script = b"#!/bin/sh\necho hand-built bundle ran\n";
    let engine = TestEngine::start().await;
    let deployments = engine.data_dir.path().join("deployments");

    let traversal = format!("../evil_{marker}");
    let absolute = format!("{}/abs_{marker}", sandbox.path().display());
    let through_link = format!("escape/pwned_{marker}");
    let sandbox_target = sandbox.path().display().to_string();
    let up_file = format!("up/x_{marker}");
    let cases: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
        (
            traversal.as_str(),
            vec![RawEntry::File {
                name: traversal.as_bytes(),
                mode: 0o644,
                data: b"evil",
            }],
        ),
        (
            absolute.as_str(),
            vec![RawEntry::File {
                name: absolute.as_bytes(),
                mode: 0o644,
                data: b"evil",
            }],
        ),
        (
            "escape",
            vec![
                RawEntry::Symlink {
                    name: b"escape",
                    target: sandbox_target.as_bytes(),
                },
                RawEntry::File {
                    name: through_link.as_bytes(),
                    mode: 0o644,
                    data: b"evil",
                },
            ],
        ),
        (
            "up",
            vec![
                RawEntry::Symlink {
                    name: b"up",
                    target: b"../../../../../../..",
                },
                RawEntry::File {
                    name: up_file.as_bytes(),
                    mode: 0o644,
                    data: b"evil",
                },
            ],
        ),
    ];
    for (named, hostile) in cases {
        let mut entries = vec![
            RawEntry::File {
                name: b"taskfly.yml",
                mode: 0o644,
                data: yml.as_bytes(),
            },
            RawEntry::File {
                name: b"setup.sh",
                mode: 0o755,
                data: script,
            },
        ];
        entries.extend(hostile);
        let response = raw_request(
            &engine.url,
            Method::POST,
            "/api/v1/deployments",
            Some(API_TOKEN),
            Some(("application/gzip", raw_bundle(&entries))),
        )
        .await;
        assert_status(&response, 400, named);
        let error = response.error();
        assert!(
            error.contains(&format!("{named:?}")),
            "the error should name {named:?}: {error}"
        );
        assert_eq!(dir_names(&deployments), Vec::<String>::new(), "{named}");
    }

    // Nothing landed outside: not next to the deployments, not in the data dir, not in the
    // sandbox the absolute and symlinked paths pointed at.
    let data_parent = engine.data_dir.path().parent().expect("parent");
    for path in [
        deployments.join(format!("evil_{marker}")),
        engine.data_dir.path().join(format!("evil_{marker}")),
        data_parent.join(format!("evil_{marker}")),
        sandbox.path().join(format!("abs_{marker}")),
        sandbox.path().join(format!("pwned_{marker}")),
        Path::new("/").join(format!("x_{marker}")),
    ] {
        assert!(!path.exists(), "{} was written", path.display());
    }
    assert_eq!(dir_names(sandbox.path()), Vec::<String>::new());
    assert!(find_named(engine.data_dir.path(), "evil_").is_empty());
    assert!(engine.engine.deployments().await.expect("list").is_empty());

    // The same hand-built bundle without the hostile entries is accepted and runs.
    let entries = [
        RawEntry::File {
            name: b"taskfly.yml",
            mode: 0o644,
            data: yml.as_bytes(),
        },
        RawEntry::File {
            name: b"setup.sh",
            mode: 0o755,
            data: script,
        },
    ];
    let response = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/deployments",
        Some(API_TOKEN),
        Some(("application/gzip", raw_bundle(&entries))),
    )
    .await;
    assert_status(&response, 202, "clean hand-built bundle");
    let id = response.json()["deployment_id"]
        .as_str()
        .expect("deployment_id")
        .to_owned();
    let view = engine.wait(&id).await.expect("wait");
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert_eq!(
        node_lines(&engine.all_logs(&id).await, 0),
        ["hand-built bundle ran"]
    );
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7–9. The node protocol, driven by hand
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_heartbeat_or_status_does_not_reopen_a_completed_node() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project = Project::new(&local_yml(1, "global_metadata: {color: blue}"))
        .script("#!/bin/sh\necho not run by this test\n");
    let (id, calls) = deploy_recorded(&engine, &provider, &project, 1).await;
    let call = &calls[0];
    assert_eq!(call.daemon_url, engine.url);
    assert_eq!(call.node_id, format!("{id}-0"));

    let registered = Client::new(&engine.url, None)
        .expect("client")
        .register(&call.provision_token)
        .await
        .expect("register");
    assert_eq!(registered.deployment_id, id);
    assert_eq!(registered.node_id, format!("{id}-0"));
    assert_eq!(registered.node_index, 0);
    assert_eq!(registered.script, "setup.sh");
    assert_eq!(
        registered.env.get("COLOR").map(String::as_str),
        Some("blue")
    );
    assert_eq!(
        registered
            .env
            .get("TASKFLY_TOTAL_NODES")
            .map(String::as_str),
        Some("1")
    );
    let node = Client::new(&engine.url, Some(registered.auth_token.clone())).expect("client");
    let view = engine.view(&id).await.expect("view");
    assert_eq!(only_node(&view).status.as_str(), "registering");
    assert_eq!(
        only_node(&view).instance_id.as_deref(),
        Some(call.instance_id.as_str())
    );

    for step in ["downloading_assets", "running_script"] {
        node.report_status(&status(step, None, None))
            .await
            .expect(step);
        let view = engine.view(&id).await.expect("view");
        assert_eq!(only_node(&view).status.as_str(), step);
        assert_eq!(view.status.as_str(), "running");
    }
    let beat = node.heartbeat().await.expect("heartbeat");
    assert_eq!((beat.status.as_str(), beat.shutdown), ("ok", false));
    node.report_status(&status("completed", Some(0), None))
        .await
        .expect("completed");
    let view = engine.wait(&id).await.expect("wait");
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert_eq!(only_node(&view).status.as_str(), "completed");
    assert_eq!(only_node(&view).exit_code, Some(0));
    // The engine terminates the instance of a node that ended.
    provider.wait_for_terminated(&call.instance_id).await;
    let before = engine.view(&id).await.expect("view");

    // A late heartbeat is answered with shutdown and changes nothing.
    let beat = node.heartbeat().await.expect("late heartbeat");
    assert_eq!((beat.status.as_str(), beat.shutdown), ("ok", true));
    let response = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/heartbeat",
        Some(&registered.auth_token),
        Some(("application/json", b"{}".to_vec())),
    )
    .await;
    assert_status(&response, 200, "late heartbeat");
    assert_eq!(
        response.json(),
        serde_json::json!({"status": "ok", "shutdown": true})
    );

    // A late status is refused with 409, whichever it is, except the state the node is in:
    // a report resent after a lost answer is a no-op success.
    for (late, exit_code) in [
        ("running_script", None),
        ("downloading_assets", None),
        ("failed", Some(9)),
    ] {
        let error = node
            .report_status(&status(late, exit_code, Some("late")))
            .await
            .expect_err(late);
        assert!(error.is_conflict(), "{late}: {error}");
    }
    node.report_status(&status("completed", Some(0), Some("late")))
        .await
        .expect("a repeated completed is a no-op");
    let response = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/status",
        Some(&registered.auth_token),
        Some((
            "application/json",
            br#"{"status":"running_script"}"#.to_vec(),
        )),
    )
    .await;
    assert_status(&response, 409, "late running_script");

    let after = engine.view(&id).await.expect("view");
    assert_eq!(after, before, "a late call changed the deployment");
    assert_eq!(only_node(&after).status.as_str(), "completed");
    assert_eq!(only_node(&after).error_message, None);
    assert_eq!(
        provider.provisioned().len(),
        1,
        "the node was started again"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_token_registers_once() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project = Project::new(&local_yml(2, "")).script("#!/bin/sh\necho unused\n");
    let (id, calls) = deploy_recorded(&engine, &provider, &project, 2).await;
    let anonymous = Client::new(&engine.url, None).expect("client");

    let first = anonymous
        .register(&calls[0].provision_token)
        .await
        .expect("first registration");
    let before = engine.view(&id).await.expect("view");
    assert_eq!(before.nodes[0].status.as_str(), "registering");

    // The token was used: the server answers 401, as for an unknown token.
    let error = anonymous
        .register(&calls[0].provision_token)
        .await
        .expect_err("second registration");
    assert!(error.is_unauthorized(), "{error}");
    let body = serde_json::to_vec(&serde_json::json!({
        "provision_token": calls[0].provision_token,
    }))
    .expect("json");
    let response = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/register",
        None,
        Some(("application/json", body)),
    )
    .await;
    assert_status(&response, 401, "second registration");
    assert!(
        !response.text().contains(&calls[0].provision_token),
        "the answer repeats the token: {}",
        response.text()
    );
    assert_eq!(
        engine.view(&id).await.expect("view"),
        before,
        "a refused registration changed the deployment"
    );
    // The first registration's token still works; no second token was issued.
    let beat = Client::new(&engine.url, Some(first.auth_token))
        .expect("client")
        .heartbeat()
        .await
        .expect("heartbeat with the first auth token");
    assert!(!beat.shutdown);

    // Two registrations racing with the same token: exactly one wins.
    let token = calls[1].provision_token.clone();
    let (a, b) = tokio::join!(anonymous.register(&token), anonymous.register(&token));
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        (a, b) => panic!(
            "expected exactly one registration to succeed: {:?} / {:?}",
            a.map(|r| r.node_id),
            b.map(|r| r.node_id)
        ),
    };
    assert_eq!(won.node_id, format!("{id}-1"));
    assert!(lost.is_unauthorized() || lost.is_conflict(), "{lost}");
    let view = engine.view(&id).await.expect("view");
    assert_eq!(view.nodes[1].status.as_str(), "registering");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_only_its_own_deployment() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project_a = Project::new(&yml_with_data(1, ""))
        .script("#!/bin/sh\necho a\n")
        .file("data.txt", "payload of deployment A\n", 0o644);
    let project_b = Project::new(&yml_with_data(1, ""))
        .script("#!/bin/sh\necho b\n")
        .file(
            "data.txt",
            "payload of deployment B, which A must never see\n",
            0o644,
        );
    let (id_a, calls_a) = deploy_recorded(&engine, &provider, &project_a, 1).await;
    let (id_b, calls_b) = deploy_recorded(&engine, &provider, &project_b, 1).await;
    let anonymous = Client::new(&engine.url, None).expect("client");
    let token_a = anonymous
        .register(&calls_a[0].provision_token)
        .await
        .expect("register A")
        .auth_token;
    let token_b = anonymous
        .register(&calls_b[0].provision_token)
        .await
        .expect("register B")
        .auth_token;

    // Each token gets its own deployment's worker bundle.
    let downloads = tempfile::tempdir().expect("downloads");
    let mut served = Vec::new();
    for (token, id, payload) in [
        (&token_a, &id_a, "payload of deployment A\n"),
        (
            &token_b,
            &id_b,
            "payload of deployment B, which A must never see\n",
        ),
    ] {
        let file = downloads.path().join(format!("{id}.tar.gz"));
        let node = Client::new(&engine.url, Some(token.clone())).expect("client");
        let written = node.download_assets(&file).await.expect("download");
        let bytes = std::fs::read(&file).expect("read download");
        assert_eq!(written, bytes.len() as u64);
        let stored =
            std::fs::read(deployment_dir(&engine, id).join("worker.tar.gz")).expect("stored");
        assert_eq!(
            bytes, stored,
            "{id}: served bytes differ from the worker bundle"
        );
        let extracted = downloads.path().join(format!("{id}-extracted"));
        taskfly::bundle::extract_bundle(
            bytes.as_slice(),
            &extracted,
            &taskfly::bundle::BundleLimits::default(),
        )
        .expect("extract");
        assert_eq!(
            std::fs::read_to_string(extracted.join("data.txt")).expect("data.txt"),
            payload
        );
        served.push(bytes);
    }
    assert_ne!(served[0], served[1]);

    // There is no way to name another deployment: a query is ignored, a path is unknown.
    let response = raw_get(
        &engine.url,
        &format!("/api/v1/nodes/assets?deployment_id={id_b}"),
        Some(&token_a),
    )
    .await;
    assert_status(&response, 200, "assets with a query");
    assert_eq!(response.body, served[0]);
    for path in [
        format!("/api/v1/nodes/assets/{id_b}"),
        format!("/api/v1/nodes/{id_b}/assets"),
    ] {
        let response = raw_get(&engine.url, &path, Some(&token_a)).await;
        assert_status(&response, 404, &path);
    }

    // Node endpoints refuse a made-up token, the API token and no token.
    for (token, what) in [
        (Some("made-up-token-0123456789abcdef0123"), "made-up token"),
        (Some(API_TOKEN), "API token"),
        (None, "no token"),
    ] {
        for (method, path, body) in node_calls() {
            let body = body.map(|b| ("application/json", b.as_bytes().to_vec()));
            let response = raw_request(&engine.url, method.clone(), path, token, body).await;
            assert_status(&response, 401, &format!("{what} on {method} {path}"));
        }
    }
    // Client endpoints refuse a node token.
    for path in [
        "/api/v1/deployments".to_owned(),
        format!("/api/v1/deployments/{id_a}"),
        format!("/api/v1/deployments/{id_a}/logs"),
        "/api/v1/stats".to_owned(),
    ] {
        let response = raw_get(&engine.url, &path, Some(&token_a)).await;
        assert_status(&response, 401, &format!("node token on GET {path}"));
    }
    let error = Client::new(&engine.url, Some(token_a.clone()))
        .expect("client")
        .deployments()
        .await
        .expect_err("node token on a client endpoint");
    assert!(error.is_unauthorized(), "{error}");

    // A node's log lines land in its own deployment only; nothing forged was stored.
    Client::new(&engine.url, Some(token_a))
        .expect("client")
        .send_logs(&taskfly::wire::LogsRequest {
            lines: vec![taskfly::wire::LogLineIn {
                stream: "stdout".to_owned(),
                line: "written by node A".to_owned(),
                timestamp: None,
                line_no: None,
            }],
            offset: None,
        })
        .await
        .expect("send logs");
    let logs_a: Vec<String> = engine
        .all_logs(&id_a)
        .await
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(logs_a, ["written by node A"]);
    assert!(engine.all_logs(&id_b).await.is_empty());
    for id in [&id_a, &id_b] {
        let view = engine.view(id).await.expect("view");
        assert_eq!(only_node(&view).status.as_str(), "registering", "{view:#?}");
    }
    engine.stop().await;
}

/// A provider may return after the agent it started has already registered (a local agent is
/// quick; `Provider::provision` returns once the instance exists, not once it has booted). The
/// engine must then keep the node and its instance, not tear the instance down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registering_before_its_instance_is_recorded_keeps_its_instance() {
    let (provider, gate) = RecordingProvider::gated();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project = Project::new(&local_yml(1, "")).script("#!/bin/sh\necho unused\n");
    let id = engine.deploy(project.path()).await;
    let call = provider.wait_for_provisioned(&id, 1).await.remove(0);

    // The engine is still inside `provision`: the agent registers now.
    let registered = Client::new(&engine.url, None)
        .expect("client")
        .register(&call.provision_token)
        .await
        .expect("register");
    gate.add_permits(1);
    let view = poll_until(
        &engine,
        &id,
        "the instance recorded or terminated",
        |view| only_node(view).instance_id.is_some() || !provider.terminated().is_empty(),
    )
    .await;
    assert_eq!(
        provider.terminated(),
        Vec::<String>::new(),
        "the engine terminated the instance of a registered node"
    );
    assert_eq!(
        only_node(&view).instance_id.as_deref(),
        Some(call.instance_id.as_str())
    );
    assert_eq!(only_node(&view).status.as_str(), "registering");

    let node = Client::new(&engine.url, Some(registered.auth_token)).expect("client");
    for step in ["downloading_assets", "running_script"] {
        node.report_status(&status(step, None, None))
            .await
            .expect(step);
    }
    node.report_status(&status("completed", Some(0), None))
        .await
        .expect("completed");
    let view = engine.wait(&id).await.expect("wait");
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Scale, and nothing left running
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_local_nodes_complete_and_leave_no_process_behind() {
    let marker = unique_marker();
    let project = Project::new(&local_yml(200, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX of $TASKFLY_TOTAL_NODES\"\n");
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert_eq!((view.nodes_completed, view.nodes_failed), (200, 0));
    assert_eq!(view.nodes.len(), 200);
    for node in &view.nodes {
        assert_eq!(node.status.as_str(), "completed", "{node:#?}");
        assert_eq!(node.exit_code, Some(0));
    }
    let logs = engine.all_logs(&view.deployment_id).await;
    assert_eq!(logs.len(), 200);
    for index in 0..200u32 {
        assert_eq!(
            node_lines(&logs, index),
            [format!("node {index} of 200")],
            "node {index}"
        );
    }
    assert_eq!(
        processes_with_env(&format!("MARKER={marker}")),
        Vec::<u32>::new()
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_running_nodes_kills_their_scripts() {
    let marker = unique_marker();
    let env_marker = format!("MARKER={marker}");
    let project = Project::new(&local_yml(3, &marker_metadata(&marker)))
        .script("#!/bin/sh\necho started\nsleep 300\n");
    let engine = TestEngine::start().await;
    let id = engine.deploy(project.path()).await;

    // Every node runs its script, and the scripts are really there.
    poll_until(&engine, &id, "3 scripts running", |view| {
        view.nodes
            .iter()
            .all(|n| n.status.as_str() == "running_script")
            && processes_with_env(&env_marker).len() >= 3
    })
    .await;

    engine.engine.terminate(&id).await.expect("terminate");
    let view = engine.view(&id).await.expect("view");
    assert_eq!(view.status.as_str(), "terminated", "{view:#?}");
    assert!(view.completed_at.is_some());
    assert_eq!((view.nodes_completed, view.nodes_failed), (0, 0));
    for node in &view.nodes {
        assert_eq!(node.status.as_str(), "terminated", "{node:#?}");
    }
    assert_eq!(processes_with_env(&env_marker), Vec::<u32>::new());
    // A final deployment cannot be terminated again.
    let error = engine.engine.terminate(&id).await.expect_err("again");
    assert!(error.is_conflict() && error.is_already_final(), "{error}");
    engine.stop().await;
}

/// A provider that starts fake instances but cannot terminate them (an unreachable cloud API).
struct CannotTerminate(std::sync::Arc<RecordingProvider>);

#[taskfly::async_trait]
impl taskfly::Provider for CannotTerminate {
    fn name(&self) -> &str {
        "local"
    }

    async fn provision(
        &self,
        spec: taskfly::InstanceSpec,
    ) -> Result<taskfly::Instance, taskfly::BoxError> {
        taskfly::Provider::provision(&*self.0, spec).await
    }

    async fn terminate(&self, instance: &taskfly::InstanceRef) -> Result<(), taskfly::BoxError> {
        Err(format!("the cloud API did not answer for {}", instance.id).into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_instance_is_not_confirmed_gone_stays_terminating() {
    let recording = RecordingProvider::new();
    let provider = std::sync::Arc::new(CannotTerminate(recording.clone()));
    let engine = TestEngine::start_with(|config| config.provider(provider)).await;
    let project = Project::new(&local_yml(1, "")).script("#!/bin/sh\nexit 0\n");
    let (id, _) = deploy_recorded(&engine, &recording, &project, 1).await;

    engine
        .engine
        .terminate(&id)
        .await
        .expect("terminate returns");
    let view = engine.view(&id).await.expect("view");
    // Never `terminated` while an instance may still run (and bill).
    assert_eq!(view.status.as_str(), "terminating", "{view:#?}");
    assert_eq!(only_node(&view).status.as_str(), "terminating");
    assert!(!view.is_final());
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 11. One worker bundle per deployment, streamed to every node
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_keeps_one_worker_bundle_and_no_client_bundle() {
    let project = Project::new(&yml_with_data(5, ""))
        .script("#!/bin/sh\ncat data.txt\n")
        .file("data.txt", "shared data\n", 0o644);
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    let logs = engine.all_logs(&view.deployment_id).await;
    for index in 0..5u32 {
        assert_eq!(node_lines(&logs, index), ["shared data"]);
    }
    let dir = deployment_dir(&engine, &view.deployment_id);
    let bundles: Vec<String> = dir_names(&dir)
        .into_iter()
        .filter(|name| name.ends_with(".tar.gz"))
        .collect();
    assert_eq!(bundles, ["worker.tar.gz"]);
    assert!(!dir.join("client.tar.gz").exists());
    // The uploads folder of `deploy_dir` keeps nothing either.
    let uploads = engine.data_dir.path().join("uploads");
    if uploads.exists() {
        assert_eq!(dir_names(&uploads), Vec::<String>::new());
    }

    // The worker bundle holds the application files, not taskfly.yml.
    let worker = std::fs::File::open(dir.join("worker.tar.gz")).expect("worker bundle");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(worker));
    let mut names: Vec<String> = archive
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["data.txt", "setup.sh"]);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_is_served_the_same_stored_worker_bundle() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project = Project::new(&yml_with_data(5, ""))
        .script("#!/bin/sh\necho unused\n")
        .file("data.txt", &"some data to stream\n".repeat(5000), 0o644);
    let (id, calls) = deploy_recorded(&engine, &provider, &project, 5).await;
    let stored_path = deployment_dir(&engine, &id).join("worker.tar.gz");
    let stored = std::fs::read(&stored_path).expect("worker bundle");
    let modified = std::fs::metadata(&stored_path)
        .and_then(|m| m.modified())
        .expect("mtime");

    let downloads = tempfile::tempdir().expect("downloads");
    let anonymous = Client::new(&engine.url, None).expect("client");
    for index in [1usize, 3] {
        let registered = anonymous
            .register(&calls[index].provision_token)
            .await
            .expect("register");
        assert_eq!(registered.node_index as usize, index);
        let file = downloads.path().join(format!("node-{index}.tar.gz"));
        let written = Client::new(&engine.url, Some(registered.auth_token))
            .expect("client")
            .download_assets(&file)
            .await
            .expect("download");
        assert_eq!(written, stored.len() as u64);
        assert_eq!(
            std::fs::read(&file).expect("download"),
            stored,
            "node {index}"
        );
    }
    // Serving did not rebuild or add a bundle.
    assert_eq!(
        std::fs::metadata(&stored_path)
            .and_then(|m| m.modified())
            .expect("mtime"),
        modified
    );
    let bundles: Vec<String> = dir_names(&deployment_dir(&engine, &id))
        .into_iter()
        .filter(|name| name.ends_with(".tar.gz"))
        .collect();
    assert_eq!(bundles, ["worker.tar.gz"]);
    engine.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 12. Secrets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_script_and_are_masked_everywhere_else() {
    let project = Project::new(&local_yml(1, &secret_metadata())).script(SECRET_SCRIPT);
    let engine = TestEngine::start().await;

    let view = engine.run(project.path()).await;
    let id = view.deployment_id.clone();
    assert_eq!(view.status.as_str(), "failed", "{view:#?}");
    let node = only_node(&view);
    assert_eq!(node.exit_code, Some(1));
    let message = node.error_message.as_deref().expect("error message");
    assert!(message.contains("code 1"), "{message}");
    assert!(message.contains("stderr says ***"), "{message}");
    assert!(!message.contains(SECRET), "{message}");

    let logs = engine.all_logs(&id).await;
    let lines: Vec<(&str, &str)> = logs
        .iter()
        .map(|l| (l.stream.as_str(), l.line.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            ("stdout", "match"),
            ("stdout", "stdout says ***"),
            ("stderr", "stderr says ***"),
        ]
    );

    // Nothing the API answers holds the value.
    for path in [
        format!("/api/v1/deployments/{id}"),
        "/api/v1/deployments".to_owned(),
        format!("/api/v1/deployments/{id}/logs"),
        "/api/v1/stats".to_owned(),
    ] {
        let response = raw_get(&engine.url, &path, Some(API_TOKEN)).await;
        assert_status(&response, 200, &path);
        assert!(
            !response.text().contains(SECRET),
            "GET {path} shows the secret: {}",
            response.text()
        );
    }
    let response = raw_get(
        &engine.url,
        &format!("/api/v1/deployments/{id}"),
        Some(API_TOKEN),
    )
    .await;
    assert!(
        response.text().contains("stderr says ***"),
        "{}",
        response.text()
    );

    // At rest, only files of mode 0600 hold it.
    let mut holders = Vec::new();
    let mut pending = vec![engine.data_dir.path().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path()).expect("read");
                if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
                    let mode = entry.metadata().expect("metadata").permissions().mode();
                    holders.push((entry.path(), mode & 0o777));
                }
            }
        }
    }
    assert!(
        holders.iter().all(|(_, mode)| *mode == 0o600),
        "files holding the secret: {holders:?}"
    );
    assert!(
        holders
            .iter()
            .any(|(path, _)| path.ends_with(format!("{id}/taskfly.yml"))),
        "{holders:?}"
    );
    engine.stop().await;
}

/// Deploys `yml` and expects it refused as invalid, its one problem starting with `field`, and
/// nothing deployed.
async fn refused_at_deploy(yml: &str, field: &str) {
    let project = Project::new(yml).script("#!/bin/sh\necho should not run\n");
    let engine = TestEngine::start().await;
    let error = engine
        .engine
        .deploy_dir(project.path())
        .await
        .expect_err("refused");
    assert!(error.is_invalid_config(), "{error}");
    assert!(
        error.details()[0].starts_with(field),
        "{:?}",
        error.details()
    );
    assert!(engine.engine.deployments().await.expect("list").is_empty());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_host_that_ssh_would_read_as_an_option_is_refused_before_any_ssh_call() {
    let marker = std::env::temp_dir().join(format!("taskfly-pwned-{}", unique_marker()));
    let yml = format!(
        "cloud_provider: local\ninstance_config:\n  local:\n    \
         hosts: ['-oProxyCommand=touch {}']\n    ssh_user: ops\n\
         application_files: [setup.sh]\nnodes:\n  count: 1\n",
        marker.display()
    );
    refused_at_deploy(&yml, "instance_config.local.hosts[0]: ").await;
    assert!(!marker.exists(), "ssh ran the host name as an option");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_nodes_sharing_one_remote_dest_dir_are_refused_naming_the_field() {
    let yml = format!(
        "{}remote_dest_dir: /tmp/taskfly-shared-job\n",
        local_yml(3, "")
    );
    refused_at_deploy(&yml, "remote_dest_dir: the 3 local nodes").await;
}
