//! The Slurm client commands the provider runs (`sbatch`, `squeue`, `scancel`), and what it
//! reads from their answers: pure parsing, tested without Slurm.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use crate::error::{BoxError, Error};
use crate::provider::ProviderError;

/// How long one client command may take: the clients retry an unreachable controller for
/// about `MessageTimeout` (10 s by default) several times before they give up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// What the controller says when it cannot be reached or is too busy: worth trying again, as
/// EC2's throttling is.
const TRANSIENT: &[&str] = &[
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Connection timed out",
    "temporarily unable to accept job",
    "Resource temporarily unavailable",
    "Zero Bytes were transmitted or received",
    "Communication connection failure",
];

/// The fields TaskFly asks `squeue` for, in order: the array's job id, the task's index, the
/// state, the reason it waits, and the comment last (it is ours, but may hold the separator).
pub(super) const SQUEUE_FORMAT: &str = "%F|%K|%T|%r|%k";

/// What a client command gave back.
pub(super) struct Output {
    pub(super) status: Option<i32>,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Output {
    pub(super) fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The last line the command wrote to stderr, for messages.
    pub(super) fn said(&self) -> &str {
        self.stderr
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .unwrap_or("no message")
    }
}

/// The variables of the daemon's environment a job gets: its tasks need no more to run the
/// bootstrap, and nothing else of the daemon's (its secrets included) reaches them.
const JOB_VARIABLES: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG"];

/// The environment a client command runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Environment {
    /// The daemon's, without its API token (`squeue`, `scancel`).
    Daemon,
    /// `sbatch` submitting with `--export=ALL`: [`JOB_VARIABLES`] and Slurm's own `SLURM_*` and
    /// `SBATCH_*` settings only, so that is all the job gets. A list (`--export=PATH,…`) would
    /// give the same, but makes slurmd load the user's login environment for every task
    /// (`--get-user-env`: a login shell per task, one task at a time), which made tasks start
    /// at about 3 a second on the test cluster instead of 20.
    Job,
}

/// Whether the daemon's variable `name` goes into `environment`.
pub(super) fn passes(environment: Environment, name: &str) -> bool {
    match environment {
        Environment::Daemon => name != "TASKFLY_API_TOKEN",
        Environment::Job => {
            JOB_VARIABLES.contains(&name)
                || name.starts_with("SLURM_")
                || name.starts_with("SBATCH_")
        }
    }
}

/// Runs `program` of `bin_dir` (or found on `PATH`) with `args` in `environment`, feeding it
/// `input`.
pub(super) async fn run(
    bin_dir: Option<&Path>,
    program: &str,
    args: &[String],
    input: Option<&[u8]>,
    environment: Environment,
) -> Result<Output, BoxError> {
    let path = bin_dir.map_or_else(|| PathBuf::from(program), |dir| dir.join(program));
    let mut command = tokio::process::Command::new(&path);
    command
        .args(args)
        .env_clear()
        .envs(
            std::env::vars_os()
                .filter(|(name, _)| name.to_str().is_some_and(|name| passes(environment, name))),
        )
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        Error::io(
            format!(
                "cannot run {} (is the Slurm client installed? set instance_config.slurm.bin_dir \
                 to its folder)",
                path.display()
            ),
            e,
        )
    })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A command that stops reading early says why in its status and stderr.
        let _ = stdin.write_all(input).await;
        drop(stdin);
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| ProviderError {
            code: "SlurmTimeout".to_owned(),
            message: format!(
                "{program} did not answer within {} s (is the Slurm controller up?)",
                COMMAND_TIMEOUT.as_secs()
            ),
            retryable: true,
        })?
        .map_err(|e| Error::io(format!("cannot read from {program}"), e))?;
    Ok(Output {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// A failed command as a provider error carrying its own message; retryable when the
/// controller could not be reached.
pub(super) fn failure(program: &str, output: &Output) -> ProviderError {
    let said = output.said();
    let retryable = TRANSIENT
        .iter()
        .any(|t| said.to_ascii_lowercase().contains(&t.to_ascii_lowercase()));
    ProviderError {
        code: if retryable {
            "SlurmUnavailable".to_owned()
        } else {
            "SlurmRefused".to_owned()
        },
        message: format!("{program} failed: {said}"),
        retryable,
    }
}

/// The job id in `sbatch --parsable`'s answer (`12345` or `12345;cluster`).
pub(super) fn parse_job_id(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    let id = line.split(';').next()?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_owned())
}

/// `indexes` (sorted or not) as Slurm's array list: runs of consecutive indexes as `a-b`.
pub(super) fn array_spec(indexes: &[u32]) -> String {
    let mut sorted = indexes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut spec = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !spec.is_empty() {
            spec.push(',');
        }
        if start == end {
            let _ = write!(spec, "{start}");
        } else {
            let _ = write!(spec, "{start}-{end}");
        }
        i += 1;
    }
    spec
}

/// One task of a job array, as `squeue` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct QueuedTask {
    /// The array's job id.
    pub(super) job_id: String,
    /// The task's index.
    pub(super) task: u32,
    /// `PENDING`, `RUNNING`, `COMPLETING`, …
    pub(super) state: String,
    /// Why it waits (`Priority`, `Resources`), `None` when Slurm gives none.
    pub(super) reason: Option<String>,
    /// The job's comment.
    pub(super) comment: String,
}

impl QueuedTask {
    /// Whether the task still waits in the queue.
    pub(super) fn is_pending(&self) -> bool {
        self.state == "PENDING"
    }
}

/// The lines of `squeue --array --noheader --format=SQUEUE_FORMAT`. Lines that do not read as
/// a task of an array (a job that is not an array, a line cut short) are skipped: they are
/// not TaskFly's.
pub(super) fn parse_squeue(stdout: &str) -> Vec<QueuedTask> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.trim_end_matches(['\r', '\n']).splitn(5, '|');
            let job_id = fields.next()?.trim();
            let task = fields.next()?.trim();
            let state = fields.next()?.trim();
            let reason = fields.next()?.trim();
            let comment = fields.next()?.trim();
            if job_id.is_empty() || !job_id.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let task = task.parse::<u32>().ok()?;
            let reason = match reason {
                "" | "None" | "(null)" => None,
                reason => Some(reason.to_owned()),
            };
            Some(QueuedTask {
                job_id: job_id.to_owned(),
                task,
                state: state.to_owned(),
                reason,
                comment: comment.to_owned(),
            })
        })
        .collect()
}

/// What `scancel ids…` said of each id: fine, unless a line of its stderr names the id with
/// an error other than the task being gone already; a failure naming no id (the controller
/// is down) is every id's.
pub(super) fn scancel_answers(ids: &[String], output: &Output) -> Vec<Result<(), ProviderError>> {
    let gone = |line: &str| {
        line.contains("Invalid job id specified")
            || line.contains("already completing or completed")
    };
    let errors: Vec<&str> = output
        .stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !gone(line))
        .collect();
    let names_an_id = |line: &str| ids.iter().any(|id| names(line, id));
    let general = !output.success() && errors.iter().any(|line| !names_an_id(line));
    ids.iter()
        .map(|id| {
            if general {
                return Err(failure("scancel", output));
            }
            match errors.iter().find(|line| names(line, id)) {
                Some(line) => Err(ProviderError {
                    code: "SlurmRefused".to_owned(),
                    message: format!("scancel failed: {line}"),
                    retryable: false,
                }),
                None => Ok(()),
            }
        })
        .collect()
}

/// Whether `line` names job `id` as a word of its own (`12_3`, not `12_34`).
fn names(line: &str, id: &str) -> bool {
    line.split(|c: char| !(c.is_ascii_digit() || c == '_'))
        .any(|word| word == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_gets_the_job_variables_and_slurms_own_only() {
        for name in [
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "LANG",
            "SLURM_CONF",
            "SBATCH_ACCOUNT",
        ] {
            assert!(passes(Environment::Job, name), "{name}");
        }
        for name in [
            "TASKFLY_API_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "LD_PRELOAD",
            "PATHX",
        ] {
            assert!(!passes(Environment::Job, name), "{name}");
        }
        assert!(passes(Environment::Daemon, "AWS_PROFILE"));
        assert!(!passes(Environment::Daemon, "TASKFLY_API_TOKEN"));
    }

    #[test]
    fn array_specs_compress_runs() {
        assert_eq!(array_spec(&[0, 1, 2, 3]), "0-3");
        assert_eq!(array_spec(&[7]), "7");
        assert_eq!(array_spec(&[5, 1, 2, 9, 3, 10, 12]), "1-3,5,9-10,12");
        assert_eq!(array_spec(&[]), "");
    }

    #[test]
    fn job_ids_are_read_from_parsable_answers() {
        assert_eq!(parse_job_id("12345\n").as_deref(), Some("12345"));
        assert_eq!(parse_job_id("12345;cluster\n").as_deref(), Some("12345"));
        assert_eq!(
            parse_job_id("sbatch: warning: x\n678\n").as_deref(),
            Some("678")
        );
        assert_eq!(parse_job_id("Submitted batch job 5\n"), None);
        assert_eq!(parse_job_id(""), None);
    }

    #[test]
    fn squeue_lines_are_read_and_strangers_skipped() {
        let out = "12|0|RUNNING|None|taskfly:owner=o;deployment=d;batch=b\n\
                   12|1|PENDING|Resources|taskfly:owner=o;deployment=d;batch=b\n\
                   13|N/A|RUNNING|None|someone else's job\n\
                   14|3|PENDING|Priority|a|comment|with bars\n\
                   garbage\n";
        let tasks = parse_squeue(out);
        assert_eq!(tasks.len(), 3);
        assert_eq!(tasks[0].reason, None);
        assert!(!tasks[0].is_pending());
        assert_eq!(tasks[1].reason.as_deref(), Some("Resources"));
        assert!(tasks[1].is_pending());
        assert_eq!(tasks[2].comment, "a|comment|with bars");
        assert_eq!(tasks[2].task, 3);
    }

    #[test]
    fn scancel_answers_are_per_task_and_gone_tasks_are_fine() {
        let ids: Vec<String> = ["12_3", "12_34", "13_0"].map(String::from).to_vec();
        let output = Output {
            status: Some(1),
            stdout: String::new(),
            stderr: "scancel: error: Kill job error on job id 12_3: Job/step already completing or completed
                     scancel: error: Kill job error on job id 13_0: Access/permission denied
"
                .to_owned(),
        };
        let answers = scancel_answers(&ids, &output);
        assert!(answers[0].is_ok());
        assert!(answers[1].is_ok());
        let refused = answers[2].as_ref().expect_err("refused");
        assert!(
            refused.message.contains("Access/permission denied"),
            "{refused}"
        );
        let down = Output {
            status: Some(1),
            stdout: String::new(),
            stderr: "scancel: error: Unable to contact slurm controller (connect failure)
"
            .to_owned(),
        };
        for answer in scancel_answers(&ids, &down) {
            assert!(answer.expect_err("down").retryable);
        }
    }

    #[test]
    fn an_unreachable_controller_is_retryable_and_a_refusal_is_not() {
        let output = |stderr: &str| Output {
            status: Some(1),
            stdout: String::new(),
            stderr: stderr.to_owned(),
        };
        let down = failure(
            "sbatch",
            &output("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"),
        );
        assert!(down.retryable);
        assert_eq!(down.code, "SlurmUnavailable");
        let refused = failure(
            "sbatch",
            &output(
                "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
            ),
        );
        assert!(!refused.retryable);
        assert_eq!(
            refused.message,
            "sbatch failed: sbatch: error: Batch job submission failed: Invalid partition name specified"
        );
    }
}
