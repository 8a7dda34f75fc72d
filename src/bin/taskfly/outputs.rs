//! `taskfly outputs` and what `taskfly run` collects: a deployment's outputs archive,
//! downloaded (or read from the embedded engine) and unpacked as `DIR/node-<index>/<path>`.

use std::path::{Path, PathBuf};

use taskfly::bundle::BundleLimits;
use taskfly::Orchestrator;

use crate::commands::{client, failed, failure, resolve_id, Failure, EXIT_FAILED, EXIT_OK};
use crate::{Cli, Output};

/// What an archive from the daemon may hold once unpacked: the daemon's own limits (4 GiB and
/// 10,000 entries per node by default) are checked where the outputs arrive; these only keep a
/// hostile daemon from filling the disk without bound.
const EXTRACT_LIMITS: BundleLimits = BundleLimits {
    max_total_bytes: 1 << 40,
    max_files: 10_000_000,
};

/// `taskfly outputs DEP [--dest DIR] [--node I] [--force]`.
pub(crate) async fn outputs(
    cli: &Cli,
    id: &str,
    dest: Option<&Path>,
    node: Option<u32>,
    force: bool,
) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = resolve_id(cli, &client, id).await?;
    let dest = dest.map_or_else(|| PathBuf::from(&id), Path::to_path_buf);
    let download = temp_archive_path();
    let downloaded = client.download_outputs(&id, node, &download).await;
    let written = match downloaded {
        Ok(_) => unpack(&download, &dest, force).await,
        Err(e) => Err(failure(Some(cli), e)),
    };
    let _ = std::fs::remove_file(&download);
    let files = written?;
    report(cli.output, &id, &dest, &files, true);
    Ok(EXIT_OK)
}

/// After `taskfly run`: the outputs of every node into `./<deployment id>/`. Says where they
/// went (one line on stderr) when there were any.
pub(crate) async fn collect_after_run(engine: &Orchestrator, id: &str, format: Output) -> u8 {
    let dest = PathBuf::from(id);
    let archive = temp_archive_path();
    let collected = async {
        let mut reader = engine
            .outputs(id, None)
            .await
            .map_err(|e| e.report().to_string())?;
        let mut file = tokio::fs::File::create(&archive)
            .await
            .map_err(|e| format!("cannot create {}: {e}", archive.display()))?;
        tokio::io::copy(&mut reader, &mut file)
            .await
            .map_err(|e| format!("cannot write {}: {e}", archive.display()))?;
        unpack(&archive, &dest, false)
            .await
            .map_err(|failure| failure.message().to_owned())
    }
    .await;
    let _ = std::fs::remove_file(&archive);
    match collected {
        Ok(files) => {
            if !files.is_empty() {
                report(format, id, &dest, &files, false);
            }
            EXIT_OK
        }
        Err(why) => {
            eprintln!(
                "error: cannot collect the outputs into {}: {why}",
                dest.display()
            );
            EXIT_FAILED
        }
    }
}

/// A fresh file name for the downloaded archive.
fn temp_archive_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "taskfly-outputs-{}-{nanos}.tar.gz",
        std::process::id()
    ))
}

/// Unpacks `archive` into `dest` (checked entry by entry; an existing file is replaced only
/// with `force`). Returns the files written; a `dest` that stayed empty is removed.
async fn unpack(archive: &Path, dest: &Path, force: bool) -> Result<Vec<String>, Failure> {
    let (archive, dest) = (archive.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&archive)
            .map_err(|e| failed(format!("cannot read {}: {e}", archive.display())))?;
        let existed = dest.exists();
        let summary = taskfly::bundle::extract_outputs(
            std::io::BufReader::new(file),
            &dest,
            &EXTRACT_LIMITS,
            force,
        );
        if !existed {
            // Nothing to show: no empty folder is left behind either.
            let _ = std::fs::remove_dir(&dest);
        }
        summary
            .map(|summary| summary.files)
            .map_err(|e| failure(None, e))
    })
    .await
    .map_err(|e| failed(format!("unpacking the outputs failed: {e}")))?
}

/// Says what was written where: on stdout for `taskfly outputs` (a JSON document with
/// `--output json`), on stderr after `taskfly run`, whose stdout belongs to the run.
fn report(format: Output, id: &str, dest: &Path, files: &[String], on_stdout: bool) {
    let nodes = files
        .iter()
        .filter_map(|f| f.split('/').next())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if on_stdout && format == Output::Json {
        let doc = serde_json::json!({
            "deployment_id": id,
            "dest": dest.display().to_string(),
            "files": files,
        });
        println!("{doc}");
        return;
    }
    let line = if files.is_empty() {
        format!("deployment {id} has no outputs")
    } else {
        format!(
            "outputs of {nodes} node(s) written to {}/ ({} file{})",
            dest.display(),
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        )
    };
    if on_stdout {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
}
