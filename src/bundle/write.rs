//! Writing the client bundle on the user's machine.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Builder, EntryType, Header};

use super::resolve::resolve_application_files;
use super::{BundleSummary, CONFIG_FILE};
use crate::{Error, Result};

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

/// Appends the file at `path` (following symbolic links) as the entry `name` of the client
/// bundle, returning its size.
fn append_project_file<W: Write>(builder: &mut Builder<W>, path: &Path, name: &str) -> Result<u64> {
    append_file(builder, path, name, BUNDLE_WORDS)
}

/// How errors name an archive being written: what happens to a file put in (`bundled`), and
/// the archive (`the client bundle`).
pub(super) struct ArchiveWords {
    pub(super) done_to_file: &'static str,
    pub(super) archive: &'static str,
}

const BUNDLE_WORDS: ArchiveWords = ArchiveWords {
    done_to_file: "bundled",
    archive: "the client bundle",
};

/// Appends the regular file at `path` (following symbolic links) as the entry `name`, with
/// its permission bits and time, returning its size. A file that changes size while it is
/// read is an error, never a corrupt entry.
pub(super) fn append_file<W: Write>(
    builder: &mut Builder<W>,
    path: &Path,
    name: &str,
    words: ArchiveWords,
) -> Result<u64> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::io(
            format!("cannot put {} in {}", path.display(), words.archive),
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
                        "cannot read {} (did it change while it was {}?)",
                        path.display(),
                        words.done_to_file
                    ),
                    e,
                )
            } else {
                Error::io(format!("cannot write {}", words.archive), e)
            }
        })?;
    Ok(size)
}

/// A header for a regular file with deterministic ownership: uid and gid 0, no user names.
pub(super) fn file_header(size: u64, mode: u32, mtime: u64) -> Header {
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
pub(super) fn empty_header(entry_type: EntryType, mode: u32, mtime: u64) -> Header {
    let mut header = file_header(0, mode, mtime);
    header.set_entry_type(entry_type);
    header
}

/// A reader that yields exactly `remaining` bytes of `inner`: it stops there even if `inner`
/// has more, and fails if `inner` ends first. `source_failed` tells afterwards whether an error
/// came from `inner` rather than from the writer the bytes were copied to.
pub(super) struct ExactReader<R> {
    inner: R,
    remaining: u64,
    pub(super) source_failed: bool,
}

impl<R: Read> ExactReader<R> {
    pub(super) fn new(inner: R, size: u64) -> Self {
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
