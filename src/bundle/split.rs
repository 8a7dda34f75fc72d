//! Splitting a client bundle on the daemon into its `taskfly.yml` and the worker bundle.

use std::io::{self, Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Builder, EntryType};

use super::extract::truncated;
use super::read::{read_bundle, Item};
use super::write::{empty_header, file_header, ExactReader};
use super::{BundleLimits, BundleSummary, CONFIG_FILE, MAX_CONFIG_BYTES, MODE_MASK};
use crate::{Error, Result};

/// Reads a client bundle once, validating every entry exactly as [`extract_bundle`](super::extract_bundle) does, and
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
/// An invalid-bundle error naming the entry for any entry [`extract_bundle`](super::extract_bundle) would refuse, and
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
