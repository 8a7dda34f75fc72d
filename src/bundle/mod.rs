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

mod extract;
mod outputs;
mod read;
mod resolve;
pub(crate) mod serve;
mod split;
#[cfg(test)]
mod tests;
mod write;

pub use self::extract::extract_bundle;
pub use self::outputs::extract_outputs;
pub(crate) use self::outputs::{
    pack_outputs, receive_outputs, write_outputs_archive, PackedOutputs,
};
pub use self::resolve::resolve_application_files;
pub use self::split::split_client_bundle;
pub use self::write::write_client_bundle;

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
