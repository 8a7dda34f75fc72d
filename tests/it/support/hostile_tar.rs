//! Hand-built gzip tar archives with any entry type (hard links and devices included) and
//! names written into the header as raw bytes, so entries a careful archiver refuses to write
//! (`../x`, `/abs`, a character device) can be sent to the daemon.

use std::io::Write;

/// What one entry is.
pub enum Kind<'a> {
    File(&'a [u8]),
    Symlink(&'a [u8]),
    HardLink(&'a [u8]),
    CharDevice { major: u32, minor: u32 },
}

/// One entry: its raw name and what it is.
pub struct Entry<'a> {
    pub name: &'a [u8],
    pub kind: Kind<'a>,
}

impl<'a> Entry<'a> {
    /// A regular file: mode 0755 for `setup.sh`, 0644 for anything else.
    pub fn file(name: &'a str, data: &'a [u8]) -> Entry<'a> {
        Entry {
            name: name.as_bytes(),
            kind: Kind::File(data),
        }
    }

    /// A symbolic link to `target`.
    pub fn symlink(name: &'a str, target: &'a str) -> Entry<'a> {
        Entry {
            name: name.as_bytes(),
            kind: Kind::Symlink(target.as_bytes()),
        }
    }

    /// A hard link to `target`.
    pub fn hard_link(name: &'a str, target: &'a str) -> Entry<'a> {
        Entry {
            name: name.as_bytes(),
            kind: Kind::HardLink(target.as_bytes()),
        }
    }

    /// A character device.
    pub fn char_device(name: &'a str, major: u32, minor: u32) -> Entry<'a> {
        Entry {
            name: name.as_bytes(),
            kind: Kind::CharDevice { major, minor },
        }
    }
}

/// A gzip tar archive (GNU headers) of `entries`, exactly as given.
pub fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(encoder);
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let mut data: &[u8] = &[];
        let mut link: &[u8] = &[];
        match &entry.kind {
            Kind::File(bytes) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if entry.name == b"setup.sh" {
                    0o755
                } else {
                    0o644
                });
                data = bytes;
            }
            Kind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                link = target;
            }
            Kind::HardLink(target) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o644);
                link = target;
            }
            Kind::CharDevice { major, minor } => {
                header.set_entry_type(tar::EntryType::Char);
                header.set_mode(0o666);
                header.set_device_major(*major).expect("device major");
                header.set_device_minor(*minor).expect("device minor");
            }
        }
        header.set_size(data.len() as u64);
        let gnu = header.as_gnu_mut().expect("GNU header");
        assert!(entry.name.len() < gnu.name.len(), "entry name too long");
        gnu.name[..entry.name.len()].copy_from_slice(entry.name);
        assert!(link.len() < gnu.linkname.len(), "link target too long");
        gnu.linkname[..link.len()].copy_from_slice(link);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append(&header, data).expect("append entry");
    }
    let mut encoder = builder.into_inner().expect("finish tar");
    encoder.flush().expect("flush");
    encoder.finish().expect("finish gzip")
}
