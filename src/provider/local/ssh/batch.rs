//! Several nodes started in one ssh session: the per-host queue of pending starts behind
//! [`super::SshHosts::provision`], and the `sh` program that runs a batch of them.
//!
//! Every ssh session costs the host a login shell (sshd runs the command through it, and bash
//! started by sshd reads `~/.bashrc`), so a deployment's starts are gathered per host: a
//! start joins its host's queue, then waits for one of [`BATCHES_PER_HOST`] turns; the start
//! that gets a turn while its own entry is still queued takes it and up to
//! [`MAX_BATCH`]` - 1` more, runs them in one session and hands each its own result. A start
//! whose entry another took waits for that answer. While the first starts of a deployment run,
//! the rest queue up, so 25 nodes on a host take a handful of sessions rather than 25.
//!
//! A batch of one runs [`super::LAUNCH`] exactly as a single start always has. A larger batch
//! runs `sh -s` fed [`program`]: the same `LAUNCH` text as a function, called once per node in
//! turn with its bootstrap in a here-document (its delimiter a random word that occurs
//! nowhere in the scripts), each node's standard output and error written to files and then
//! printed as tagged lines (`O <id> <line>`, `E <id> <line>`), ending with `R <id> <status>`.
//! [`parse`] turns them back into one [`Output`] per node, the same a single start gives; a
//! node with no `R` line (the session ended before its turn) gets the session's own failure.
//!
//! A start whose future is dropped while queued leaves the queue with it. One dropped while
//! another start runs its batch still starts (its record is written, so the leak checks find
//! it); a batch whose runner is dropped hands no answer, and the starts it carried queue again
//! (`LAUNCH` run twice for a node starts it once).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

use super::{Output, LAUNCH};
use crate::agent::bootstrap::sh_quote;
use crate::provider::ProviderError;

/// At most this many starts in one session.
pub(super) const MAX_BATCH: usize = 16;
/// At most this many batches of starts at once per host (each also holds one of the host's
/// sessions): the starts arriving meanwhile gather into the next batch.
pub(super) const BATCHES_PER_HOST: usize = 2;
/// The remote command of a batch: `sh` reading [`program`] on its standard input.
pub(super) const BATCH_COMMAND: &str = "sh -s";

/// What a start is answered with.
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

/// A start waiting in its host's queue.
struct Pending {
    ticket: u64,
    launch: Launch,
    answer: oneshot::Sender<Answer>,
}

/// A taken start: its launch and where its answer goes.
pub(super) struct Taken {
    pub(super) launch: Launch,
    pub(super) answer: oneshot::Sender<Answer>,
}

/// One host's pending starts and its batch turns.
#[derive(Debug)]
pub(super) struct Launches {
    /// One permit per batch under way.
    pub(super) turns: Semaphore,
    next_ticket: AtomicU64,
    pending: Mutex<Vec<Pending>>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("ticket", &self.ticket)
            .field("instance_id", &self.launch.instance_id)
            .finish_non_exhaustive()
    }
}

impl Default for Launches {
    fn default() -> Launches {
        Launches {
            turns: Semaphore::new(BATCHES_PER_HOST),
            next_ticket: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
        }
    }
}

/// A start in the queue; leaves it when dropped, unless a batch took it.
pub(super) struct Queued<'a> {
    launches: &'a Launches,
    ticket: u64,
}

impl Launches {
    /// Queues `launch`; its answer comes on the receiver if another start takes it.
    pub(super) fn enqueue(&self, launch: Launch) -> (Queued<'_>, oneshot::Receiver<Answer>) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        crate::sync::lock(&self.pending).push(Pending {
            ticket,
            launch,
            answer,
        });
        (
            Queued {
                launches: self,
                ticket,
            },
            receiver,
        )
    }
}

impl Queued<'_> {
    /// This start and up to [`MAX_BATCH`]` - 1` more, oldest first, this one first; `None`
    /// when another start has taken this one.
    pub(super) fn take_batch(&self) -> Option<Vec<Taken>> {
        let mut pending = crate::sync::lock(&self.launches.pending);
        let own = pending.iter().position(|p| p.ticket == self.ticket)?;
        let mut batch = vec![pending.remove(own)];
        let others = pending.len().min(MAX_BATCH - 1);
        batch.extend(pending.drain(..others));
        Some(
            batch
                .into_iter()
                .map(|p| Taken {
                    launch: p.launch,
                    answer: p.answer,
                })
                .collect(),
        )
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        crate::sync::lock(&self.launches.pending).retain(|p| p.ticket != self.ticket);
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
    let mut text = String::from(
        r#"set -u
umask 077
b="$HOME/.taskfly/batch-$$"
rm -rf "$b"
mkdir -p "$b" || exit 3
trap 'rm -rf "$b"' EXIT
tag() { while IFS= read -r l || [ -n "$l" ]; do printf '%s %s %s\n' "$1" "$2" "$l"; done <"$3"; }
launch() (
"#,
    );
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

/// Each node's [`Output`] from a batch session's `session` output; a node with no `R` line
/// gets the session's status and standard error.
pub(super) fn parse(launches: &[Launch], session: &Output) -> Vec<Output> {
    let mut found: HashMap<&str, (Option<i32>, String, String)> = launches
        .iter()
        .map(|l| (l.instance_id.as_str(), (None, String::new(), String::new())))
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
    launches
        .iter()
        .map(|l| match found.remove(l.instance_id.as_str()) {
            Some((Some(status), stdout, stderr)) => Output {
                status: Some(status),
                stdout,
                stderr,
            },
            _ => Output {
                status: session.status.filter(|s| *s != 0),
                stdout: String::new(),
                stderr: if session.stderr.trim().is_empty() {
                    "the ssh session ended before this node's start was reported\n".to_owned()
                } else {
                    session.stderr.clone()
                },
            },
        })
        .collect()
}
