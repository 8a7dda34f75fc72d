//! Client and worker bundles: gzip tar archives, written from a project and read as hostile input.
//!
//! A deployment moves files in two archives:
//!
//! - The **client bundle**, written by [`write_client_bundle`] on the user's machine:
//!   `taskfly.yml` at the root plus every file that `application_files` names
//!   ([`resolve_application_files`]), each with its permission bits.
//! - The **worker bundle**, cut from the client bundle by [`split_client_bundle`] on the daemon:
//!   the same entries without the top-level `taskfly.yml`. Nodes unpack it with
//!   [`extract_bundle`].
//!
//! Everything that reads a bundle treats it as hostile, because it arrives over the network.
//! Reading validates every entry with one set of rules, the same for splitting and extracting:
//!
//! - paths must be relative, without a `..` component, a NUL byte, a backslash or a Windows
//!   drive prefix (a leading `./` is accepted and dropped);
//! - only regular files, directories and symbolic links are accepted: no hard links, devices or
//!   FIFOs;
//! - a symbolic link must be relative and resolve inside the bundle, both lexically from its own
//!   directory and when every other link of the bundle is followed the way the kernel would;
//! - no path may appear twice, and no entry may sit under a symbolic link or a file of the bundle;
//! - [`BundleLimits`] caps the entry count and the bytes of entry data, and each entry's headers
//!   (long names, pax records) are capped at `METADATA_BUDGET` bytes so a hostile header cannot
//!   exhaust memory.
//!
//! Extraction writes every file itself (the `tar` crate's `unpack` is not used): files are
//! created with `O_EXCL`, parents are checked with `symlink_metadata` and never followed, and
//! symbolic links are created only after the whole archive has been read and checked, so no
//! write ever goes through one.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Archive, Builder, EntryType, Header};

use crate::{Error, Result};

/// The configuration file at the root of every project and client bundle. `config.rs` owns the
/// public name; this private copy keeps the bundle code free of a dependency on it.
const CONFIG_FILE: &str = "taskfly.yml";

/// The two bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The message for input that is not a gzip stream at all.
const NOT_GZIP_TAR: &str = "bundle is not a gzip tar archive";

/// How many bytes of headers (the header block itself, GNU long names, pax records) one entry
/// may use. The `tar` crate reads long names and pax records into memory, so without this cap a
/// single entry could claim gigabytes.
const METADATA_BUDGET: u64 = 1 << 20;

/// The longest entry path or symbolic link target accepted, in bytes (Linux's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// The largest `taskfly.yml` accepted in a client bundle. It is held in memory as text, so it
/// gets a cap of its own, well below [`BundleLimits::max_total_bytes`].
const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// How many symbolic links one path resolution may follow before it counts as a loop (the
/// kernel's own limit).
const MAX_LINK_HOPS: u32 = 40;

/// How many path components all symbolic link checks of one bundle may walk, so that a bundle
/// built to make the check slow is refused instead.
const MAX_LINK_STEPS: u64 = 1 << 24;

/// The mask applied to a header's mode on extraction: permission bits and the sticky bit, but
/// never setuid or setgid.
const MODE_MASK: u32 = 0o1777;

/// Size caps applied while reading a bundle, so that a small compressed upload cannot expand
/// into an unbounded amount of disk or memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// The most bytes of entry data (the decompressed size of the files) a bundle may hold.
    pub max_total_bytes: u64,
    /// The most entries (files, directories, links) a bundle may hold.
    pub max_files: u64,
}

impl Default for BundleLimits {
    /// 1 GiB of decompressed data and 100,000 entries: far beyond an application bundle, far
    /// below what would hurt the daemon or a node.
    fn default() -> Self {
        BundleLimits {
            max_total_bytes: 1 << 30,
            max_files: 100_000,
        }
    }
}

/// What a bundle holds, as reported after writing, splitting or extracting it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSummary {
    /// The relative, `/`-separated paths of the bundle's regular files, sorted.
    pub files: Vec<String>,
    /// The sum of the sizes of those files, in bytes.
    pub total_bytes: u64,
}

impl BundleSummary {
    /// Builds a summary from `(path, size)` pairs, sorting the paths.
    fn from_files<'a>(files: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut summary = BundleSummary::default();
        for (path, size) in files {
            summary.files.push(path.to_owned());
            summary.total_bytes = summary.total_bytes.saturating_add(size);
        }
        summary.files.sort();
        summary
    }
}

// ---------------------------------------------------------------------------------------------
// Resolving application_files
// ---------------------------------------------------------------------------------------------

/// Resolves the `application_files` patterns of `taskfly.yml` against `project_dir`.
///
/// Each pattern is a file, a glob (`*`, `?`, `[...]`, and `**` for any number of directories) or
/// a directory, which is taken recursively. Symbolic links inside the project are followed and
/// bundled as what they point to. The result is every matched regular file as a path relative
/// to `project_dir`, sorted and without duplicates; the top-level `taskfly.yml` is never listed,
/// since [`write_client_bundle`] adds it on its own.
///
/// # Errors
///
/// An invalid-config error whose details list every problem at once, each starting with
/// `application_files[i]: "<pattern>"`: an absolute pattern, a `..` component, a pattern that
/// matches nothing, a match (or a symbolic link under a matched directory) that resolves outside
/// the project, a broken link, a link loop, or a file that is neither regular nor a directory.
/// An invalid-config error also when `project_dir` has no `taskfly.yml`, and an I/O error when
/// `project_dir` cannot be opened.
pub fn resolve_application_files(project_dir: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let root = fs::canonicalize(project_dir).map_err(|e| {
        Error::io(
            format!(
                "cannot open the project directory {}",
                project_dir.display()
            ),
            e,
        )
    })?;
    let config_path = project_dir.join(CONFIG_FILE);
    match fs::metadata(&config_path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(Error::invalid_config(
                format!("{} is not a regular file", config_path.display()),
                Vec::new(),
            ))
        }
        Err(e) => {
            return Err(Error::invalid_config(
                format!("cannot read {}", config_path.display()),
                Vec::new(),
            )
            .with_source(e))
        }
    }

    let mut resolver = Resolver {
        root,
        files: BTreeSet::new(),
        problems: Vec::new(),
    };
    for (index, pattern) in patterns.iter().enumerate() {
        let label = format!("application_files[{index}]: {pattern:?}");
        resolver.add_pattern(&label, pattern);
    }
    if !resolver.problems.is_empty() {
        return Err(Error::invalid_config(
            "application_files names files that cannot be bundled",
            resolver.problems,
        ));
    }
    Ok(resolver.files.into_iter().map(PathBuf::from).collect())
}

/// The state of one [`resolve_application_files`] call.
struct Resolver {
    /// The canonical project directory; every bundled file must resolve under it.
    root: PathBuf,
    /// The relative paths found so far, as `/`-separated text (sorted and deduplicated).
    files: BTreeSet<String>,
    /// Every problem found so far, each starting with the pattern's label.
    problems: Vec<String>,
}

impl Resolver {
    /// Resolves one pattern, recording its files or its problems.
    fn add_pattern(&mut self, label: &str, pattern: &str) {
        if pattern.is_empty() {
            self.problems.push(format!("{label} is empty"));
            return;
        }
        let path = Path::new(pattern);
        if path.has_root() || path.is_absolute() {
            self.problems.push(format!(
                "{label} is an absolute path; application files are relative to taskfly.yml"
            ));
            return;
        }
        if path.components().any(|c| c == Component::ParentDir) {
            self.problems.push(format!(
                "{label} has a \"..\" component; application files must be inside the project directory"
            ));
            return;
        }

        // A name that exists as written is taken literally, even if it contains glob characters.
        let literal = self.root.join(path);
        let exists = fs::symlink_metadata(&literal).is_ok();
        if exists || !has_glob_characters(pattern) {
            if exists {
                self.add_match(label, &literal);
            } else {
                self.problems.push(format!("{label} matches no file"));
            }
            return;
        }

        let Some(root_text) = self.root.to_str() else {
            self.problems.push(format!(
                "{label} is a glob, but the project directory's path {} is not UTF-8",
                self.root.display()
            ));
            return;
        };
        let full_pattern = format!("{}/{}", glob::Pattern::escape(root_text), pattern);
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let paths = match glob::glob_with(&full_pattern, options) {
            Ok(paths) => paths,
            Err(e) => {
                self.problems
                    .push(format!("{label} is not a valid glob pattern: {}", e.msg));
                return;
            }
        };
        let mut matched = false;
        for found in paths {
            matched = true;
            match found {
                Ok(found) => self.add_match(label, &found),
                Err(e) => self.problems.push(format!(
                    "{label}: cannot read {}: {}",
                    self.relative_text(e.path()),
                    e.error()
                )),
            }
        }
        if !matched {
            self.problems.push(format!("{label} matches no file"));
        }
    }

    /// Adds one path that a pattern matched: a file, or a directory taken recursively. `path`
    /// is lexically under the root; it must also resolve under it.
    fn add_match(&mut self, label: &str, path: &Path) {
        let Some(relative) = self.relative(label, path) else {
            return;
        };
        let Some(canonical) = self.resolve_inside_root(label, path, &relative, "resolves to")
        else {
            return;
        };
        match fs::metadata(&canonical) {
            Ok(meta) if meta.is_dir() => {
                let mut ancestors = vec![canonical];
                self.walk(label, path, &relative, &mut ancestors);
            }
            Ok(meta) if meta.is_file() => self.add_file(relative),
            Ok(_) => self.problems.push(format!(
                "{label}: {relative} is neither a regular file nor a directory"
            )),
            Err(e) => self
                .problems
                .push(format!("{label}: cannot read {relative}: {e}")),
        }
    }

    /// Adds every file under the directory `dir` (whose relative path is `relative`; empty for
    /// the project root). `ancestors` holds the canonical paths of the directories being walked,
    /// so that a symbolic link back to one of them is reported instead of walked forever.
    fn walk(&mut self, label: &str, dir: &Path, relative: &str, ancestors: &mut Vec<PathBuf>) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.problems.push(format!(
                    "{label}: cannot read the directory {}: {e}",
                    shown_relative(relative)
                ));
                return;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.problems.push(format!(
                        "{label}: cannot read the directory {}: {e}",
                        shown_relative(relative)
                    ));
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                self.problems.push(format!(
                    "{label}: the file name {:?} in {} is not UTF-8",
                    name,
                    shown_relative(relative)
                ));
                continue;
            };
            let child_relative = if relative.is_empty() {
                name.to_owned()
            } else {
                format!("{relative}/{name}")
            };
            let child = entry.path();
            let file_type = match entry.file_type() {
                Ok(file_type) => file_type,
                Err(e) => {
                    self.problems
                        .push(format!("{label}: cannot read {child_relative}: {e}"));
                    continue;
                }
            };

            if file_type.is_dir() {
                let Some(parent) = ancestors.last() else {
                    continue;
                };
                ancestors.push(parent.join(name));
                self.walk(label, &child, &child_relative, ancestors);
                ancestors.pop();
            } else if file_type.is_file() {
                self.add_file(child_relative);
            } else if file_type.is_symlink() {
                self.add_linked(label, &child, child_relative, ancestors);
            } else {
                self.problems.push(format!(
                    "{label}: {child_relative} is neither a regular file, a directory nor a symbolic link"
                ));
            }
        }
    }

    /// Adds what the symbolic link `link`, found while walking a directory, points to: a file's
    /// content, or a directory's files under the link's own path.
    fn add_linked(
        &mut self,
        label: &str,
        link: &Path,
        relative: String,
        ancestors: &mut Vec<PathBuf>,
    ) {
        let Some(canonical) =
            self.resolve_inside_root(label, link, &relative, "is a symbolic link to")
        else {
            return;
        };
        match fs::metadata(&canonical) {
            Ok(meta) if meta.is_dir() => {
                if ancestors.contains(&canonical) {
                    self.problems.push(format!(
                        "{label}: {relative} is a symbolic link to a directory that contains it (a loop)"
                    ));
                    return;
                }
                ancestors.push(canonical);
                self.walk(label, link, &relative, ancestors);
                ancestors.pop();
            }
            Ok(meta) if meta.is_file() => self.add_file(relative),
            Ok(_) => self.problems.push(format!(
                "{label}: {relative} links to something that is neither a regular file nor a directory"
            )),
            Err(e) => self
                .problems
                .push(format!("{label}: cannot read {relative}: {e}")),
        }
    }

    /// The canonical path of `path` (shown as `relative`), or `None` with a problem recorded
    /// when it is a broken symbolic link, cannot be resolved, or resolves outside the root.
    /// `leads_to` words how the path reaches its target in that last problem ("resolves to",
    /// "is a symbolic link to").
    fn resolve_inside_root(
        &mut self,
        label: &str,
        path: &Path,
        relative: &str,
        leads_to: &str,
    ) -> Option<PathBuf> {
        let canonical = match fs::canonicalize(path) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.problems
                    .push(format!("{label}: {relative} is a broken symbolic link"));
                return None;
            }
            Err(e) => {
                self.problems
                    .push(format!("{label}: cannot resolve {relative}: {e}"));
                return None;
            }
        };
        if !canonical.starts_with(&self.root) {
            self.problems.push(format!(
                "{label}: {relative} {leads_to} {}, outside the project directory",
                canonical.display()
            ));
            return None;
        }
        Some(canonical)
    }

    /// Records one file, unless it is the top-level `taskfly.yml`.
    fn add_file(&mut self, relative: String) {
        if relative != CONFIG_FILE {
            self.files.insert(relative);
        }
    }

    /// The `/`-separated path of `path` relative to the root, or `None` (with a problem
    /// recorded) when it is not UTF-8.
    fn relative(&mut self, label: &str, path: &Path) -> Option<String> {
        let stripped = path.strip_prefix(&self.root).unwrap_or(path);
        let mut parts = Vec::new();
        // The pattern was checked to be relative and free of `..`, and glob matches start with
        // the root, so only normal components and meaningless `.` ones can remain.
        for component in stripped.components() {
            let Component::Normal(part) = component else {
                continue;
            };
            let Some(part) = part.to_str() else {
                self.problems
                    .push(format!("{label}: the file name {stripped:?} is not UTF-8"));
                return None;
            };
            parts.push(part);
        }
        Some(parts.join("/"))
    }

    /// A relative path for messages, without failing on non-UTF-8 names.
    fn relative_text(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Whether `pattern` contains a character that makes it a glob.
fn has_glob_characters(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// A relative directory path for messages, naming the root as such.
fn shown_relative(relative: &str) -> &str {
    if relative.is_empty() {
        "the project directory"
    } else {
        relative
    }
}

// ---------------------------------------------------------------------------------------------
// Writing the client bundle
// ---------------------------------------------------------------------------------------------

/// Writes the client bundle of the project in `project_dir` to `out`: a gzip tar archive with
/// `taskfly.yml` at its root and every file [`resolve_application_files`] finds for `patterns`.
///
/// Entries keep their file's permission bits and modification time; owners are recorded as
/// uid and gid 0 without names, so the bundle says nothing about the user who built it. Only
/// regular files are written (directories are implied by their paths). The returned summary
/// lists every file of the bundle, `taskfly.yml` included.
///
/// # Errors
///
/// The errors of [`resolve_application_files`], and an I/O error naming the file when one
/// cannot be read (or changed size while it was read) or when `out` fails.
pub fn write_client_bundle<W: Write>(
    project_dir: &Path,
    patterns: &[String],
    out: W,
) -> Result<BundleSummary> {
    let files = resolve_application_files(project_dir, patterns)?;
    let mut builder = Builder::new(GzEncoder::new(out, Compression::default()));
    let mut written: Vec<(String, u64)> = Vec::with_capacity(files.len() + 1);

    let size = append_project_file(&mut builder, &project_dir.join(CONFIG_FILE), CONFIG_FILE)?;
    written.push((CONFIG_FILE.to_owned(), size));
    for relative in &files {
        let Some(name) = relative.to_str() else {
            // resolve_application_files only returns UTF-8 paths.
            continue;
        };
        let size = append_project_file(&mut builder, &project_dir.join(relative), name)?;
        written.push((name.to_owned(), size));
    }

    let encoder = builder
        .into_inner()
        .map_err(|e| Error::io("cannot write the client bundle", e))?;
    encoder
        .finish()
        .map_err(|e| Error::io("cannot write the client bundle", e))?;
    Ok(BundleSummary::from_files(
        written.iter().map(|(path, size)| (path.as_str(), *size)),
    ))
}

/// Appends the file at `path` (following symbolic links) as the entry `name`, returning its size.
fn append_project_file<W: Write>(builder: &mut Builder<W>, path: &Path, name: &str) -> Result<u64> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::io(
            format!("cannot bundle {}", path.display()),
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let size = meta.len();
    let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
    let mut header = file_header(size, meta.mode() & 0o7777, mtime);
    let mut source = ExactReader::new(&mut file, size);
    builder
        .append_data(&mut header, name, &mut source)
        .map_err(|e| {
            if source.source_failed {
                Error::io(
                    format!(
                        "cannot read {} (did it change while it was bundled?)",
                        path.display()
                    ),
                    e,
                )
            } else {
                Error::io("cannot write the client bundle", e)
            }
        })?;
    Ok(size)
}

/// A header for a regular file with deterministic ownership: uid and gid 0, no user names.
fn file_header(size: u64, mode: u32, mtime: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// A header for a directory or symbolic link, with the same deterministic ownership.
fn empty_header(entry_type: EntryType, mode: u32, mtime: u64) -> Header {
    let mut header = file_header(0, mode, mtime);
    header.set_entry_type(entry_type);
    header
}

/// A reader that yields exactly `remaining` bytes of `inner`: it stops there even if `inner`
/// has more, and fails if `inner` ends first. `source_failed` tells afterwards whether an error
/// came from `inner` rather than from the writer the bytes were copied to.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
    source_failed: bool,
}

impl<R: Read> ExactReader<R> {
    fn new(inner: R, size: u64) -> Self {
        ExactReader {
            inner,
            remaining: size,
            source_failed: false,
        }
    }
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let wanted = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        match self.inner.read(&mut buf[..wanted]) {
            Ok(0) => {
                self.source_failed = true;
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} bytes short of the declared size", self.remaining),
                ))
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.source_failed = true;
                Err(e)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Splitting the client bundle
// ---------------------------------------------------------------------------------------------

/// Reads a client bundle once, validating every entry exactly as [`extract_bundle`] does, and
/// writes every entry except the top-level `taskfly.yml` to `worker_out` as a new gzip tar:
/// the worker bundle that nodes download.
///
/// Entries are rewritten, not copied byte for byte: paths are normalized (no `./`), owners are
/// uid and gid 0 without names, and setuid and setgid bits are dropped. Returns the text of
/// `taskfly.yml` and the summary of the worker bundle (which does not list `taskfly.yml`).
///
/// On error, `worker_out` holds a partial archive and must be discarded.
///
/// # Errors
///
/// An invalid-bundle error naming the entry for any entry [`extract_bundle`] would refuse, and
/// when `taskfly.yml` is missing, not a regular file, or not UTF-8; a too-large error when
/// `limits` are exceeded; an I/O error when `worker_out` fails.
pub fn split_client_bundle<R: Read, W: Write>(
    client: R,
    worker_out: W,
    limits: &BundleLimits,
) -> Result<(String, BundleSummary)> {
    let mut builder = Builder::new(GzEncoder::new(worker_out, Compression::default()));
    let mut config: Option<String> = None;
    let write_error = |e| Error::io("cannot write the worker bundle", e);

    let validator = read_bundle(client, limits, |item, data| match item {
        Item::File { path, size, .. } if path == CONFIG_FILE => {
            if *size > MAX_CONFIG_BYTES {
                return Err(Error::too_large(format!(
                    "bundle entry \"{CONFIG_FILE}\" is larger than {MAX_CONFIG_BYTES} bytes"
                )));
            }
            let mut text = Vec::new();
            let mut source = ExactReader::new(data, *size);
            source
                .read_to_end(&mut text)
                .map_err(|e| truncated(path, e))?;
            let text = String::from_utf8(text).map_err(|_| {
                Error::invalid_bundle(format!("bundle entry \"{CONFIG_FILE}\" is not UTF-8 text"))
            })?;
            config = Some(text);
            Ok(())
        }
        Item::File {
            path,
            mode,
            size,
            mtime,
        } => {
            let mut header = file_header(*size, mode & MODE_MASK, *mtime);
            let mut source = ExactReader::new(data, *size);
            builder
                .append_data(&mut header, path, &mut source)
                .map_err(|e| {
                    if source.source_failed {
                        truncated(path, e)
                    } else {
                        write_error(e)
                    }
                })
        }
        Item::Dir { path, .. } | Item::Symlink { path, .. } if path == CONFIG_FILE => {
            Err(Error::invalid_bundle(format!(
                "bundle entry \"{CONFIG_FILE}\" is not a regular file"
            )))
        }
        Item::Dir { path, mode, mtime } => {
            let mut header = empty_header(EntryType::Directory, mode & MODE_MASK, *mtime);
            builder
                .append_data(&mut header, path, io::empty())
                .map_err(write_error)
        }
        Item::Symlink {
            path,
            target,
            mtime,
        } => {
            let mut header = empty_header(EntryType::Symlink, 0o777, *mtime);
            builder
                .append_link(&mut header, path, target)
                .map_err(write_error)
        }
        Item::Skip => Ok(()),
    })?;

    let config = config.ok_or_else(|| {
        Error::invalid_bundle(format!("bundle has no \"{CONFIG_FILE}\" at its root"))
    })?;
    let encoder = builder.into_inner().map_err(write_error)?;
    encoder.finish().map_err(write_error)?;
    let summary = BundleSummary::from_files(
        validator
            .files
            .iter()
            .filter(|(path, _)| path != CONFIG_FILE)
            .map(|(path, size)| (path.as_str(), *size)),
    );
    Ok((config, summary))
}

// ---------------------------------------------------------------------------------------------
// Extracting a bundle
// ---------------------------------------------------------------------------------------------

/// Extracts the gzip tar `bundle` into `dest`, which is created if missing and must be empty if
/// it exists.
///
/// Files get their header's permission bits without setuid and setgid (so `0o755` stays
/// `0o755`) and its modification time; directories get their mode plus owner `rwx`, so that
/// extraction can always go on inside them. Nothing is ever written outside `dest`: see the
/// module documentation for the rules every entry must pass.
///
/// On error, `dest` may hold part of the bundle; the caller should remove it.
///
/// # Errors
///
/// An invalid-bundle error naming the entry for a hostile or malformed entry, or
/// `bundle is not a gzip tar archive`; a too-large error when `limits` are exceeded; an I/O
/// error when `dest` is not an empty directory or a file cannot be written.
pub fn extract_bundle<R: Read>(
    bundle: R,
    dest: &Path,
    limits: &BundleLimits,
) -> Result<BundleSummary> {
    prepare_destination(dest)?;
    let mut links: Vec<(String, String)> = Vec::new();
    let validator = read_bundle(bundle, limits, |item, data| match item {
        Item::File {
            path,
            mode,
            size,
            mtime,
        } => write_file(dest, path, *mode, *size, *mtime, data),
        Item::Dir { path, mode, .. } => make_directory(dest, path, *mode),
        Item::Symlink { path, target, .. } => {
            // Links are created last, once every entry has been checked, so that no file or
            // directory is ever created through one.
            links.push((path.clone(), target.clone()));
            Ok(())
        }
        Item::Skip => Ok(()),
    })?;
    for (path, target) in &links {
        let full = create_parents(dest, path)?;
        std::os::unix::fs::symlink(target, &full).map_err(|e| {
            Error::io(
                format!("cannot create the symbolic link {}", full.display()),
                e,
            )
        })?;
    }
    Ok(BundleSummary::from_files(
        validator
            .files
            .iter()
            .map(|(path, size)| (path.as_str(), *size)),
    ))
}

/// Makes sure `dest` is an empty directory, creating it if it does not exist.
fn prepare_destination(dest: &Path) -> Result<()> {
    let refuse = |why: &str| {
        Error::io(
            format!("cannot extract the bundle into {}", dest.display()),
            io::Error::new(io::ErrorKind::AlreadyExists, why.to_owned()),
        )
    };
    match fs::metadata(dest) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = fs::read_dir(dest)
                .map_err(|e| Error::io(format!("cannot read {}", dest.display()), e))?;
            if entries.next().is_some() {
                return Err(refuse("the directory is not empty"));
            }
            Ok(())
        }
        Ok(_) => Err(refuse("it exists and is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dest)
            .map_err(|e| Error::io(format!("cannot create {}", dest.display()), e)),
        Err(e) => Err(Error::io(format!("cannot read {}", dest.display()), e)),
    }
}

/// Creates the missing parent directories of the entry `relative` under `dest`, refusing to go
/// through anything that is not a real directory (a symbolic link in particular), and returns
/// the entry's full path.
fn create_parents(dest: &Path, relative: &str) -> Result<PathBuf> {
    let (parents, name) = match relative.rsplit_once('/') {
        Some((parents, name)) => (Some(parents), name),
        None => (None, relative),
    };
    let mut dir = dest.to_path_buf();
    for component in parents.into_iter().flat_map(|p| p.split('/')) {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid_bundle(format!(
                    "bundle entry {relative:?}: {} exists and is not a directory",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?,
            Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()), e)),
        }
    }
    Ok(dir.join(name))
}

/// Writes one regular file, created with `O_EXCL` so an existing file or link is never reused.
fn write_file(
    dest: &Path,
    relative: &str,
    mode: u32,
    size: u64,
    mtime: u64,
    data: &mut dyn Read,
) -> Result<()> {
    let path = create_parents(dest, relative)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    let mut source = ExactReader::new(data, size);
    io::copy(&mut source, &mut file).map_err(|e| {
        if source.source_failed {
            truncated(relative, e)
        } else {
            Error::io(format!("cannot write {}", path.display()), e)
        }
    })?;
    // The permissions are set on the open file (fchmod), after writing, so that a read-only
    // mode does not get in the way and the umask does not change the bits.
    file.set_permissions(Permissions::from_mode(mode & MODE_MASK))
        .map_err(|e| {
            Error::io(
                format!("cannot set the permissions of {}", path.display()),
                e,
            )
        })?;
    if let Some(modified) = UNIX_EPOCH.checked_add(Duration::from_secs(mtime)) {
        file.set_modified(modified).map_err(|e| {
            Error::io(
                format!("cannot set the modification time of {}", path.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// Creates one directory (or adopts the one earlier entries implied) and sets its mode, with
/// owner `rwx` always added so that its own entries can still be written.
fn make_directory(dest: &Path, relative: &str, mode: u32) -> Result<()> {
    let path = create_parents(dest, relative)?;
    let permissions = (mode & MODE_MASK) | 0o700;
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::invalid_bundle(format!(
                "bundle entry {relative:?}: {} exists and is not a directory",
                path.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(permissions)
            .create(&path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?,
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
    fs::set_permissions(&path, Permissions::from_mode(permissions)).map_err(|e| {
        Error::io(
            format!("cannot set the permissions of {}", path.display()),
            e,
        )
    })
}

/// The error for an entry whose data ended early or could not be decompressed.
fn truncated(path: &str, source: io::Error) -> Error {
    Error::invalid_bundle(format!("bundle entry {path:?} is truncated or corrupt"))
        .with_source(source)
}

// ---------------------------------------------------------------------------------------------
// Reading and validating a bundle
// ---------------------------------------------------------------------------------------------

/// One entry of a bundle, validated and normalized.
enum Item {
    /// A regular file.
    File {
        path: String,
        mode: u32,
        size: u64,
        mtime: u64,
    },
    /// A directory.
    Dir { path: String, mode: u32, mtime: u64 },
    /// A symbolic link whose target stays inside the bundle.
    Symlink {
        path: String,
        target: String,
        mtime: u64,
    },
    /// An entry with nothing to write: the root directory (`./`) or a pax global header.
    Skip,
}

/// Reads the gzip tar `bundle`, validates each entry and hands it (with its data) to `visit`,
/// then checks every symbolic link against the whole archive. Returns the validator, which
/// knows the bundle's files.
fn read_bundle<R: Read>(
    bundle: R,
    limits: &BundleLimits,
    mut visit: impl FnMut(&Item, &mut dyn Read) -> Result<()>,
) -> Result<Validator> {
    let stream = gzip_stream(bundle)?;
    let budget = Rc::new(Budget::default());
    let mut archive = Archive::new(BudgetReader {
        inner: stream,
        budget: Rc::clone(&budget),
    });
    let mut validator = Validator::new(*limits);
    let mut entries = archive
        .entries()
        .map_err(|e| Error::invalid_bundle(NOT_GZIP_TAR).with_source(e))?;
    loop {
        // The previous entry's unread data and padding are still allowed; the next entry's
        // headers get a budget of their own.
        budget.grant(METADATA_BUDGET);
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(validator.read_error(&budget, e)),
        };
        budget.set(padded(entry.size()));
        let item = validator.check(&entry)?;
        visit(&item, &mut entry)?;
    }

    // The tar stream ended, but the gzip stream's checksum and length come after it: read on to
    // its end so that a bundle cut short, or corrupted, is refused rather than half-trusted.
    // Trailing bytes past the budget are left unread, since no entry can hide in them.
    let mut rest = archive.into_inner();
    budget.grant(METADATA_BUDGET);
    if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
        if !budget.exceeded.get() {
            return Err(
                Error::invalid_bundle("bundle is truncated or corrupt at its end").with_source(e),
            );
        }
    }

    validator.check_links()?;
    Ok(validator)
}

/// Checks the gzip magic bytes and returns the decompressed stream.
fn gzip_stream<R: Read>(mut bundle: R) -> Result<GzDecoder<io::Chain<io::Cursor<[u8; 2]>, R>>> {
    let mut magic = [0u8; 2];
    match bundle.read_exact(&mut magic) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(Error::invalid_bundle(NOT_GZIP_TAR))
        }
        Err(e) => return Err(Error::io("cannot read the bundle", e)),
    }
    if magic != GZIP_MAGIC {
        return Err(Error::invalid_bundle(NOT_GZIP_TAR));
    }
    Ok(GzDecoder::new(io::Cursor::new(magic).chain(bundle)))
}

/// `size` rounded up to whole 512-byte tar blocks.
fn padded(size: u64) -> u64 {
    size.saturating_add(511) & !511
}

/// How many more decompressed bytes the archive may read, shared between [`read_bundle`] and
/// the [`BudgetReader`] the `tar` crate reads through.
#[derive(Default)]
struct Budget {
    remaining: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    fn grant(&self, bytes: u64) {
        self.remaining
            .set(self.remaining.get().saturating_add(bytes));
    }

    fn set(&self, bytes: u64) {
        self.remaining.set(bytes);
    }
}

/// A reader that fails once its [`Budget`] is spent.
struct BudgetReader<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for BudgetReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.budget.remaining.get();
        if remaining == 0 {
            self.budget.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tar headers larger than allowed",
            ));
        }
        let wanted = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let n = self.inner.read(&mut buf[..wanted])?;
        self.budget.remaining.set(remaining - n as u64);
        Ok(n)
    }
}

/// What a path of the bundle is, in [`Tree`].
enum NodeKind {
    /// A directory; `explicit` when it has an entry of its own rather than being implied by the
    /// paths of other entries.
    Dir { explicit: bool },
    /// A regular file.
    File,
    /// A symbolic link and its target.
    Symlink { target: String },
}

/// One path of the bundle.
struct TreeNode {
    kind: NodeKind,
    parent: usize,
    children: HashMap<String, usize>,
}

/// Every path of the bundle seen so far, as a tree of components (node 0 is the root), so that
/// duplicates, entries under links and link targets can be checked in memory proportional to
/// the paths' total length.
struct Tree {
    nodes: Vec<TreeNode>,
}

impl Tree {
    fn new() -> Self {
        Tree {
            nodes: vec![TreeNode {
                kind: NodeKind::Dir { explicit: true },
                parent: 0,
                children: HashMap::new(),
            }],
        }
    }

    fn child(&self, parent: usize, name: &str) -> Option<usize> {
        self.nodes[parent].children.get(name).copied()
    }

    fn add(&mut self, parent: usize, name: &str, kind: NodeKind) -> usize {
        let id = self.nodes.len();
        self.nodes.push(TreeNode {
            kind,
            parent,
            children: HashMap::new(),
        });
        self.nodes[parent].children.insert(name.to_owned(), id);
        id
    }

    /// Records the normalized, non-empty `path`, or says why it cannot be in the bundle.
    fn insert(&mut self, path: &str, kind: NodeKind) -> std::result::Result<usize, String> {
        let mut parent = 0;
        let mut start = 0;
        for (end, _) in path.match_indices('/') {
            let name = &path[start..end];
            parent = match self.child(parent, name) {
                None => self.add(parent, name, NodeKind::Dir { explicit: false }),
                Some(id) => match self.nodes[id].kind {
                    NodeKind::Dir { .. } => id,
                    NodeKind::Symlink { .. } => {
                        return Err(format!(
                            "goes through the symbolic link {:?} of the bundle",
                            &path[..end]
                        ))
                    }
                    NodeKind::File => {
                        return Err(format!(
                            "goes through the file {:?} of the bundle",
                            &path[..end]
                        ))
                    }
                },
            };
            start = end + 1;
        }
        let name = &path[start..];
        match self.child(parent, name) {
            None => Ok(self.add(parent, name, kind)),
            Some(id) => match (&mut self.nodes[id].kind, kind) {
                (NodeKind::Dir { explicit }, NodeKind::Dir { .. }) if !*explicit => {
                    *explicit = true;
                    Ok(id)
                }
                (NodeKind::Dir { explicit: false }, _) => {
                    Err("is not a directory, but earlier entries are inside it".to_owned())
                }
                _ => Err("is a duplicate entry (the same path appears twice)".to_owned()),
            },
        }
    }

    /// The nodes from the root (excluded) down to the parent of `id`, as the starting point of
    /// a link resolution.
    fn parents_of(&self, id: usize) -> Vec<Option<usize>> {
        let mut stack = Vec::new();
        let mut current = self.nodes[id].parent;
        while current != 0 {
            stack.push(Some(current));
            current = self.nodes[current].parent;
        }
        stack.reverse();
        stack
    }

    /// Walks `target` from `stack` the way the kernel would, following the bundle's links. The
    /// stack holds the node of each component below the root, or `None` for a component the
    /// bundle does not have (treated as a plain directory).
    fn follow(
        &self,
        target: &str,
        stack: &mut Vec<Option<usize>>,
        hops: &mut u32,
        steps: &mut u64,
    ) -> std::result::Result<(), &'static str> {
        for component in target.split('/') {
            *steps += 1;
            if *steps > MAX_LINK_STEPS {
                return Err("is one of too many nested symbolic links to check");
            }
            match component {
                "" | "." => {}
                ".." => {
                    if stack.pop().is_none() {
                        return Err("is a symbolic link that resolves outside the bundle through other symbolic links");
                    }
                }
                name => {
                    let parent = match stack.last() {
                        None => Some(0),
                        Some(parent) => *parent,
                    };
                    let child = parent.and_then(|p| self.child(p, name));
                    match child.map(|id| &self.nodes[id].kind) {
                        Some(NodeKind::Symlink { target }) => {
                            *hops += 1;
                            if *hops > MAX_LINK_HOPS {
                                return Err(
                                    "is a symbolic link in a loop or in too long a chain of links",
                                );
                            }
                            self.follow(target, stack, hops, steps)?;
                        }
                        _ => stack.push(child),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The rules every entry of a bundle must pass, and what the entries seen so far hold.
struct Validator {
    limits: BundleLimits,
    /// How many entries were read.
    entries: u64,
    /// How many bytes of entry data the headers declared.
    data_bytes: u64,
    /// The path of the last entry read, for errors about what follows it.
    last_entry: Option<String>,
    tree: Tree,
    /// Every symbolic link: its path and its node.
    links: Vec<(String, usize)>,
    /// Every regular file: its path and size.
    files: Vec<(String, u64)>,
}

impl Validator {
    fn new(limits: BundleLimits) -> Self {
        Validator {
            limits,
            entries: 0,
            data_bytes: 0,
            last_entry: None,
            tree: Tree::new(),
            links: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Validates one entry and records it.
    fn check<R: Read>(&mut self, entry: &tar::Entry<'_, R>) -> Result<Item> {
        let raw_path = entry.path_bytes();
        let shown = shown_path(&raw_path);
        self.last_entry = Some(shown.clone());

        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(Error::too_large(format!(
                "bundle has more than {} entries (the max_files limit); refused at entry {shown:?}",
                self.limits.max_files
            )));
        }
        let size = entry.size();
        self.data_bytes = self.data_bytes.saturating_add(size);
        if self.data_bytes > self.limits.max_total_bytes {
            return Err(Error::too_large(format!(
                "bundle holds more than {} bytes of data (the max_total_bytes limit); refused at entry {shown:?}",
                self.limits.max_total_bytes
            )));
        }

        let header = entry.header();
        let entry_type = header.entry_type();
        if entry_type == EntryType::XGlobalHeader {
            // Pax global headers carry defaults the tar crate does not apply; their names are
            // often absolute temporary paths, so they are skipped before the path rules.
            return Ok(Item::Skip);
        }
        let refuse = |why: &str| Error::invalid_bundle(format!("bundle entry {shown:?} {why}"));
        let path = normalize_entry_path(&raw_path).map_err(|why| refuse(&why))?;
        let mtime = header.mtime().unwrap_or(0);
        let mode = || {
            header
                .mode()
                .map_err(|_| refuse("has an invalid mode field"))
        };

        match entry_type {
            EntryType::Regular => {
                if path.is_empty() {
                    return Err(refuse("is a file with an empty path"));
                }
                let mode = mode()?;
                self.tree
                    .insert(&path, NodeKind::File)
                    .map_err(|why| refuse(&why))?;
                self.files.push((path.clone(), size));
                Ok(Item::File {
                    path,
                    mode,
                    size,
                    mtime,
                })
            }
            EntryType::Directory => {
                if path.is_empty() {
                    return Ok(Item::Skip);
                }
                let mode = mode()?;
                self.tree
                    .insert(&path, NodeKind::Dir { explicit: true })
                    .map_err(|why| refuse(&why))?;
                Ok(Item::Dir { path, mode, mtime })
            }
            EntryType::Symlink => {
                if path.is_empty() {
                    return Err(refuse("is a symbolic link with an empty path"));
                }
                let raw_target = entry.link_name_bytes().unwrap_or_default();
                let target = check_link_target(&path, &raw_target).map_err(|why| refuse(&why))?;
                let id = self
                    .tree
                    .insert(
                        &path,
                        NodeKind::Symlink {
                            target: target.clone(),
                        },
                    )
                    .map_err(|why| refuse(&why))?;
                self.links.push((path.clone(), id));
                Ok(Item::Symlink {
                    path,
                    target,
                    mtime,
                })
            }
            EntryType::Link => Err(refuse("is a hard link; bundles may not contain hard links")),
            EntryType::Char | EntryType::Block | EntryType::Fifo => Err(refuse(
                "is a device or FIFO; bundles may contain only files, directories and symbolic links",
            )),
            other => Err(refuse(&format!("has an unsupported entry type ({other:?})"))),
        }
    }

    /// Checks every symbolic link against the whole bundle: followed the way the kernel
    /// follows them (through the bundle's other links), each must stay inside the bundle.
    /// This catches what a lexical check cannot, such as `s -> .` with `t -> s/d/../..`.
    fn check_links(&self) -> Result<()> {
        let mut steps = 0;
        for (path, id) in &self.links {
            let NodeKind::Symlink { target } = &self.tree.nodes[*id].kind else {
                continue;
            };
            let mut stack = self.tree.parents_of(*id);
            let mut hops = 0;
            self.tree
                .follow(target, &mut stack, &mut hops, &mut steps)
                .map_err(|why| Error::invalid_bundle(format!("bundle entry {path:?} {why}")))?;
        }
        Ok(())
    }

    /// The error for a failure of the archive itself (not of one entry's rules).
    fn read_error(&self, budget: &Budget, source: io::Error) -> Error {
        if budget.exceeded.get() {
            let place = match &self.last_entry {
                Some(last) => format!("after entry {last:?}"),
                None => "in the first entry".to_owned(),
            };
            return Error::too_large(format!(
                "bundle entry headers {place} are larger than {METADATA_BUDGET} bytes"
            ));
        }
        match &self.last_entry {
            None => Error::invalid_bundle(NOT_GZIP_TAR).with_source(source),
            Some(last) => Error::invalid_bundle(format!(
                "bundle is corrupt or truncated after entry {last:?}"
            ))
            .with_source(source),
        }
    }
}

/// An entry path for messages: lossy UTF-8, cut short if very long.
fn shown_path(raw: &[u8]) -> String {
    const SHOWN: usize = 256;
    let text = String::from_utf8_lossy(raw);
    if text.chars().count() <= SHOWN {
        text.into_owned()
    } else {
        let mut cut: String = text.chars().take(SHOWN).collect();
        cut.push('…');
        cut
    }
}

/// Checks the text rules shared by entry paths and link targets: length, NUL, UTF-8 and
/// Windows forms.
fn check_path_text<'a>(raw: &'a [u8], what: &str) -> std::result::Result<&'a str, String> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(format!("has a {what} longer than {MAX_PATH_BYTES} bytes"));
    }
    if raw.contains(&0) {
        return Err(format!("has a {what} with a NUL byte"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| format!("has a {what} that is not UTF-8"))?;
    if text.contains('\\') {
        return Err(format!(
            "has a {what} with a backslash (a Windows separator)"
        ));
    }
    let bytes = text.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(format!("has a {what} with a Windows drive prefix"));
    }
    Ok(text)
}

/// Normalizes an entry path to `/`-separated components without `.` or empty ones (the root
/// itself is the empty string), refusing absolute paths and `..`.
fn normalize_entry_path(raw: &[u8]) -> std::result::Result<String, String> {
    let text = check_path_text(raw, "path")?;
    if text.starts_with('/') {
        return Err("is an absolute path".to_owned());
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("has a \"..\" component".to_owned()),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a symbolic link's target lexically: relative, and inside the bundle when resolved
/// from the link's own directory.
fn check_link_target(path: &str, raw: &[u8]) -> std::result::Result<String, String> {
    if raw.is_empty() {
        return Err("is a symbolic link with an empty target".to_owned());
    }
    let target = check_path_text(raw, "link target")?;
    if target.starts_with('/') {
        return Err(format!(
            "is a symbolic link to the absolute path {target:?}"
        ));
    }
    let mut depth = path.matches('/').count();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth == 0 {
                    return Err(format!(
                        "is a symbolic link to {target:?}, outside the bundle"
                    ));
                }
                depth -= 1;
            }
            _ => depth += 1,
        }
    }
    Ok(target.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Writes `content` to `root/relative` with `mode`, creating parent directories.
    fn put(root: &Path, relative: &str, content: &str, mode: u32) {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parents");
        }
        fs::write(&path, content).expect("write file");
        fs::set_permissions(&path, Permissions::from_mode(mode)).expect("chmod");
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    fn patterns(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| (*p).to_owned()).collect()
    }

    /// A project with a config, a script, Python sources, data and a file nobody asks for.
    fn sample_project() -> tempfile::TempDir {
        let project = tempfile::tempdir().expect("tempdir");
        let root = project.path();
        put(root, "taskfly.yml", "cloud_provider: local\n", 0o644);
        put(root, "setup.sh", "#!/bin/sh\necho hi\n", 0o755);
        put(root, "src/main.py", "print('main')\n", 0o644);
        put(root, "src/pkg/util.py", "X = 1\n", 0o644);
        put(root, "src/pkg/notes.txt", "not python\n", 0o644);
        put(root, "data/input.csv", "a,b\n", 0o644);
        put(root, "data/deep/more.csv", "c,d\n", 0o600);
        put(root, "unlisted.txt", "left out\n", 0o644);
        project
    }

    #[test]
    fn resolves_files_globs_and_directories() {
        let project = sample_project();
        let files = resolve_application_files(
            project.path(),
            &patterns(&["setup.sh", "src/**/*.py", "data/", "setup.sh", "*.yml"]),
        )
        .expect("resolve");
        let files: Vec<_> = files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            [
                "data/deep/more.csv",
                "data/input.csv",
                "setup.sh",
                "src/main.py",
                "src/pkg/util.py"
            ]
        );
    }

    #[test]
    fn whole_project_never_lists_taskfly_yml() {
        let project = sample_project();
        let files = resolve_application_files(project.path(), &patterns(&["."])).expect("resolve");
        assert!(files.iter().all(|p| p != Path::new("taskfly.yml")));
        assert!(files.iter().any(|p| p == Path::new("unlisted.txt")));
        assert_eq!(files.len(), 7);
    }

    #[test]
    fn refuses_patterns_outside_the_project_and_reports_all_of_them() {
        let outside = tempfile::tempdir().expect("tempdir");
        put(outside.path(), "secret.txt", "secret", 0o600);
        let project = sample_project();
        symlink(outside.path(), project.path().join("out_dir")).expect("symlink");
        symlink(
            outside.path().join("secret.txt"),
            project.path().join("data/secret_link"),
        )
        .expect("symlink");

        let error = resolve_application_files(
            project.path(),
            &patterns(&[
                "../x",
                "/etc/passwd",
                "out_dir",
                "nothing/*.py",
                "missing.txt",
                "data",
                "setup.sh",
            ]),
        )
        .expect_err("must be refused");
        assert!(error.is_invalid_config());
        let details = error.details();
        let has = |prefix: &str, words: &str| {
            details
                .iter()
                .any(|d| d.starts_with(prefix) && d.contains(words))
        };
        assert!(has("application_files[0]: \"../x\"", ".."), "{details:?}");
        assert!(
            has("application_files[1]: \"/etc/passwd\"", "absolute"),
            "{details:?}"
        );
        assert!(
            has("application_files[2]: \"out_dir\"", "outside"),
            "{details:?}"
        );
        assert!(
            has("application_files[3]: \"nothing/*.py\"", "matches no file"),
            "{details:?}"
        );
        assert!(
            has("application_files[4]: \"missing.txt\"", "matches no file"),
            "{details:?}"
        );
        assert!(
            has("application_files[5]: \"data\"", "data/secret_link"),
            "{details:?}"
        );
        assert_eq!(details.len(), 6, "{details:?}");
    }

    #[test]
    fn symlinks_inside_the_project_are_bundled_as_content() {
        let project = sample_project();
        symlink("../setup.sh", project.path().join("data/setup_link.sh")).expect("symlink");
        symlink("deep", project.path().join("data/deep_link")).expect("symlink");
        let mut bundle = Vec::new();
        let summary =
            write_client_bundle(project.path(), &patterns(&["data"]), &mut bundle).expect("write");
        assert!(summary.files.contains(&"data/setup_link.sh".to_owned()));
        assert!(summary
            .files
            .contains(&"data/deep_link/more.csv".to_owned()));

        let dest = tempfile::tempdir().expect("tempdir");
        let out = dest.path().join("out");
        extract_bundle(&bundle[..], &out, &BundleLimits::default()).expect("extract");
        let link = out.join("data/setup_link.sh");
        assert!(fs::symlink_metadata(&link).expect("stat").is_file());
        assert_eq!(
            fs::read_to_string(&link).expect("read"),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode_of(&link), 0o755);
    }

    #[test]
    fn missing_taskfly_yml_is_named() {
        let project = tempfile::tempdir().expect("tempdir");
        put(project.path(), "setup.sh", "", 0o755);
        let error = write_client_bundle(project.path(), &patterns(&["setup.sh"]), Vec::new())
            .expect_err("must fail");
        assert!(error.is_invalid_config());
        assert!(error.to_string().contains("taskfly.yml"), "{error}");
    }

    #[test]
    fn round_trip_keeps_contents_and_modes() {
        let project = sample_project();
        let mut client = Vec::new();
        let client_summary = write_client_bundle(
            project.path(),
            &patterns(&["setup.sh", "src/**/*.py", "data/"]),
            &mut client,
        )
        .expect("write");
        assert_eq!(
            client_summary.files,
            [
                "data/deep/more.csv",
                "data/input.csv",
                "setup.sh",
                "src/main.py",
                "src/pkg/util.py",
                "taskfly.yml"
            ]
        );

        let mut worker = Vec::new();
        let (config, worker_summary) =
            split_client_bundle(&client[..], &mut worker, &BundleLimits::default()).expect("split");
        assert_eq!(config, "cloud_provider: local\n");
        assert_eq!(
            worker_summary.files,
            [
                "data/deep/more.csv",
                "data/input.csv",
                "setup.sh",
                "src/main.py",
                "src/pkg/util.py"
            ]
        );
        let expected_bytes: u64 = [
            "#!/bin/sh\necho hi\n",
            "print('main')\n",
            "X = 1\n",
            "a,b\n",
            "c,d\n",
        ]
        .iter()
        .map(|s| s.len() as u64)
        .sum();
        assert_eq!(worker_summary.total_bytes, expected_bytes);

        let base = tempfile::tempdir().expect("tempdir");
        let dest = base.path().join("job");
        let extracted =
            extract_bundle(&worker[..], &dest, &BundleLimits::default()).expect("extract");
        assert_eq!(extracted, worker_summary);
        assert!(!dest.join("taskfly.yml").exists());
        assert!(!dest.join("unlisted.txt").exists());
        assert!(!dest.join("src/pkg/notes.txt").exists());
        assert_eq!(
            fs::read_to_string(dest.join("setup.sh")).expect("read"),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read_to_string(dest.join("src/pkg/util.py")).expect("read"),
            "X = 1\n"
        );
        assert_eq!(
            fs::read_to_string(dest.join("data/deep/more.csv")).expect("read"),
            "c,d\n"
        );
        assert_eq!(mode_of(&dest.join("setup.sh")), 0o755);
        assert_eq!(mode_of(&dest.join("src/main.py")), 0o644);
        assert_eq!(mode_of(&dest.join("data/deep/more.csv")), 0o600);

        // The client bundle itself extracts too, taskfly.yml included.
        let whole = base.path().join("whole");
        let summary =
            extract_bundle(&client[..], &whole, &BundleLimits::default()).expect("extract");
        assert_eq!(summary, client_summary);
        assert!(whole.join("taskfly.yml").is_file());
    }

    #[test]
    fn extraction_needs_an_empty_destination() {
        let project = sample_project();
        let mut client = Vec::new();
        write_client_bundle(project.path(), &patterns(&["setup.sh"]), &mut client).expect("write");
        let dest = tempfile::tempdir().expect("tempdir");
        put(dest.path(), "already.txt", "here", 0o644);
        let error = extract_bundle(&client[..], dest.path(), &BundleLimits::default())
            .expect_err("must fail");
        assert!(error.to_string().contains("not empty"), "{error}");
    }

    // -----------------------------------------------------------------------------------------
    // Hostile archives, built block by block so that any name can be written.
    // -----------------------------------------------------------------------------------------

    /// Raw tar bytes, one entry at a time.
    #[derive(Default)]
    struct RawTar(Vec<u8>);

    impl RawTar {
        fn entry(
            mut self,
            name: &[u8],
            kind: EntryType,
            link: &[u8],
            data: &[u8],
            mode: u32,
        ) -> Self {
            let mut header = Header::new_gnu();
            {
                let gnu = header.as_gnu_mut().expect("gnu header");
                gnu.name[..name.len()].copy_from_slice(name);
                gnu.linkname[..link.len()].copy_from_slice(link);
            }
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_mtime(0);
            header.set_cksum();
            self.0.extend_from_slice(header.as_bytes());
            self.0.extend_from_slice(data);
            let padding = (512 - data.len() % 512) % 512;
            self.0.extend_from_slice(&vec![0u8; padding]);
            self
        }

        fn file(self, name: &str, data: &str) -> Self {
            self.entry(
                name.as_bytes(),
                EntryType::Regular,
                b"",
                data.as_bytes(),
                0o644,
            )
        }

        fn dir(self, name: &str, mode: u32) -> Self {
            self.entry(name.as_bytes(), EntryType::Directory, b"", b"", mode)
        }

        fn link(self, name: &str, target: &str) -> Self {
            self.entry(
                name.as_bytes(),
                EntryType::Symlink,
                target.as_bytes(),
                b"",
                0o777,
            )
        }

        fn gzip(mut self) -> Vec<u8> {
            self.0.extend_from_slice(&[0u8; 1024]);
            let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(&self.0).expect("gzip");
            encoder.finish().expect("gzip")
        }
    }

    /// A scratch directory holding the destination `dest` and an empty sibling `sibling`.
    struct Sandbox {
        base: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let base = tempfile::tempdir().expect("tempdir");
            fs::create_dir(base.path().join("sibling")).expect("mkdir");
            Sandbox { base }
        }

        fn dest(&self) -> PathBuf {
            self.base.path().join("dest")
        }

        /// Asserts that nothing was written next to `dest`.
        fn assert_nothing_outside(&self) {
            let sibling: Vec<_> = fs::read_dir(self.base.path().join("sibling"))
                .expect("read sibling")
                .collect();
            assert!(sibling.is_empty(), "something was written into the sibling");
            let mut names: Vec<_> = fs::read_dir(self.base.path())
                .expect("read base")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert!(
                names == ["dest", "sibling"] || names == ["sibling"],
                "unexpected files next to dest: {names:?}"
            );
        }
    }

    /// Asserts that both extraction and splitting refuse `bundle`, naming `entry`, and that
    /// extraction wrote nothing outside its destination.
    fn assert_refused(bundle: &[u8], limits: BundleLimits, entry: &str) -> Error {
        let sandbox = Sandbox::new();
        let error =
            extract_bundle(bundle, &sandbox.dest(), &limits).expect_err("extract must refuse");
        assert!(
            error.message().contains(entry),
            "{error} should name {entry}"
        );
        sandbox.assert_nothing_outside();

        let split_error =
            split_client_bundle(bundle, Vec::new(), &limits).expect_err("split must refuse");
        assert!(
            split_error.message().contains(entry),
            "{split_error} should name {entry}"
        );
        assert_eq!(split_error.is_too_large(), error.is_too_large());
        error
    }

    #[test]
    fn refuses_parent_traversal() {
        let bundle = RawTar::default()
            .file("taskfly.yml", "x")
            .file("../sibling/evil", "pwned")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "../sibling/evil");
        assert!(error.is_invalid_bundle());
        assert!(error.message().contains(".."));
    }

    #[test]
    fn refuses_absolute_paths() {
        let bundle = RawTar::default().file("/abs/evil", "pwned").gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "/abs/evil");
        assert!(error.message().contains("absolute"));
    }

    #[test]
    fn refuses_windows_paths() {
        let bundle = RawTar::default().file("C:\\evil", "pwned").gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "evil");
        assert!(error.is_invalid_bundle());
    }

    #[test]
    fn refuses_absolute_symlink_and_the_file_behind_it() {
        let sandbox = Sandbox::new();
        let target = sandbox.base.path().join("sibling");
        let bundle = RawTar::default()
            .link("escape", target.to_str().expect("utf-8"))
            .file("escape/evil", "pwned")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "escape");
        assert!(error.message().contains("absolute"), "{error}");

        let error = extract_bundle(&bundle[..], &sandbox.dest(), &BundleLimits::default())
            .expect_err("must refuse");
        assert!(error.is_invalid_bundle());
        sandbox.assert_nothing_outside();
    }

    #[test]
    fn refuses_symlink_to_etc() {
        let bundle = RawTar::default()
            .link("etc", "/etc")
            .file("etc/evil", "pwned")
            .gzip();
        assert_refused(&bundle, BundleLimits::default(), "etc");
    }

    #[test]
    fn refuses_relative_symlink_escaping_the_root() {
        let bundle = RawTar::default().link("a", "../../x").gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "\"a\"");
        assert!(error.message().contains("outside"), "{error}");

        let bundle = RawTar::default()
            .dir("a", 0o755)
            .link("a/b", "../../x")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "a/b");
        assert!(error.message().contains("outside"), "{error}");
    }

    #[test]
    fn refuses_symlink_escaping_through_another_symlink() {
        // Lexically `t` stays inside (s/d/../.. is the root), but `s` is the root itself, so the
        // kernel would resolve `t` to the root's parent.
        let bundle = RawTar::default()
            .dir("d", 0o755)
            .link("t", "s/d/../..")
            .link("s", ".")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "\"t\"");
        assert!(error.message().contains("outside"), "{error}");
    }

    #[test]
    fn refuses_files_under_an_earlier_symlink() {
        let bundle = RawTar::default()
            .dir("inside", 0o755)
            .link("alias", "inside")
            .file("alias/evil", "through the link")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "alias/evil");
        assert!(error.message().contains("symbolic link"), "{error}");
    }

    #[test]
    fn refuses_symlink_over_an_implied_directory() {
        let bundle = RawTar::default()
            .file("dir/file", "x")
            .link("dir", "elsewhere")
            .gzip();
        assert_refused(&bundle, BundleLimits::default(), "dir");
    }

    #[test]
    fn refuses_hard_links() {
        let bundle = RawTar::default()
            .file("a", "x")
            .entry(b"h", EntryType::Link, b"a", b"", 0o644)
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "\"h\"");
        assert!(error.message().contains("hard link"), "{error}");
    }

    #[test]
    fn refuses_devices() {
        let bundle = RawTar::default()
            .entry(b"dev", EntryType::Char, b"", b"", 0o666)
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "dev");
        assert!(error.message().contains("device"), "{error}");
        let bundle = RawTar::default()
            .entry(b"pipe", EntryType::Fifo, b"", b"", 0o666)
            .gzip();
        assert_refused(&bundle, BundleLimits::default(), "pipe");
    }

    #[test]
    fn refuses_duplicate_entries() {
        let bundle = RawTar::default()
            .file("a.txt", "first")
            .file("./a.txt", "second")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "a.txt");
        assert!(error.message().contains("duplicate"), "{error}");
    }

    #[test]
    fn refuses_too_many_entries() {
        let bundle = RawTar::default()
            .file("a", "1")
            .file("b", "2")
            .file("c", "3")
            .file("d", "4")
            .gzip();
        let limits = BundleLimits {
            max_files: 3,
            ..BundleLimits::default()
        };
        let error = assert_refused(&bundle, limits, "max_files");
        assert!(error.is_too_large());
        assert!(error.message().contains('3'), "{error}");
    }

    #[test]
    fn refuses_too_many_bytes() {
        let bundle = RawTar::default()
            .file("small", "12345")
            .file("big", "1234567890")
            .gzip();
        let limits = BundleLimits {
            max_total_bytes: 10,
            ..BundleLimits::default()
        };
        let error = assert_refused(&bundle, limits, "max_total_bytes");
        assert!(error.is_too_large());
        assert!(error.message().contains("big"), "{error}");
    }

    #[test]
    fn refuses_oversized_long_name_headers() {
        let long_name = vec![b'a'; (METADATA_BUDGET as usize) * 2];
        let bundle = RawTar::default()
            .entry(
                b"././@LongLink",
                EntryType::GNULongName,
                b"",
                &long_name,
                0o644,
            )
            .file("x", "data")
            .gzip();
        let error = assert_refused(&bundle, BundleLimits::default(), "larger than");
        assert!(error.is_too_large());
    }

    #[test]
    fn refuses_input_that_is_not_gzip() {
        for input in [&b"hello world"[..], b"", b"\x1f"] {
            let sandbox = Sandbox::new();
            let error = extract_bundle(input, &sandbox.dest(), &BundleLimits::default())
                .expect_err("must refuse");
            assert!(error.is_invalid_bundle());
            assert_eq!(error.message(), "bundle is not a gzip tar archive");
        }
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(&[b'z'; 2048]).expect("gzip");
        let not_tar = encoder.finish().expect("gzip");
        let error = split_client_bundle(&not_tar[..], Vec::new(), &BundleLimits::default())
            .expect_err("must refuse");
        assert_eq!(error.message(), "bundle is not a gzip tar archive");
    }

    #[test]
    fn refuses_every_truncation() {
        let project = sample_project();
        let mut client = Vec::new();
        write_client_bundle(project.path(), &patterns(&["."]), &mut client).expect("write");
        // Every proper prefix must be refused, including those that only lose the gzip trailer.
        for length in 0..client.len() {
            let sandbox = Sandbox::new();
            let result =
                extract_bundle(&client[..length], &sandbox.dest(), &BundleLimits::default());
            let error = result.expect_err("a truncated bundle must be refused");
            assert!(error.is_invalid_bundle(), "{error}");
            sandbox.assert_nothing_outside();
        }
    }

    #[test]
    fn split_requires_taskfly_yml() {
        let bundle = RawTar::default().file("setup.sh", "echo").gzip();
        let error = split_client_bundle(&bundle[..], Vec::new(), &BundleLimits::default())
            .expect_err("must refuse");
        assert!(error.message().contains("taskfly.yml"), "{error}");
        let bundle = RawTar::default()
            .link("taskfly.yml", "setup.sh")
            .file("setup.sh", "x")
            .gzip();
        let error = split_client_bundle(&bundle[..], Vec::new(), &BundleLimits::default())
            .expect_err("must refuse");
        assert!(error.message().contains("not a regular file"), "{error}");
    }

    #[test]
    fn accepts_dot_slash_paths_links_and_strips_setuid() {
        let bundle = RawTar::default()
            .dir("./", 0o755)
            .dir("./bin/", 0o555)
            .entry(
                b"./bin/tool",
                EntryType::Regular,
                b"",
                b"#!/bin/sh\n",
                0o4755,
            )
            .link("./current", "bin/tool")
            .link("bin/self", "../bin")
            .file("taskfly.yml", "cloud_provider: local\n")
            .gzip();
        let sandbox = Sandbox::new();
        let dest = sandbox.dest();
        let summary =
            extract_bundle(&bundle[..], &dest, &BundleLimits::default()).expect("extract");
        assert_eq!(summary.files, ["bin/tool", "taskfly.yml"]);
        assert_eq!(mode_of(&dest.join("bin/tool")), 0o755);
        assert_eq!(mode_of(&dest.join("bin")), 0o755);
        assert_eq!(
            fs::read_link(dest.join("current")).expect("read link"),
            Path::new("bin/tool")
        );
        assert_eq!(
            fs::read_to_string(dest.join("current")).expect("read"),
            "#!/bin/sh\n"
        );
        sandbox.assert_nothing_outside();

        let mut worker = Vec::new();
        let (_, worker_summary) =
            split_client_bundle(&bundle[..], &mut worker, &BundleLimits::default()).expect("split");
        assert_eq!(worker_summary.files, ["bin/tool"]);
        let mut archive = Archive::new(GzDecoder::new(&worker[..]));
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mode = entry.header().mode().expect("mode");
            seen.push((path, mode));
        }
        assert_eq!(
            seen,
            [
                ("bin".to_owned(), 0o555),
                ("bin/tool".to_owned(), 0o755),
                ("current".to_owned(), 0o777),
                ("bin/self".to_owned(), 0o777)
            ]
        );
    }
}
