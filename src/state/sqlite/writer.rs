//! The thread that owns [`super::SqliteStore`]'s connection: every call is a [`Job`] it runs,
//! and the node updates and log appends that arrive together are written in one transaction
//! (group commit), each caller answered only once that transaction has committed.
//!
//! One thread instead of a hand-off to tokio's blocking pool per call: under load, each call
//! then costs a channel message and a wake-up instead of a pool thread that blocks on the
//! connection's lock behind all the others, and writes queued while a batch is written form
//! the next batch, so one commit (one write-ahead-log append) serves many callers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::{Connection, TransactionBehavior};

use super::memory::Pending;
use super::{DbError, Shared};
use crate::error::{Error, Result};

/// Most jobs taken from the queue at once: bounds a batch's transaction, and how long a read
/// queued behind it waits.
const MAX_JOBS_AT_ONCE: usize = 512;

/// A call that runs on its own: a read, or a write in a transaction of its own. It answers its
/// caller itself.
pub(super) type AloneJob = Box<dyn FnOnce(&Shared, &mut Connection) + Send>;

/// One call of the store, run on the writer thread.
pub(super) enum Job {
    /// Runs on its own.
    Alone(AloneJob),
    /// Written together with the other batched writes queued with it.
    Batched(Box<dyn BatchedWrite>),
}

/// A write that can share its transaction with others: [`BatchedWrite::write`] runs inside a
/// savepoint of its own, so one that fails changes nothing and the others go on.
pub(super) trait BatchedWrite: Send {
    /// Makes the change with `conn`, inside a transaction that is committed afterwards, and
    /// records the nodes and deployments it wrote in `pending` (the later writes of the
    /// transaction read them from there; the store's memory takes them once it has
    /// committed). May be called again (in a transaction of its own) if that transaction
    /// could not commit.
    fn write(
        &mut self,
        shared: &Shared,
        conn: &Connection,
        pending: &mut Pending,
    ) -> Result<(), DbError>;

    /// Answers the caller: `Ok` once the transaction holding the write has committed, or the
    /// error that refused it (then nothing of it was written).
    fn answer(self: Box<Self>, outcome: Result<(), DbError>);
}

/// A [`BatchedWrite`] made of a function: `write` computes and writes the change and returns
/// the caller's answer, which is held until the commit.
pub(super) struct Write<T, F> {
    pub(super) write: F,
    pub(super) answer: tokio::sync::oneshot::Sender<Result<T>>,
    pub(super) written: Option<T>,
}

impl<T, F> BatchedWrite for Write<T, F>
where
    T: Send,
    F: FnMut(&Shared, &Connection, &mut Pending) -> Result<T, DbError> + Send,
{
    fn write(
        &mut self,
        shared: &Shared,
        conn: &Connection,
        pending: &mut Pending,
    ) -> Result<(), DbError> {
        self.written = Some((self.write)(shared, conn, pending)?);
        Ok(())
    }

    fn answer(self: Box<Self>, outcome: Result<(), DbError>) {
        let this = *self;
        let answer = match (outcome, this.written) {
            (Ok(()), Some(written)) => Ok(written),
            (Err(error), _) => Err(error.into_error()),
            (Ok(()), None) => Err(Error::store(
                "the state store lost a write's answer",
                super::BadData("a write committed without being made".to_owned()),
            )),
        };
        // A caller that stopped waiting no longer needs its answer; its write stands.
        let _ = this.answer.send(answer);
    }
}

/// The store's handle on its writer thread. Dropping it lets the thread finish the jobs
/// already queued, save the heartbeats the file does not have yet, close the database, and
/// waits for all of that.
pub(super) struct WriterHandle {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl WriterHandle {
    /// Starts the writer thread with the connection.
    pub(super) fn start(shared: Arc<Shared>, conn: Connection) -> crate::Result<WriterHandle> {
        let (jobs, queue) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("taskfly-sqlite".to_owned())
            .spawn(move || run(&shared, conn, &queue))
            .map_err(|e| Error::io("cannot start the state store's writer thread", e))?;
        Ok(WriterHandle {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues `job`; an error if the writer thread has stopped.
    pub(super) fn send(&self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(stopped)
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            // The thread has caught every panic of a job; one while saving the heartbeats is
            // already logged as such by the panic hook.
            let _ = thread.join();
        }
    }
}

/// The error of a call the writer thread did not answer.
pub(super) fn stopped() -> Error {
    Error::store(
        "the state store's writer stopped before answering",
        super::BadData("its thread ended (a panic while running a call)".to_owned()),
    )
}

/// The writer thread: takes every job queued, writes the batched ones together, runs the
/// others one by one, until the store is dropped.
fn run(shared: &Shared, mut conn: Connection, queue: &Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::new();
        let mut alone = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Alone(job) => alone.push(job),
                Job::Batched(write) => batch.push(write),
            }
            if batch.len() + alone.len() < MAX_JOBS_AT_ONCE {
                // Empty or disconnected: what is queued is taken.
                next = queue.try_recv().ok();
            }
        }
        // A panic fails the calls it interrupted (their answers are dropped, so they get an
        // error) and rolls back their transaction; the thread goes on with the next jobs.
        if !batch.is_empty() {
            let written = catch_unwind(AssertUnwindSafe(|| write_batch(shared, &mut conn, batch)));
            if written.is_err() {
                tracing::error!("the state store's writer panicked while writing a batch");
            }
        }
        for job in alone {
            if catch_unwind(AssertUnwindSafe(|| job(shared, &mut conn))).is_err() {
                tracing::error!("the state store's writer panicked while running a call");
            }
        }
    }
    shared.save_heartbeats(&mut conn);
}

/// Writes `batch` in one transaction and answers each caller once it has committed. If the
/// transaction as a whole cannot begin or commit, each write is tried again in a transaction
/// of its own, so each caller gets its own answer.
fn write_batch(shared: &Shared, conn: &mut Connection, mut batch: Vec<Box<dyn BatchedWrite>>) {
    match write_together(shared, conn, &mut batch) {
        Ok(outcomes) => {
            for (write, outcome) in batch.into_iter().zip(outcomes) {
                write.answer(outcome);
            }
        }
        Err(error) if batch.len() > 1 => {
            tracing::warn!(%error, writes = batch.len(), "could not commit state writes together; writing them one by one");
            for mut write in batch {
                let outcome = write_together(shared, conn, std::slice::from_mut(&mut write))
                    .map_err(DbError::from)
                    .and_then(|mut outcomes| outcomes.pop().unwrap_or(Ok(())));
                write.answer(outcome);
            }
        }
        Err(error) => {
            // The batch held one write.
            if let Some(write) = batch.pop() {
                write.answer(Err(DbError::from(error)));
            }
        }
    }
}

/// Runs every write of `batch` in one IMMEDIATE transaction, each in a savepoint, commits, and
/// has the store's memory take what they wrote: the outcome of each write, or the error that
/// kept the transaction from committing (then none of them is written).
fn write_together(
    shared: &Shared,
    conn: &mut Connection,
    batch: &mut [Box<dyn BatchedWrite>],
) -> rusqlite::Result<Vec<Result<(), DbError>>> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut pending = Pending::default();
    for write in batch.iter_mut() {
        let savepoint = tx.savepoint()?;
        let outcome = write.write(shared, &savepoint, &mut pending);
        if outcome.is_ok() {
            savepoint.commit()?;
        } else {
            // Rolls back whatever the write changed before it failed.
            savepoint.finish()?;
        }
        outcomes.push(outcome);
    }
    tx.commit()?;
    shared.memory().committed(pending);
    shared.count_commit();
    Ok(outcomes)
}
