//! The thread that owns [`super::SqliteStore`]'s connection: every call is a [`Job`] it runs,
//! and the node updates and log appends that arrive together are written in one transaction
//! (group commit), each caller answered only once that transaction has committed.
//!
//! One thread instead of a hand-off to tokio's blocking pool per call: under load, each call
//! then costs a channel message and a wake-up instead of a pool thread that blocks on the
//! connection's lock behind all the others, and writes queued while a batch is written join
//! it before its commit, so one commit (one write-ahead-log append) serves many callers.

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

/// A write that can share its transaction with others. One that fails without having changed
/// a row is left out and the others go on; one that fails after changing rows (or with an
/// error of SQLite's) has its transaction rolled back, and the writes of that transaction are
/// then made again, each in a transaction of its own, so it changes nothing and the others go
/// on all the same. This costs less than a savepoint per write, which copied every page a
/// write touched into a sub-journal (BENCHMARKS.md, "SQLite (session 8)"), and the writes
/// check what they can before changing anything, so a refused write costs nothing more.
pub(super) trait BatchedWrite: Send {
    /// Makes the change with `conn`, inside a transaction that is committed afterwards, and
    /// records the nodes and deployments it wrote in `pending`, only if it succeeds (the later
    /// writes of the transaction read them from there; the deployments' rows are written from
    /// there once for the whole transaction; the store's memory takes them once it has
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

    /// A sender of jobs, for tests that queue a job while the writer runs another.
    #[cfg(test)]
    pub(super) fn sender(&self) -> Sender<Job> {
        self.jobs.clone().expect("the writer is running")
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

/// The jobs the writer took from its queue in one round: the batched writes, written
/// together, and the others, run one by one afterwards.
struct Taken {
    batch: Vec<Box<dyn BatchedWrite>>,
    alone: Vec<AloneJob>,
}

impl Taken {
    /// Takes what is queued, up to [`MAX_JOBS_AT_ONCE`] jobs in all.
    fn take_queued(&mut self, queue: &Receiver<Job>) {
        while self.batch.len() + self.alone.len() < MAX_JOBS_AT_ONCE {
            // Empty or disconnected: what is queued is taken.
            let Ok(job) = queue.try_recv() else {
                return;
            };
            match job {
                Job::Alone(job) => self.alone.push(job),
                Job::Batched(write) => self.batch.push(write),
            }
        }
    }
}

/// The writer thread: takes every job queued, writes the batched ones together, runs the
/// others one by one, until the store is dropped.
fn run(shared: &Shared, mut conn: Connection, queue: &Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut taken = Taken {
            batch: Vec::new(),
            alone: Vec::new(),
        };
        match first {
            Job::Alone(job) => taken.alone.push(job),
            Job::Batched(write) => taken.batch.push(write),
        }
        taken.take_queued(queue);
        // A panic fails the calls it interrupted (their answers are dropped, so they get an
        // error) and rolls back their transaction; the thread goes on with the next jobs.
        if !taken.batch.is_empty() {
            let written = catch_unwind(AssertUnwindSafe(|| {
                write_batch(shared, &mut conn, &mut taken, queue);
            }));
            if written.is_err() {
                tracing::error!("the state store's writer panicked while writing a batch");
            }
        }
        for job in taken.alone {
            if catch_unwind(AssertUnwindSafe(|| job(shared, &mut conn))).is_err() {
                tracing::error!("the state store's writer panicked while running a call");
            }
        }
    }
    shared.save_heartbeats(&mut conn);
}

/// Writes `taken.batch` in one transaction, with the batched writes queued meanwhile, and
/// answers each caller once it has committed. If the transaction as a whole cannot begin or
/// commit, or a write failed halfway, each write is tried again in a transaction of its own,
/// so each caller gets its own answer.
fn write_batch(shared: &Shared, conn: &mut Connection, taken: &mut Taken, queue: &Receiver<Job>) {
    let together = write_together(shared, conn, taken, Some(queue));
    let batch = std::mem::take(&mut taken.batch);
    match together {
        Ok(outcomes) => {
            for (write, outcome) in batch.into_iter().zip(outcomes) {
                write.answer(outcome);
            }
        }
        Err(error) if batch.len() > 1 => {
            // A write refused halfway is one caller's answer, not a fault of the database.
            if let DbError::Sqlite(error) = &error {
                tracing::warn!(%error, writes = batch.len(), "could not commit state writes together; writing them one by one");
            }
            for write in batch {
                let mut alone = Taken {
                    batch: vec![write],
                    alone: Vec::new(),
                };
                let outcome = write_together(shared, conn, &mut alone, None)
                    .and_then(|mut outcomes| outcomes.pop().unwrap_or(Ok(())));
                if let Some(write) = alone.batch.pop() {
                    write.answer(outcome);
                }
            }
        }
        Err(error) => {
            // The batch held one write.
            if let Some(write) = batch.into_iter().next() {
                write.answer(Err(error));
            }
        }
    }
}

/// Runs every write of `taken.batch` in one IMMEDIATE transaction, then, with `queue`, the
/// batched writes queued meanwhile (added to `taken`; they share the commit instead of waiting
/// for the next one, and the jobs that are not batched wait for the commit), writes the
/// deployments they changed, commits, and has the store's memory take what they wrote: the
/// outcome of each write, or the error that kept the transaction from committing (then none of
/// them is written: the transaction is rolled back when it is dropped).
fn write_together(
    shared: &Shared,
    conn: &mut Connection,
    taken: &mut Taken,
    queue: Option<&Receiver<Job>>,
) -> Result<Vec<Result<(), DbError>>, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(taken.batch.len());
    let mut pending = Pending::default();
    loop {
        for write in &mut taken.batch[outcomes.len()..] {
            let changes_before = tx.total_changes();
            let outcome = write.write(shared, &tx, &mut pending);
            if let Err(error) = outcome {
                if matches!(error, DbError::Sqlite(_)) || tx.total_changes() != changes_before {
                    // Only rolling the transaction back undoes what it changed.
                    return Err(error);
                }
                outcomes.push(Err(error));
            } else {
                outcomes.push(Ok(()));
            }
        }
        match queue {
            Some(queue) => taken.take_queued(queue),
            None => break,
        }
        if outcomes.len() == taken.batch.len() {
            break;
        }
    }
    for deployment in pending.deployments.values() {
        super::write_deployment(&tx, deployment)?;
    }
    tx.commit()?;
    shared.memory().committed(pending);
    shared.count_commit();
    Ok(outcomes)
}
