//! Several nodes started (or stopped) in one ssh session: the per-host queues behind
//! [`super::SshHosts::provision`] and [`super::SshHosts::terminate`], and the `sh` programs
//! that run a batch.
//!
//! Every ssh session costs the host a login shell (sshd runs the command through it, and bash
//! started by sshd reads `~/.bashrc`), so a deployment's starts, and its stops, are gathered
//! per host: a job joins its host's queue of its kind, then waits for one of
//! [`BATCHES_PER_HOST`] turns; the caller that gets a turn while its own job is still queued
//! takes it and up to [`MAX_BATCH`]` - 1` more, runs them in one session and hands each its
//! own result. A caller whose job another took waits for that answer. While the first jobs
//! run, the rest queue up, so 25 nodes on a host take a handful of sessions rather than 25.
//!
//! A batch of one runs [`super::LAUNCH`] (or [`super::TERMINATE`]) exactly as a single call
//! always has. A larger batch runs `sh -s` fed a generated program: the same text as a
//! function, called once per node with that node's arguments, its standard output and error
//! written to files and then printed as tagged lines (`O <id> <line>`, `E <id> <line>`),
//! ending with `R <id> <status>`. Starts run one after another, each bootstrap in a
//! here-document whose delimiter is a random word that occurs in none of the scripts; stops
//! run at once (each may wait for its bootstrap to end). [`parse`] turns the lines back into
//! one [`Output`] per node, the same a single call gives; a node with no `R` line (the session
//! ended before its turn) gets the session's own failure.
//!
//! A job whose future is dropped while queued leaves the queue with it. One dropped while
//! another caller runs its batch still runs (a start's record is written first, so the leak
//! checks find it); a batch whose runner is dropped hands no answer, and the jobs it carried
//! queue again (both programs, run twice for a node, act once).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

use super::{Output, LAUNCH, TERMINATE};
use crate::agent::bootstrap::sh_quote;
use crate::provider::ProviderError;

/// At most this many nodes in one session.
pub(super) const MAX_BATCH: usize = 16;
/// At most this many batches of each kind at once per host (each also holds one of the
/// host's sessions): the jobs arriving meanwhile gather into the next batch.
pub(super) const BATCHES_PER_HOST: usize = 2;
/// The remote command of a batch: `sh` reading its program on its standard input.
pub(super) const BATCH_COMMAND: &str = "sh -s";

/// What a job is answered with.
pub(super) type Answer = Result<Output, ProviderError>;

/// One node's start: what `LAUNCH` needs.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    pub(super) instance_id: String,
    /// The grace period in milliseconds, as `LAUNCH`'s `$2`.
    pub(super) grace_ms: String,
    /// The bootstrap, written to the node's folder.
    pub(super) script: Arc<str>,
}

/// One node's stop: what `TERMINATE` needs.
#[derive(Debug, Clone)]
pub(super) struct Stop {
    pub(super) instance_id: String,
    pub(super) node_id: String,
    /// How long the bootstrap may take to end, in tenths of a second, as `TERMINATE`'s `$3`.
    pub(super) tenths: String,
}

/// What a batch runs for one node.
pub(super) trait Job: Clone {
    /// The node's instance id: the tag of its result lines.
    fn instance_id(&self) -> &str;
    /// The command line and standard input of this job run alone, as it always was.
    fn alone(&self) -> (String, Option<&[u8]>);
    /// The `sh` program running every one of `jobs`, its here-documents delimited by a word
    /// `delimiter` gives that occurs in none of them.
    fn program(jobs: &[Self], delimiter: impl FnMut() -> String) -> String;
}

impl Job for Launch {
    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn alone(&self) -> (String, Option<&[u8]>) {
        (
            super::remote_command(LAUNCH, &[&self.instance_id, &self.grace_ms]),
            Some(self.script.as_bytes()),
        )
    }

    fn program(jobs: &[Launch], delimiter: impl FnMut() -> String) -> String {
        program(jobs, delimiter)
    }
}

impl Job for Stop {
    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn alone(&self) -> (String, Option<&[u8]>) {
        (
            super::remote_command(TERMINATE, &[&self.instance_id, &self.node_id, &self.tenths]),
            None,
        )
    }

    fn program(jobs: &[Stop], _delimiter: impl FnMut() -> String) -> String {
        stop_program(jobs)
    }
}

/// A job waiting in its host's queue.
struct Pending<J> {
    ticket: u64,
    job: J,
    answer: oneshot::Sender<Answer>,
}

/// A taken job and where its answer goes.
pub(super) struct Taken<J> {
    pub(super) job: J,
    pub(super) answer: oneshot::Sender<Answer>,
}

/// One host's pending jobs of one kind, and its batch turns.
pub(super) struct Queue<J> {
    /// One permit per batch under way.
    pub(super) turns: Semaphore,
    next_ticket: AtomicU64,
    pending: Mutex<Vec<Pending<J>>>,
}

impl<J> std::fmt::Debug for Queue<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("turns", &self.turns)
            .field("pending", &crate::sync::lock(&self.pending).len())
            .finish_non_exhaustive()
    }
}

impl<J> Default for Queue<J> {
    fn default() -> Queue<J> {
        Queue {
            turns: Semaphore::new(BATCHES_PER_HOST),
            next_ticket: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
        }
    }
}

/// A job in the queue; leaves it when dropped, unless a batch took it.
pub(super) struct Queued<'a, J> {
    queue: &'a Queue<J>,
    ticket: u64,
}

impl<J> Queue<J> {
    /// Queues `job`; its answer comes on the receiver if another caller takes it.
    pub(super) fn enqueue(&self, job: J) -> (Queued<'_, J>, oneshot::Receiver<Answer>) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        crate::sync::lock(&self.pending).push(Pending {
            ticket,
            job,
            answer,
        });
        (
            Queued {
                queue: self,
                ticket,
            },
            receiver,
        )
    }
}

impl<J> Queued<'_, J> {
    /// This job and up to [`MAX_BATCH`]` - 1` more, oldest first, this one first; `None`
    /// when another caller has taken this one.
    pub(super) fn take_batch(&self) -> Option<Vec<Taken<J>>> {
        let mut pending = crate::sync::lock(&self.queue.pending);
        let own = pending.iter().position(|p| p.ticket == self.ticket)?;
        let mut batch = vec![pending.remove(own)];
        let others = pending.len().min(MAX_BATCH - 1);
        batch.extend(pending.drain(..others));
        Some(
            batch
                .into_iter()
                .map(|p| Taken {
                    job: p.job,
                    answer: p.answer,
                })
                .collect(),
        )
    }
}

impl<J> Drop for Queued<'_, J> {
    fn drop(&mut self) {
        crate::sync::lock(&self.queue.pending).retain(|p| p.ticket != self.ticket);
    }
}

/// A fresh here-document delimiter: `TASKFLY_END_` and 16 random hex digits.
pub(super) fn random_delimiter() -> String {
    let mut bytes = [0u8; 8];
    // Any word that occurs in no script will do; the check in `program` is what counts.
    let _ = getrandom::fill(&mut bytes);
    let mut word = String::from("TASKFLY_END_");
    for byte in bytes {
        let _ = write!(word, "{byte:02x}");
    }
    word
}

/// The `sh` program starting every node of `launches` in turn (see the module's doc).
/// `delimiter` is asked for words until one occurs in none of the scripts.
pub(super) fn program(launches: &[Launch], mut delimiter: impl FnMut() -> String) -> String {
    let word = loop {
        let word = delimiter();
        if !launches.iter().any(|l| l.script.contains(&word)) {
            break word;
        }
    };
    let mut text = String::from(PROLOGUE);
    text.push_str("launch() (\n");
    text.push_str(LAUNCH);
    text.push_str(")\n");
    for launch in launches {
        let id = sh_quote(&launch.instance_id);
        let _ = writeln!(
            text,
            "launch {id} {} >\"$b/o\" 2>\"$b/e\" <<'{word}'",
            sh_quote(&launch.grace_ms)
        );
        text.push_str(&launch.script);
        if !launch.script.ends_with('\n') {
            text.push('\n');
        }
        let _ = writeln!(
            text,
            "{word}\ns=$?\ntag O {id} \"$b/o\"\ntag E {id} \"$b/e\"\necho \"R {} $s\"",
            launch.instance_id
        );
    }
    text
}

/// The `sh` program stopping every node of `stops` at once (each may wait for its bootstrap
/// to end), then reporting each in turn.
pub(super) fn stop_program(stops: &[Stop]) -> String {
    let mut text = String::from(PROLOGUE);
    text.push_str("stop() (\n");
    text.push_str(TERMINATE);
    text.push_str(")\n");
    for (index, stop) in stops.iter().enumerate() {
        let _ = writeln!(
            text,
            "{{ stop {} {} {} >\"$b/{index}.o\" 2>\"$b/{index}.e\" </dev/null; echo $? >\"$b/{index}.s\"; }} &",
            sh_quote(&stop.instance_id),
            sh_quote(&stop.node_id),
            sh_quote(&stop.tenths)
        );
    }
    text.push_str("wait\n");
    for (index, stop) in stops.iter().enumerate() {
        let id = sh_quote(&stop.instance_id);
        let _ = writeln!(
            text,
            "tag O {id} \"$b/{index}.o\"\ntag E {id} \"$b/{index}.e\"\necho \"R {} $(cat \"$b/{index}.s\" 2>/dev/null)\"",
            stop.instance_id
        );
    }
    text
}

/// What every batch program starts with: a private folder for the nodes' outputs (removed
/// at the end, also when the session is hung up or terminated), and `tag`, which prints a
/// file's lines prefixed with a tag and an id. The folders of earlier sessions whose shell
/// is gone (killed outright, so no trap ran) are removed first; a live one is left alone.
const PROLOGUE: &str = r#"set -u
umask 077
for o in "$HOME"/.taskfly/batch-*; do
  [ -d "$o" ] || continue
  kill -0 "${o##*-}" 2>/dev/null || rm -rf "$o"
done
b="$HOME/.taskfly/batch-$$"
rm -rf "$b"
mkdir -p "$b" || exit 3
trap 'rm -rf "$b"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
tag() { while IFS= read -r l || [ -n "$l" ]; do printf '%s %s %s\n' "$1" "$2" "$l"; done <"$3"; }
"#;

/// Each node's [`Output`] from a batch session's `session` output; a node with no `R` line
/// gets the session's status and standard error.
pub(super) fn parse<J: Job>(jobs: &[J], session: &Output) -> Vec<Output> {
    let mut found: HashMap<&str, (Option<i32>, String, String)> = jobs
        .iter()
        .map(|j| (j.instance_id(), (None, String::new(), String::new())))
        .collect();
    for line in session.stdout.lines() {
        let Some((tag, rest)) = line.split_once(' ') else {
            continue;
        };
        let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let Some((status, stdout, stderr)) = found.get_mut(id) else {
            continue;
        };
        match tag {
            "O" => {
                stdout.push_str(text);
                stdout.push('\n');
            }
            "E" => {
                stderr.push_str(text);
                stderr.push('\n');
            }
            "R" => *status = text.trim().parse().ok(),
            _ => {}
        }
    }
    jobs.iter()
        .map(|j| match found.remove(j.instance_id()) {
            Some((Some(status), stdout, stderr)) => Output {
                status: Some(status),
                stdout,
                stderr,
            },
            _ => Output {
                status: session.status.filter(|s| *s != 0),
                stdout: String::new(),
                stderr: if session.stderr.trim().is_empty() {
                    "the ssh session ended before this node's result was reported\n".to_owned()
                } else {
                    session.stderr.clone()
                },
            },
        })
        .collect()
}
