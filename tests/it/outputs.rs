//! Node outputs (SPEC §1 `outputs`, §4 outputs endpoints): both agents pack and upload what
//! the patterns match, the daemon keeps it per node and serves it as one archive, limits and
//! hostile uploads are refused, cleanup removes it, and the pool keeps each node's own.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use hyper::Method;
use taskfly::{Client, OutputLimits, PoolConfig};

use crate::support::cli_daemon::{path_str, Daemon};
use crate::support::cli_run;
use crate::support::engine_http::raw_request;
use crate::support::engine_provider::RecordingProvider;
use crate::support::engine_util::poll_nodes_status;
use crate::support::pool::PoolEngine;
use crate::support::{agent_yml, local_yml, Project, TestEngine};

/// One entry of an outputs archive: path, mode, and content (`-> target` for a link).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    path: String,
    mode: u32,
    content: String,
}

/// The entries of a gzip tar, in archive order.
fn entries_of(gzip_tar: &[u8]) -> Vec<Entry> {
    let mut archive = tar::Archive::new(GzDecoder::new(gzip_tar));
    let mut out = Vec::new();
    for entry in archive.entries().expect("a tar") {
        let mut entry = entry.expect("an entry");
        let path = entry.path().expect("path").display().to_string();
        let mode = entry.header().mode().expect("mode") & 0o7777;
        let mut content = String::new();
        if entry.header().entry_type() == tar::EntryType::Symlink {
            let target = entry.link_name().expect("link").expect("target");
            content = format!("-> {}", target.display());
        } else {
            entry.read_to_string(&mut content).expect("content");
        }
        out.push(Entry {
            path,
            mode,
            content,
        });
    }
    out
}

/// The deployment's outputs as the engine serves them (all nodes, or one).
async fn outputs(engine: &TestEngine, id: &str, node: Option<u32>) -> Vec<Entry> {
    let mut reader = engine.engine.outputs(id, node).await.expect("outputs");
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
        .await
        .expect("read the archive");
    entries_of(&bytes)
}

fn paths(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.path.as_str()).collect()
}

fn content<'a>(entries: &'a [Entry], path: &str) -> Option<&'a Entry> {
    entries.iter().find(|e| e.path == path)
}

/// The stored archives of a deployment, with their modes.
fn stored(engine: &TestEngine, id: &str) -> Vec<(String, u32)> {
    let dir = engine
        .data_dir
        .path()
        .join("deployments")
        .join(id)
        .join("outputs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, u32)> = entries
        .flatten()
        .map(|e| {
            let mode = e.metadata().expect("stat").permissions().mode() & 0o777;
            (e.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    files.sort();
    files
}

/// A project of `count` nodes run by `agent`, whose script writes its results, and
/// `outputs` patterns.
fn project(agent: &str, count: u32, outputs: &str, script: &str) -> Project {
    Project::new(&format!(
        "{}outputs: {outputs}\n",
        agent_yml(agent, count, "")
    ))
    .script(script)
}

const WRITES_RESULTS: &str = r#"#!/bin/sh
set -e
mkdir -p results out/deep
printf '{"node": %s}\n' "$TASKFLY_NODE_INDEX" > results/count.json
echo ignored > results/notes.txt
printf '#!/bin/sh\necho tool\n' > out/tool.sh
chmod 755 out/tool.sh
echo deep > out/deep/file.txt
ln -s /etc/hostname out/leak
echo done
"#;

async fn outputs_come_back_from_every_node(agent: &str) {
    let engine = TestEngine::start().await;
    let project = project(agent, 2, "[results/*.json, out/]", WRITES_RESULTS);
    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    let id = view.deployment_id.clone();

    let all = outputs(&engine, &id, None).await;
    for node in 0..2 {
        let count = content(&all, &format!("node-{node}/results/count.json"))
            .unwrap_or_else(|| panic!("{agent}: node {node}'s count in {all:#?}"));
        assert_eq!(count.content, format!("{{\"node\": {node}}}\n"));
        let tool = content(&all, &format!("node-{node}/out/tool.sh")).expect("tool");
        assert_eq!(tool.mode, 0o755, "{agent}: execute bits are kept");
        assert!(content(&all, &format!("node-{node}/out/deep/file.txt")).is_some());
    }
    assert!(
        !all.iter()
            .any(|e| e.path.ends_with("notes.txt") || e.path.contains("leak")),
        "{agent}: only what the patterns match, never a link out: {:?}",
        paths(&all)
    );
    let logs = engine.all_logs(&id).await;
    assert!(
        logs.iter().any(|l| l.stream == "stderr"
            && l.line.contains("outputs left out")
            && l.line.contains("leak")),
        "{agent}: the link left out is named in the node's log: {logs:#?}"
    );

    let one = outputs(&engine, &id, Some(1)).await;
    assert!(!one.is_empty());
    assert!(
        one.iter().all(|e| e.path.starts_with("node-1/")),
        "{one:#?}"
    );
    let missing = engine
        .engine
        .outputs(&id, Some(7))
        .await
        .expect_err("no node 7");
    assert!(missing.is_not_found(), "{missing}");

    let files = stored(&engine, &id);
    assert_eq!(
        files,
        [("0-1.tar".to_owned(), 0o600), ("1-1.tar".to_owned(), 0o600)],
        "one private archive per node attempt"
    );

    // Over HTTP, with the API token: the same archive.
    let download = tempfile::tempdir().expect("tempdir");
    let file = download.path().join("outputs.tar.gz");
    engine
        .client()
        .download_outputs(&id, Some(0), &file)
        .await
        .expect("download");
    let downloaded = entries_of(&std::fs::read(&file).expect("read"));
    assert_eq!(
        paths(&downloaded),
        paths(&outputs(&engine, &id, Some(0)).await)
    );
    let unknown = engine
        .client()
        .download_outputs(&id, Some(9), &file)
        .await
        .expect_err("404");
    assert!(unknown.is_not_found(), "{unknown}");

    // Cleanup removes them with the deployment's folder.
    engine.engine.cleanup(&id).await.expect("cleanup");
    assert!(
        stored(&engine, &id).is_empty(),
        "cleanup removes the outputs"
    );
    engine.stop().await;
}

async fn a_failed_script_still_sends_what_it_wrote(agent: &str) {
    let engine = TestEngine::start().await;
    let project = project(
        agent,
        1,
        "[partial.txt, never/*.csv]",
        "#!/bin/sh\necho half > partial.txt\necho broken >&2\nexit 3\n",
    );
    let view = engine.run(project.path()).await;
    let node = &view.nodes[0];
    assert_eq!(node.status.as_str(), "failed", "{agent}: {view:#?}");
    assert_eq!(
        node.error_message.as_deref(),
        Some("exited with code 3: broken"),
        "{agent}: an upload that went well adds nothing to the error"
    );
    let all = outputs(&engine, &view.deployment_id, None).await;
    assert_eq!(paths(&all), ["node-0/partial.txt"], "{agent}");
    engine.stop().await;
}

async fn outputs_over_the_limit_fail_the_node_and_keep_what_arrived(agent: &str) {
    let engine = TestEngine::start_with(|config| {
        config.output_limits(OutputLimits {
            max_node_bytes: 10,
            ..OutputLimits::default()
        })
    })
    .await;
    let project = project(
        agent,
        1,
        "[a.txt, b.txt]",
        "#!/bin/sh\nprintf 12345 > a.txt\nprintf 12345678901234567890 > b.txt\n",
    );
    let view = engine.run(project.path()).await;
    let node = &view.nodes[0];
    assert_eq!(node.status.as_str(), "failed", "{agent}: {view:#?}");
    assert_eq!(
        node.exit_code,
        Some(0),
        "{agent}: the script itself succeeded"
    );
    let message = node.error_message.clone().unwrap_or_default();
    assert!(
        message.starts_with("the script completed, but the outputs upload failed")
            && message.contains("per-node limit of 10 bytes")
            && message.contains("are kept"),
        "{agent}: {message}"
    );
    let all = outputs(&engine, &view.deployment_id, None).await;
    assert_eq!(
        paths(&all),
        ["node-0/a.txt"],
        "{agent}: what arrived is kept"
    );
    engine.stop().await;
}

async fn each_node_of_a_pooled_instance_sends_its_own_outputs(agent: &str) {
    let pool = PoolEngine::start(PoolConfig::new(1)).await;
    let yml = format!(
        "{}outputs: [result.txt]\n",
        agent_yml(agent, 3, "distributed_lists: {word: [alpha, beta, gamma]}")
    );
    let project = Project::new(&yml).script(
        "#!/bin/sh\n[ ! -e result.txt ] || { echo 'a previous node left its result' >&2; exit 1; }\necho \"$WORD\" > result.txt\n",
    );
    let view = pool.engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{agent}: {view:#?}");
    assert_eq!(
        pool.counting.launched().len(),
        1,
        "one instance served every node"
    );
    let all = outputs(&pool.engine, &view.deployment_id, None).await;
    let got: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e.path.as_str(), e.content.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("node-0/result.txt", "alpha\n"),
            ("node-1/result.txt", "beta\n"),
            ("node-2/result.txt", "gamma\n")
        ],
        "{agent}"
    );
    pool.stop().await;
}

for_both_agents!(
    outputs_come_back_from_every_node,
    a_failed_script_still_sends_what_it_wrote,
    outputs_over_the_limit_fail_the_node_and_keep_what_arrived,
    each_node_of_a_pooled_instance_sends_its_own_outputs,
);

/// A gzip tar holding one entry whose header is written by hand (the tar crate refuses to
/// write hostile names), of `kind` with `name` and, for a link, `target`.
fn hostile_tar(kind: tar::EntryType, name: &str, target: &str) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(0o644);
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"pwned"
    } else {
        b""
    };
    header.set_size(data.len() as u64);
    {
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
    }
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    gz.finish().expect("gzip")
}

fn good_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "result.txt", &b"42\n"[..])
        .expect("append");
    builder.into_inner().expect("tar").finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_endpoint_refuses_hostile_archives_and_takes_a_resend_once() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let project = Project::new(&format!("{}outputs: [result.txt]\n", local_yml(1, "")))
        .script("#!/bin/sh\nexit 0\n");
    let id = engine.deploy(project.path()).await;
    let calls = provider.wait_for_provisioned(&id, 1).await;
    poll_nodes_status(&engine, &id, "booting").await;
    let registered = Client::new(&engine.url, None)
        .expect("client")
        .register(&calls[0].provision_token)
        .await
        .expect("register");
    assert_eq!(
        registered.outputs,
        ["result.txt"],
        "the agent is told the patterns"
    );
    let token = registered.auth_token.clone();
    let upload = |body: Vec<u8>, content_type: &'static str| {
        let (url, token) = (engine.url.clone(), token.clone());
        async move {
            raw_request(
                &url,
                Method::POST,
                "/api/v1/nodes/outputs",
                Some(&token),
                Some((content_type, body)),
            )
            .await
        }
    };

    for (what, body) in [
        (
            "path traversal",
            hostile_tar(tar::EntryType::Regular, "../../escape", ""),
        ),
        (
            "absolute path",
            hostile_tar(tar::EntryType::Regular, "/tmp/escape", ""),
        ),
        (
            "symlink out",
            hostile_tar(tar::EntryType::Symlink, "out", "../../../etc"),
        ),
        (
            "hard link",
            hostile_tar(tar::EntryType::Link, "hard", "/etc/passwd"),
        ),
        ("not a gzip tar", b"garbage".to_vec()),
    ] {
        let response = upload(body, "application/gzip").await;
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        assert!(stored(&engine, &id).is_empty(), "{what}: nothing is stored");
    }
    assert_eq!(upload(good_tar(), "text/plain").await.status, 415);
    let no_token = raw_request(
        &engine.url,
        Method::POST,
        "/api/v1/nodes/outputs",
        None,
        Some(("application/gzip", good_tar())),
    )
    .await;
    assert_eq!(no_token.status, 401);

    for _ in 0..2 {
        let response = upload(good_tar(), "application/gzip").await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["files"], 1);
    }
    assert_eq!(
        stored(&engine, &id),
        [("0-1.tar".to_owned(), 0o600)],
        "a resend replaces"
    );
    let all = outputs(&engine, &id, None).await;
    assert_eq!(
        all.iter()
            .map(|e| (e.path.as_str(), e.content.as_str()))
            .collect::<Vec<_>>(),
        [("node-0/result.txt", "42\n")]
    );

    let node = Client::new(&engine.url, Some(token.clone())).expect("client");
    for status in ["downloading_assets", "running_script", "completed"] {
        node.report_status(&taskfly::wire::StatusRequest {
            status: status.parse().expect("status"),
            message: None,
            exit_code: (status == "completed").then_some(0),
        })
        .await
        .expect(status);
    }
    let late = upload(good_tar(), "application/gzip").await;
    assert_eq!(
        late.status,
        409,
        "a final node takes no more outputs: {}",
        late.text()
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_without_outputs_serves_an_empty_archive() {
    let engine = TestEngine::start().await;
    let project = Project::new(&local_yml(1, "")).script("#!/bin/sh\necho hi > result.txt\n");
    let view = engine.run(project.path()).await;
    assert_eq!(view.status.as_str(), "completed", "{view:#?}");
    assert!(outputs(&engine, &view.deployment_id, None).await.is_empty());
    assert!(stored(&engine, &view.deployment_id).is_empty());
    let unknown = engine
        .engine
        .outputs("dep-0000000000000000", None)
        .await
        .expect_err("unknown");
    assert!(unknown.is_not_found());
    engine.stop().await;
}

/// Checks that `dir` holds these files (relative paths) with these contents.
fn assert_files(dir: &Path, expected: &[(&str, &str)]) {
    for (relative, content) in expected {
        let path = dir.join(relative);
        let got =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got, *content, "{}", path.display());
    }
}

#[test]
fn taskfly_outputs_writes_node_folders_and_never_overwrites_without_force() {
    let daemon = Daemon::start();
    let project = project(
        "rust",
        2,
        "[results/]",
        "#!/bin/sh\nmkdir -p results\necho \"node $TASKFLY_NODE_INDEX\" > results/count.txt\n",
    );
    let id = daemon.up(project.path());
    daemon.wait_for_status(&id, cli_run::COMMAND_LIMIT, "completed", |s| {
        s["status"] == "completed"
    });
    let work = tempfile::tempdir().expect("tempdir");
    let dest = work.path().join("got");

    let ran = daemon.cli(&["outputs", "last", "--dest", path_str(&dest)]);
    ran.expect_success();
    assert!(
        ran.stdout.contains("outputs of 2 node(s) written to"),
        "{}",
        ran.show()
    );
    assert_files(
        &dest,
        &[
            ("node-0/results/count.txt", "node 0\n"),
            ("node-1/results/count.txt", "node 1\n"),
        ],
    );

    std::fs::write(dest.join("node-1/results/count.txt"), "edited").expect("edit");
    let refused = daemon.cli(&["outputs", &id[..8], "--dest", path_str(&dest)]);
    refused.expect_code(1);
    assert!(
        refused
            .stderr
            .contains("node-0/results/count.txt already exists (and 1 more)")
            && refused.stderr.contains("--force"),
        "the path and the way out: {}",
        refused.show()
    );
    assert_files(&dest, &[("node-1/results/count.txt", "edited")]);

    let forced = daemon.cli(&[
        "outputs",
        &id,
        "--dest",
        path_str(&dest),
        "--node",
        "1",
        "--force",
    ]);
    forced.expect_success();
    assert_files(&dest, &[("node-1/results/count.txt", "node 1\n")]);

    // The default destination is ./<deployment id>/ in the working directory.
    let ran = cli_run::run(
        daemon
            .taskfly(&["outputs", &id, "--node", "0", "--output", "json"])
            .current_dir(work.path()),
    );
    ran.expect_success();
    assert_eq!(ran.json()["files"][0], "node-0/results/count.txt");
    assert_files(
        &work.path().join(&id),
        &[("node-0/results/count.txt", "node 0\n")],
    );

    daemon.cli(&["outputs", &id, "--node", "5"]).expect_code(1);
    daemon.stop();
}

#[test]
fn taskfly_run_brings_the_outputs_back_unless_told_not_to() {
    let project = project(
        "rust",
        2,
        "[result.txt]",
        "#!/bin/sh\necho \"$TASKFLY_NODE_INDEX\" > result.txt\n",
    );
    let home = tempfile::tempdir().expect("home");
    let work = tempfile::tempdir().expect("work");
    let ran = cli_run::run(
        cli_run::command("taskfly", home.path())
            .args(["run", "--output", "json"])
            .arg(project.path())
            .current_dir(work.path()),
    );
    ran.expect_success();
    let id = ran.json()["deployment_id"]
        .as_str()
        .expect("deployment id")
        .to_owned();
    assert!(
        ran.stderr_lines()
            .iter()
            .any(|l| *l == format!("outputs of 2 node(s) written to {id}/ (2 files)")),
        "one line says where: {}",
        ran.show()
    );
    assert_files(
        &work.path().join(&id),
        &[("node-0/result.txt", "0\n"), ("node-1/result.txt", "1\n")],
    );

    let skipped = tempfile::tempdir().expect("work");
    let ran = cli_run::run(
        cli_run::command("taskfly", home.path())
            .args(["run", "--no-outputs"])
            .arg(project.path())
            .current_dir(skipped.path()),
    );
    ran.expect_success();
    assert_eq!(
        std::fs::read_dir(skipped.path()).expect("dir").count(),
        0,
        "nothing collected: {}",
        ran.show()
    );
    assert!(!ran.stderr.contains("written to"), "{}", ran.show());
}
