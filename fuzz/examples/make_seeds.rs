//! Writes the seed bundles of the `bundle_extract` (gzip) and `bundle_extract_raw` (plain tar)
//! targets into `fuzz/seeds/`: a few valid client bundles written by
//! `taskfly::bundle::write_client_bundle` from small projects, and hand-made hostile ones
//! (`..`, absolute paths, links that escape, hard links, devices, duplicates, setuid bits).
//!
//! Run it from the repository root:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! The text seeds of the other targets are plain files, written by hand.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Builder, EntryType, Header};
use taskfly::bundle::{extract_bundle, write_client_bundle};
use taskfly_fuzz::bundle::LIMITS;

fn main() {
    let gzip_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/bundle_extract");
    let raw_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/bundle_extract_raw");
    fs::create_dir_all(&gzip_dir).expect("create seeds/bundle_extract");
    fs::create_dir_all(&raw_dir).expect("create seeds/bundle_extract_raw");

    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    seeds.push((
        "valid-hello",
        client_bundle(&hello_project(), &["setup.sh"]),
    ));
    seeds.push((
        "valid-nested",
        client_bundle(&nested_project(), &["setup.sh", "data/", "src/**/*.py"]),
    ));
    for (name, tar) in hostile_tars() {
        seeds.push((name, gzip(&tar)));
    }

    for (name, gzip_bytes) in &seeds {
        fs::write(gzip_dir.join(format!("{name}.tar.gz")), gzip_bytes).expect("write a seed");
        let mut tar = Vec::new();
        GzDecoder::new(&gzip_bytes[..])
            .read_to_end(&mut tar)
            .expect("gunzip a seed");
        fs::write(raw_dir.join(format!("{name}.tar")), trim_tar(&tar)).expect("write a seed");
        let dest = tempfile::tempdir().expect("tempdir");
        let outcome = match extract_bundle(&gzip_bytes[..], &dest.path().join("dest"), &LIMITS) {
            Ok(summary) => format!("extracts {:?}", summary.files),
            Err(err) => format!("refused: {err}"),
        };
        println!("{name} ({} bytes): {outcome}", gzip_bytes.len());
    }
}

/// A tar without its closing zero blocks, which readers do not need, so that the plain-tar seeds
/// stay small.
fn trim_tar(tar: &[u8]) -> &[u8] {
    let mut end = tar.len();
    while end >= 512 && tar[end - 512..end].iter().all(|&b| b == 0) {
        end -= 512;
    }
    &tar[..end]
}

fn put(root: &Path, relative: &str, content: &str, mode: u32) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().expect("a parent")).expect("create parents");
    fs::write(&path, content).expect("write a project file");
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn hello_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    put(
        dir.path(),
        "taskfly.yml",
        include_str!("../../examples/hello/taskfly.yml"),
        0o644,
    );
    put(
        dir.path(),
        "setup.sh",
        "#!/bin/sh\necho \"$MESSAGE\"\n",
        0o755,
    );
    dir
}

fn nested_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(
        root,
        "taskfly.yml",
        "cloud_provider: local\napplication_files: [setup.sh, data/, \"src/**/*.py\"]\n\
         nodes:\n  count: 2\n  distributed_lists:\n    file: [data/a.csv, data/deep/b.csv]\n",
        0o644,
    );
    put(root, "setup.sh", "#!/bin/sh\nwc -l \"$FILE\"\n", 0o755);
    put(root, "data/a.csv", "a,b\n1,2\n", 0o644);
    put(root, "data/deep/b.csv", "c,d\n", 0o600);
    put(root, "src/main.py", "print('main')\n", 0o644);
    put(root, "src/pkg/util.py", "X = 1\n", 0o644);
    // Followed by write_client_bundle: bundled as the file it points to.
    symlink("a.csv", root.join("data/alias.csv")).expect("symlink");
    dir
}

fn client_bundle(project: &tempfile::TempDir, patterns: &[&str]) -> Vec<u8> {
    let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
    let mut out = Vec::new();
    write_client_bundle(project.path(), &patterns, &mut out).expect("write a client bundle");
    out
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(tar).expect("gzip");
    encoder.finish().expect("gzip")
}

/// One tar entry, written with its path as raw bytes so that hostile paths (which the `tar`
/// crate's own setters refuse) can be written.
struct Entry<'a> {
    path: &'a str,
    kind: EntryType,
    mode: u32,
    link: &'a str,
    data: &'a [u8],
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> Entry<'a> {
    Entry {
        path,
        kind: EntryType::Regular,
        mode: 0o644,
        link: "",
        data,
    }
}

fn dir(path: &str) -> Entry<'_> {
    Entry {
        path,
        kind: EntryType::Directory,
        mode: 0o755,
        link: "",
        data: b"",
    }
}

fn link<'a>(path: &'a str, target: &'a str) -> Entry<'a> {
    Entry {
        path,
        kind: EntryType::Symlink,
        mode: 0o777,
        link: target,
        data: b"",
    }
}

fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = Builder::new(Vec::new());
    for entry in entries {
        let mut header = Header::new_gnu();
        header.set_entry_type(entry.kind);
        header.set_mode(entry.mode);
        header.set_size(entry.data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        let old = header.as_old_mut();
        old.name[..entry.path.len()].copy_from_slice(entry.path.as_bytes());
        old.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        header.set_cksum();
        builder
            .append(&header, entry.data)
            .expect("append an entry");
    }
    builder.into_inner().expect("finish the tar")
}

const CONFIG: &[u8] = b"cloud_provider: local\napplication_files: [setup.sh]\nnodes:\n  count: 1\n";
const SCRIPT: &[u8] = b"#!/bin/sh\necho hi\n";

fn hostile_tars() -> Vec<(&'static str, Vec<u8>)> {
    let config = || file("taskfly.yml", CONFIG);
    let mut setuid = file("setup.sh", SCRIPT);
    setuid.mode = 0o4755;
    let mut hard = link("hard", "taskfly.yml");
    hard.kind = EntryType::Link;
    let mut fifo = dir("fifo");
    fifo.kind = EntryType::Fifo;
    let mut device = dir("null");
    device.kind = EntryType::Char;

    let mut tars = vec![
        // Accepted: a root entry, a leading ./, directories, a link that stays inside.
        (
            "valid-links",
            tar_of(&[
                dir("./"),
                file("./taskfly.yml", CONFIG),
                dir("bin"),
                file("bin/setup.sh", SCRIPT),
                link("setup.sh", "bin/setup.sh"),
                link("bin/self", "../bin"),
            ]),
        ),
        // Accepted by extraction, refused by splitting: no taskfly.yml.
        ("worker-only", tar_of(&[file("setup.sh", SCRIPT)])),
        // Accepted, with the setuid bit dropped.
        ("setuid", tar_of(&[config(), setuid])),
        ("dotdot", tar_of(&[config(), file("../escaped", b"x")])),
        (
            "dotdot-deep",
            tar_of(&[config(), file("a/../../escaped", b"x")]),
        ),
        (
            "absolute",
            tar_of(&[config(), file("/tmp/taskfly-fuzz-escaped", b"x")]),
        ),
        (
            "link-dotdot",
            tar_of(&[config(), link("out", "../outside")]),
        ),
        ("link-absolute", tar_of(&[config(), link("etc", "/etc")])),
        (
            "link-then-write-through",
            tar_of(&[config(), link("d", "."), file("d/inner", b"x")]),
        ),
        (
            // Lexically inside, outside once `s` is followed: s -> ., t -> s/d/../..
            "link-chain-escape",
            tar_of(&[config(), link("s", "."), dir("d"), link("t", "s/d/../..")]),
        ),
        (
            "link-loop",
            tar_of(&[config(), link("a", "b"), link("b", "a")]),
        ),
        ("hard-link", tar_of(&[config(), hard])),
        ("fifo", tar_of(&[config(), fifo])),
        ("device", tar_of(&[config(), device])),
        (
            "duplicate",
            tar_of(&[
                config(),
                file("setup.sh", SCRIPT),
                file("setup.sh", b"again"),
            ]),
        ),
        (
            "file-then-dir",
            tar_of(&[config(), file("data", b"x"), file("data/inner", b"y")]),
        ),
        ("backslash", tar_of(&[config(), file("..\\escaped", b"x")])),
        (
            "config-is-dir",
            tar_of(&[dir("taskfly.yml"), file("setup.sh", SCRIPT)]),
        ),
    ];

    // Long names: a GNU long-name entry and a pax path record, both built by the tar crate.
    let mut builder = Builder::new(Vec::new());
    let mut header = Header::new_gnu();
    header.set_size(CONFIG.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "taskfly.yml", CONFIG)
        .expect("append");
    let long = format!("{}/setup.sh", "d".repeat(150));
    let mut header = Header::new_gnu();
    header.set_size(SCRIPT.len() as u64);
    header.set_mode(0o755);
    builder
        .append_data(&mut header, &long, SCRIPT)
        .expect("append");
    builder
        .append_pax_extensions([("path", "pax/named.txt".as_bytes())])
        .expect("pax");
    let mut header = Header::new_ustar();
    header.set_size(2);
    header.set_mode(0o644);
    header.set_path("ignored.txt").expect("path");
    header.set_cksum();
    builder.append(&header, &b"hi"[..]).expect("append");
    tars.push(("long-names", builder.into_inner().expect("finish")));
    tars
}
