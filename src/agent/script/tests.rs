//! How scripts are started, their environment, and the messages of their failures.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::*;
use crate::agent::fake_daemon::registration;

#[test]
fn exec_plan_follows_execute_bits_then_shebang_then_sh() {
    assert_eq!(exec_plan(0o755, b"#!/bin/bash\n"), ExecPlan::Direct);
    assert_eq!(exec_plan(0o100, b"echo hi\n"), ExecPlan::Direct);
    assert_eq!(
        exec_plan(0o644, b"#!/usr/bin/env python3\nprint(1)\n"),
        ExecPlan::Interpreter {
            program: "/usr/bin/env".into(),
            argument: Some("python3".into()),
        }
    );
    assert_eq!(
        exec_plan(0o644, b"#! /bin/bash  -e -u \r\necho\n"),
        ExecPlan::Interpreter {
            program: "/bin/bash".into(),
            argument: Some("-e -u".into()),
        }
    );
    assert_eq!(
        exec_plan(0o600, b"#!/bin/sh"),
        ExecPlan::Interpreter {
            program: "/bin/sh".into(),
            argument: None,
        }
    );
    assert_eq!(exec_plan(0o644, b"echo hi\n"), ExecPlan::Shell);
    assert_eq!(exec_plan(0o644, b"#!\n"), ExecPlan::Shell);
    assert_eq!(exec_plan(0o644, b""), ExecPlan::Shell);
}

#[test]
fn env_inherits_only_login_variables_and_keeps_node_values_byte_for_byte() {
    let tricky = "it's \"quoted\" $HOME `id` \\ \n second line ";
    let inherited = vec![
        (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
        (
            OsString::from("TASKFLY_API_TOKEN"),
            OsString::from("daemon-secret"),
        ),
        (
            OsString::from("TASKFLY_DATA_DIR"),
            OsString::from("/var/lib"),
        ),
        (OsString::from("OVERRIDDEN"), OsString::from("old")),
        (OsString::from("taskfly_lower"), OsString::from("kept")),
        (
            OsString::from("RAW"),
            OsString::from(OsStr::from_bytes(b"\xff\xfe")),
        ),
    ];
    let registration = registration(&[
        ("TRICKY", tricky),
        ("OVERRIDDEN", "new"),
        ("TASKFLY_TOTAL_NODES", "3"),
    ]);
    let env = script_env(inherited, &registration);
    let get = |key: &str| env.get(OsStr::new(key)).cloned();
    assert_eq!(get("TASKFLY_API_TOKEN"), None);
    assert_eq!(get("TASKFLY_DATA_DIR"), None);
    assert_eq!(get("PATH"), Some("/usr/bin:/bin".into()));
    // Only what a login shell sets is inherited: nothing the host was given for itself.
    assert_eq!(get("taskfly_lower"), None);
    assert_eq!(get("RAW"), None);
    assert_eq!(get("TRICKY"), Some(tricky.into()));
    assert_eq!(get("OVERRIDDEN"), Some("new".into()));
    assert_eq!(get("TASKFLY_DEPLOYMENT_ID"), Some("dep".into()));
    assert_eq!(get("TASKFLY_NODE_ID"), Some("dep-1".into()));
    assert_eq!(get("TASKFLY_NODE_INDEX"), Some("1".into()));
    assert_eq!(get("TASKFLY_TOTAL_NODES"), Some("3".into()));
}

#[test]
fn failure_messages_name_the_code_or_signal_and_the_last_stderr_line() {
    let (code, message) = failure_message(ExitStatus::from_raw(3 << 8), Some("boom"), &[]);
    assert_eq!(code, Some(3));
    assert_eq!(message, "exited with code 3: boom");
    let (code, message) = failure_message(ExitStatus::from_raw(9), Some("dying"), &[]);
    assert_eq!(code, None);
    assert_eq!(message, "killed by signal SIGKILL: dying");
    let (_, message) = failure_message(ExitStatus::from_raw(1 << 8), None, &[]);
    assert_eq!(message, "exited with code 1");
    let long = "y".repeat(2000);
    let (_, message) = failure_message(ExitStatus::from_raw(1 << 8), Some(&long), &[]);
    assert!(message.chars().count() < 600);
}

#[tokio::test]
async fn scripts_start_by_exec_bit_shebang_or_sh() {
    let root = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str, u32); 4] = [
        ("exec.sh", "#!/bin/sh\necho \"direct $0\"\n", 0o755),
        ("plain-exec.sh", "echo \"no shebang $WHO\"\n", 0o755),
        (
            "shebang.sh",
            "#!/bin/sh -e\necho \"interpreted $WHO\"\n",
            0o644,
        ),
        ("plain.sh", "echo \"by sh $(pwd)\"\n", 0o600),
    ];
    let env: BTreeMap<OsString, OsString> = [
        (OsString::from("WHO"), OsString::from("me")),
        (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
    ]
    .into();
    let root_path = std::fs::canonicalize(root.path()).expect("canonical");
    let mut outputs = Vec::new();
    for (name, text, mode) in cases {
        let script = root_path.join(name);
        std::fs::write(&script, text).expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let head = read_head(&script).expect("head");
        let prepared = Prepared {
            root: root_path.clone(),
            script: script.clone(),
            plan: exec_plan(mode, &head),
        };
        let child = start_script(&prepared, &env).await.expect("started");
        let output = child.wait_with_output().await.expect("output");
        assert!(output.status.success(), "{name}: {output:?}");
        outputs.push(String::from_utf8_lossy(&output.stdout).trim().to_string());
    }
    assert_eq!(
        outputs,
        [
            format!("direct {}", root_path.join("exec.sh").display()),
            "no shebang me".to_string(),
            "interpreted me".to_string(),
            format!("by sh {}", root_path.display()),
        ]
    );
}

#[test]
fn a_secret_cut_by_the_quote_limit_is_masked_first() {
    let secret = "s3cr3t-value-0123456789";
    let line = format!("{}{secret}", "x".repeat(MAX_QUOTED_CHARS - 10));
    let (_, message) = failure_message(ExitStatus::from_raw(1 << 8), Some(&line), &[secret]);
    assert!(!message.contains(&secret[..10]), "{message}");
    assert!(message.ends_with("x***"), "{message}");
}
