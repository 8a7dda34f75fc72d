//! Hostile bundles: [`extract_bundle`] and [`split_client_bundle`] on untrusted bytes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use taskfly::bundle::{extract_bundle, split_client_bundle, BundleLimits, BundleSummary};

/// Small limits, so that one input never writes more than a megabyte.
pub const LIMITS: BundleLimits = BundleLimits {
    max_total_bytes: 1 << 20,
    max_files: 256,
};

/// The most bytes the worker bundle written by [`split_client_bundle`] may take: its data is
/// capped by [`LIMITS`], and 256 entries of headers add less than the rest.
const MAX_WORKER_BUNDLE: usize = 4 << 20;

/// `ENAMETOOLONG`: an entry path of up to 4096 bytes (what the validator accepts) plus the
/// destination directory can exceed what the kernel takes, which is an I/O error, not a bug.
const ENAMETOOLONG: i32 = 36;

/// Feeds `gzip` to [`extract_bundle`] and [`split_client_bundle`] and checks that:
///
/// - nothing was written outside the destination, whether extraction succeeded or not, and no
///   symbolic link in it resolves outside it (followed the way the kernel follows links);
/// - only files, directories and links were created, and no file is setuid or setgid;
/// - a successful extraction created exactly the files its summary lists, with their sizes;
/// - a bundle that splitting accepts, extraction accepts too (they share one set of rules), and
///   the worker bundle that splitting writes extracts to the same files minus `taskfly.yml`.
pub fn check(gzip: &[u8]) {
    let scratch = Scratch::new();
    let extracted = extract_bundle(gzip, &scratch.dest, &LIMITS);
    scratch.check_contained();
    if let Ok(summary) = &extracted {
        scratch.check_matches(summary);
    }

    let mut worker = CappedWriter::default();
    let Ok((config_text, split_summary)) = split_client_bundle(gzip, &mut worker, &LIMITS) else {
        return;
    };
    match &extracted {
        Ok(summary) => {
            let mut without_config = summary.clone();
            let at = without_config
                .files
                .iter()
                .position(|file| file == "taskfly.yml")
                .expect("split_client_bundle accepted a bundle without taskfly.yml");
            without_config.files.remove(at);
            without_config.total_bytes -= config_text.len() as u64;
            assert_eq!(split_summary, without_config, "split and extract disagree");
        }
        Err(err) if has_os_error(err, ENAMETOOLONG) => {}
        Err(err) => panic!("split_client_bundle accepted a bundle extract_bundle refuses: {err:?}"),
    }

    let again = Scratch::new();
    match extract_bundle(&worker.bytes[..], &again.dest, &LIMITS) {
        Ok(summary) => {
            assert_eq!(
                summary, split_summary,
                "the worker bundle holds other files"
            );
            again.check_matches(&summary);
        }
        Err(err) if has_os_error(&err, ENAMETOOLONG) => {}
        Err(err) => panic!("the worker bundle written by split_client_bundle is refused: {err:?}"),
    }
    again.check_contained();
}

/// Whether `err`, or an error it was caused by, is the OS error `code`.
fn has_os_error(err: &taskfly::Error, code: i32) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(code) {
                return true;
            }
        }
        source = current.source();
    }
    false
}

/// A writer that refuses to grow past [`MAX_WORKER_BUNDLE`].
#[derive(Default)]
struct CappedWriter {
    bytes: Vec<u8>,
}

impl Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_WORKER_BUNDLE {
            return Err(io::Error::other("worker bundle larger than the fuzz cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `outer/root/dest`, where the bundle is extracted: anything that appears in `outer` or `root`
/// besides the way down to `dest` escaped from it. Removed on drop.
struct Scratch {
    outer: tempfile::TempDir,
    root: PathBuf,
    dest: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        // A tmpfs keeps the many small extractions off the disk when it is there.
        let outer = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("taskfly-fuzz-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("taskfly-fuzz-").tempdir(),
        }
        .expect("create a scratch directory");
        // Canonical, so that resolved link targets can be compared with it.
        let outer_path = fs::canonicalize(outer.path()).expect("canonicalize the scratch");
        let root = outer_path.join("root");
        let dest = root.join("dest");
        fs::create_dir_all(&dest).expect("create the destination");
        Scratch { outer, root, dest }
    }

    /// Checks that nothing exists beside `root` and `dest`, and that no link under `dest`
    /// resolves outside it.
    fn check_contained(&self) {
        for (dir, only) in [(self.outer.path(), "root"), (self.root.as_path(), "dest")] {
            let names: Vec<_> = fs::read_dir(dir)
                .expect("read the scratch")
                .map(|entry| entry.expect("read the scratch").file_name())
                .collect();
            assert_eq!(names, [only], "extraction wrote outside its destination");
        }
        let meta = fs::symlink_metadata(&self.dest).expect("stat the destination");
        assert!(meta.is_dir(), "the destination was replaced");
        for (path, kind) in walk(&self.dest) {
            match kind {
                Kind::Symlink => {
                    let resolved = resolve(&path);
                    assert!(
                        resolved
                            .as_deref()
                            .is_some_and(|r| r.starts_with(&self.dest)),
                        "the link {} resolves outside the destination, to {resolved:?}",
                        path.display()
                    );
                }
                Kind::File { mode, .. } => {
                    assert_eq!(mode & 0o6000, 0, "{} is setuid or setgid", path.display());
                }
                Kind::Dir => {}
                Kind::Other => panic!(
                    "{} is neither a file, a directory nor a link",
                    path.display()
                ),
            }
        }
    }

    /// Checks that the destination holds exactly the files of `summary`.
    fn check_matches(&self, summary: &BundleSummary) {
        let mut files = BTreeSet::new();
        let mut total = 0u64;
        for (path, kind) in walk(&self.dest) {
            if let Kind::File { size, .. } = kind {
                let relative = path.strip_prefix(&self.dest).expect("under dest");
                files.insert(relative.to_str().expect("UTF-8 path").to_owned());
                total += size;
            }
        }
        let listed: BTreeSet<String> = summary.files.iter().cloned().collect();
        assert_eq!(
            listed.len(),
            summary.files.len(),
            "the summary lists a file twice"
        );
        assert_eq!(files, listed, "the files on disk are not the summary's");
        assert_eq!(
            total, summary.total_bytes,
            "the sizes on disk are not the summary's"
        );
    }
}

enum Kind {
    File { mode: u32, size: u64 },
    Dir,
    Symlink,
    Other,
}

/// Every path under `dir`, without following links.
fn walk(dir: &Path) -> Vec<(PathBuf, Kind)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read an extracted directory") {
            let path = entry.expect("read an extracted directory").path();
            let meta = fs::symlink_metadata(&path).expect("stat an extracted entry");
            let kind = if meta.file_type().is_symlink() {
                Kind::Symlink
            } else if meta.is_dir() {
                pending.push(path.clone());
                Kind::Dir
            } else if meta.is_file() {
                Kind::File {
                    mode: meta.permissions().mode(),
                    size: meta.len(),
                }
            } else {
                Kind::Other
            };
            found.push((path, kind));
        }
    }
    found
}

/// Where the link `link` leads when followed the way the kernel would: links met on the way are
/// followed (at most 40 of them), and components that do not exist are taken as they are
/// written. `None` for a loop.
fn resolve(link: &Path) -> Option<PathBuf> {
    let mut current = link.parent()?.to_path_buf();
    let mut pending: Vec<PathBuf> = vec![PathBuf::from(link.file_name()?)];
    let mut hops = 0;
    // `pending` is a stack of paths still to walk; each is consumed one component at a time.
    while let Some(next) = pending.pop() {
        let mut components = next.components();
        let Some(first) = components.next() else {
            continue;
        };
        let rest = components.as_path().to_path_buf();
        if !rest.as_os_str().is_empty() {
            pending.push(rest);
        }
        match first {
            Component::RootDir => current = PathBuf::from("/"),
            Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                current.pop();
            }
            Component::Normal(name) => {
                let candidate = current.join(name);
                match fs::symlink_metadata(&candidate) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        hops += 1;
                        if hops > 40 {
                            return None;
                        }
                        pending.push(fs::read_link(&candidate).ok()?);
                    }
                    _ => current = candidate,
                }
            }
        }
    }
    Some(current)
}
