//! Sweeps of `/proc` shared by everyone looking: one scan answers all of them.
//!
//! Terminating a local node looks for processes twice (the agent process of an instance, the
//! scripts carrying a node's id) and polls until the groups it signalled are gone. Done with a
//! scan of `/proc` per node and per poll, `down` of a thousand nodes read `/proc` hundreds of
//! thousands of times. Here a caller asks for a sweep begun after a moment of its choosing
//! (after it sent its signals); concurrent callers wait for one scan together and share it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{procfs, signal_group, GROUP_EXIT_WAIT, GROUP_POLL_INTERVAL};

/// What one scan of `/proc` found: the live processes whose environment holds one of the
/// watched variables, by their `NAME=value` entry, and the groups with a live (not zombie)
/// member.
#[derive(Debug, Default)]
pub(crate) struct Sweep {
    /// `(pid, process group)` of each live process, by each watched entry it carries.
    by_entry: HashMap<String, Vec<(i32, i32)>>,
    /// Groups with at least one live member.
    live_groups: HashSet<i32>,
}

impl Sweep {
    /// Scan `/proc` once, indexing the processes that carry one of `watched` (variable
    /// names). Processes of other users (unreadable environment) count only for the live
    /// groups. Without a readable `/proc`, nothing is found.
    fn scan(watched: &[&str]) -> Sweep {
        let mut sweep = Sweep::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return sweep;
        };
        let prefixes: Vec<String> = watched.iter().map(|name| format!("{name}=")).collect();
        for process in dir.flatten() {
            let Some(pid) = process
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if matches!(procfs::stat_field(&stat, 0), Some("Z" | "X")) {
                continue;
            }
            let Some(pgid) = procfs::stat_field(&stat, 2).and_then(|f| f.parse().ok()) else {
                continue;
            };
            sweep.live_groups.insert(pgid);
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            for entry in environ.split(|b| *b == 0) {
                let Ok(entry) = std::str::from_utf8(entry) else {
                    continue;
                };
                if prefixes
                    .iter()
                    .any(|prefix| entry.starts_with(prefix.as_str()))
                {
                    sweep
                        .by_entry
                        .entry(entry.to_owned())
                        .or_default()
                        .push((pid, pgid));
                }
            }
        }
        sweep
    }

    /// The live processes whose environment holds exactly `entry` (`NAME=value`, NAME one of
    /// the watched variables).
    pub(crate) fn pids_with_env(&self, entry: &str) -> Vec<i32> {
        let found = self.by_entry.get(entry).map(Vec::as_slice).unwrap_or(&[]);
        found.iter().map(|(pid, _)| *pid).collect()
    }

    /// The process groups of the live processes whose environment holds exactly `entry`.
    pub(crate) fn groups_with_env(&self, entry: &str) -> Vec<i32> {
        let found = self.by_entry.get(entry).map(Vec::as_slice).unwrap_or(&[]);
        let mut groups: Vec<i32> = found.iter().map(|(_, pgid)| *pgid).collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }
}

/// Hands out sweeps of `/proc`, scanning only when the latest is older than a caller needs.
/// Cheap to clone: clones share the sweeps.
#[derive(Clone)]
pub(crate) struct Sweeper {
    watched: &'static [&'static str],
    latest: Arc<tokio::sync::Mutex<Option<Begun>>>,
}

/// A sweep and when it began.
type Begun = (Instant, Arc<Sweep>);

impl Sweeper {
    /// Sweeps that index the processes carrying one of the `watched` variables.
    pub(crate) fn new(watched: &'static [&'static str]) -> Sweeper {
        Sweeper {
            watched,
            latest: Arc::default(),
        }
    }

    /// A sweep begun at or after `since`: the latest one if it is that recent, else a new
    /// scan, which every caller waiting meanwhile shares.
    pub(crate) async fn since(&self, since: Instant) -> Arc<Sweep> {
        let mut latest = self.latest.lock().await;
        if let Some((began, sweep)) = latest.as_ref() {
            if *began >= since {
                return sweep.clone();
            }
        }
        let began = Instant::now();
        let watched = self.watched;
        let sweep = Arc::new(
            tokio::task::spawn_blocking(move || Sweep::scan(watched))
                .await
                .unwrap_or_default(),
        );
        *latest = Some((began, sweep.clone()));
        sweep
    }

    /// A sweep begun now or later.
    pub(crate) async fn fresh(&self) -> Arc<Sweep> {
        self.since(Instant::now()).await
    }

    /// Stop process groups that are not children of this process: SIGTERM, up to `grace` for
    /// them to exit, then SIGKILL, and a few seconds more for them to disappear. Returns the
    /// groups still alive after all that. Whether a group is gone is asked of the shared
    /// sweeps (zombies do not count).
    pub(crate) async fn stop_groups(&self, pgids: &[i32], grace: Duration) -> Vec<i32> {
        if pgids.is_empty() {
            return Vec::new();
        }
        for pgid in pgids {
            signal_group(Pid::from_raw(*pgid), Signal::SIGTERM);
        }
        let mut alive = self.wait_for_groups(pgids, Instant::now() + grace).await;
        if !alive.is_empty() {
            for pgid in &alive {
                signal_group(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
            alive = self
                .wait_for_groups(&alive, Instant::now() + GROUP_EXIT_WAIT)
                .await;
        }
        alive
    }

    /// Waits until `deadline` for the groups to be gone; returns those still alive.
    async fn wait_for_groups(&self, pgids: &[i32], deadline: Instant) -> Vec<i32> {
        loop {
            let asked = Instant::now();
            // A group no process belongs to (not even a zombie) is gone without a scan.
            let mut alive: Vec<i32> = pgids
                .iter()
                .copied()
                .filter(|pgid| killpg(Pid::from_raw(*pgid), None).is_ok())
                .collect();
            if !alive.is_empty() {
                let sweep = self.since(asked).await;
                alive.retain(|pgid| sweep.live_groups.contains(pgid));
            }
            let now = Instant::now();
            if alive.is_empty() || now >= deadline {
                return alive;
            }
            tokio::time::sleep(GROUP_POLL_INTERVAL.min(deadline - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: &str = "SWEEP_TEST_MARKER";

    #[tokio::test]
    async fn a_sweep_finds_a_group_by_environment_until_it_is_stopped() {
        let entry = format!("{MARKER}={}", std::process::id());
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 100 & sleep 100"])
            .env(MARKER, std::process::id().to_string())
            .process_group(0)
            .spawn()
            .expect("sh");
        let leader = i32::try_from(child.id().expect("pid")).expect("pid");
        let sweeper = Sweeper::new(&[MARKER]);
        // The environment is in place as soon as spawn returns (it is set before exec).
        let sweep = sweeper.fresh().await;
        assert!(sweep.pids_with_env(&entry).contains(&leader));
        assert_eq!(sweep.groups_with_env(&entry), vec![leader]);
        assert!(sweep.live_groups.contains(&leader));
        // Callers asking for a sweep begun before the latest share it: no new scan.
        let before = Instant::now();
        let first = sweeper.since(before).await;
        let (a, b) = tokio::join!(sweeper.since(before), sweeper.since(before));
        assert!(Arc::ptr_eq(&first, &a) && Arc::ptr_eq(&a, &b));

        let reaped = tokio::spawn(async move { child.wait().await });
        let left = sweeper
            .stop_groups(&[leader], Duration::from_millis(500))
            .await;
        assert!(left.is_empty(), "{left:?}");
        reaped.await.expect("join").expect("wait");
        assert!(sweeper.fresh().await.groups_with_env(&entry).is_empty());
    }
}
