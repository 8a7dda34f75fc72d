//! Heartbeats: the node tells the daemon it is alive and what its script uses (SPEC §4.2), and
//! learns whether to stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::node::Node;
use crate::api::wire;
use crate::process::procfs;

/// The bundle's disk use is measured on the first reading and every this many after: walking
/// a large bundle costs more than reading `/proc`.
const DISK_EVERY: u32 = 4;

/// The script's resources are read at most this often, and whenever a new script starts;
/// every heartbeat carries the newest reading. A reading scans `/proc`, which costs real CPU
/// when hundreds of nodes share a machine (local nodes), and must never crowd out the
/// heartbeats themselves.
const READ_EVERY: Duration = Duration::from_secs(30);

/// A heartbeat's `metrics` object.
type Metrics = BTreeMap<String, serde_json::Value>;

/// What the script's process group used at the last reading, for its CPU share since.
#[derive(Debug, Default)]
pub(super) struct ResourceMeter {
    last: Option<(i32, Instant, u64)>,
    readings: u32,
}

impl ResourceMeter {
    /// The heartbeat's `metrics` for the script of group `pgid` (0: none runs) and the bundle
    /// at `root`: `cpu_percent` (of one CPU, since the last reading of the same group),
    /// `rss_bytes`, and every [`DISK_EVERY`] readings `disk_bytes`. `None` when there is
    /// nothing to say (no script yet, no `/proc`).
    pub(super) fn read(
        &mut self,
        pgid: i32,
        root: Option<PathBuf>,
    ) -> Option<BTreeMap<String, serde_json::Value>> {
        let mut metrics = BTreeMap::new();
        if pgid > 0 {
            if let Some(usage) = procfs::group_usage(pgid).filter(|u| u.members > 0) {
                let now = Instant::now();
                if let Some((last_group, at, ticks)) = self.last {
                    let seconds = now.duration_since(at).as_secs_f64();
                    if last_group == pgid && seconds > 0.0 {
                        let used = usage.cpu_ticks.saturating_sub(ticks) as f64
                            / procfs::clock_ticks() as f64;
                        let percent = (used / seconds * 1000.0).round() / 10.0;
                        metrics.insert("cpu_percent".to_owned(), percent.into());
                    }
                }
                self.last = Some((pgid, now, usage.cpu_ticks));
                metrics.insert("rss_bytes".to_owned(), usage.rss_bytes.into());
            }
        }
        if let Some(root) = root {
            if self.readings % DISK_EVERY == 0 {
                metrics.insert("disk_bytes".to_owned(), procfs::disk_usage(&root).into());
            }
            self.readings += 1;
        }
        (!metrics.is_empty()).then_some(metrics)
    }
}

impl Node<'_> {
    /// Heartbeats every `heartbeat_interval_ms` (`heartbeat_interval_s` from an older daemon),
    /// the first one interval after registration, until `finished`; an answer with `shutdown: true`
    /// stops the script. Each carries what the script uses ([`ResourceMeter`]), read off the
    /// async threads.
    ///
    /// A heartbeat still unanswered at the next tick is given up for a fresh one. While the
    /// daemon is away the client's pauses between tries grow to 10 s and more, longer than a short
    /// heartbeat timeout: a restarted daemon would then fail this live node before its next
    /// try. A fresh heartbeat each interval reaches it within about one interval instead.
    pub(super) async fn heartbeat_loop(&self, finished: &CancellationToken) {
        let period = self.registration.heartbeat_interval();
        // The registration just told the daemon the node is alive: the first heartbeat is due
        // one interval later. (A node whose script ends sooner sends none; hundreds of local
        // nodes thus spare a request and a second connection each.)
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut meter = ResourceMeter::default();
        // The newest reading: when, of which script group, and what it said.
        let mut reading: Option<(Instant, i32, Option<Metrics>)> = None;
        // A reading still under way on a blocking thread (a loaded machine), of which group.
        let mut pending: Option<(i32, Reading)> = None;
        loop {
            tokio::select! {
                () = finished.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let group = self.script_group.load(Ordering::Relaxed);
            let due = reading.as_ref().is_none_or(|(at, read_group, _)| {
                *read_group != group || at.elapsed() >= READ_EVERY
            });
            if due || pending.is_some() {
                let (read_group, mut under_way) = match pending.take() {
                    Some(under_way) => under_way,
                    None => (group, self.read_resources(std::mem::take(&mut meter))),
                };
                // A slow reading is not waited for past half an interval: the heartbeat goes
                // with the previous one, and the reading is looked at again at the next tick.
                // It keeps the meter (its last CPU count), so the next reading still has one.
                match tokio::time::timeout(period / 2, &mut under_way).await {
                    Ok(Ok((back, metrics))) => {
                        meter = back;
                        reading = Some((Instant::now(), read_group, metrics));
                    }
                    // The thread failed: the meter starts again.
                    Ok(Err(_)) => reading = Some((Instant::now(), read_group, None)),
                    Err(_) => pending = Some((read_group, under_way)),
                }
            }
            let request = wire::HeartbeatRequest {
                metrics: reading.as_ref().and_then(|(_, _, metrics)| metrics.clone()),
            };
            let answer = tokio::select! {
                () = finished.cancelled() => return,
                answer = tokio::time::timeout(period, self.call(self.client.heartbeat_with(&request))) => answer,
            };
            match answer {
                Ok(Ok(answer)) if answer.shutdown => {
                    if !self.stop.is_cancelled() {
                        tracing::info!(node_id = %self.node_id(), "the daemon asked this node to stop");
                        self.stop.cancel();
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(node_id = %self.node_id(), error = %error.report(), "heartbeat failed");
                }
                Err(_) => {
                    tracing::warn!(node_id = %self.node_id(), "heartbeat unanswered for one interval; sending a new one");
                }
            }
        }
    }

    /// One reading of the script's resources on a blocking thread (`/proc` and the bundle's
    /// folder are files). The meter travels with the reading and comes back with it.
    fn read_resources(&self, mut meter: ResourceMeter) -> Reading {
        let pgid = self.script_group.load(Ordering::Relaxed);
        let root = self.bundle_root.get().cloned();
        tokio::task::spawn_blocking(move || {
            let metrics = meter.read(pgid, root);
            (meter, metrics)
        })
    }
}

/// A reading of a script's resources under way: the meter back, and what it read.
type Reading = tokio::task::JoinHandle<(ResourceMeter, Option<Metrics>)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_group_reports_memory_then_cpu_and_the_bundle_its_disk_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("data"), vec![1u8; 8192]).expect("write");
        let pgid = nix::unistd::getpgrp().as_raw();
        let mut meter = ResourceMeter::default();

        let first = meter
            .read(pgid, Some(dir.path().to_owned()))
            .expect("a reading");
        assert!(
            first["rss_bytes"].as_u64().is_some_and(|b| b > 0),
            "{first:?}"
        );
        assert!(
            first["disk_bytes"].as_u64().is_some_and(|b| b >= 8192),
            "{first:?}"
        );
        assert!(
            !first.contains_key("cpu_percent"),
            "one reading has no CPU share yet"
        );

        let second = meter
            .read(pgid, Some(dir.path().to_owned()))
            .expect("a reading");
        assert!(
            second["cpu_percent"].as_f64().is_some_and(|p| p >= 0.0),
            "{second:?}"
        );
        assert!(
            !second.contains_key("disk_bytes"),
            "disk use is not read every time"
        );
    }

    #[test]
    fn nothing_to_report_before_the_script_and_its_bundle() {
        assert_eq!(ResourceMeter::default().read(0, None), None);
    }
}
