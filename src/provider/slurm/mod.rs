//! Nodes as the tasks of Slurm job arrays: [`SlurmProvider`].
//!
//! One deployment is one job array. The engine asks for one instance per node; the provider
//! gathers the first-attempt requests of one deployment that arrive together (until none has
//! come for [`SlurmProvider::gather_window`]) and submits them with one `sbatch
//! --array=<indexes>[%max_parallel]`, so a submission costs the same for 2 nodes or 2,000. A
//! retried node (attempt 2 and later) is submitted alone, `--array=<its index>`: node *i* is
//! always task *i*. Each instance is one task: id `<array job id>_<index>` (Slurm's own name
//! for it), locator a JSON [`Locator`].
//!
//! What a task runs: the array's script (`script.sh`, fed to sbatch on its standard input, no
//! secret in it) moves its node's shell bootstrap ([`crate::agent::bootstrap`], the same EC2
//! and SSH nodes run) out of the submission folder `<work_dir>/<batch>/<index>.sh` into a
//! private temporary folder and runs it; once it has ended, it kills whatever still carries
//! the task's `SLURM_JOB_ID` (a process that left the script's process group escapes
//! `proctrack/linuxproc`), and removes its folder. The bootstrap holds the node's single-use
//! provision token, so it is written mode 0600 in a 0700 folder and is never on a command
//! line or in the job's environment (sbatch runs with `PATH`, `HOME`, `USER`, `LOGNAME`,
//! `LANG` and Slurm's own `SLURM_*`/`SBATCH_*` variables only, and exports them all). This
//! assumes `work_dir` is on a file system the compute nodes share with the daemon, at the same
//! path, readable by the daemon's user only (a home directory on a cluster usually is). Task
//! output (the bootstrap's own messages) goes to
//! `<work_dir>/<batch>/<index>.log`.
//!
//! A node waits in Slurm's queue inside `provision`: the call returns once its task has left
//! the queue (running, or already over), so the node shows `provisioning` while it waits, with
//! Slurm's reason ([`Provider::queue_reason`]), and the engine's boot timeout starts when the
//! task starts. `queue_timeout` bounds the wait. One `squeue` call serves every waiting node.
//!
//! Terminating is `scancel <job>_<index>`; Slurm sends SIGTERM to every process of the task,
//! SIGKILL after `KillWait` (the cluster's setting must exceed the grace period). The leak
//! checks list this user's jobs with `squeue` and keep those whose `--comment` carries this
//! provider's owner id.

mod commands;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use self::commands::{array_spec, failure, parse_job_id, parse_squeue, Environment, QueuedTask};
use super::{
    is_plain_word, Instance, InstanceKind, InstanceRef, InstanceSpec, InstanceState, OwnedBy,
    OwnedInstance, Owner, Provider, ProviderError, ProviderSettings,
};
use crate::agent::bootstrap::{self, sh_quote};
use crate::config::{slurm_settings, SlurmConfig};
use crate::error::{BoxError, Error};
use crate::sync::lock;

/// The script every task of an array runs; `@DIR@` and `@GRACE_MS@` are filled in.
const TASK_SCRIPT: &str = include_str!("script.sh");
/// How a job's comment starts: the jobs whose comment does not are not TaskFly's.
const COMMENT_PREFIX: &str = "taskfly:";
/// The file of a submission folder naming each task's node, one `<index> <node id>` a line.
const NODES_FILE: &str = "nodes";
/// The file of a submission folder holding its array's job id, once submitted.
const JOB_FILE: &str = "job";
/// How long the requests of one deployment are gathered after the last one came, by default.
const DEFAULT_GATHER_WINDOW: Duration = Duration::from_millis(300);
/// However many keep coming, a batch is submitted this long after its first request.
const MAX_GATHER: Duration = Duration::from_secs(30);
/// How long cancellations are gathered into one `scancel` after the last one came.
const CANCEL_WINDOW: Duration = Duration::from_millis(50);
/// However many keep coming, cancellations are sent this long after the first.
const MAX_CANCEL_GATHER: Duration = Duration::from_secs(2);
/// At most this many tasks per `scancel` call, to keep its command line short.
const CANCEL_CHUNK: usize = 500;
/// How often `squeue` is asked about waiting tasks, by default.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a terminated script gets between SIGTERM and SIGKILL unless configured otherwise.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// A submission folder with no job recorded this long after it was made is a crash's remains.
const STALE_FOLDER: Duration = Duration::from_secs(3600);
/// A submission folder whose job Slurm no longer lists is removed once its job was recorded
/// at least this long ago.
const GONE_JOB_FOLDER: Duration = Duration::from_secs(120);
/// How long a controller that cannot be reached (`squeue` failing as it does while slurmctld
/// is down or busy) is asked again about a waiting task before its node fails.
const UNREACHABLE_WHILE_QUEUED: Duration = Duration::from_secs(300);

/// Runs nodes as the tasks of Slurm job arrays (`cloud_provider: slurm`, settings in
/// `instance_config.slurm`). See the module documentation for how.
///
/// The daemon must run where `sbatch`, `squeue` and `scancel` work (a login node), and
/// `work_dir` must be shared with the compute nodes, at the same path.
///
/// ```no_run
/// # fn demo() {
/// let slurm = taskfly::SlurmProvider::new("/home/me/.taskfly/work/slurm").owner("daemon-1");
/// let config = taskfly::Config::new("/home/me/.taskfly")
///     .advertise_url("http://login1:8080")
///     .provider(std::sync::Arc::new(slurm));
/// # let _ = config; }
/// ```
pub struct SlurmProvider {
    work_dir: PathBuf,
    owner: Option<String>,
    grace_period: Duration,
    gather_window: Duration,
    poll_interval: Duration,
    bin_dir: Option<PathBuf>,
    shared: Arc<Shared>,
}

/// What the provider's calls share.
#[derive(Default)]
struct Shared {
    /// Requests being gathered, by deployment.
    gathering: Mutex<HashMap<String, Gathering>>,
    /// The last `squeue` answer per client folder, refreshed by one caller at a time.
    queue: tokio::sync::Mutex<HashMap<Option<PathBuf>, Snapshot>>,
    /// Why each node still waits in the queue, by node id.
    waiting: Mutex<HashMap<String, String>>,
    /// Tasks waiting to be cancelled together, by client folder.
    cancelling: Mutex<HashMap<Option<PathBuf>, Cancelling>>,
    /// Makes submission folder names unique within this process.
    batches: AtomicU64,
}

/// Tasks (`<job>_<index>`) waiting to be cancelled by one `scancel`.
struct Cancelling {
    first: Instant,
    last: Instant,
    members: Vec<(String, oneshot::Sender<Result<(), ProviderError>>)>,
}

/// The requests of one deployment waiting to be submitted together.
struct Gathering {
    first: Instant,
    last: Instant,
    members: Vec<Member>,
}

/// One node's request in a batch.
struct Member {
    index: u32,
    node_id: String,
    bootstrap: String,
    submitted: oneshot::Sender<Result<Submitted, ProviderError>>,
}

/// Where a submitted node's task is.
#[derive(Debug, Clone)]
struct Submitted {
    job_id: String,
    batch: String,
}

/// What `squeue` said (or how it failed: the nodes waiting meanwhile share the failure, not
/// one call each), and when.
struct Snapshot {
    taken: Instant,
    tasks: Result<Arc<Vec<QueuedTask>>, ProviderError>,
}

/// Where an instance is: what the engine stores as its locator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Locator {
    job_id: String,
    task: u32,
    deployment_id: String,
    node_id: String,
    batch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bin_dir: Option<PathBuf>,
}

impl fmt::Debug for SlurmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlurmProvider")
            .field("work_dir", &self.work_dir)
            .field("owner", &self.owner)
            .field("grace_period", &self.grace_period)
            .field("bin_dir", &self.bin_dir)
            .finish_non_exhaustive()
    }
}

impl SlurmProvider {
    /// A provider keeping its submission folders under `work_dir`, which the compute nodes
    /// must see at the same path.
    pub fn new(work_dir: impl Into<PathBuf>) -> SlurmProvider {
        SlurmProvider {
            work_dir: work_dir.into(),
            owner: None,
            grace_period: DEFAULT_GRACE_PERIOD,
            gather_window: DEFAULT_GATHER_WINDOW,
            poll_interval: DEFAULT_POLL_INTERVAL,
            bin_dir: None,
            shared: Arc::new(Shared::default()),
        }
    }

    /// Tag every job with this owner id, and let the leak checks consider only jobs with
    /// it: two daemons submitting as one user must each have an owner of their own, or each
    /// would cancel the other's jobs. Without one, the leak checks take every TaskFly job of
    /// the user.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> SlurmProvider {
        self.owner = Some(owner.into());
        self
    }

    /// How long a node's script gets between SIGTERM and SIGKILL when it is stopped (5 s
    /// unless set). Slurm's `KillWait` must be longer, or Slurm kills first.
    #[must_use]
    pub fn grace_period(mut self, grace_period: Duration) -> SlurmProvider {
        self.grace_period = grace_period;
        self
    }

    /// How long the requests of one deployment are gathered into one array after the last
    /// one came (300 ms unless set).
    #[must_use]
    pub fn gather_window(mut self, window: Duration) -> SlurmProvider {
        self.gather_window = window;
        self
    }

    /// How often `squeue` is asked about nodes waiting in the queue (every second unless
    /// set).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> SlurmProvider {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The folder of `squeue` and `scancel` for the leak checks, when they are not on `PATH`
    /// (a deployment's `instance_config.slurm.bin_dir` serves its own jobs).
    #[must_use]
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> SlurmProvider {
        self.bin_dir = Some(dir.into());
        self
    }

    /// The comment tagging a job of `deployment_id` submitted as `batch`.
    fn comment(&self, deployment_id: &str, batch: &str, node_id: Option<&str>) -> String {
        let mut comment = format!(
            "{COMMENT_PREFIX}owner={};deployment={deployment_id};batch={batch}",
            self.owner.as_deref().unwrap_or("")
        );
        if let Some(node_id) = node_id {
            comment.push_str(";node=");
            comment.push_str(node_id);
        }
        comment
    }

    /// Gathers `member` with the other first-attempt requests of its deployment, or submits
    /// it alone (a retry), and answers where its task is.
    async fn submit(
        &self,
        deployment_id: &str,
        slurm: &SlurmConfig,
        member: Member,
        alone: bool,
        receiver: oneshot::Receiver<Result<Submitted, ProviderError>>,
    ) -> Result<Submitted, BoxError> {
        if alone {
            self.submit_batch(deployment_id, slurm, vec![member]).await;
        } else {
            let leader = {
                let mut gathering = lock(&self.shared.gathering);
                let now = Instant::now();
                match gathering.get_mut(deployment_id) {
                    Some(batch) => {
                        batch.last = now;
                        batch.members.push(member);
                        false
                    }
                    None => {
                        gathering.insert(
                            deployment_id.to_owned(),
                            Gathering {
                                first: now,
                                last: now,
                                members: vec![member],
                            },
                        );
                        true
                    }
                }
            };
            if leader {
                // Dropped (the engine stops), the guard withdraws the batch: every waiting
                // request then ends with an error, and nothing was submitted.
                let guard = WithdrawOnDrop {
                    shared: &self.shared,
                    deployment_id,
                };
                loop {
                    let (first, last) = {
                        let gathering = lock(&self.shared.gathering);
                        match gathering.get(deployment_id) {
                            Some(batch) => (batch.first, batch.last),
                            None => break,
                        }
                    };
                    let due = (last + self.gather_window).min(first + MAX_GATHER);
                    if Instant::now() >= due {
                        break;
                    }
                    tokio::time::sleep_until(due).await;
                }
                std::mem::forget(guard);
                let members = lock(&self.shared.gathering)
                    .remove(deployment_id)
                    .map(|batch| batch.members)
                    .unwrap_or_default();
                self.submit_batch(deployment_id, slurm, members).await;
            }
        }
        match receiver.await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(Error::shutting_down("the Slurm submission was withdrawn").into()),
        }
    }

    /// Submits `members` as one array and tells each the outcome.
    async fn submit_batch(&self, deployment_id: &str, slurm: &SlurmConfig, members: Vec<Member>) {
        if members.is_empty() {
            return;
        }
        let batch = format!(
            "{deployment_id}-{}-{}",
            std::process::id(),
            self.shared.batches.fetch_add(1, Ordering::Relaxed)
        );
        let result = self
            .submit_array(deployment_id, slurm, &batch, &members)
            .await;
        if result.is_err() {
            self.remove_batch_folder(&batch).await;
        }
        if let Ok(job_id) = &result {
            tracing::info!(deployment_id, job_id = %job_id, tasks = members.len(), "submitted a Slurm job array");
        }
        for member in members {
            let answer = match &result {
                Ok(job_id) => Ok(Submitted {
                    job_id: job_id.clone(),
                    batch: batch.clone(),
                }),
                Err(error) => Err(error.clone()),
            };
            let _ = member.submitted.send(answer);
        }
    }

    /// Writes the batch's folder and runs `sbatch`; the array's job id.
    async fn submit_array(
        &self,
        deployment_id: &str,
        slurm: &SlurmConfig,
        batch: &str,
        members: &[Member],
    ) -> Result<String, ProviderError> {
        let folder = self.work_dir.join(batch);
        let files: Vec<(u32, String, String)> = members
            .iter()
            .map(|m| (m.index, m.node_id.clone(), m.bootstrap.clone()))
            .collect();
        let written = {
            let folder = folder.clone();
            tokio::task::spawn_blocking(move || write_batch_folder(&folder, &files))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        written.map_err(|e| ProviderError {
            code: "SlurmWorkDir".to_owned(),
            message: format!(
                "cannot write the node bootstraps to {}: {e}",
                folder.display()
            ),
            retryable: false,
        })?;
        let indexes: Vec<u32> = members.iter().map(|m| m.index).collect();
        let mut array = array_spec(&indexes);
        if let Some(parallel) = slurm.max_parallel.filter(|_| members.len() > 1) {
            array.push_str(&format!("%{parallel}"));
        }
        let single = match members {
            [only] => Some(only.node_id.as_str()),
            _ => None,
        };
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--array={array}"),
            format!("--job-name=taskfly-{deployment_id}"),
            format!("--comment={}", self.comment(deployment_id, batch, single)),
            format!("--output={}/%a.log", folder.display()),
            format!("--chdir={}", folder.display()),
            // With the environment sbatch runs in (commands::Environment::Job).
            "--export=ALL".to_owned(),
            "--no-requeue".to_owned(),
            "--ntasks=1".to_owned(),
        ];
        let options = [
            ("partition", &slurm.partition),
            ("account", &slurm.account),
            ("qos", &slurm.qos),
            ("time", &slurm.time_limit),
            ("mem", &slurm.mem),
            ("gres", &slurm.gres),
            ("constraint", &slurm.constraint),
        ];
        for (name, value) in options {
            if let Some(value) = value {
                args.push(format!("--{name}={value}"));
            }
        }
        if let Some(cpus) = slurm.cpus_per_node {
            args.push(format!("--cpus-per-task={cpus}"));
        }
        args.extend(slurm.extra_args.iter().cloned());
        let script = TASK_SCRIPT
            .replacen("@GRACE_MS@", &self.grace_period.as_millis().to_string(), 1)
            .replacen("@DIR@", &sh_quote(&folder.display().to_string()), 1);
        let output = commands::run(
            slurm.bin_dir.as_deref(),
            "sbatch",
            &args,
            Some(script.as_bytes()),
            Environment::Job,
        )
        .await
        .map_err(as_provider_error)?;
        if !output.success() {
            return Err(failure("sbatch", &output));
        }
        let job_id = parse_job_id(&output.stdout).ok_or_else(|| ProviderError {
            code: "SlurmRefused".to_owned(),
            message: format!(
                "sbatch gave no job id: {:?}",
                output.stdout.trim().chars().take(200).collect::<String>()
            ),
            retryable: false,
        })?;
        // Recorded for the leak checks' clean-up of old folders; the job runs without it.
        if let Err(e) = tokio::fs::write(folder.join(JOB_FILE), &job_id).await {
            tracing::warn!(folder = %folder.display(), error = %e, "cannot record a Slurm job id");
        }
        Ok(job_id)
    }

    /// Waits until task `task` of `job_id` has left the queue, noting why it waits meanwhile;
    /// gives up (cancelling the task) after `queue_timeout`.
    async fn wait_in_queue(
        &self,
        locator: &Locator,
        node_id: &str,
        queue_timeout: Option<Duration>,
    ) -> Result<(), BoxError> {
        let started = Instant::now();
        let mut guard = CancelOnDrop {
            provider: self,
            locator: Some(locator.clone()),
            node_id,
        };
        // Since when squeue has failed as it does while the controller is down, if it does:
        // the task is still Slurm's, so the node waits for the controller (as for throttling)
        // rather than fail, and cancel a task that may be running already.
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let tasks = match self.queue(locator.bin_dir.as_deref()).await {
                Ok(tasks) => {
                    unreachable_since = None;
                    tasks
                }
                Err(error) if error.retryable => {
                    let since = *unreachable_since.get_or_insert_with(|| {
                        tracing::warn!(job_id = %locator.job_id, task = locator.task, error = %error, "the Slurm controller cannot be reached; asking again");
                        Instant::now()
                    });
                    if since.elapsed() >= UNREACHABLE_WHILE_QUEUED {
                        // The guard cancels the task.
                        return Err(ProviderError {
                            retryable: false,
                            message: format!(
                                "{} (for more than {} while task {}_{} was waiting to start)",
                                error.message,
                                humantime::format_duration(UNREACHABLE_WHILE_QUEUED),
                                locator.job_id,
                                locator.task
                            ),
                            ..error
                        }
                        .into());
                    }
                    tokio::time::sleep(self.poll_interval).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let pending = tasks
                .iter()
                .find(|t| t.job_id == locator.job_id && t.task == locator.task)
                .filter(|t| t.is_pending());
            let Some(pending) = pending else {
                guard.locator = None;
                lock(&self.shared.waiting).remove(node_id);
                return Ok(());
            };
            let reason = pending.reason.clone().unwrap_or_else(|| "None".to_owned());
            lock(&self.shared.waiting).insert(node_id.to_owned(), reason.clone());
            if let Some(why) = never_starts(&reason) {
                // The guard cancels the task.
                return Err(ProviderError {
                    code: "SlurmWillNotStart".to_owned(),
                    message: format!(
                        "Slurm will not start task {}_{}: {reason} ({why})",
                        locator.job_id, locator.task
                    ),
                    retryable: false,
                }
                .into());
            }
            if let Some(limit) = queue_timeout {
                if started.elapsed() >= limit {
                    // The guard cancels the task.
                    return Err(ProviderError {
                        code: "SlurmQueueTimeout".to_owned(),
                        message: format!(
                            "task {}_{} waited in Slurm's queue for more than {} \
                             (instance_config.slurm.queue_timeout); Slurm's reason: {reason}",
                            locator.job_id,
                            locator.task,
                            humantime::format_duration(limit)
                        ),
                        retryable: false,
                    }
                    .into());
                }
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// The tasks `squeue` lists for this user (or how it failed), at most `poll_interval` old:
    /// one caller asks, the others wait for its answer.
    async fn queue(&self, bin_dir: Option<&Path>) -> Result<Arc<Vec<QueuedTask>>, ProviderError> {
        let mut snapshots = self.shared.queue.lock().await;
        let key = bin_dir.map(Path::to_path_buf);
        if let Some(snapshot) = snapshots.get(&key) {
            if snapshot.taken.elapsed() < self.poll_interval {
                return snapshot.tasks.clone();
            }
        }
        let args = vec![
            "--me".to_owned(),
            "--array".to_owned(),
            "--noheader".to_owned(),
            format!("--format={}", commands::SQUEUE_FORMAT),
        ];
        let tasks = match commands::run(bin_dir, "squeue", &args, None, Environment::Daemon).await {
            Ok(output) if output.success() => Ok(Arc::new(parse_squeue(&output.stdout))),
            Ok(output) => Err(failure("squeue", &output)),
            Err(error) => Err(as_provider_error(error)),
        };
        snapshots.insert(
            key,
            Snapshot {
                taken: Instant::now(),
                tasks: tasks.clone(),
            },
        );
        tasks
    }

    /// `scancel` of one task; a task Slurm no longer knows is fine. Tasks cancelled together
    /// (a deployment taken `down`) share one `scancel` call: the first request waits until
    /// none has come for [`CANCEL_WINDOW`], then cancels them all.
    async fn cancel(
        &self,
        job_id: &str,
        task: u32,
        bin_dir: Option<&Path>,
    ) -> Result<(), BoxError> {
        let (sender, receiver) = oneshot::channel();
        let key = bin_dir.map(Path::to_path_buf);
        let leader = {
            let mut cancelling = lock(&self.shared.cancelling);
            let now = Instant::now();
            let batch = cancelling.entry(key.clone()).or_insert_with(|| Cancelling {
                first: now,
                last: now,
                members: Vec::new(),
            });
            batch.last = now;
            batch.members.push((format!("{job_id}_{task}"), sender));
            batch.members.len() == 1
        };
        if leader {
            // Dropped, the guard withdraws the batch: every waiting request then ends with an
            // error, and nothing was cancelled.
            let guard = WithdrawCancelsOnDrop {
                shared: &self.shared,
                key: &key,
            };
            loop {
                let (first, last) = {
                    let cancelling = lock(&self.shared.cancelling);
                    match cancelling.get(&key) {
                        Some(batch) => (batch.first, batch.last),
                        None => break,
                    }
                };
                let due = (last + CANCEL_WINDOW).min(first + MAX_CANCEL_GATHER);
                if Instant::now() >= due {
                    break;
                }
                tokio::time::sleep_until(due).await;
            }
            std::mem::forget(guard);
            let mut members = lock(&self.shared.cancelling)
                .remove(&key)
                .map(|batch| batch.members)
                .unwrap_or_default();
            while !members.is_empty() {
                let chunk: Vec<_> = members.drain(..members.len().min(CANCEL_CHUNK)).collect();
                let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
                let answers = scancel(bin_dir, &ids).await;
                for ((_, sender), answer) in chunk.into_iter().zip(answers) {
                    let _ = sender.send(answer);
                }
            }
        }
        match receiver.await {
            Ok(answer) => answer.map_err(Into::into),
            Err(_) => Err(Error::shutting_down("the Slurm cancellation was withdrawn").into()),
        }
    }

    /// Whether the comment is one of this provider's: `taskfly:owner=<ours>;…` (any owner
    /// when this provider has none). Returns the comment's fields.
    fn own_comment<'c>(&self, comment: &'c str) -> Option<HashMap<&'c str, &'c str>> {
        let fields: HashMap<&str, &str> = comment
            .strip_prefix(COMMENT_PREFIX)?
            .split(';')
            .filter_map(|field| field.split_once('='))
            .collect();
        match &self.owner {
            Some(owner) if fields.get("owner") != Some(&owner.as_str()) => None,
            _ => Some(fields),
        }
    }

    /// The node ids of a batch's tasks, from its folder (empty when it is gone).
    async fn batch_nodes(&self, batch: &str) -> HashMap<u32, String> {
        if !is_plain_word(batch) {
            return HashMap::new();
        }
        let text = tokio::fs::read_to_string(self.work_dir.join(batch).join(NODES_FILE))
            .await
            .unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (index, node_id) = line.split_once(' ')?;
                Some((index.parse().ok()?, node_id.to_owned()))
            })
            .collect()
    }

    /// Whether `work_dir` holds any submission folder.
    async fn has_batch_folders(&self) -> bool {
        match tokio::fs::read_dir(&self.work_dir).await {
            Ok(mut entries) => matches!(entries.next_entry().await, Ok(Some(_))),
            Err(_) => false,
        }
    }

    async fn remove_batch_folder(&self, batch: &str) {
        if !is_plain_word(batch) {
            return;
        }
        let folder = self.work_dir.join(batch);
        if let Err(e) = tokio::fs::remove_dir_all(&folder).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot remove a Slurm submission folder");
            }
        }
    }

    /// Removes the submission folders of jobs Slurm no longer lists (and those of
    /// submissions that never got a job), keeping those of `listed` jobs.
    async fn remove_old_folders(&self, listed: &[QueuedTask]) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.work_dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(batch) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let folder = entry.path();
            let job_file = folder.join(JOB_FILE);
            // A job submitted after `listed` was taken is not in it: only files older than
            // that can tell a job that is gone.
            let (path, age) = match tokio::fs::read_to_string(&job_file).await {
                Ok(job_id) if listed.iter().any(|t| t.job_id == job_id.trim()) => continue,
                Ok(_) => (job_file, GONE_JOB_FOLDER),
                Err(_) => (folder.clone(), STALE_FOLDER),
            };
            let remove = tokio::fs::metadata(&path)
                .await
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|elapsed| elapsed > age);
            if remove {
                self.remove_batch_folder(&batch).await;
            }
        }
    }
}

#[async_trait]
impl Provider for SlurmProvider {
    fn name(&self) -> &str {
        "slurm"
    }

    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        _owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        let slurm = slurm_settings(settings)?;
        Ok(InstanceKind::new(format!(
            "slurm partition={} account={} qos={} cpus={} mem={} gres={} constraint={}",
            slurm.partition.as_deref().unwrap_or("default"),
            slurm.account.as_deref().unwrap_or("default"),
            slurm.qos.as_deref().unwrap_or("default"),
            slurm.cpus_per_node.unwrap_or(1),
            slurm.mem.as_deref().unwrap_or("default"),
            slurm.gres.as_deref().unwrap_or("none"),
            slurm.constraint.as_deref().unwrap_or("none"),
        )))
    }

    fn gathers_provisions(&self) -> bool {
        true
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let Owner::Node {
            deployment_id,
            node_id,
            node_index,
            attempt,
        } = &spec.owner
        else {
            return Err(Error::invalid_input(
                "the slurm provider runs nodes of deployments only; it cannot be pooled",
            )
            .into());
        };
        if !is_plain_word(deployment_id) || !is_plain_word(node_id) {
            return Err(Error::invalid_input(format!(
                "deployment id {deployment_id:?} or node id {node_id:?} cannot name a Slurm job"
            ))
            .into());
        }
        let slurm = slurm_settings(&spec.settings)?;
        let bootstrap = bootstrap::bootstrap_script(
            &spec.daemon_url,
            spec.provision_token.expose(),
            spec.ca_pem.as_deref(),
        )?;
        let (sender, receiver) = oneshot::channel();
        let member = Member {
            index: *node_index,
            node_id: node_id.clone(),
            bootstrap,
            submitted: sender,
        };
        let submitted = self
            .submit(deployment_id, &slurm, member, *attempt > 1, receiver)
            .await;
        let submitted = match submitted {
            Ok(submitted) => submitted,
            Err(e) => {
                lock(&self.shared.waiting).remove(node_id);
                return Err(e);
            }
        };
        let locator = Locator {
            job_id: submitted.job_id,
            task: *node_index,
            deployment_id: deployment_id.clone(),
            node_id: node_id.clone(),
            batch: submitted.batch,
            bin_dir: slurm.bin_dir.clone(),
        };
        let waited = self
            .wait_in_queue(&locator, node_id, slurm.queue_timeout)
            .await;
        lock(&self.shared.waiting).remove(node_id);
        waited?;
        let text = serde_json::to_string(&locator)
            .map_err(|e| Error::io("cannot encode a Slurm instance locator", e.into()))?;
        Ok(Instance {
            reference: InstanceRef {
                id: format!("{}_{}", locator.job_id, locator.task),
                locator: text,
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        let locator: Locator = serde_json::from_str(&instance.locator).map_err(|e| {
            Error::invalid_input(format!("{} has an invalid Slurm locator: {e}", instance.id))
        })?;
        self.cancel(&locator.job_id, locator.task, locator.bin_dir.as_deref())
            .await?;
        tracing::debug!(instance_id = %instance.id, "cancelled a Slurm task");
        Ok(())
    }

    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        // Every job is submitted from a folder of its own, removed only once Slurm no longer
        // lists the job: with none, there is nothing to look for, and a daemon that never ran
        // a Slurm deployment (or has no Slurm client) never calls squeue.
        if !self.has_batch_folders().await {
            return Ok(Vec::new());
        }
        // Fresh: a leak check must not judge by an answer older than the engine's own state.
        let args = vec![
            "--me".to_owned(),
            "--array".to_owned(),
            "--noheader".to_owned(),
            format!("--format={}", commands::SQUEUE_FORMAT),
        ];
        let output = commands::run(
            self.bin_dir.as_deref(),
            "squeue",
            &args,
            None,
            Environment::Daemon,
        )
        .await?;
        if !output.success() {
            return Err(failure("squeue", &output).into());
        }
        let tasks = parse_squeue(&output.stdout);
        let mut owned = Vec::new();
        let mut nodes_of: HashMap<String, HashMap<u32, String>> = HashMap::new();
        for task in &tasks {
            let Some(fields) = self.own_comment(&task.comment) else {
                continue;
            };
            let (Some(deployment_id), Some(batch)) =
                (fields.get("deployment"), fields.get("batch"))
            else {
                continue;
            };
            if !nodes_of.contains_key(*batch) {
                let nodes = self.batch_nodes(batch).await;
                nodes_of.insert((*batch).to_owned(), nodes);
            }
            let node_id = fields.get("node").map(|n| (*n).to_owned()).or_else(|| {
                nodes_of
                    .get(*batch)
                    .and_then(|n| n.get(&task.task).cloned())
            });
            let locator = Locator {
                job_id: task.job_id.clone(),
                task: task.task,
                deployment_id: (*deployment_id).to_owned(),
                node_id: node_id.clone().unwrap_or_default(),
                batch: (*batch).to_owned(),
                bin_dir: self.bin_dir.clone(),
            };
            let text = serde_json::to_string(&locator)
                .map_err(|e| Error::io("cannot encode a Slurm instance locator", e.into()))?;
            owned.push(OwnedInstance {
                instance: InstanceRef {
                    id: format!("{}_{}", task.job_id, task.task),
                    locator: text,
                },
                owner: OwnedBy::Deployment {
                    deployment_id: (*deployment_id).to_owned(),
                    node_id,
                },
                state: match task.state.as_str() {
                    "PENDING" | "CONFIGURING" => InstanceState::Pending,
                    "COMPLETING" => InstanceState::ShuttingDown,
                    _ => InstanceState::Running,
                },
            });
        }
        self.remove_old_folders(&tasks).await;
        Ok(owned)
    }

    fn queue_reason(&self, node_id: &str) -> Option<String> {
        lock(&self.shared.waiting).get(node_id).cloned()
    }
}

/// Withdraws a deployment's gathered requests when the leader's future is dropped.
struct WithdrawOnDrop<'a> {
    shared: &'a Shared,
    deployment_id: &'a str,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        lock(&self.shared.gathering).remove(self.deployment_id);
    }
}

/// Withdraws the cancellations gathered under `key` when the leader's future is dropped.
struct WithdrawCancelsOnDrop<'a> {
    shared: &'a Shared,
    key: &'a Option<PathBuf>,
}

impl Drop for WithdrawCancelsOnDrop<'_> {
    fn drop(&mut self) {
        lock(&self.shared.cancelling).remove(self.key);
    }
}

/// Runs one `scancel` for `ids`; the answer for each.
async fn scancel(bin_dir: Option<&Path>, ids: &[String]) -> Vec<Result<(), ProviderError>> {
    match commands::run(bin_dir, "scancel", ids, None, Environment::Daemon).await {
        Ok(output) => commands::scancel_answers(ids, &output),
        Err(error) => {
            let error = as_provider_error(error);
            ids.iter().map(|_| Err(error.clone())).collect()
        }
    }
}

/// Cancels a task still waiting in the queue when the `provision` future waiting for it is
/// dropped (the engine stops): a task no node row records must not start later.
struct CancelOnDrop<'a> {
    provider: &'a SlurmProvider,
    locator: Option<Locator>,
    node_id: &'a str,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        lock(&self.provider.shared.waiting).remove(self.node_id);
        let Some(locator) = self.locator.take() else {
            return;
        };
        let program = match &locator.bin_dir {
            Some(dir) => dir.join("scancel"),
            None => PathBuf::from("scancel"),
        };
        // Not awaited: a drop cannot wait. tokio reaps the finished child.
        let spawned = tokio::process::Command::new(program)
            .arg(format!("{}_{}", locator.job_id, locator.task))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!(job_id = %locator.job_id, task = locator.task, error = %e, "cannot cancel a Slurm task no node waits for");
        }
    }
}

/// Makes the submission folder (0700): each member's bootstrap as `<index>.sh` (0600) and
/// the `nodes` file.
fn write_batch_folder(folder: &Path, files: &[(u32, String, String)]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)?;
    let mut nodes = String::new();
    for (index, node_id, bootstrap) in files {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(folder.join(format!("{index}.sh")))?;
        file.write_all(bootstrap.as_bytes())?;
        nodes.push_str(&format!("{index} {node_id}\n"));
    }
    std::fs::write(folder.join(NODES_FILE), nodes)
}

/// A failure of running a command as a provider error (a timeout already is one).
fn as_provider_error(error: BoxError) -> ProviderError {
    match error.downcast::<ProviderError>() {
        Ok(error) => *error,
        Err(error) => ProviderError {
            code: "SlurmClient".to_owned(),
            message: crate::error::Report::new(error.as_ref()).to_string(),
            retryable: false,
        },
    }
}

/// Why a task pending for `reason` never starts unless someone changes the job or the
/// cluster: Slurm accepts such jobs (unless the cluster sets `EnforcePartLimits`) and keeps
/// them queued, so the node fails now, with Slurm's reason, rather than wait for ever.
fn never_starts(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "PartitionTimeLimit" => {
            "the time limit is over the partition's; lower instance_config.slurm.time_limit"
        }
        "PartitionNodeLimit" => "the job asks for more nodes than the partition allows",
        "PartitionConfig" => {
            "the job asks for more than the partition allows (time limit, CPUs, memory or nodes)"
        }
        "InvalidAccount" => "the account is not valid; check instance_config.slurm.account",
        "InvalidQOS" => "the QOS is not valid; check instance_config.slurm.qos",
        "BadConstraints" => "no node satisfies the constraints",
        "QOSMaxWallDurationPerJobLimit" => "the time limit is over the QOS's",
        "DependencyNeverSatisfied" => "its --dependency can never be satisfied",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
