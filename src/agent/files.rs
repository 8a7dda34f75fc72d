//! The node's files: downloading and extracting its bundle, finding its script, and removing
//! what a pooled node leaves behind before the next one.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::node::Node;
use super::script::{exec_plan, read_head, Prepared};
use crate::api::client::Downloaded;
use crate::bundle::{extract_bundle, BundleLimits};
use crate::error::{Error, Result};

/// The name of the downloaded worker bundle inside the work directory, removed once extracted.
pub(super) const ASSETS_FILE: &str = ".taskfly-assets.tar.gz";

/// Bundles the daemon announces at up to this size are kept in memory from the download to the
/// extraction: no archive file is written (nor synced, nor removed) per node. Larger ones go
/// through [`ASSETS_FILE`], so memory stays bounded whatever the bundle, also with hundreds of
/// agent tasks in one process (200 local nodes downloading at once: at most 50 MiB).
const IN_MEMORY_BUNDLE_BYTES: u64 = 256 * 1024;

/// A downloaded bundle on its way to extraction.
enum Archive {
    InMemory(bytes::Bytes),
    File(PathBuf),
}

impl Node<'_> {
    /// Downloads, extracts and checks the bundle. `Ok(None)`: stopped meanwhile. `Err`: why the
    /// node cannot run, for the `failed` report.
    pub(super) async fn prepare(&self) -> std::result::Result<Option<Prepared>, String> {
        let work_dir = &self.config.work_dir;
        tokio::fs::create_dir_all(work_dir).await.map_err(|e| {
            format!(
                "cannot create the work directory {}: {e}",
                work_dir.display()
            )
        })?;
        let archive_file = work_dir.join(ASSETS_FILE);
        let downloaded = tokio::select! {
            () = self.stop.cancelled() => None,
            downloaded = self
                .client
                .download_assets_or_keep(&archive_file, Some(IN_MEMORY_BUNDLE_BYTES)) => Some(downloaded),
        };
        let archive = match downloaded {
            None => {
                remove_quietly(&archive_file).await;
                return Ok(None);
            }
            Some(Ok(Downloaded::InMemory(data))) => {
                tracing::debug!(node_id = %self.node_id(), bytes = data.len(), "downloaded the assets");
                Archive::InMemory(data)
            }
            Some(Ok(Downloaded::File(bytes))) => {
                tracing::debug!(node_id = %self.node_id(), bytes, "downloaded the assets");
                Archive::File(archive_file.clone())
            }
            Some(Err(error)) => {
                remove_quietly(&archive_file).await;
                return Err(format!("cannot download the assets: {}", error.report()));
            }
        };

        let dest = bundle_dir(work_dir, self.registration.dest_dir.as_deref());
        let script = self.registration.script.clone();
        // One trip to a blocking thread for everything on disk: extraction, then the script's
        // checks.
        let unpacked = tokio::task::spawn_blocking(move || unpack(&archive, &dest, &script)).await;
        let (files, prepared) = match unpacked {
            Ok(unpacked) => unpacked,
            Err(e) => {
                remove_quietly(&archive_file).await;
                return Err(format!("the extraction of the bundle failed: {e}"));
            }
        };
        if let Some(files) = files {
            let _ = self.bundle_files.set(files);
        }
        prepared.map(Some)
    }
}

/// Extracts `archive` into `dest` and finds the script `name` in it (blocking). Also returns
/// what the extraction leaves behind for a pooled node to remove, judged before it starts:
/// whether it creates `dest` or fills an empty one decides what goes once the node has ended
/// (a directory it refuses, not empty, is left as it is). An archive file is removed.
fn unpack(
    archive: &Archive,
    dest: &Path,
    name: &str,
) -> (Option<BundleFiles>, std::result::Result<Prepared, String>) {
    let files = BundleFiles::plan(dest);
    let extracted = match archive {
        Archive::InMemory(data) => extract_bundle(&data[..], dest, &BundleLimits::default()),
        Archive::File(path) => {
            let extracted = match std::fs::File::open(path) {
                Ok(file) => {
                    extract_bundle(io::BufReader::new(file), dest, &BundleLimits::default())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return (
                        files,
                        Err(format!("cannot open the downloaded assets: {e}")),
                    );
                }
            };
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a temporary file");
            }
            extracted
        }
    };
    let prepared = extracted
        .map_err(|e| {
            format!(
                "cannot extract the bundle into {}: {}",
                dest.display(),
                e.report()
            )
        })
        .and_then(|summary| {
            tracing::debug!(
                files = summary.files.len(),
                bytes = summary.total_bytes,
                "extracted the bundle"
            );
            find_script(dest, name)
        });
    (files, prepared)
}

/// The extracted bundle's script `name`, checked and with the way to start it (blocking).
fn find_script(dest: &Path, name: &str) -> std::result::Result<Prepared, String> {
    let root = std::fs::canonicalize(dest)
        .map_err(|e| format!("cannot open the bundle directory {}: {e}", dest.display()))?;
    let script = resolve_script(&root, name)?;
    let metadata = match std::fs::metadata(&script) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("script {name} not found in the bundle"))
        }
        Err(e) => return Err(format!("cannot read script {name}: {e}")),
    };
    if !metadata.is_file() {
        return Err(format!("script {name} is not a regular file"));
    }
    let head = read_head(&script).map_err(|e| format!("cannot read script {name}: {e}"))?;
    let plan = exec_plan(metadata.permissions().mode(), &head);
    Ok(Prepared { root, script, plan })
}

pub(super) async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove a temporary file");
        }
    }
}

/// The files of a pooled node's bundle to remove once the node has ended, so that the next
/// node extracts into the same clean directory a fresh agent would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BundleFiles {
    /// The extraction creates the bundle directory: remove this, the outermost directory it
    /// creates (the bundle directory itself, or the first of its parents that did not exist).
    Created(PathBuf),
    /// The bundle directory exists and is empty: remove what is in it, never the directory.
    Contents(PathBuf),
}

impl BundleFiles {
    /// What the extraction into `dest` will leave behind, judged before it starts. `None` when
    /// `dest` is not an empty directory: the extraction refuses it, and nothing there is the
    /// node's.
    fn plan(dest: &Path) -> Option<BundleFiles> {
        match std::fs::metadata(dest) {
            Ok(metadata) if metadata.is_dir() => {
                let mut entries = std::fs::read_dir(dest).ok()?;
                if entries.next().is_some() {
                    return None;
                }
                std::fs::canonicalize(dest).ok().map(BundleFiles::Contents)
            }
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BundleFiles::created(dest),
            Err(_) => None,
        }
    }

    /// For a `dest` that does not exist: the outermost missing directory on its way, resolved
    /// through the deepest one that exists. `None` when the missing part of the path climbs
    /// with `..`: where it leads is not known before it exists (`/missing/../tmp` is `/tmp`
    /// once `/missing` has been created), so nothing is removed rather than the wrong thing.
    fn created(dest: &Path) -> Option<BundleFiles> {
        let existing = dest.ancestors().skip(1).find(|ancestor| {
            // An empty ancestor is the current directory of a relative path.
            ancestor.as_os_str().is_empty() || std::fs::symlink_metadata(ancestor).is_ok()
        });
        let outermost = existing.and_then(|existing| {
            let missing = dest.strip_prefix(existing).ok()?;
            let mut components = missing.components();
            let first = match components.next()? {
                Component::Normal(name) => name,
                _ => return None,
            };
            if !components.all(|c| matches!(c, Component::Normal(_))) {
                return None;
            }
            let base = if existing.as_os_str().is_empty() {
                std::env::current_dir().ok()?
            } else {
                std::fs::canonicalize(existing).ok()?
            };
            Some(base.join(first))
        });
        outermost.map(BundleFiles::Created)
    }

    /// Removes the files. Errors: something could not be removed; the next node would not
    /// start clean.
    pub(super) async fn remove(self) -> Result<()> {
        match tokio::task::spawn_blocking(move || self.remove_now()).await {
            Ok(removed) => removed,
            Err(e) => Err(Error::io(
                "cannot remove the previous node's files",
                io::Error::other(e.to_string()),
            )),
        }
    }

    fn remove_now(&self) -> Result<()> {
        let failed = |path: &Path, e: io::Error| {
            Error::io(
                format!(
                    "cannot remove the previous node's files in {}",
                    path.display()
                ),
                e,
            )
        };
        match self {
            BundleFiles::Created(dir) => {
                if is_protected(dir) {
                    return Err(refuse_protected(dir));
                }
                remove_tree(dir).map_err(|e| failed(dir, e))
            }
            BundleFiles::Contents(dir) => {
                match std::fs::symlink_metadata(dir) {
                    Ok(metadata) if metadata.is_dir() => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    // The script put something else in the directory's place: whatever that
                    // leads to is not the node's to empty.
                    Ok(_) => {
                        return Err(failed(dir, io::Error::other("it is no longer a directory")))
                    }
                    Err(e) => return Err(failed(dir, e)),
                }
                if is_protected(dir) {
                    return Err(refuse_protected(dir));
                }
                let entries = std::fs::read_dir(dir).map_err(|e| failed(dir, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| failed(dir, e))?;
                    remove_tree(&entry.path()).map_err(|e| failed(dir, e))?;
                }
                Ok(())
            }
        }
    }
}

/// `/` and the home directory are never removed or emptied, whatever a deployment names.
fn is_protected(dir: &Path) -> bool {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .and_then(|home| std::fs::canonicalize(home).ok());
    canonical.parent().is_none() || home.is_some_and(|home| home == canonical)
}

fn refuse_protected(dir: &Path) -> Error {
    Error::io(
        format!(
            "will not remove the previous node's files in {}",
            dir.display()
        ),
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "it is the root or the home directory",
        ),
    )
}

/// Removes `path` (a file, a link, or a directory with everything in it), without following
/// links. A directory the script made read-only is made writable and the removal tried again.
fn remove_tree(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !metadata.is_dir() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_owner_writable(path);
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

/// Gives the owner full access to `dir` and every directory below it (links not followed), as
/// far as it can.
fn make_owner_writable(dir: &Path) {
    let Ok(metadata) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !metadata.is_dir() {
        return;
    }
    let mode = metadata.permissions().mode() | 0o700;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_owner_writable(&entry.path());
        }
    }
}

/// Where the bundle goes: `remote_dest_dir` (a leading `~/` meaning the home directory,
/// relative paths taken from the work directory), else `work_dir/bundle`.
fn bundle_dir(work_dir: &Path, dest_dir: Option<&str>) -> PathBuf {
    let Some(dest) = dest_dir.map(str::trim).filter(|d| !d.is_empty()) else {
        return work_dir.join("bundle");
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let expanded = match (dest.strip_prefix("~/"), dest == "~", home) {
        (Some(rest), _, Some(home)) => home.join(rest),
        (None, true, Some(home)) => home,
        _ => PathBuf::from(dest),
    };
    work_dir.join(expanded)
}

/// The script's path inside the bundle; refuses an absolute path or one climbing out with `..`.
fn resolve_script(root: &Path, script: &str) -> std::result::Result<PathBuf, String> {
    let relative = Path::new(script);
    let mut has_name = false;
    for component in relative.components() {
        match component {
            Component::Normal(_) => has_name = true,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(format!(
                    "script path {script} must be relative to the bundle and stay inside it"
                ))
            }
        }
    }
    if !has_name {
        return Err("the deployment names no script to run".to_string());
    }
    Ok(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_must_stay_inside_the_bundle() {
        let root = Path::new("/b");
        assert_eq!(
            resolve_script(root, "setup.sh").expect("plain"),
            PathBuf::from("/b/setup.sh")
        );
        assert_eq!(
            resolve_script(root, "./bin/run.sh").expect("nested"),
            PathBuf::from("/b/./bin/run.sh")
        );
        for bad in ["/etc/passwd", "../x.sh", "bin/../../x.sh", "", "."] {
            assert!(resolve_script(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bundle_unpacks_alike_from_memory_and_from_a_file_which_then_goes() {
        let temp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(temp.path()).expect("canonical");
        let data = crate::agent::fake_daemon::bundle("#!/bin/sh\necho hi\n");

        let in_memory = root.join("memory/bundle");
        let (files, prepared) = unpack(
            &Archive::InMemory(bytes::Bytes::from(data.clone())),
            &in_memory,
            "setup.sh",
        );
        let from_memory = prepared.expect("unpacked from memory");
        assert_eq!(files, Some(BundleFiles::Created(root.join("memory"))));
        assert_eq!(from_memory.script, in_memory.join("setup.sh"));

        let archive = root.join(ASSETS_FILE);
        std::fs::write(&archive, &data).expect("write");
        let from_file = root.join("file/bundle");
        let (_, prepared) = unpack(&Archive::File(archive.clone()), &from_file, "setup.sh");
        let from_file_prepared = prepared.expect("unpacked from a file");
        assert_eq!(from_file_prepared.plan, from_memory.plan);
        assert_eq!(
            std::fs::read(from_file_prepared.script).expect("script"),
            std::fs::read(&from_memory.script).expect("script")
        );
        assert!(!archive.exists(), "the archive file is removed");

        // A broken archive file goes too, and the failure names the folder.
        std::fs::write(&archive, b"not a bundle").expect("write");
        let broken = root.join("broken");
        let (_, prepared) = unpack(&Archive::File(archive.clone()), &broken, "setup.sh");
        let problem = prepared.expect_err("refused");
        assert!(problem.contains(&broken.display().to_string()), "{problem}");
        assert!(!archive.exists(), "the archive file is removed");

        let (_, prepared) = unpack(
            &Archive::InMemory(bytes::Bytes::from(data)),
            &root.join("other"),
            "missing.sh",
        );
        assert_eq!(
            prepared.expect_err("no such script"),
            "script missing.sh not found in the bundle"
        );
    }

    #[test]
    fn bundle_dir_defaults_to_the_work_dir() {
        let work = Path::new("/w/node");
        assert_eq!(bundle_dir(work, None), PathBuf::from("/w/node/bundle"));
        assert_eq!(bundle_dir(work, Some(" ")), PathBuf::from("/w/node/bundle"));
        assert_eq!(
            bundle_dir(work, Some("/opt/job")),
            PathBuf::from("/opt/job")
        );
        assert_eq!(bundle_dir(work, Some("job")), PathBuf::from("/w/node/job"));
    }

    #[test]
    fn bundle_files_to_remove_are_what_the_extraction_makes() {
        let temp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(temp.path()).expect("canonical");

        // Missing parents: the outermost one the extraction creates goes.
        let nested = root.join("a/b/c");
        let plan = BundleFiles::plan(&nested).expect("plan");
        assert_eq!(plan, BundleFiles::Created(root.join("a")));
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(nested.join("f"), "x").expect("write");
        plan.remove_now().expect("removed");
        assert!(!root.join("a").exists());
        assert!(root.is_dir());

        // A directory that exists, empty, stays; what is in it goes, links not followed.
        let outside = root.join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep.txt"), "keep").expect("write");
        let existing = root.join("pre");
        std::fs::create_dir(&existing).expect("mkdir");
        let plan = BundleFiles::plan(&existing).expect("plan");
        assert_eq!(plan, BundleFiles::Contents(existing.clone()));
        std::fs::create_dir(existing.join("ro")).expect("mkdir");
        std::fs::write(existing.join("ro/f"), "x").expect("write");
        std::fs::set_permissions(existing.join("ro"), std::fs::Permissions::from_mode(0o555))
            .expect("chmod");
        std::fs::write(existing.join(".hidden"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, existing.join("link")).expect("symlink");
        plan.remove_now().expect("removed");
        assert!(existing.is_dir());
        assert_eq!(std::fs::read_dir(&existing).expect("read").count(), 0);
        assert!(outside.join("keep.txt").is_file());

        // A directory the extraction refuses is not the node's.
        assert_eq!(BundleFiles::plan(&root), None);
        assert_eq!(BundleFiles::plan(&outside.join("keep.txt")), None);

        // `..` resolved through a directory that exists; not through one that does not.
        assert_eq!(
            BundleFiles::plan(&outside.join("../job")),
            Some(BundleFiles::Created(root.join("job")))
        );
        assert_eq!(BundleFiles::plan(&root.join("nope/../job")), None);

        // A directory replaced by a link is not followed.
        let replaced = root.join("replaced");
        std::fs::create_dir(&replaced).expect("mkdir");
        let plan = BundleFiles::plan(&replaced).expect("plan");
        std::fs::remove_dir(&replaced).expect("rmdir");
        std::os::unix::fs::symlink(&outside, &replaced).expect("symlink");
        plan.remove_now().expect_err("not a directory any more");
        assert!(outside.join("keep.txt").is_file());

        assert!(is_protected(Path::new("/")));
        if let Some(home) = std::env::var_os("HOME").filter(|h| Path::new(h).is_dir()) {
            assert!(is_protected(Path::new(&home)));
        }
        assert!(!is_protected(&root));
    }
}
