//! How results look: tables, log lines, and live progress (a bar on a terminal, plain
//! timestamped lines elsewhere, nothing but the final document with `--output json`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use taskfly::state::model::DeploymentSummary;
use taskfly::wire::{DeploymentView, LogLineView, NodeStatus};

use crate::Output;

/// Whether to colour output: a terminal, and `NO_COLOR` unset.
pub(crate) fn use_color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

/// `[node 3] line`, the prefix coloured per node on a terminal; `[node 3 attempt 2] line` when
/// `mark_attempt` (the node ran more than once).
pub(crate) fn log_line(line: &LogLineView, color: bool, mark_attempt: bool) -> String {
    let prefix = if mark_attempt {
        format!("[node {} attempt {}]", line.node_index, line.attempt)
    } else {
        format!("[node {}]", line.node_index)
    };
    if color {
        // The prefix coloured per node; stderr lines in red.
        let code = COLORS[line.node_index as usize % COLORS.len()];
        if line.stream == "stderr" {
            format!("\x1b[{code}m{prefix}\x1b[0m \x1b[31m{}\x1b[0m", line.line)
        } else {
            format!("\x1b[{code}m{prefix}\x1b[0m {}", line.line)
        }
    } else {
        format!("{prefix} {}", line.line)
    }
}

/// A log line (as [`log_line`] shows it) prefixed by the time its node wrote it, as the daemon
/// stored it (RFC 3339, milliseconds): `logs --timestamps`.
pub(crate) fn with_timestamp(line: &LogLineView, text: &str) -> String {
    format!("{} {text}", line.timestamp)
}

/// Node indexes as short text: `0-3, 7` (ascending input).
pub(crate) fn index_list(indexes: &[u32]) -> String {
    taskfly::state::model::index_ranges(indexes)
}

/// Seconds as people read them: `0.25s`, `12.34s`, `2m05.3s`, `1h02m05s`.
pub(crate) fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 60.0 {
        format!("{seconds:.2}s")
    } else if seconds < 3600.0 {
        let minutes = (seconds / 60.0).floor();
        format!("{minutes:.0}m{:04.1}s", seconds - minutes * 60.0)
    } else {
        let whole = seconds.round() as u64;
        format!("{}h{:02}m{:02}s", whole / 3600, whole / 60 % 60, whole % 60)
    }
}

/// A value shown so that spaces, quotes and control characters are visible and unambiguous.
pub(crate) fn quote_for_display(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || "-_./:@,+=%".contains(c));
    if plain {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// The nodes of a deployment that ran more than once: their log lines are marked with their
/// attempt.
pub(crate) fn retried_nodes(view: &DeploymentView) -> BTreeSet<u32> {
    view.nodes
        .iter()
        .filter(|node| node.attempt > 1)
        .map(|node| node.node_index)
        .collect()
}

/// `running_script 3 · completed 2` for the nodes of a deployment; a failed node waiting for
/// its retry counts as `retrying`.
pub(crate) fn state_counts(view: &DeploymentView) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for node in &view.nodes {
        let state = if view.is_retrying(node) {
            "retrying"
        } else {
            node.status.as_str()
        };
        *counts.entry(state).or_default() += 1;
    }
    counts
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// `active 3 · completed 2 · failed 1` from a deployment's counters alone: nodes not yet
/// completed, failed or terminated count as `active`; states with no node are left out.
pub(crate) fn counter_counts(total: u32, completed: u32, failed: u32, terminated: u32) -> String {
    let ended = completed.saturating_add(failed).saturating_add(terminated);
    let counts = [
        ("active", total.saturating_sub(ended)),
        ("completed", completed),
        ("failed", failed),
        ("terminated", terminated),
    ];
    let shown: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    shown.join(" · ")
}

/// What progress shows of a deployment: its state, how many nodes are done of how many, and
/// a count per node state. Made from a whole view (`up --wait`), or from the engine's
/// counters alone (`taskfly run`: the same cost at 10 nodes as at 100,000).
pub(crate) struct Tally {
    status: String,
    done: u32,
    total: u32,
    counts: String,
}

impl Tally {
    /// A count per node state, a failed node waiting for its retry as `retrying`.
    pub(crate) fn of_view(view: &DeploymentView) -> Tally {
        Tally {
            status: view.status.to_string(),
            done: view.nodes_completed + view.nodes_failed,
            total: view.total_nodes,
            counts: state_counts(view),
        }
    }

    /// Nodes under way counted together as `active` ([`counter_counts`]).
    pub(crate) fn of_summary(summary: &DeploymentSummary) -> Tally {
        Tally {
            status: summary.status.to_string(),
            done: summary.nodes_completed + summary.nodes_failed,
            total: summary.total_nodes,
            counts: counter_counts(
                summary.total_nodes,
                summary.nodes_completed,
                summary.nodes_failed,
                summary.nodes_terminated,
            ),
        }
    }

    /// One progress line: `[12s] running 3/5 done (completed 3 · running_script 2)`.
    pub(crate) fn line(&self, elapsed: Duration) -> String {
        format!(
            "[{}s] {} {}/{} done ({})",
            elapsed.as_secs(),
            self.status,
            self.done,
            self.total,
            self.counts
        )
    }
}

/// [`Tally::line`] of a whole view.
pub(crate) fn progress_line(view: &DeploymentView, elapsed: Duration) -> String {
    Tally::of_view(view).line(elapsed)
}

fn output_timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// How often plain progress (off a terminal) may print a line.
pub(crate) const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// At most one event per period: the first call is let through, then none until the period
/// has passed since the last one let through. On tokio's clock, so tests can pause it.
pub(crate) struct Throttle {
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    /// Whether an event may happen now; if so, the period starts again.
    pub(crate) fn ready(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Live progress of one deployment.
pub(crate) struct Progress {
    format: Output,
    bar: Option<ProgressBar>,
    color: bool,
    /// The state last printed as a plain line, and when lines may be printed.
    last_line: String,
    throttle: Throttle,
    /// Nodes that ran more than once, whose lines carry their attempt.
    retried: BTreeSet<u32>,
    /// Standard output could not be written (its reader went away: `taskfly run | head`).
    stdout_closed: bool,
}

impl Progress {
    pub(crate) fn new(format: Output, total_nodes: u32) -> Progress {
        let bar = (format == Output::Text && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(u64::from(total_nodes));
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            format,
            bar,
            color: use_color() && format == Output::Text,
            last_line: String::new(),
            throttle: Throttle::new(PLAIN_PROGRESS_EVERY),
            retried: BTreeSet::new(),
            stdout_closed: false,
        }
    }

    /// Whether standard output could not be written, its reader gone: nothing more can be
    /// shown there.
    pub(crate) fn stdout_closed(&self) -> bool {
        self.stdout_closed
    }

    /// Writes `text` to standard output (above the bar, if any); notes a failure instead of
    /// panicking as `print!` does.
    fn print(&mut self, text: &str) {
        if self.stdout_closed {
            return;
        }
        let write = || -> std::io::Result<()> {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()
        };
        let written = match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        };
        self.stdout_closed = written.is_err();
    }

    /// Print log lines: above the bar, or on stderr with `--output json` (stdout then holds
    /// only the final document).
    pub(crate) fn print_logs(&mut self, lines: &[LogLineView]) {
        if lines.is_empty() {
            return;
        }
        let mut text = String::new();
        for line in lines {
            // Once a node is seen on a later attempt, every line of it names its attempt.
            if line.attempt > 1 {
                self.retried.insert(line.node_index);
            }
            let mark = line.attempt > 1 || self.retried.contains(&line.node_index);
            let _ = writeln!(text, "{}", log_line(line, self.color, mark));
        }
        if self.format == Output::Json {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
            return;
        }
        self.print(&text);
    }

    pub(crate) fn message(&mut self, message: &str) {
        if self.format == Output::Text {
            match &self.bar {
                Some(bar) => bar.println(message),
                None => eprintln!("{message}"),
            }
        }
    }

    /// Show the current state of a whole view ([`Progress::show`]).
    pub(crate) fn update(&mut self, view: &DeploymentView, elapsed: Duration) {
        self.retried.extend(retried_nodes(view));
        if self.format == Output::Text {
            self.show(&Tally::of_view(view), elapsed);
        }
    }

    /// Show the current state from the deployment's counters alone ([`Progress::show`]).
    pub(crate) fn update_summary(&mut self, summary: &DeploymentSummary, elapsed: Duration) {
        if self.format == Output::Text {
            self.show(&Tally::of_summary(summary), elapsed);
        }
    }

    /// Show `tally`: the bar on a terminal, a timestamped line when it changed.
    fn show(&mut self, tally: &Tally, elapsed: Duration) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(u64::from(tally.done));
                bar.set_message(format!("{} ({})", tally.status, tally.counts));
            }
            None => {
                // Plain output: a line when the deployment's state or the count of finished
                // nodes changed, at most one per PLAIN_PROGRESS_EVERY, so a log file is not
                // flooded by every node's every step; a change held back is printed later.
                let key = format!("{} {}", tally.status, tally.done);
                if key != self.last_line && self.throttle.ready() {
                    eprintln!("{} {}", output_timestamp(), tally.line(elapsed));
                    self.last_line = key;
                }
            }
        }
    }

    /// Stop showing progress without a summary (following was interrupted).
    pub(crate) fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// The final summary (text) or the final document (json).
    pub(crate) fn finish(&mut self, view: &DeploymentView, elapsed: Duration) {
        match self.bar.take() {
            Some(bar) => bar.finish_and_clear(),
            // Plain output ends with one line of the final state, whatever the throttle held.
            None if self.format == Output::Text => {
                eprintln!("{} {}", output_timestamp(), progress_line(view, elapsed));
            }
            None => {}
        }
        let text = match self.format {
            Output::Json => format!("{}\n", serde_json::to_string(view).unwrap_or_default()),
            Output::Text => summary(view, elapsed),
        };
        self.print(&text);
    }
}

/// The end-of-run summary: the outcome, then one line per node that did not complete.
pub(crate) fn summary(view: &DeploymentView, elapsed: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ndeployment {} {} in {}: {} completed, {} failed, {} total",
        view.deployment_id,
        view.status,
        duration(view.duration_s.unwrap_or(elapsed.as_secs_f64())),
        view.nodes_completed,
        view.nodes_failed,
        view.total_nodes
    );
    for node in view
        .nodes
        .iter()
        .filter(|n| n.status != NodeStatus::Completed)
    {
        let _ = writeln!(
            out,
            "  node {} {}{}",
            node.node_index,
            node.status,
            node.error_message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
    out
}

/// `taskfly list`.
pub(crate) fn deployments_table(all: &[DeploymentView]) -> String {
    if all.is_empty() {
        return "no deployments\n".to_owned();
    }
    let mut rows = vec![vec![
        "ID".to_owned(),
        "STATUS".to_owned(),
        "PROVIDER".to_owned(),
        "NODES".to_owned(),
        "DONE".to_owned(),
        "FAILED".to_owned(),
        "CREATED".to_owned(),
    ]];
    for d in all {
        rows.push(vec![
            d.deployment_id.clone(),
            d.status.to_string(),
            d.cloud_provider.clone(),
            d.total_nodes.to_string(),
            d.nodes_completed.to_string(),
            d.nodes_failed.to_string(),
            d.created_at.clone(),
        ]);
    }
    table(&rows)
}

/// `taskfly status ID`.
pub(crate) fn deployment_details(view: &DeploymentView) -> String {
    deployment_details_at(view, SystemTime::now())
}

/// Seconds from the RFC 3339 time `since` until `now`: how long something still under way has
/// taken so far, by this machine's clock (the daemon's views carry only what has ended).
fn so_far(since: &str, now: SystemTime) -> Option<f64> {
    let since = humantime::parse_rfc3339(since).ok()?;
    Some(now.duration_since(since).unwrap_or_default().as_secs_f64())
}

/// `taskfly status ID` at `now`: what is still under way is timed until then.
pub(crate) fn deployment_details_at(view: &DeploymentView, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "deployment  {}", view.deployment_id);
    let _ = writeln!(out, "status      {}", view.status);
    let _ = writeln!(out, "provider    {}", view.cloud_provider);
    let _ = writeln!(
        out,
        "nodes       {} total, {} completed, {} failed",
        view.total_nodes, view.nodes_completed, view.nodes_failed
    );
    if let Some(original) = &view.rerun_of {
        let indexes: Vec<u32> = view.nodes.iter().map(|n| n.node_index).collect();
        let _ = writeln!(
            out,
            "rerun of    {original} (node(s) {})",
            index_list(&indexes)
        );
    }
    let _ = writeln!(out, "created     {}", view.created_at);
    if let Some(done) = &view.completed_at {
        let _ = writeln!(out, "finished    {done}");
    }
    match view.duration_s {
        Some(seconds) => {
            let _ = writeln!(out, "duration    {}", duration(seconds));
        }
        None if !view.is_final() => {
            if let Some(seconds) = so_far(&view.created_at, now) {
                let _ = writeln!(out, "duration    {} so far", duration(seconds));
            }
        }
        None => {}
    }
    if let Some(error) = &view.error_message {
        let _ = writeln!(out, "error       {error}");
    }
    if let Some(cleaned) = &view.cleaned_at {
        let _ = writeln!(
            out,
            "cleaned up  {cleaned} (files deleted; status and logs kept)"
        );
    }
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "STATUS".to_owned(),
        "ATTEMPT".to_owned(),
        "EXIT".to_owned(),
        "DURATION".to_owned(),
        "INSTANCE".to_owned(),
        "CPU".to_owned(),
        "MEM".to_owned(),
        "LAST SEEN".to_owned(),
        "ERROR".to_owned(),
    ]];
    for n in &view.nodes {
        rows.push(vec![
            n.node_index.to_string(),
            n.status.to_string(),
            n.attempt.to_string(),
            n.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            n.duration_s
                .or_else(|| match (&n.started_at, &n.finished_at) {
                    (Some(started), None) => so_far(started, now),
                    _ => None,
                })
                .map_or_else(|| "-".to_owned(), duration),
            n.instance_id.clone().unwrap_or_else(|| "-".to_owned()),
            cpu_cell(n),
            memory_cell(n),
            n.last_update.clone(),
            n.error_message.clone().unwrap_or_default(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

/// The CPU column: the script's CPU use at its last heartbeat, while the node runs.
fn cpu_cell(node: &taskfly::wire::NodeView) -> String {
    match node.resources.as_ref().and_then(|r| r.cpu_percent) {
        Some(percent) if !node.status.is_final() => format!("{percent:.1}%"),
        _ => "-".to_owned(),
    }
}

/// The MEM column: the script's resident memory while the node runs, its peak once it ended.
fn memory_cell(node: &taskfly::wire::NodeView) -> String {
    let Some(resources) = &node.resources else {
        return "-".to_owned();
    };
    if node.status.is_final() {
        resources
            .peak_rss_bytes
            .map_or_else(|| "-".to_owned(), |b| format!("{} peak", bytes(b)))
    } else {
        resources.rss_bytes.map_or_else(|| "-".to_owned(), bytes)
    }
}

/// A byte count for people: `512B`, `3.4KiB`, `1.2GiB`.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if count < 1024 {
        return format!("{count}B");
    }
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Longest cell a table shows, in characters; longer ones are cut and end in `…`
/// (`--output json` has them whole).
const MAX_CELL_CHARS: usize = 200;

fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| table_cell(cell)).collect())
        .collect();
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        // Padded by hand: `format!("{cell:<width$}")` panics for widths over 65,535.
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| {
                let padding = width.saturating_sub(cell.chars().count());
                format!("{cell}{}", " ".repeat(padding))
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// A cell on one line and at most [`MAX_CELL_CHARS`] long.
fn table_cell(cell: &str) -> String {
    let one_line = cell.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= MAX_CELL_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(MAX_CELL_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests;
