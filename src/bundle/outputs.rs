//! Node outputs (SPEC §1 `outputs`): packed on the node, received by the daemon as hostile
//! input, served back as one archive, and unpacked on the user's machine.
//!
//! - [`pack_outputs`] (node): the files the `outputs` patterns match in the bundle folder, as a
//!   gzip tar with paths relative to that folder and their permission bits. A symbolic link
//!   resolving inside the folder is packed as what it points to; one leading out of it is
//!   skipped and named in [`PackedOutputs::skipped`].
//! - [`receive_outputs`] (daemon): reads an upload with the bundle rules of [`super::read`]
//!   and stores its entries as a plain tar, entry by entry, so that when a limit is reached or
//!   the upload breaks off, what arrived before stays a valid archive.
//! - [`write_outputs_archive`] (daemon): the stored archives of several nodes as one gzip tar,
//!   each entry under `node-<index>/`.
//! - [`extract_outputs`] (user's machine): that archive, checked by the same rules, written
//!   into a folder without replacing a file unless asked to.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Archive, Builder, EntryType};

use super::extract::extract_bundle;
use super::read::{read_bundle, Item};
use super::write::{append_file, empty_header, file_header, ArchiveWords, ExactReader};
use super::{BundleLimits, BundleSummary, MODE_MASK};
use crate::{Error, Result};

/// What [`pack_outputs`] packed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PackedOutputs {
    /// The relative paths of the files packed, sorted.
    pub(crate) files: Vec<String>,
    /// Their total size in bytes.
    pub(crate) bytes: u64,
    /// Each path left out, with the reason (a symbolic link leading out of the folder).
    pub(crate) skipped: Vec<String>,
}

/// Packs the files `patterns` match under `bundle_dir` into `out` as a gzip tar.
///
/// A pattern is a file, a folder (taken whole) or a glob (`*`, `?`, `[...]`, `**`), relative
/// to `bundle_dir`; one that matches nothing adds nothing (a failed script may have written
/// nothing). Entries are the files' paths relative to `bundle_dir`, with their permission bits
/// and modification times; owners are recorded as 0. The file at `archive_path` (where `out`
/// goes) is never packed, should a pattern match it.
///
/// # Errors
///
/// An I/O error naming the file or folder that cannot be read, or when `out` fails.
pub(crate) fn pack_outputs<W: Write>(
    bundle_dir: &Path,
    patterns: &[String],
    archive_path: &Path,
    out: W,
) -> Result<PackedOutputs> {
    let root = fs::canonicalize(bundle_dir)
        .map_err(|e| Error::io(format!("cannot open {}", bundle_dir.display()), e))?;
    let mut walk = Walk {
        root,
        archive: fs::canonicalize(archive_path).ok(),
        files: BTreeMap::new(),
        skipped: Vec::new(),
        visited: HashSet::new(),
    };
    for pattern in patterns {
        walk.add_pattern(pattern)?;
    }
    let mut builder = Builder::new(GzEncoder::new(out, Compression::default()));
    let mut packed = PackedOutputs {
        skipped: walk.skipped,
        ..PackedOutputs::default()
    };
    for (name, path) in &walk.files {
        let size = append_file(
            &mut builder,
            path,
            name,
            ArchiveWords {
                done_to_file: "packed",
                archive: "the outputs archive",
            },
        )?;
        packed.files.push(name.clone());
        packed.bytes = packed.bytes.saturating_add(size);
    }
    builder
        .into_inner()
        .and_then(GzEncoder::finish)
        .map_err(|e| Error::io("cannot write the outputs archive", e))?;
    Ok(packed)
}

/// The state of one [`pack_outputs`] call.
struct Walk {
    /// The canonical bundle folder; everything packed resolves under it.
    root: PathBuf,
    /// The archive being written, never packed.
    archive: Option<PathBuf>,
    /// Entry name → the path read for it.
    files: BTreeMap<String, PathBuf>,
    skipped: Vec<String>,
    /// Canonical folders already walked (a link loop is walked once).
    visited: HashSet<PathBuf>,
}

impl Walk {
    fn add_pattern(&mut self, pattern: &str) -> Result<()> {
        let literal = self.root.join(pattern.trim_end_matches('/'));
        if fs::symlink_metadata(&literal).is_ok() || !pattern.contains(['*', '?', '[']) {
            if fs::symlink_metadata(&literal).is_ok() {
                // `./a//b/` is the entry `a/b`; `.` is the whole folder.
                let name = pattern
                    .split('/')
                    .filter(|part| !part.is_empty() && *part != ".")
                    .collect::<Vec<_>>()
                    .join("/");
                self.add(&name, &literal)?;
            }
            return Ok(());
        }
        let Some(root_text) = self.root.to_str() else {
            return Err(Error::invalid_input(format!(
                "outputs: the glob {pattern:?} cannot be used: the bundle folder's path {} is not UTF-8",
                self.root.display()
            )));
        };
        let full = format!("{}/{}", glob::Pattern::escape(root_text), pattern);
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let paths = glob::glob_with(&full, options).map_err(|e| {
            Error::invalid_input(format!(
                "outputs: {pattern:?} is not a valid glob: {}",
                e.msg
            ))
        })?;
        for found in paths.flatten() {
            let Ok(relative) = found.strip_prefix(&self.root) else {
                continue;
            };
            let Some(name) = relative.to_str().map(str::to_owned) else {
                self.skipped
                    .push(format!("{}: the name is not UTF-8", relative.display()));
                continue;
            };
            if name.is_empty() {
                continue;
            }
            self.add(&name, &found)?;
        }
        Ok(())
    }

    /// Adds the file or folder at `path`, packed as `name` (empty for the folder itself).
    fn add(&mut self, name: &str, path: &Path) -> Result<()> {
        let unreadable = |e| Error::io(format!("cannot read {}", path.display()), e);
        let link = fs::symlink_metadata(path).map_err(unreadable)?;
        let resolved = match fs::canonicalize(path) {
            Ok(resolved) => resolved,
            Err(_) if link.file_type().is_symlink() => {
                self.skipped.push(format!("{name}: a broken symbolic link"));
                return Ok(());
            }
            Err(e) => return Err(unreadable(e)),
        };
        if !resolved.starts_with(&self.root) {
            self.skipped.push(format!(
                "{name}: a symbolic link leading out of the bundle folder"
            ));
            return Ok(());
        }
        let meta = fs::metadata(&resolved).map_err(unreadable)?;
        if meta.is_file() {
            if self.archive.as_ref() != Some(&resolved) && !name.is_empty() {
                self.files.insert(name.to_owned(), resolved);
            }
        } else if meta.is_dir() {
            if !self.visited.insert(resolved.clone()) {
                return Ok(());
            }
            let mut children: Vec<_> = fs::read_dir(&resolved)
                .map_err(unreadable)?
                .filter_map(std::result::Result::ok)
                .collect();
            children.sort_by_key(fs::DirEntry::file_name);
            for child in children {
                let Some(child_name) = child.file_name().to_str().map(str::to_owned) else {
                    self.skipped.push(format!(
                        "{name}/{}: the name is not UTF-8",
                        child.file_name().to_string_lossy()
                    ));
                    continue;
                };
                let child_entry = if name.is_empty() {
                    child_name.clone()
                } else {
                    format!("{name}/{child_name}")
                };
                self.add(&child_entry, &path.join(&child_name))?;
            }
        } else {
            self.skipped
                .push(format!("{name}: neither a file nor a folder"));
        }
        Ok(())
    }
}

/// What [`receive_outputs`] stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReceivedOutputs {
    /// Regular files stored.
    pub(crate) files: u64,
    /// Their total size in bytes.
    pub(crate) bytes: u64,
}

/// Reads the gzip tar `upload` as hostile input (the bundle rules: relative paths without
/// `..`, no hard links, devices or links leading out, no duplicates, `limits` on entries and
/// bytes) and writes its entries to `stored` as a plain tar, as they arrive.
///
/// Returns what was stored and how the upload ended. On an error, `stored` still holds a
/// valid tar of the complete entries before the one refused (symbolic links only once the
/// whole upload was checked): the caller decides whether to keep it.
pub(crate) fn receive_outputs<R: Read>(
    upload: R,
    stored: &mut File,
    limits: &BundleLimits,
) -> (ReceivedOutputs, Result<()>) {
    let mut received = ReceivedOutputs::default();
    let mut good_end = 0u64;
    let mut links: Vec<(String, String, u64)> = Vec::new();
    let outcome = {
        let mut builder = Builder::new(Counting {
            inner: &mut *stored,
            written: 0,
        });
        let read = read_bundle(upload, limits, |item, data| {
            match item {
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
                                super::extract::truncated(path, e)
                            } else {
                                Error::io("cannot store the outputs", e)
                            }
                        })?;
                    received.files += 1;
                    received.bytes = received.bytes.saturating_add(*size);
                }
                Item::Dir { path, mode, mtime } => {
                    let mut header = empty_header(EntryType::Directory, mode & MODE_MASK, *mtime);
                    builder
                        .append_data(&mut header, path, io::empty())
                        .map_err(|e| Error::io("cannot store the outputs", e))?;
                }
                Item::Symlink {
                    path,
                    target,
                    mtime,
                } => links.push((path.clone(), target.clone(), *mtime)),
                Item::Skip => {}
            }
            good_end = builder.get_ref().written;
            Ok(())
        });
        let outcome = read.and_then(|_| {
            for (path, target, mtime) in &links {
                let mut header = empty_header(EntryType::Symlink, 0o777, *mtime);
                builder
                    .append_link(&mut header, path, target)
                    .map_err(|e| Error::io("cannot store the outputs", e))?;
            }
            builder
                .finish()
                .map_err(|e| Error::io("cannot store the outputs", e))
        });
        // Whatever the builder writes when dropped after an error is cut off below.
        outcome
    };
    if outcome.is_err() {
        if let Err(e) = end_archive_at(stored, good_end) {
            return (received, Err(e));
        }
    }
    (received, outcome)
}

/// Cuts `file` at `end` (the end of its last complete entry) and writes the tar end marker.
fn end_archive_at(file: &mut File, end: u64) -> Result<()> {
    let failed = |e| Error::io("cannot store the outputs", e);
    file.set_len(end).map_err(failed)?;
    file.seek(SeekFrom::Start(end)).map_err(failed)?;
    file.write_all(&[0u8; 1024]).map_err(failed)
}

/// A writer counting the bytes written through it.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the stored plain tars `sources` (each with the folder its entries go under, such as
/// `node-3`) to `out` as one gzip tar. A source file that is gone (cleaned up meanwhile) is
/// left out.
pub(crate) fn write_outputs_archive<W: Write>(sources: &[(String, PathBuf)], out: W) -> Result<()> {
    let mut builder = Builder::new(GzEncoder::new(out, Compression::default()));
    let failed = |e| Error::io("cannot write the outputs archive", e);
    for (folder, source) in sources {
        let file = match File::open(source) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("cannot read {}", source.display()), e)),
        };
        let unreadable = |e| Error::io(format!("cannot read {}", source.display()), e);
        let mut archive = Archive::new(io::BufReader::new(file));
        for entry in archive.entries().map_err(unreadable)? {
            let mut entry = entry.map_err(unreadable)?;
            let path = format!("{folder}/{}", String::from_utf8_lossy(&entry.path_bytes()));
            let mut header = entry.header().clone();
            match header.entry_type() {
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default();
                    builder
                        .append_link(&mut header, &path, &target)
                        .map_err(failed)?;
                }
                EntryType::Regular | EntryType::Directory => builder
                    .append_data(&mut header, &path, &mut entry)
                    .map_err(failed)?,
                _ => {}
            }
        }
    }
    builder
        .into_inner()
        .and_then(GzEncoder::finish)
        .map(drop)
        .map_err(failed)
}

/// Unpacks the outputs archive `archive` (entries `node-<index>/<path>`) into `dest`, created
/// if missing: every entry checked by the bundle rules (it came over the network), nothing
/// written through a symbolic link of `dest`. An existing file is replaced only with
/// `overwrite`; without it, no file is written when one already exists, and the error names
/// it.
///
/// # Errors
///
/// The errors of [`extract_bundle`]; [`Error::is_conflict`] naming the first file that exists
/// (and how many do); an I/O error when `dest` cannot be written.
pub fn extract_outputs<R: Read>(
    archive: R,
    dest: &Path,
    limits: &BundleLimits,
    overwrite: bool,
) -> Result<BundleSummary> {
    fs::create_dir_all(dest)
        .map_err(|e| Error::io(format!("cannot create {}", dest.display()), e))?;
    let staging = dest.join(format!(".taskfly-incoming-{}", crate::auth::new_id()?));
    let result = extract_outputs_via(archive, dest, &staging, limits, overwrite);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn extract_outputs_via<R: Read>(
    archive: R,
    dest: &Path,
    staging: &Path,
    limits: &BundleLimits,
    overwrite: bool,
) -> Result<BundleSummary> {
    let summary = extract_bundle(archive, staging, limits)?;
    let mut entries = Vec::new();
    list_entries(staging, "", &mut entries)?;
    let mut existing = Vec::new();
    for relative in &entries {
        let target = dest.join(relative);
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::conflict(format!(
                    "{} is a folder, and the outputs hold a file of that name; move it away",
                    target.display()
                )))
            }
            Ok(_) => existing.push(target),
            Err(_) => {}
        }
    }
    if let Some(first) = existing.first() {
        if !overwrite {
            let more = match existing.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            return Err(Error::conflict(format!(
                "{} already exists{more}; nothing was written (pass --force to replace existing files, or choose another --dest)",
                first.display()
            )));
        }
    }
    for relative in &entries {
        let target = real_parents(dest, relative)?;
        fs::rename(staging.join(relative), &target)
            .map_err(|e| Error::io(format!("cannot write {}", target.display()), e))?;
    }
    Ok(summary)
}

/// Every file and symbolic link under `dir`, relative to the staging root.
fn list_entries(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let unreadable = |e| Error::io(format!("cannot read {}", dir.display()), e);
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(std::result::Result::ok)
        .collect();
    children.sort_by_key(fs::DirEntry::file_name);
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = child.file_type().map_err(unreadable)?;
        if kind.is_dir() {
            list_entries(&child.path(), &relative, out)?;
        } else {
            out.push(relative);
        }
    }
    Ok(())
}

/// Creates the parent folders of `relative` under `dest` (mode 0755), refusing a parent that
/// is a symbolic link or a file, and returns the entry's full path.
fn real_parents(dest: &Path, relative: &str) -> Result<PathBuf> {
    let mut dir = dest.to_path_buf();
    let mut parts: Vec<&str> = relative.split('/').collect();
    let name = parts.pop().unwrap_or_default();
    for part in parts {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::conflict(format!(
                    "{} is not a real folder (a file or a symbolic link); move it away",
                    dir.display()
                )))
            }
            Err(_) => {
                fs::create_dir(&dir)
                    .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)))
                    .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            }
        }
    }
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests;
