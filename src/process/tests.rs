//! Stopping real process groups, and finding processes by their environment.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::procfs::{group_has_live_member, stat_field};
use super::*;

/// Spawns `sh -c script` in a process group of its own.
fn spawn_group(script: &str) -> (Child, Pid) {
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sh");
    let pgid = Pid::from_raw(i32::try_from(child.id().expect("pid")).expect("pid fits"));
    (child, pgid)
}

/// Asserts that no process of the group is left: none alive at once, and (once init has
/// reaped the orphaned zombies) none at all as `killpg(pgid, None)` sees it.
async fn assert_group_gone(pgid: Pid) {
    assert!(
        !group_has_live_member(pgid.as_raw()),
        "a process of the group still runs"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match killpg(pgid, None) {
            Err(Errno::ESRCH) => return,
            Err(e) => panic!("killpg: {e}"),
            Ok(()) => {
                assert!(Instant::now() < deadline, "group {pgid} still exists");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits until the group's processes have started (the background `sleep` exists).
async fn wait_for_members(pgid: Pid, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| stat_field(stat, 2) == Some(pgid.as_raw().to_string().as_str()))
            .count();
        if members >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group never got {count} processes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn terminating_kills_the_whole_process_group() {
    let (mut child, pgid) = spawn_group("sleep 100 & sleep 100");
    wait_for_members(pgid, 2).await;
    let started = Instant::now();
    let status = terminate_group(&mut child, pgid, Duration::from_secs(5))
        .await
        .expect("terminated");
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "SIGTERM was enough"
    );
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn processes_ignoring_sigterm_are_killed_after_the_grace_period() {
    let (mut child, pgid) = spawn_group("trap '' TERM; sleep 100 & sleep 100; exit 0");
    wait_for_members(pgid, 2).await;
    let started = Instant::now();
    let status = terminate_group(&mut child, pgid, Duration::from_millis(300))
        .await
        .expect("terminated");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn children_left_behind_by_the_leader_are_killed() {
    let (mut child, pgid) = spawn_group("sleep 100 & exit 0");
    let status = child.wait().await.expect("leader exits");
    assert!(status.success());
    assert!(
        group_alive(pgid, true).await,
        "the background sleep still runs"
    );
    kill_group(pgid).await;
    assert_group_gone(pgid).await;
}
