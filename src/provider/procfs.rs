//! Finding and stopping local processes through `/proc`: used by the local provider to find
//! agent processes it started before a restart, and scripts orphaned by a killed agent.

use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How often to look whether stopped process groups are gone.
const POLL: Duration = Duration::from_millis(50);

/// Pids of live processes whose environment holds exactly the entry `entry` (`NAME=value`).
/// Processes of other users (unreadable environment) are skipped.
pub(crate) fn pids_with_env(entry: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for process in dir.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(process.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == entry.as_bytes())
            && is_alive(pid)
        {
            found.push(pid);
        }
    }
    found
}

/// The process group of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 2)?.parse().ok()
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_field(&stat, 0), Some("Z" | "X")),
        Err(_) => false,
    }
}

/// Field `n` after the command name of a `/proc/<pid>/stat` line (0 = state, 1 = ppid,
/// 2 = pgrp). The command name may hold spaces and parentheses, so parsing starts after the
/// last `)`.
fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(n)
}

/// Whether any live (non-zombie) process belongs to group `pgid`.
fn group_alive(pgid: i32) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|process| {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .is_some_and(|stat| {
                stat_field(&stat, 2) == Some(pgid.to_string().as_str())
                    && !matches!(stat_field(&stat, 0), Some("Z" | "X"))
            })
    })
}

/// Stop process groups: SIGTERM, up to `grace` for them to exit, then SIGKILL, and up to 5 s
/// more for them to disappear. Returns the groups still alive after all that.
pub(crate) async fn stop_groups(pgids: &[i32], grace: Duration) -> Vec<i32> {
    if pgids.is_empty() {
        return Vec::new();
    }
    for pgid in pgids {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGTERM);
    }
    let mut alive = wait_groups(pgids, grace).await;
    if !alive.is_empty() {
        for pgid in &alive {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
        alive = wait_groups(&alive, Duration::from_secs(5)).await;
    }
    alive
}

/// Wait up to `limit` for the groups to be gone; returns those still alive.
async fn wait_groups(pgids: &[i32], limit: Duration) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let list = pgids.to_vec();
        let alive = tokio::task::spawn_blocking(move || {
            list.into_iter()
                .filter(|g| group_alive(*g))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| pgids.to_vec());
        if alive.is_empty() || tokio::time::Instant::now() >= deadline {
            return alive;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let stat = "123 (a) b (c)) S 1 456 456 0 -1";
        assert_eq!(stat_field(stat, 0), Some("S"));
        assert_eq!(stat_field(stat, 1), Some("1"));
        assert_eq!(stat_field(stat, 2), Some("456"));
    }

    #[tokio::test]
    async fn finds_and_stops_a_group_by_environment() {
        let marker = format!("PROCFS_TEST_MARKER={}", std::process::id());
        let (name, value) = marker.split_once('=').unwrap();
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 100 & sleep 100"])
            .env(name, value)
            .process_group(0)
            .spawn()
            .unwrap();
        let leader = child.id().unwrap() as i32;
        // The environment is in place as soon as spawn returns (it is set before exec).
        let found = pids_with_env(&marker);
        assert!(found.contains(&leader), "{found:?}");
        assert_eq!(process_group(leader), Some(leader));
        let left = stop_groups(&[leader], Duration::from_millis(500)).await;
        let _ = child.wait().await;
        assert!(left.is_empty());
        assert!(!group_alive(leader));
    }
}
