//! Helpers for the engine tests: hand-built (hostile) bundles, bounded polling of a
//! deployment's state, unique markers and file searches.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taskfly::wire::{DeploymentView, LogLineView};

use super::TestEngine;

/// How long a bounded poll waits before the test fails.
pub const POLL_LIMIT: Duration = Duration::from_secs(30);

/// A fresh random hex string, for markers no other test (or run) uses.
pub fn unique_marker() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex of `bytes`, as `od -An -v -tx1 | tr -d ' \n'` (the script of [`print_hex_of`])
/// prints it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Metadata values a careless shell would misread or run, keyed by name: quotes, command
/// substitutions, newlines, a `;`, non-ASCII text, redirections and globs, blanks around. The
/// ones that would run something touch a file named `{pwned}_…`. Each test adds its own `sq`
/// (single quotes).
pub fn metadata_values_to_misread(pwned: &str) -> BTreeMap<&'static str, String> {
    [
        ("dq", r#"say "hi" and "bye""#.to_owned()),
        ("sub", format!("$(touch {pwned}_sub)")),
        ("bt", format!("`touch {pwned}_bt`")),
        ("nl", "first line\nsecond line\n\nfourth line".to_owned()),
        ("semi", format!("a; touch {pwned}_semi; echo b")),
        ("uni", "héllo ✓ — 日本".to_owned()),
        (
            "mix",
            format!("\"'$HOME ${{PATH}} \\ back\\slash\t| & > {pwned}_redirect < * ? ~ !"),
        ),
        ("pad", "  padded  \n".to_owned()),
    ]
    .into_iter()
    .collect()
}

/// The `global_metadata:` lines of a `taskfly.yml` (for [`local_yml`](super::local_yml)'s
/// `nodes:`) setting `values`.
pub fn global_metadata_yml(values: &BTreeMap<&str, String>) -> String {
    // YAML accepts JSON strings, so serde_json writes each value exactly.
    let mut yml = String::from("global_metadata:\n");
    for (key, value) in values {
        yml.push_str(&format!(
            "  {key}: {}\n",
            serde_json::to_string(value).expect("json")
        ));
    }
    yml
}

/// A script line printing `KEY=` and the hex of the environment variable `KEY` (`key` in
/// upper case), which [`hex`] matches.
pub fn print_hex_of(key: &str) -> String {
    let name = key.to_ascii_uppercase();
    format!("printf '{name}='; printf '%s' \"${name}\" | od -An -v -tx1 | tr -d ' \\n'; echo\n")
}

/// The value the secrets tests give their nodes as the secret `db_password`.
pub const SECRET: &str = "s3cr3t-value";

/// The `secrets:` line giving every node `DB_PASSWORD=`[`SECRET`].
pub fn secret_metadata() -> String {
    format!("secrets: {{db_password: \"{SECRET}\"}}")
}

/// Prints `match` when `DB_PASSWORD` is [`SECRET`] (spelled in two pieces, so only the
/// environment brings it whole), prints it on stdout and on stderr, then fails with exit 1.
pub const SECRET_SCRIPT: &str = "#!/bin/sh\n\
    [ \"$DB_PASSWORD\" = \"s3cr3t-\"\"value\" ] && echo match\n\
    echo \"stdout says $DB_PASSWORD\"\n\
    echo \"stderr says $DB_PASSWORD\" >&2\n\
    exit 1\n";

/// Polls the deployment (waking on every engine change, at least every 100 ms) until `done`
/// holds, and returns the view that satisfied it; fails the test after [`POLL_LIMIT`].
pub async fn poll_until(
    engine: &TestEngine,
    deployment_id: &str,
    what: &str,
    done: impl FnMut(&DeploymentView) -> bool,
) -> DeploymentView {
    poll_until_within(engine, deployment_id, what, POLL_LIMIT, done).await
}

/// [`poll_until`] with a limit of its own, for what takes longer by design.
pub async fn poll_until_within(
    engine: &TestEngine,
    deployment_id: &str,
    what: &str,
    limit: Duration,
    mut done: impl FnMut(&DeploymentView) -> bool,
) -> DeploymentView {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let view = engine.view(deployment_id).await.expect("deployment");
        if done(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?}; last view: {view:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until every node of the deployment is in `status`.
pub async fn poll_nodes_status(
    engine: &TestEngine,
    deployment_id: &str,
    status: &str,
) -> DeploymentView {
    poll_until(
        engine,
        deployment_id,
        &format!("every node {status}"),
        |view| !view.nodes.is_empty() && view.nodes.iter().all(|n| n.status.as_str() == status),
    )
    .await
}

/// The lines (text only) node `index` wrote, in order.
pub fn node_lines(logs: &[LogLineView], index: u32) -> Vec<String> {
    logs.iter()
        .filter(|l| l.node_index == index)
        .map(|l| l.line.clone())
        .collect()
}

/// Every path under `root` (not following symbolic links) whose file name starts with
/// `prefix`.
pub fn find_named(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path.clone());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            }
        }
    }
    found
}

/// The names of the entries of a directory, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A client bundle of `project` holding `taskfly.yml` and the files `patterns` name, written
/// by the crate's own bundler (as `taskfly up` does), without validating `taskfly.yml`.
pub fn client_bundle(project: &Path, patterns: &[&str]) -> Vec<u8> {
    let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
    let mut bytes = Vec::new();
    taskfly::bundle::write_client_bundle(project, &patterns, &mut bytes).expect("client bundle");
    bytes
}

/// One entry of a hand-built tar archive; names and link targets are written into the header
/// as raw bytes, so entries the `tar` crate's own setters refuse (`../x`, `/abs`) can be made.
pub enum RawEntry<'a> {
    File {
        name: &'a [u8],
        mode: u32,
        data: &'a [u8],
    },
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
}

/// A gzip tar archive of `entries`, exactly as given.
pub fn raw_bundle(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    for entry in entries {
        let mut header = tar::Header::new_old();
        let (name, data): (&[u8], &[u8]) = match entry {
            RawEntry::File { name, mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                (name, data)
            }
            RawEntry::Symlink { name, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                let link = &mut header.as_old_mut().linkname;
                assert!(target.len() < link.len(), "link target too long");
                link[..target.len()].copy_from_slice(target);
                (name, &[])
            }
        };
        let slot = &mut header.as_old_mut().name;
        assert!(name.len() < slot.len(), "entry name too long");
        slot[..name.len()].copy_from_slice(name);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append(&header, data).expect("append entry");
    }
    let mut encoder = builder.into_inner().expect("finish tar");
    encoder.flush().expect("flush");
    encoder.finish().expect("finish gzip")
}
