//! Packing, receiving, serving and unpacking node outputs.

use std::fs::{self, File, Permissions};
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Archive, EntryType, Header};

use super::*;

fn put(root: &Path, relative: &str, content: &str, mode: u32) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().expect("parent")).expect("parents");
    fs::write(&path, content).expect("write");
    fs::set_permissions(&path, Permissions::from_mode(mode)).expect("chmod");
}

fn patterns(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| (*p).to_owned()).collect()
}

/// The entries of a gzip tar: path, mode, content (links as `-> target`).
fn entries(gzip_tar: &[u8]) -> Vec<(String, u32, String)> {
    let mut archive = Archive::new(GzDecoder::new(gzip_tar));
    let mut out = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").display().to_string();
        let mode = entry.header().mode().expect("mode") & 0o7777;
        let mut content = String::new();
        if entry.header().entry_type() == EntryType::Symlink {
            content = format!(
                "-> {}",
                entry.link_name().expect("link").expect("target").display()
            );
        } else {
            entry.read_to_string(&mut content).expect("read");
        }
        out.push((path, mode, content));
    }
    out
}

fn pack(root: &Path, list: &[&str]) -> (PackedOutputs, Vec<u8>) {
    let mut out = Vec::new();
    let packed = pack_outputs(root, &patterns(list), &root.join("none"), &mut out).expect("pack");
    (packed, out)
}

#[test]
fn packs_files_globs_and_folders_with_their_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(root, "results/a.csv", "a\n", 0o644);
    put(root, "results/b.csv", "b\n", 0o644);
    put(root, "results/notes.txt", "n\n", 0o644);
    put(root, "summary.json", "{}", 0o600);
    put(root, "out/run.sh", "#!/bin/sh\n", 0o755);
    put(root, "out/deep/x", "x", 0o644);
    put(root, "input.txt", "not an output", 0o644);
    let (packed, archive) = pack(
        root,
        &["results/*.csv", "summary.json", "out/", "missing/*"],
    );
    assert_eq!(
        packed.files,
        [
            "out/deep/x",
            "out/run.sh",
            "results/a.csv",
            "results/b.csv",
            "summary.json"
        ]
    );
    assert!(packed.skipped.is_empty());
    let got = entries(&archive);
    assert!(got.contains(&("out/run.sh".to_owned(), 0o755, "#!/bin/sh\n".to_owned())));
    assert!(got.contains(&("summary.json".to_owned(), 0o600, "{}".to_owned())));
    assert_eq!(got.len(), 5);
}

#[test]
fn links_inside_are_packed_as_their_files_and_links_out_are_skipped() {
    let outside = tempfile::tempdir().expect("outside");
    put(outside.path(), "secret", "do not send", 0o600);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(root, "out/real.txt", "real", 0o644);
    symlink("real.txt", root.join("out/alias.txt")).expect("link");
    symlink(outside.path().join("secret"), root.join("out/leak")).expect("link");
    symlink(outside.path(), root.join("out/away")).expect("link");
    symlink("nowhere", root.join("out/broken")).expect("link");
    let (packed, archive) = pack(root, &["out"]);
    assert_eq!(packed.files, ["out/alias.txt", "out/real.txt"]);
    assert_eq!(packed.skipped.len(), 3, "{:?}", packed.skipped);
    assert!(packed
        .skipped
        .iter()
        .any(|s| s.starts_with("out/leak: a symbolic link leading out")));
    assert!(!entries(&archive)
        .iter()
        .any(|(_, _, c)| c.contains("do not send")));
}

#[test]
fn the_archive_being_written_is_never_packed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(root, "a.txt", "a", 0o644);
    let archive_path = root.join("outputs.tar.gz");
    let file = File::create(&archive_path).expect("create");
    let packed = pack_outputs(root, &patterns(&["*"]), &archive_path, file).expect("pack");
    assert_eq!(packed.files, ["a.txt"]);
}

/// A gzip tar of regular files, with one raw header edit allowed for hostile entries.
fn upload(files: &[(&str, &[u8])], link: Option<(&str, &str)>) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, data) in files {
        let mut header = Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_entry_type(EntryType::Regular);
        builder
            .append_data(&mut header, path, *data)
            .expect("append");
    }
    if let Some((path, target)) = link {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, path, target)
            .expect("link");
    }
    builder.into_inner().expect("tar").finish().expect("gzip")
}

fn receive(bytes: &[u8], limits: BundleLimits) -> (ReceivedOutputs, Result<()>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stored.tar");
    let mut file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create");
    let (received, outcome) = receive_outputs(Cursor::new(bytes), &mut file, &limits);
    (received, outcome, fs::read(&path).expect("read"))
}

/// The entries of a plain tar.
fn plain_entries(tar: &[u8]) -> Vec<String> {
    Archive::new(tar)
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect()
}

#[test]
fn an_upload_is_stored_entry_by_entry() {
    let bytes = upload(
        &[("a.txt", b"aaa"), ("dir/b.txt", b"bb")],
        Some(("dir/c", "b.txt")),
    );
    let (received, outcome, stored) = receive(&bytes, BundleLimits::default());
    outcome.expect("accepted");
    assert_eq!(received, ReceivedOutputs { files: 2, bytes: 5 });
    assert_eq!(plain_entries(&stored), ["a.txt", "dir/b.txt", "dir/c"]);
}

#[test]
fn over_a_limit_what_arrived_before_stays_a_valid_archive() {
    let bytes = upload(&[("a", b"1234"), ("b", b"5678"), ("c", b"9")], None);
    let limits = BundleLimits {
        max_total_bytes: 6,
        max_files: 100,
    };
    let (received, outcome, stored) = receive(&bytes, limits);
    assert!(outcome.expect_err("over").is_too_large());
    assert_eq!(received, ReceivedOutputs { files: 1, bytes: 4 });
    assert_eq!(plain_entries(&stored), ["a"]);

    let count = BundleLimits {
        max_total_bytes: 1 << 20,
        max_files: 2,
    };
    let (_, outcome, stored) = receive(&bytes, count);
    assert!(outcome.expect_err("too many").is_too_large());
    assert_eq!(plain_entries(&stored), ["a", "b"]);
}

#[test]
fn hostile_uploads_are_refused() {
    let traversal = {
        // The tar crate refuses to write `..`, so the name goes into the header by hand.
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_size(1);
        header.as_gnu_mut().expect("gnu").name[..9].copy_from_slice(b"../escape");
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.extend_from_slice(&[b'x'; 512]);
        tar.extend_from_slice(&[0; 1024]);
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&tar).expect("gzip");
        gz.finish().expect("gzip")
    };
    let (_, outcome, _) = receive(&traversal, BundleLimits::default());
    let error = outcome.expect_err("traversal refused");
    assert!(error.is_invalid_bundle(), "{error}");
    assert!(error.to_string().contains(".."), "{error}");

    let link_out = upload(&[("a", b"1")], Some(("out", "../../etc/passwd")));
    let (_, outcome, stored) = receive(&link_out, BundleLimits::default());
    assert!(outcome.expect_err("link out refused").is_invalid_bundle());
    assert_eq!(plain_entries(&stored), ["a"], "no link is ever stored");

    let (_, outcome, _) = receive(b"not a gzip tar", BundleLimits::default());
    assert!(outcome.expect_err("garbage").is_invalid_bundle());
}

#[test]
fn stored_archives_are_served_under_node_folders_and_unpacked_without_overwriting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sources = Vec::new();
    for (index, content) in [(0, "zero"), (2, "two")] {
        let path = dir.path().join(format!("{index}.tar"));
        let mut file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("create");
        let bytes = upload(
            &[("results/count.json", content.as_bytes())],
            Some(("latest", "results/count.json")),
        );
        receive_outputs(Cursor::new(bytes), &mut file, &BundleLimits::default())
            .1
            .expect("stored");
        sources.push((format!("node-{index}"), path));
    }
    sources.push(("node-9".to_owned(), dir.path().join("gone.tar")));
    let mut served = Vec::new();
    write_outputs_archive(&sources, &mut served).expect("served");
    let got = entries(&served);
    assert_eq!(
        got.iter().map(|(p, _, _)| p.as_str()).collect::<Vec<_>>(),
        [
            "node-0/results/count.json",
            "node-0/latest",
            "node-2/results/count.json",
            "node-2/latest"
        ]
    );
    assert_eq!(got[0].1, 0o755, "modes are kept");

    let dest = dir.path().join("dest");
    let summary = extract_outputs(Cursor::new(&served), &dest, &BundleLimits::default(), false)
        .expect("unpacked");
    assert_eq!(
        summary.files,
        ["node-0/results/count.json", "node-2/results/count.json"]
    );
    assert_eq!(
        fs::read_to_string(dest.join("node-2/results/count.json")).expect("read"),
        "two"
    );
    assert_eq!(
        fs::read_link(dest.join("node-0/latest"))
            .expect("link")
            .to_str(),
        Some("results/count.json")
    );

    fs::write(dest.join("node-2/results/count.json"), "mine").expect("edit");
    let refused = extract_outputs(Cursor::new(&served), &dest, &BundleLimits::default(), false)
        .expect_err("exists");
    assert!(refused.is_conflict());
    assert!(refused.to_string().contains("--force"), "{refused}");
    assert_eq!(
        fs::read_to_string(dest.join("node-2/results/count.json")).expect("read"),
        "mine"
    );
    assert_eq!(
        fs::read_dir(&dest).expect("dest").count(),
        2,
        "no staging folder left"
    );

    extract_outputs(Cursor::new(&served), &dest, &BundleLimits::default(), true).expect("forced");
    assert_eq!(
        fs::read_to_string(dest.join("node-2/results/count.json")).expect("read"),
        "two"
    );
}

#[test]
fn unpacking_never_writes_through_a_link_in_the_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let dest = dir.path().join("dest");
    fs::create_dir(&dest).expect("mkdir");
    symlink(&elsewhere, dest.join("node-0")).expect("link");
    let archive = upload(&[("node-0/x", b"x")], None);
    let error = extract_outputs(Cursor::new(&archive), &dest, &BundleLimits::default(), true)
        .expect_err("refused");
    assert!(error.is_conflict(), "{error}");
    assert_eq!(fs::read_dir(&elsewhere).expect("dir").count(), 0);
}

#[test]
fn dot_is_the_whole_folder_and_names_are_normalized() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    put(root, "a.txt", "a", 0o644);
    put(root, "sub/b.txt", "b", 0o644);
    let (packed, archive) = pack(root, &[".", "./sub//", "sub/b.txt"]);
    assert_eq!(packed.files, ["a.txt", "sub/b.txt"]);
    assert_eq!(entries(&archive).len(), 2, "no entry twice");
}
