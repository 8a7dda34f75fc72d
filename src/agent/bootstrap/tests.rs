//! The rendered script, and the bootstrap serving nodes in `sh`, `bash` and busybox `sh`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;
use crate::agent::fake_daemon::{bundle_of, BackgroundDaemon, Daemon, FakeNode, RegisterAnswer};

const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// Runs `script` with `sh -c` and returns its stdout.
fn sh(script: &str) -> Vec<u8> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh runs");
    assert!(output.status.success(), "{script}: {output:?}");
    output.stdout
}

/// Values that break naive quoting.
fn hostile_values() -> Vec<String> {
    [
        "plain",
        "",
        "it's",
        "''",
        "'\\''",
        "say \"hi\"",
        "$(touch PWNED_SUB)",
        "${HOME}",
        "`touch PWNED_BT`",
        "line one\nline two\n",
        "\n",
        "a; touch PWNED_SEMI; echo b",
        "back\\slash \\\\ \\n",
        "héllo ✓ — 日本",
        "tab\there | & > < * ? ~ ! #",
        "trailing space ",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

#[test]
fn quoted_values_come_back_exactly_from_sh() {
    let dir = tempfile::tempdir().expect("tempdir");
    for value in hostile_values() {
        let script = format!(
            "cd {} && printf %s {}",
            dir.path().display(),
            sh_quote(&value)
        );
        assert_eq!(sh(&script), value.as_bytes(), "{value:?}");
    }
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "a value was evaluated"
    );
}

#[test]
fn the_registration_answer_sources_to_the_exact_values() {
    let values = hostile_values();
    let env: BTreeMap<String, String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("VAR_{i}"), v.clone()))
        .collect();
    let registration = wire::RegisterResponse {
        auth_token: "abc123".into(),
        deployment_id: "dep".into(),
        node_id: "dep-0".into(),
        node_index: 0,
        env,
        script: "it's \"my\" $(script).sh".into(),
        dest_dir: None,
        heartbeat_interval_s: 10,
        heartbeat_interval_ms: None,
        secret_names: Vec::new(),
        timeout_s: Some(120),
        pooled: false,
        next_token: None,
        outputs: vec!["results/*.csv".into(), "it's out/".into()],
    };
    let text = registration_env(&registration).expect("valid names");
    assert!(
        text.starts_with("TASKFLY_NEXT_TOKEN=''\nTASKFLY_AUTH_TOKEN='abc123'\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "TASKFLY_SECRET_NAMES=''\nTASKFLY_OUTPUTS='results/*.csv\nit'\\''s out/'\nexport "
        ),
        "the outputs patterns come after the other control values, one a line: {text}"
    );
    assert!(text.contains("TASKFLY_DEST_DIR=''\n"), "{text}");
    assert!(text.contains("TASKFLY_TIMEOUT_S='120'\n"), "{text}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("reg");
    std::fs::write(&file, &text).expect("write");
    // Every exported variable reaches a child process byte for byte; the control values
    // are set but not exported.
    for (i, value) in values.iter().enumerate() {
        let script = format!(
            "cd {dir} && . {file} && sh -c 'printf %s \"$VAR_{i}\"; printf %s \"${{TASKFLY_AUTH_TOKEN:-unset}}\" >&2'",
            dir = dir.path().display(),
            file = file.display()
        );
        let output = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("sh");
        assert!(output.status.success(), "{output:?}");
        assert_eq!(output.stdout, value.as_bytes(), "VAR_{i}");
        assert_eq!(output.stderr, b"unset");
    }
    let script = format!(". {} && printf %s \"$TASKFLY_SCRIPT\"", file.display());
    assert_eq!(sh(&script), registration.script.as_bytes());
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").count() == 1,
        "a value was evaluated"
    );
}

#[test]
fn a_name_that_is_not_a_shell_name_is_refused() {
    let registration = wire::RegisterResponse {
        auth_token: "abc".into(),
        deployment_id: "dep".into(),
        node_id: "dep-0".into(),
        node_index: 0,
        env: [("X;touch y".to_owned(), "v".to_owned())].into(),
        script: "setup.sh".into(),
        dest_dir: Some("/opt/job".into()),
        heartbeat_interval_s: 1,
        heartbeat_interval_ms: None,
        secret_names: Vec::new(),
        timeout_s: None,
        pooled: false,
        next_token: None,
        outputs: Vec::new(),
    };
    let error = registration_env(&registration).expect_err("refused");
    assert!(error.is_invalid_input(), "{error}");
    assert!(is_shell_name("_A1") && is_shell_name("path"));
    assert!(!is_shell_name("") && !is_shell_name("1A") && !is_shell_name("A-B"));
}

#[test]
fn the_rendered_script_is_small_parses_and_holds_the_values_quoted() {
    let url = "https://ec2-203-0-113-25.us-west-2.compute.amazonaws.com:8443";
    let script = bootstrap_script(url, TOKEN, None).expect("rendered");
    assert!(script.starts_with("#!/bin/sh\n"));
    // Under the limit, which leaves room for a long URL and CA certificates (14 KiB since
    // the bootstrap masks secrets, heartbeats under a second, sends a nonce, uploads the
    // node's outputs and reports its resources: 2 KiB of room, one certificate's worth).
    assert!(
        script.len() < 14 * 1024,
        "the rendered script is {} bytes",
        script.len()
    );
    assert!(script.len() < USER_DATA_LIMIT);
    assert!(!script.contains(URL_SLOT) && !script.contains(TOKEN_SLOT));
    assert!(script.contains(&format!("tf_url='{url}'\n")));
    assert!(script.contains(&format!("tf_ptoken='{TOKEN}'\n")));
    // It talks to the daemon only, never to an instance metadata service.
    assert!(!script.contains("169.254.169.254"));
    assert!(!script.contains("fd00:ec2::254"));
    // Nothing from the daemon is evaluated.
    assert!(!script.contains("eval"));
    let checked = Command::new("sh")
        .args(["-n", "-c", &script])
        .output()
        .expect("sh -n");
    assert!(checked.status.success(), "{checked:?}");
}

#[test]
fn hostile_urls_parse_and_come_out_exactly() {
    for url in [
        "http://h/'$(touch${IFS}PWNED)'",
        "https://example.com:8443/base/",
        "http://h/`id`;\"x\"\\",
    ] {
        let script = bootstrap_script(url, TOKEN, None).expect("rendered");
        let checked = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .expect("sh -n");
        assert!(checked.status.success(), "{url}: {checked:?}");
        // The assignment line, run on its own, yields the URL byte for byte.
        let line = script
            .lines()
            .find(|l| l.starts_with("tf_url="))
            .expect("the URL line");
        assert_eq!(
            sh(&format!("{line}\nprintf %s \"$tf_url\"")),
            url.as_bytes()
        );
    }
}

#[test]
fn bad_urls_and_tokens_are_refused() {
    for url in [
        "",
        "ftp://h",
        "http://",
        "http:///path",
        "127.0.0.1:8080",
        "http://h/a b",
        "http://h/\n",
    ] {
        let error = bootstrap_script(url, TOKEN, None).expect_err(url);
        assert!(error.is_invalid_input(), "{url}: {error}");
    }
    let long = format!("http://h/{}", "a".repeat(10_000));
    let error = bootstrap_script(&long, TOKEN, None).expect_err("too long");
    assert!(
        error.is_invalid_input() && error.to_string().contains("16384"),
        "{error}"
    );
    for token in ["", "xyz", "abc'", "00 11", &"a".repeat(257)] {
        let error = bootstrap_script("http://h", token, None).expect_err(token);
        assert!(error.is_invalid_input(), "{token}: {error}");
    }
}

#[test]
fn ca_certificates_are_embedded_exactly_and_checked() {
    let pem =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAbC+/9=\n-----END CERTIFICATE-----\n\
               -----BEGIN CERTIFICATE-----\nZm9vYmFy\n-----END CERTIFICATE-----\n";
    let script = bootstrap_script("https://10.0.0.2:8443", TOKEN, Some(pem)).expect("rendered");
    let checked = Command::new("sh")
        .args(["-n", "-c", &script])
        .output()
        .expect("sh -n");
    assert!(checked.status.success(), "{checked:?}");
    // The assignment, run on its own, yields the certificates byte for byte; the script
    // hands them to curl as its only trusted CAs.
    let start = script.find("tf_ca='").expect("the CA assignment");
    let end = start + script[start..].find("'\n").expect("its end") + 1;
    assert_eq!(
        sh(&format!("{}\nprintf %s \"$tf_ca\"", &script[start..end])),
        pem.as_bytes()
    );
    assert!(script.contains("cacert = \"ca.pem\""));
    // Without certificates the value is empty, and curl keeps its own trust store.
    let plain = bootstrap_script("https://10.0.0.2:8443", TOKEN, None).expect("rendered");
    assert!(plain.contains("tf_ca=''\n"), "{plain}");

    for bad in [
        "",
        "not pem",
        "-----BEGIN CERTIFICATE-----\nZm9v\n",
        "-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\n'; touch PWNED; '\n-----END CERTIFICATE-----\n",
    ] {
        let error = bootstrap_script("https://h", TOKEN, Some(bad)).expect_err(bad);
        assert!(error.is_invalid_input(), "{bad:?}: {error}");
    }
    let huge = "-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n".repeat(500);
    let error = bootstrap_script("https://h", TOKEN, Some(&huge)).expect_err("too long");
    assert!(error.to_string().contains("16384"), "{error}");
}

#[test]
fn the_template_has_its_slots_once_and_no_multiline_strings() {
    assert_eq!(TEMPLATE.matches(URL_SLOT).count(), 1);
    assert_eq!(TEMPLATE.matches(TOKEN_SLOT).count(), 1);
    assert_eq!(TEMPLATE.matches(CA_SLOT).count(), 1);
    // Dropping comment lines and indentation is safe only if no single-quoted string
    // spans lines: every code line has an even number of single quotes.
    for (number, line) in TEMPLATE.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with('#') {
            continue;
        }
        assert_eq!(
            code.matches('\'').count() % 2,
            0,
            "line {}: {line}",
            number + 1
        );
    }
}

// -----------------------------------------------------------------------------------------
// The node protocol, played by a fake daemon: pooled instances serve node after node
// -----------------------------------------------------------------------------------------

/// How long a bootstrap run may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// A fake daemon holding `nodes`, answering registrations with `answers` (then 404), which
/// takes only the rendered provision token and then each answer's `next_token`.
fn start(answers: Vec<RegisterAnswer>, nodes: Vec<FakeNode>) -> BackgroundDaemon {
    BackgroundDaemon::start(Daemon {
        register_answers: answers.into(),
        provision_token: Some(TOKEN.to_owned()),
        nodes: nodes
            .into_iter()
            .map(|n| (n.registration.auth_token.clone(), n))
            .collect(),
        ..Daemon::default()
    })
}

/// A node whose bundle holds `run.sh` (`script`, run through its `#!` line) and `files`,
/// extracted into `dest_dir`, with `env` besides `TASKFLY_NODE_ID`.
fn fake_node(
    token: &str,
    script: &str,
    files: &[(&str, &str)],
    dest_dir: Option<&str>,
    env: &[(&str, &str)],
    pooled: bool,
) -> FakeNode {
    let node_id = format!("dep-{token}");
    let mut env: BTreeMap<String, String> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    env.insert("TASKFLY_NODE_ID".into(), node_id.clone());
    let mut files = files.to_vec();
    files.push(("run.sh", script));
    FakeNode {
        registration: wire::RegisterResponse {
            auth_token: token.into(),
            deployment_id: "dep".into(),
            node_id,
            node_index: 0,
            env,
            script: "run.sh".into(),
            dest_dir: dest_dir.map(str::to_owned),
            heartbeat_interval_s: 1,
            heartbeat_interval_ms: None,
            secret_names: Vec::new(),
            timeout_s: None,
            pooled,
            next_token: None,
            outputs: Vec::new(),
        },
        bundle: bundle_of(&files),
        shutdown: false,
        statuses: Vec::new(),
        logs: Vec::new(),
    }
}

/// The shells the bootstrap is run with: `sh` (dash here), and bash and busybox sh where
/// this machine has them.
fn shells() -> Vec<Vec<&'static str>> {
    let mut shells = vec![vec!["sh"]];
    for shell in [vec!["bash"], vec!["busybox", "sh"]] {
        let present = Command::new(shell[0])
            .args(&shell[1..])
            .args(["-c", "true"])
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            shells.push(shell);
        }
    }
    shells
}

/// Runs the rendered bootstrap for `daemon` with `shell` as an instance would, in
/// `instance` (also its `TMPDIR`) with `home` as `HOME` and `extra_env`, and returns its exit status and
/// stderr once it has ended (killing it and failing after [`RUN_LIMIT`]).
fn run_bootstrap(
    shell: &[&str],
    daemon: &BackgroundDaemon,
    instance: &Path,
    home: &Path,
    extra_env: &[(&str, String)],
) -> (std::process::ExitStatus, String) {
    let script = bootstrap_script(&daemon.url, TOKEN, None).expect("rendered");
    std::fs::write(instance.join("user-data"), script).expect("user-data");
    let child = Command::new(shell[0])
        .args(&shell[1..])
        .arg("user-data")
        .current_dir(instance)
        .env("TMPDIR", instance)
        .env("HOME", home)
        .env("TASKFLY_AGENT_GRACE_MS", "1000")
        .envs(extra_env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shell starts");
    let pid = child.id();
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let Ok(output) = ended.recv_timeout(RUN_LIMIT) else {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("{shell:?}: the bootstrap still runs after {RUN_LIMIT:?}");
    };
    let output = output.expect("the bootstrap's output");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("a directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The work directory (`taskfly-node.*`) the bootstrap made in `instance`.
fn work_dir(instance: &Path) -> PathBuf {
    let works: Vec<String> = entries(instance)
        .into_iter()
        .filter(|name| name.starts_with("taskfly-node."))
        .collect();
    assert_eq!(works.len(), 1, "{works:?}");
    instance.join(&works[0])
}

#[test]
fn a_pooled_bootstrap_serves_node_after_node_until_the_pool_retires_it() {
    for shell in shells() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let scratch = scratch.path();
        let instance = scratch.join("instance");
        let home = scratch.join("home");
        let made = scratch.join("made");
        let existing = scratch.join("existing");
        for dir in [&instance, &home, &existing] {
            std::fs::create_dir(dir).expect("mkdir");
        }
        std::fs::write(home.join("keep.txt"), "mine").expect("write");
        std::fs::write(existing.join("old.txt"), "old").expect("write");
        std::fs::write(existing.join(".hidden"), "old").expect("write");
        let made_deep = made.join("deep");
        let (made_s, made_deep_s, existing_s) = (
            made.to_str().expect("utf-8"),
            made_deep.to_str().expect("utf-8"),
            existing.to_str().expect("utf-8"),
        );
        // A leaves files in its bundle root and in the work directory; B must see neither,
        // nor A's environment, nor the bootstrap's controls.
        // A also looks for its next registration token in the bootstrap's files.
        let mut a = fake_node(
            "a1",
            "#!/bin/sh\necho \"a: secret=$SECRET_A\"\necho made >a-made.txt\nmkdir ../a-left\n\
             echo \"a: next token seen $(cat ../.taskfly/* | grep -c 0a0a0a)\"\n\
             echo \"a: its answer read $(grep -c TASKFLY_AUTH_TOKEN ../.taskfly/reg)\"\n",
            &[("a.txt", "a")],
            None,
            &[("SECRET_A", "alpha")],
            true,
        );
        // Each registration hands the next token; B's and the rest come with it.
        a.registration.next_token = Some("0a0a0a".to_owned());
        let b = fake_node(
            "b2",
            "#!/bin/sh\n\
             echo \"b: SECRET_A=${SECRET_A-unset} TASKFLY_POOLED=${TASKFLY_POOLED-unset} SECRET_B=$SECRET_B\"\n\
             echo \"b: bundle: $(ls -A | tr '\\n' ' ')\"\n\
             echo \"b: work: $(ls -A .. | tr '\\n' ' ')\"\n\
             echo oops >&2\nexit 3\n",
            &[("b.txt", "b")],
            None,
            &[("SECRET_B", "beta")],
            true,
        );
        // C, in a directory the bootstrap makes, runs until a heartbeat answers shutdown.
        let mut c = fake_node(
            "c3",
            "#!/bin/sh\necho c: ran\nsleep 30\n",
            &[("c.txt", "c")],
            Some(made_deep_s),
            &[],
            true,
        );
        c.shutdown = true;
        // D, in a directory that existed, sees C's gone.
        let d = fake_node(
            "d4",
            "#!/bin/sh\n\
             [ -e \"$MADE\" ] && echo \"d: made is there\" || echo \"d: made is gone\"\n\
             echo \"d: here: $(ls -A | tr '\\n' ' ')\"\n",
            &[],
            Some(existing_s),
            &[("MADE", made_s)],
            true,
        );
        // E, in the home directory, which is never cleared.
        let e = fake_node(
            "e5",
            "#!/bin/sh\necho e: ran\n",
            &[("e.txt", "e")],
            Some("~"),
            &[],
            true,
        );
        let daemon = start(
            vec![
                RegisterAnswer::Node("a1"),
                RegisterAnswer::NoWork,
                RegisterAnswer::Node("b2"),
                RegisterAnswer::Node("c3"),
                RegisterAnswer::Node("d4"),
                RegisterAnswer::Node("e5"),
                RegisterAnswer::Gone,
            ],
            vec![a, b, c, d, e],
        );

        let (status, stderr) = run_bootstrap(&shell, &daemon, &instance, &home, &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        assert!(
            stderr.contains("leaving the pool: 410"),
            "{shell:?}: {stderr}"
        );
        let state = daemon.state();
        assert_eq!(
            state.register_statuses,
            [200, 204, 200, 200, 200, 200, 410],
            "{shell:?}"
        );
        let node = |token: &str| &state.nodes[token];
        assert_eq!(
            node("a1").status_names(),
            ["downloading_assets", "running_script", "completed"],
            "{shell:?}"
        );
        assert_eq!(
            node("a1").output("stdout"),
            "a: secret=alpha\na: next token seen 0\na: its answer read 1\n",
            "{shell:?}"
        );
        assert_eq!(
            node("b2").output("stdout"),
            "b: SECRET_A=unset TASKFLY_POOLED=unset SECRET_B=beta\n\
             b: bundle: b.txt run.sh \n\
             b: work: .taskfly bundle \n",
            "{shell:?}: {stderr}"
        );
        // B's output files started afresh: its first piece is at offset 0.
        assert!(
            node("b2").logs.iter().all(|l| l.1 == 0),
            "{shell:?}: {:?}",
            node("b2").logs
        );
        assert_eq!(
            node("b2").statuses.last(),
            Some(&(
                "failed".to_owned(),
                Some(3),
                Some("exited with code 3: oops".to_owned())
            )),
            "{shell:?}"
        );
        // C was stopped by the daemon: no report of its end, and the next node came.
        assert_eq!(
            node("c3").status_names(),
            ["downloading_assets", "running_script"]
        );
        assert_eq!(node("c3").output("stdout"), "c: ran\n", "{shell:?}");
        assert!(stderr.contains("stopping the script: shutdown"), "{stderr}");
        assert_eq!(
            node("d4").output("stdout"),
            "d: made is gone\nd: here: .hidden old.txt run.sh \n",
            "{shell:?}: {stderr}"
        );
        assert_eq!(node("e5").output("stdout"), "e: ran\n", "{shell:?}");
        for token in ["b2", "d4", "e5"] {
            assert_eq!(node(token).status_names()[0], "downloading_assets");
        }
        // What the nodes left is gone, but for the home directory's files; the directory
        // that existed is kept, empty; the work directory is empty.
        assert!(!made.exists(), "{shell:?}");
        assert_eq!(entries(&existing), Vec::<String>::new(), "{shell:?}");
        assert_eq!(entries(&home), ["e.txt", "keep.txt", "run.sh"], "{shell:?}");
        assert!(stderr.contains("the bundle files stay in"), "{stderr}");
        assert_eq!(
            entries(&work_dir(&instance)),
            Vec::<String>::new(),
            "{shell:?}"
        );
    }
}

#[test]
fn a_pooled_bootstrap_goes_on_after_a_timeout_and_leaves_when_its_token_is_forgotten() {
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        let mut slow = fake_node(
            "f6",
            "#!/bin/sh\necho f: ran\nsleep 30\n",
            &[],
            None,
            &[],
            true,
        );
        slow.registration.timeout_s = Some(1);
        let daemon = start(
            vec![
                RegisterAnswer::Node("f6"),
                RegisterAnswer::NoWork,
                RegisterAnswer::Unauthorized,
            ],
            vec![slow],
        );

        let (status, stderr) =
            run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        assert!(
            stderr.contains("leaving the pool: 401"),
            "{shell:?}: {stderr}"
        );
        let state = daemon.state();
        assert_eq!(state.register_statuses, [200, 204, 401], "{shell:?}");
        assert_eq!(
            state.nodes["f6"].statuses.last(),
            Some(&(
                "failed".to_owned(),
                None,
                Some("timed out after 1s".to_owned())
            )),
            "{shell:?}"
        );
        assert_eq!(
            entries(&work_dir(instance.path())),
            Vec::<String>::new(),
            "{shell:?}"
        );
    }
}

#[test]
fn a_pooled_bootstrap_stopped_by_a_signal_registers_no_more() {
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        // The script's parent is the shell that records its exit status; the bootstrap is
        // that shell's parent.
        let signalled = fake_node(
            "a7",
            "#!/bin/sh\necho g: ran\nkill -TERM $(cut -d' ' -f4 /proc/$PPID/stat)\nsleep 30\n",
            &[],
            None,
            &[],
            true,
        );
        let next = fake_node("b8", "#!/bin/sh\n", &[], None, &[], true);
        let daemon = start(
            vec![RegisterAnswer::Node("a7"), RegisterAnswer::Node("b8")],
            vec![signalled, next],
        );

        let (status, stderr) =
            run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        assert!(
            stderr.contains("stopping the script: term"),
            "{shell:?}: {stderr}"
        );
        let state = daemon.state();
        assert_eq!(state.register_statuses, [200], "{shell:?}");
        assert_eq!(state.nodes["a7"].output("stdout"), "g: ran\n", "{shell:?}");
    }
}

#[test]
fn a_bootstrap_that_is_not_pooled_serves_one_node_and_a_first_401_fails() {
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        let only = fake_node(
            "c9",
            "#!/bin/sh\necho h: ran\n",
            &[("h.txt", "h")],
            None,
            &[],
            false,
        );
        let unused = fake_node("d0", "#!/bin/sh\n", &[], None, &[], true);
        let daemon = start(
            vec![RegisterAnswer::Node("c9"), RegisterAnswer::Node("d0")],
            vec![only, unused],
        );

        let (status, stderr) =
            run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        let state = daemon.state();
        assert_eq!(state.register_statuses, [200], "{shell:?}");
        assert_eq!(
            state.nodes["c9"].status_names(),
            ["downloading_assets", "running_script", "completed"],
            "{shell:?}"
        );
        // As before pools: the bundle is kept, the private files are gone.
        let work = work_dir(instance.path());
        assert_eq!(entries(&work), ["bundle"], "{shell:?}");
        assert_eq!(
            entries(&work.join("bundle")),
            ["h.txt", "run.sh"],
            "{shell:?}"
        );
        drop(state);

        // A token the daemon does not know at the first registration is an error.
        let refused = tempfile::tempdir().expect("tempdir");
        let daemon = start(vec![RegisterAnswer::Unauthorized], Vec::new());
        let (status, stderr) = run_bootstrap(&shell, &daemon, refused.path(), refused.path(), &[]);
        assert_eq!(status.code(), Some(1), "{shell:?}: {stderr}");
        assert!(stderr.contains("cannot register"), "{shell:?}: {stderr}");
    }
}

#[test]
fn a_pooled_node_stopped_while_its_bundle_is_extracted_leaves_nothing_behind() {
    // A tar that takes two seconds: the first heartbeat, a second after the node starts,
    // answers shutdown while the bundle is still being extracted.
    let tools = tempfile::tempdir().expect("tempdir");
    let real_tar = String::from_utf8(sh("command -v tar")).expect("a path");
    let slow_tar = tools.path().join("tar");
    std::fs::write(
        &slow_tar,
        format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", real_tar.trim()),
    )
    .expect("write");
    std::fs::set_permissions(
        &slow_tar,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        let mut stopped = fake_node("a1", "#!/bin/sh\n", &[("a.txt", "a")], None, &[], true);
        stopped.shutdown = true;
        let next = fake_node(
            "b2",
            "#!/bin/sh\necho \"b: bundle: $(ls -A | tr '\\n' ' ')\"\n",
            &[("b.txt", "b")],
            None,
            &[],
            true,
        );
        let daemon = start(
            vec![
                RegisterAnswer::Node("a1"),
                RegisterAnswer::Node("b2"),
                RegisterAnswer::Gone,
            ],
            vec![stopped, next],
        );

        let (status, stderr) = run_bootstrap(
            &shell,
            &daemon,
            instance.path(),
            instance.path(),
            &[("PATH", path.clone())],
        );

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        let state = daemon.state();
        assert_eq!(state.register_statuses, [200, 200, 410], "{shell:?}");
        assert_eq!(
            state.nodes["a1"].status_names(),
            ["downloading_assets"],
            "{shell:?}"
        );
        // The first bundle was fully extracted before it was cleared, so none of it is left
        // for the next node.
        assert_eq!(
            state.nodes["b2"].output("stdout"),
            "b: bundle: b.txt run.sh \n",
            "{shell:?}: {stderr}"
        );
    }
}

#[test]
fn the_registration_answer_says_whether_the_node_is_pooled() {
    let mut node = fake_node("ab", "#!/bin/sh\n", &[], None, &[], false);
    let text = registration_env(&node.registration).expect("valid names");
    assert!(text.contains("\nTASKFLY_POOLED=''\n"), "{text}");
    node.registration.pooled = true;
    let text = registration_env(&node.registration).expect("valid names");
    assert!(text.contains("\nTASKFLY_POOLED='1'\n"), "{text}");
}

#[test]
fn answers_lost_after_the_daemon_acted_are_resent_and_the_node_completes() {
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        let node = fake_node("e1", "#!/bin/sh\necho hello\n", &[], None, &[], false);
        // The resent registration is answered with the same node, as the daemon does for the
        // same token and nonce.
        let daemon = start(
            vec![RegisterAnswer::Node("e1"), RegisterAnswer::Node("e1")],
            vec![node],
        );
        daemon.state().lose_answers = vec!["register", "status", "logs"];

        let (status, stderr) =
            run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        let state = daemon.state();
        assert!(state.lose_answers.is_empty(), "{shell:?}");
        assert_eq!(state.register_nonces.len(), 2, "{shell:?}");
        assert!(state.register_nonces[0].is_some(), "{shell:?}");
        assert_eq!(
            state.register_nonces[0], state.register_nonces[1],
            "{shell:?}"
        );
        assert_eq!(
            state.nodes["e1"].status_names(),
            [
                "downloading_assets",
                "downloading_assets",
                "running_script",
                "completed"
            ],
            "{shell:?}"
        );
        // The piece whose answer was lost was sent again at the same offset.
        let pieces: Vec<(u64, &str)> = state.nodes["e1"]
            .logs
            .iter()
            .map(|(_, offset, text)| (*offset, text.as_str()))
            .collect();
        assert_eq!(pieces, [(0, "hello\n"), (0, "hello\n")], "{shell:?}");
    }
}

#[test]
fn secrets_are_masked_before_the_cut_and_short_intervals_keep_heartbeating() {
    let secret = "s3cr3t-0123456789abcdef";
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        // The script ends once the daemon has counted five heartbeats (the test opens the
        // gate then), so no wall-clock assumption decides the outcome; it gives up after 60 s.
        let gate = instance.path().join("heartbeats-seen");
        let script = "#!/bin/sh\ni=0\nwhile [ ! -e \"$GATE\" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done\nprintf '%0490d' 0 | tr 0 x >&2\nprintf '%s\\n' \"$API_KEY\" >&2\nexit 1\n";
        let gate_value = gate.to_str().expect("a UTF-8 temp path").to_owned();
        let mut node = fake_node(
            "f2",
            script,
            &[],
            None,
            &[("API_KEY", secret), ("GATE", &gate_value)],
            false,
        );
        node.registration.secret_names = vec!["API_KEY".into()];
        node.registration.heartbeat_interval_ms = Some(200);
        let daemon = start(vec![RegisterAnswer::Node("f2")], vec![node]);
        let watcher = {
            let daemon = daemon.clone();
            let gate = gate.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + RUN_LIMIT;
                while daemon.heartbeats() < 5 && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                std::fs::write(&gate, b"").expect("open the gate");
            })
        };

        let (_, stderr) = run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);
        watcher.join().expect("the watcher ends");

        let state = daemon.state();
        let (name, code, message) = state.nodes["f2"].statuses.last().expect("a report");
        assert_eq!(
            (name.as_str(), *code),
            ("failed", Some(1)),
            "{shell:?}: {stderr}"
        );
        let message = message.as_deref().unwrap_or_default();
        assert!(
            message.starts_with("exited with code 1: xxx"),
            "{shell:?}: {message}"
        );
        assert!(!message.contains(&secret[..6]), "{shell:?}: {message}");
        assert!(message.ends_with("x***"), "{shell:?}: {message}");
        drop(state);
        assert!(
            daemon.heartbeats() >= 5,
            "{shell:?}: the script ran until five heartbeats came ({} heartbeats)",
            daemon.heartbeats()
        );
    }
}

#[test]
fn pieces_the_daemon_finds_too_large_are_halved_and_all_output_arrives() {
    for shell in shells() {
        let instance = tempfile::tempdir().expect("tempdir");
        let script =
            "#!/bin/sh\ni=1\nwhile [ $i -le 40 ]; do printf '%04d%0996d\\n' $i 0; i=$((i + 1)); done\n";
        let node = fake_node("a3", script, &[], None, &[], false);
        let daemon = start(vec![RegisterAnswer::Node("a3")], vec![node]);
        daemon.state().max_logs_body = Some(10 * 1024);

        let (status, stderr) =
            run_bootstrap(&shell, &daemon, instance.path(), instance.path(), &[]);

        assert_eq!(status.code(), Some(0), "{shell:?}: {stderr}");
        let state = daemon.state();
        let output = state.nodes["a3"].output("stdout");
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 40, "{shell:?}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(&line[..4], format!("{:04}", i + 1), "{shell:?}");
            assert_eq!(line.len(), 1000, "{shell:?}");
        }
    }
}
