//! Writing, splitting, extracting and refusing bundles.

use std::fs::{self, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Archive, EntryType, Header};

use super::*;
use crate::Error;
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
    let extracted = extract_bundle(&worker[..], &dest, &BundleLimits::default()).expect("extract");
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
    let summary = extract_bundle(&client[..], &whole, &BundleLimits::default()).expect("extract");
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
    let error =
        extract_bundle(&client[..], dest.path(), &BundleLimits::default()).expect_err("must fail");
    assert!(
        error.report().to_string().contains("not empty"),
        "{error:?}"
    );
}

// -----------------------------------------------------------------------------------------
// Hostile archives, built block by block so that any name can be written.
// -----------------------------------------------------------------------------------------

/// Raw tar bytes, one entry at a time.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn entry(mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8], mode: u32) -> Self {
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
    let error = extract_bundle(bundle, &sandbox.dest(), &limits).expect_err("extract must refuse");
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
        let result = extract_bundle(&client[..length], &sandbox.dest(), &BundleLimits::default());
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
    let summary = extract_bundle(&bundle[..], &dest, &BundleLimits::default()).expect("extract");
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
