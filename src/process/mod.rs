//! Process groups, in one place: signalling a group, stopping it (SIGTERM, a grace period,
//! SIGKILL) and waiting until it is gone, and finding processes through `/proc` ([`procfs`]).
//!
//! The agent stops the script of a node with [`terminate_group`] (or [`kill_group`] once its
//! leader has exited); the local provider finds agent processes and orphaned scripts through
//! shared sweeps of `/proc` and stops them with [`Sweeper::stop_groups`]. A group counts as gone
//! once none of its processes is alive; zombies waiting for a late init to reap them do not
//! count.

pub(crate) mod procfs;
mod sweep;
#[cfg(test)]
mod tests;

pub(crate) use sweep::Sweeper;

use std::ffi::{OsStr, OsString};
use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::Instant;

/// After SIGKILL, how long to wait for a group to disappear before giving up with a warning.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How often to check whether a group is gone.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Kills a process group with SIGKILL if it is dropped while still armed, so a dropped future
/// that started the group leaves nothing running.
pub(crate) struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    /// A guard armed for group `pgid`.
    pub(crate) fn new(pgid: Pid) -> GroupGuard {
        GroupGuard { pgid: Some(pgid) }
    }

    /// The group has been dealt with: dropping the guard does nothing any more.
    pub(crate) fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Sends `signal` to every process of the group; a group already gone is not an error.
pub(crate) fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pgid = pgid.as_raw(),
            signal = signal.as_str(),
            error = %e,
            "cannot signal a process group"
        ),
    }
}

/// Stops a running child and its group: SIGTERM to the whole group, up to `grace` for the group
/// to exit, then SIGKILL to whatever is left. Returns the leader's exit status once the leader
/// is reaped and the group is gone.
pub(crate) async fn terminate_group(
    child: &mut Child,
    pgid: Pid,
    grace: Duration,
) -> io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    let leader = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => None,
    };
    if leader.is_some() {
        // The leader is gone; give the rest of its group the remainder of the grace period.
        wait_for_group_exit(pgid, deadline, false).await;
    }
    signal_group(pgid, Signal::SIGKILL);
    let status = match leader {
        Some(status) => status,
        None => child.wait().await?,
    };
    ensure_group_gone(pgid).await;
    Ok(status)
}

/// Kills whatever is left of a group whose leader has exited and been reaped.
pub(crate) async fn kill_group(pgid: Pid) {
    signal_group(pgid, Signal::SIGKILL);
    ensure_group_gone(pgid).await;
}

/// Waits up to [`GROUP_EXIT_WAIT`] for a killed group to be gone, warning if it is not.
async fn ensure_group_gone(pgid: Pid) {
    let deadline = Instant::now() + GROUP_EXIT_WAIT;
    if !wait_for_group_exit(pgid, deadline, true).await {
        tracing::warn!(
            pgid = pgid.as_raw(),
            "processes of a process group are still there after SIGKILL"
        );
    }
}

/// Polls until no process of the group runs, or `deadline`; true if the group is gone.
/// With `ignore_zombies`, processes that are dead but not yet reaped by their parent count as
/// gone (orphans wait for init to reap them, which some container inits do late).
async fn wait_for_group_exit(pgid: Pid, deadline: Instant, ignore_zombies: bool) -> bool {
    loop {
        if !group_alive(pgid, ignore_zombies).await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// Whether a process of group `pgid` exists; with `ignore_zombies`, whether one is alive.
pub(crate) async fn group_alive(pgid: Pid, ignore_zombies: bool) -> bool {
    match killpg(pgid, None) {
        // ESRCH: no process has that group; EPERM: the id now belongs to someone else's group.
        Err(_) => false,
        Ok(()) if ignore_zombies => {
            tokio::task::spawn_blocking(move || procfs::group_has_live_member(pgid.as_raw()))
                .await
                .unwrap_or(true)
        }
        Ok(()) => true,
    }
}

/// The variables of this process' environment that a node's agent and script start with: what a
/// login shell would set, and nothing the daemon or host program was given for itself (cloud
/// credentials, the API token). The node's own variables come on top.
const ALLOWED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR",
];

/// Whether a node may inherit the variable `key`: [`ALLOWED_ENV`] and every `LC_*`.
pub(crate) fn is_allowed_env(key: &OsStr) -> bool {
    key.to_str()
        .is_some_and(|key| ALLOWED_ENV.contains(&key) || key.starts_with("LC_"))
}

/// The part of this process' environment a node may inherit ([`is_allowed_env`]).
pub(crate) fn allowed_env() -> impl Iterator<Item = (OsString, OsString)> {
    std::env::vars_os().filter(|(key, _)| is_allowed_env(key))
}
