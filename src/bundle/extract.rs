//! Extracting a worker bundle on a node, writing every file itself.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use super::read::{read_bundle, Item};
use super::write::ExactReader;
use super::{BundleLimits, BundleSummary, MODE_MASK};
use crate::{Error, Result};

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
pub(super) fn truncated(path: &str, source: io::Error) -> Error {
    Error::invalid_bundle(format!("bundle entry {path:?} is truncated or corrupt"))
        .with_source(source)
}
