//! [`SqliteStore`]: deployments, nodes and logs in one SQLite file, so a daemon that restarts
//! finds every deployment where it left it.
//!
//! Writes are incremental: a node update rewrites that node's row and its deployment's row
//! (once for all the updates committed together), a log append inserts its lines, and nothing
//! ever rewrites the whole state. One thread owns the
//! connection ([`writer`]) and commits the writes that arrive together in one transaction; the
//! live nodes and deployments are also held in memory ([`memory`]), so the node protocol's
//! reads need no query. Heartbeats are kept in memory and reach the file only coarsely. Tokens
//! are stored only as their SHA-256 hashes.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::model::{
    self, Applied, Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate, PhaseTimes,
};
use super::{LogLine, LogQuery, LogStream, NewLogLine, Store};
use crate::error::{Error, Result};
use crate::sync::lock;

mod memory;
mod writer;

use memory::{Heartbeat, Memory, Pending};

/// The schema this code reads and writes, kept in `PRAGMA user_version`: 1 was taskfly 0.1's,
/// 2 adds the nodes' `instance_locator`, 3 the per-node log counts, 4 the nodes' phase times,
/// 5 the deployments' `rerun_of`, 6 the deployments' `cleaned_at`, 7 the webhook deliveries,
/// 8 the deployments' `log_stored` ([`MIGRATIONS`]).
const SCHEMA_VERSION: i64 = 8;

/// Default cap on stored log lines per deployment, as for the in-memory store.
const DEFAULT_MAX_LOG_LINES: usize = 1_000_000;

/// A heartbeat reaches the file only when it is more than this much newer than the stored time.
const HEARTBEAT_FLUSH_MS: i64 = 60_000;

/// How long a call waits for another process holding the database's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Every call uses a handful of statements; keep them all prepared.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Schema version 1 (taskfly 0.1), which [`MIGRATIONS`] bring up to date. Times are integer milliseconds since the Unix epoch; `log_seq` is the last
/// `seq` handed out in the deployment's log, so a `seq` is never reused even after old lines
/// are trimmed.
const SCHEMA: &str = "
CREATE TABLE deployments (
    id               TEXT PRIMARY KEY NOT NULL,
    status           TEXT NOT NULL,
    cloud_provider   TEXT NOT NULL,
    total_nodes      INTEGER NOT NULL,
    retries          INTEGER NOT NULL,
    nodes_completed  INTEGER NOT NULL,
    nodes_failed     INTEGER NOT NULL,
    nodes_terminated INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    completed_at     INTEGER,
    error_message    TEXT,
    log_seq          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX deployments_newest_first ON deployments (created_at DESC, id DESC);

CREATE TABLE nodes (
    id                   TEXT PRIMARY KEY NOT NULL,
    deployment_id        TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    node_index           INTEGER NOT NULL,
    status               TEXT NOT NULL,
    attempt              INTEGER NOT NULL,
    instance_id          TEXT,
    ip_address           TEXT,
    last_update          INTEGER NOT NULL,
    exit_code            INTEGER,
    error_message        TEXT,
    provision_token_hash BLOB UNIQUE,
    auth_token_hash      BLOB UNIQUE
);
CREATE INDEX nodes_by_deployment ON nodes (deployment_id, node_index);

CREATE TABLE logs (
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    node_id       TEXT NOT NULL,
    node_index    INTEGER NOT NULL,
    stream        TEXT NOT NULL,
    line          TEXT NOT NULL,
    timestamp     INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    line_no       INTEGER,
    PRIMARY KEY (deployment_id, seq)
);
CREATE INDEX logs_by_node ON logs (deployment_id, node_index, seq);
-- A resent line (same node, attempt and line number) is ignored; NULL line numbers never clash.
CREATE UNIQUE INDEX logs_dedup ON logs (node_id, attempt, line_no);
";

/// The changes from each schema version to the next: `MIGRATIONS[0]` turns version 1 into 2.
/// A database is brought up to [`SCHEMA_VERSION`] when opened, in one transaction.
const MIGRATIONS: &[&str] = &[
    // 2: where the provider finds a node's instance again (`InstanceRef::locator`); NULL
    // for nodes recorded by taskfly 0.1.
    "ALTER TABLE nodes ADD COLUMN instance_locator TEXT;",
    // 3: how many log lines each node has stored (its marker included) and has had dropped,
    // and which line is its marker (`SqliteStore::max_log_lines_per_node`).
    "CREATE TABLE log_volume (
         deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
         node_index    INTEGER NOT NULL,
         stored        INTEGER NOT NULL,
         dropped       INTEGER NOT NULL DEFAULT 0,
         marker_seq    INTEGER,
         PRIMARY KEY (deployment_id, node_index)
     );
     INSERT INTO log_volume (deployment_id, node_index, stored)
         SELECT deployment_id, node_index, COUNT(*) FROM logs GROUP BY deployment_id, node_index;",
    // 4 (timings): when each node's current attempt entered each phase (`Node::times`), in
    // milliseconds; NULL for a phase not entered, and for nodes recorded before.
    "ALTER TABLE nodes ADD COLUMN provisioning_at INTEGER;
     ALTER TABLE nodes ADD COLUMN booting_at INTEGER;
     ALTER TABLE nodes ADD COLUMN downloading_at INTEGER;
     ALTER TABLE nodes ADD COLUMN started_at INTEGER;
     ALTER TABLE nodes ADD COLUMN finished_at INTEGER;",
    // 5 (rerun): the deployment a rerun runs nodes of again (`Deployment::rerun_of`).
    "ALTER TABLE deployments ADD COLUMN rerun_of TEXT;",
    // 6 (cleanup keeps records): when a deployment's files were deleted (ms since the epoch);
    // NULL while they are there.
    "ALTER TABLE deployments ADD COLUMN cleaned_at INTEGER;",
    // 7 (webhooks): each deployment's webhook notification, kept until delivered or given up
    // so a restarted daemon delivers it (`Store::save_delivery`). Times in milliseconds.
    "CREATE TABLE webhook_deliveries (
         deployment_id   TEXT PRIMARY KEY REFERENCES deployments (id) ON DELETE CASCADE,
         url             TEXT NOT NULL,
         body            TEXT NOT NULL,
         signature       TEXT,
         status          TEXT NOT NULL,
         attempts        INTEGER NOT NULL,
         last_error      TEXT,
         created_at      INTEGER NOT NULL,
         next_attempt_at INTEGER NOT NULL,
         delivered_at    INTEGER
     );
     CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (status, created_at);",
    // 8 (SQLite group commit): how many log lines the deployment stores in all (the sum of its
    // `log_volume.stored`), kept with it, so checking the deployment's cap after an append
    // reads one row instead of one per node.
    "ALTER TABLE deployments ADD COLUMN log_stored INTEGER NOT NULL DEFAULT 0;
     UPDATE deployments SET log_stored = (
         SELECT COALESCE(SUM(stored), 0) FROM log_volume
         WHERE log_volume.deployment_id = deployments.id
     );",
];

/// The columns of a webhook delivery, in the order [`delivery_from_row`] reads them.
const DELIVERY_COLUMNS: &str = "deployment_id, url, body, signature, status, attempts, \
     last_error, created_at, next_attempt_at, delivered_at";

/// Log lines stored per transaction: a large batch is stored in several, so other calls get
/// the connection in between.
const LOG_CHUNK: usize = 2048;

/// The columns of a node, in the order [`node_from_row`] reads them.
macro_rules! node_columns {
    () => {
        "id, deployment_id, node_index, status, attempt, instance_id, ip_address, last_update, \
         exit_code, error_message, provision_token_hash, auth_token_hash, instance_locator, \
         provisioning_at, booting_at, downloading_at, started_at, finished_at"
    };
}

/// The columns of a deployment, in the order [`deployment_from_row`] reads them.
macro_rules! deployment_columns {
    () => {
        "id, status, cloud_provider, total_nodes, retries, nodes_completed, nodes_failed, \
         nodes_terminated, created_at, updated_at, completed_at, error_message, rerun_of, \
         cleaned_at"
    };
}

/// A [`Store`] in one SQLite file: deployments, nodes and logs survive a restart of the process.
///
/// The file is opened in WAL mode with `synchronous=NORMAL`: a committed change survives a
/// crash of the process; a power loss may lose the last changes committed before it but never
/// corrupts the file. The file is created with mode 0600 (it holds token hashes). Its
/// write-ahead log (`<file>-wal`) is copied into the file every 10,000 pages, so it grows to
/// about 40 MiB under a steady stream of updates and keeps that size.
///
/// # Writes
/// One thread of the store's own owns the connection and runs every call. Node updates and log
/// appends that are queued together are written in one transaction (group commit), and each
/// caller is answered only once that transaction has committed: an answered write is in the
/// file. A write that is refused or fails changes nothing and does not fail the others of its
/// transaction (one that fails after writing has the transaction rolled back, and the others
/// are written again without it). Every change of state is computed by
/// [`model::apply_node_update`] or [`model::apply_deployment_status`], so the state machines
/// are the same as [`crate::MemoryStore`]'s. A node update writes that node's row, and its
/// deployment's row is written once per transaction with what the last of its updates left;
/// nothing ever rewrites the whole state. A refused transition returns the
/// crate's conflict [`Error`] and changes nothing.
///
/// # Reads
/// The nodes and deployments that are not final are also held in memory, exactly as their rows
/// hold them (the writer updates this copy after each commit, before answering), so reading a
/// live node by id or token, or a live deployment, needs no query; other reads query the file
/// on the writer thread. Memory therefore holds one copy of each live node that was read or
/// written since the file was opened. The file must not be written by another program while
/// the store is open (`taskflyd` holds its data directory's lock); reading it is fine.
///
/// # Heartbeats
/// [`Store::touch_node`] does not write to the file: the last-seen time is kept in memory and
/// shown as `last_update` on every node read back. It reaches the file when the node's row is
/// next written, when a heartbeat is more than 60 s newer than the stored time, and when the
/// store is dropped (dropping it waits for its thread to finish the calls already queued and
/// save these times in one transaction). After a crash, a node's `last_update` may therefore
/// be up to a minute old.
///
/// # Cancellation
/// Calls need no tokio runtime. Dropping a call's future does not take its call back: a call
/// already queued runs to completion, and since each write is one transaction or savepoint its
/// change is then either fully applied or, if it failed, not applied at all, never half. A call
/// that panics fails alone (its caller gets a store error); the thread goes on.
///
/// # Differences from the in-memory store
/// Times are stored at millisecond precision, so a `SystemTime` read back is the one written,
/// truncated to the millisecond.
///
/// ```no_run
/// # fn demo() -> taskfly::Result<()> {
/// use std::sync::Arc;
/// use taskfly::{Config, Orchestrator, SqliteStore};
/// let store = SqliteStore::open("/var/lib/taskfly/state.db".as_ref())?;
/// let engine = Orchestrator::new(Config::new("/var/lib/taskfly").store(Arc::new(store)))?;
/// # let _ = engine; Ok(()) }
/// ```
pub struct SqliteStore {
    shared: Arc<Shared>,
    writer: writer::WriterHandle,
    max_log_lines: usize,
    max_log_lines_per_node: Option<usize>,
}

/// What the writer thread shares with the store's callers.
struct Shared {
    /// `None` for an in-memory database.
    path: Option<PathBuf>,
    /// The live nodes and deployments, and the heartbeats not yet written.
    memory: Mutex<Memory>,
    /// How many transactions the writer has committed batched writes in, to check the
    /// batching in tests.
    #[cfg(test)]
    batch_commits: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("max_log_lines", &self.max_log_lines)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// The node found by `select` (one of the token-hash lookups) in the file, remembered
    /// if live, heartbeats overlaid: for a node not held in memory.
    async fn node_by_hash(&self, select: &'static str, hash: [u8; 32]) -> Result<Option<Node>> {
        self.run(move |shared, conn| {
            let mut statement = conn.prepare_cached(select)?;
            let node = statement
                .query([hash.as_slice()])?
                .next()?
                .map(node_from_row)
                .transpose()?;
            Ok(shared.remember_read_node(node))
        })
        .await
    }
    /// Opens the database at `path`, creating it (and its parent directory) if needed.
    ///
    /// A new file is created with mode 0600; an existing one loses any group or other
    /// permission bits. The schema is created on first use; a file written by a newer version
    /// of taskfly (a higher schema version) is refused rather than misread. This blocks briefly
    /// on file I/O.
    pub fn open(path: &Path) -> crate::Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| {
                Error::io(format!("cannot create directory {}", parent.display()), e)
            })?;
        }
        create_private_file(path)?;
        let conn = Connection::open(path)
            .map_err(|e| sqlite_error(format!("cannot open {}", path.display()), e))?;
        SqliteStore::from_connection(conn, Some(path.to_owned()))
    }

    /// A store in a private in-memory database, lost when it is dropped: for tests, and to
    /// exercise the SQLite code paths without a file.
    pub fn open_in_memory() -> crate::Result<SqliteStore> {
        let conn = Connection::open_in_memory()
            .map_err(|e| sqlite_error("cannot open an in-memory database", e))?;
        SqliteStore::from_connection(conn, None)
    }

    /// Keep at most this many log lines per deployment (default 1,000,000); past it, the
    /// oldest lines of the node holding the most are deleted (see [`Store::append_logs`]).
    /// `seq` numbers are never reused.
    #[must_use]
    pub fn max_log_lines(mut self, lines: usize) -> Self {
        self.max_log_lines = lines.max(1);
        self
    }

    /// Keep at most this many log lines per node (at least 2; default half of
    /// [`SqliteStore::max_log_lines`]); past it, that node's oldest lines are deleted.
    #[must_use]
    pub fn max_log_lines_per_node(mut self, lines: usize) -> Self {
        self.max_log_lines_per_node = Some(lines.max(2));
        self
    }

    fn from_connection(mut conn: Connection, path: Option<PathBuf>) -> crate::Result<SqliteStore> {
        let name = path.as_ref().map_or_else(
            || "the in-memory database".to_owned(),
            |p| p.display().to_string(),
        );
        configure(&conn).map_err(|e| sqlite_error(format!("cannot configure {name}"), e))?;
        migrate(&mut conn, &name)?;
        let shared = Arc::new(Shared {
            path,
            memory: Mutex::new(Memory::default()),
            #[cfg(test)]
            batch_commits: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(SqliteStore {
            writer: writer::WriterHandle::start(Arc::clone(&shared), conn)?,
            shared,
            max_log_lines: DEFAULT_MAX_LOG_LINES,
            max_log_lines_per_node: None,
        })
    }

    /// Runs `f` with the connection on the writer thread, on its own (outside any batch). The
    /// call runs to completion even if the returned future is dropped.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Shared, &mut Connection) -> Result<T, DbError> + Send + 'static,
        T: Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.writer
            .send(writer::Job::Alone(Box::new(move |shared, conn| {
                // A caller that stopped waiting no longer needs the answer.
                let _ = answer.send(f(shared, conn).map_err(DbError::into_error));
            })))?;
        answered.await.map_err(|_| writer::stopped())?
    }

    /// Runs `write` on the writer thread in a transaction shared with the other writes queued
    /// with it (group commit), and answers once that transaction has committed (and the
    /// store's memory has taken what `write` recorded in its [`Pending`]). A write that fails
    /// changes nothing and does not fail the others. The write stands (or fails) even if the
    /// future is dropped.
    async fn write<T, F>(&self, write: F) -> Result<T>
    where
        F: FnMut(&Shared, &Connection, &mut Pending) -> Result<T, DbError> + Send + 'static,
        T: Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.writer
            .send(writer::Job::Batched(Box::new(writer::Write {
                write,
                answer,
                written: None,
            })))?;
        answered.await.map_err(|_| writer::stopped())?
    }
}

impl Shared {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        lock(&self.memory)
    }

    /// Shows the newest heartbeat of each node as its `last_update`.
    fn overlay_heartbeats(&self, nodes: &mut [Node]) {
        self.memory().overlay_heartbeats(nodes);
    }

    /// The node `id` as the transaction writing `pending` sees it: from `pending`, from
    /// memory, or from its row (then remembered once the transaction commits).
    fn current_node(
        &self,
        conn: &Connection,
        pending: &Pending,
        id: &str,
    ) -> Result<Node, DbError> {
        if let Some(node) = pending.nodes.get(id) {
            return Ok(node.clone());
        }
        if let Some(node) = self.memory().node(id) {
            return Ok(node.clone());
        }
        select_node(conn, id)?.ok_or_else(|| unknown_node(id))
    }

    /// The deployment `id` as the transaction writing `pending` sees it.
    fn current_deployment(
        &self,
        conn: &Connection,
        pending: &Pending,
        id: &str,
    ) -> Result<Deployment, DbError> {
        if let Some(deployment) = pending.deployments.get(id) {
            return Ok(deployment.clone());
        }
        if let Some(deployment) = self.memory().deployment(id) {
            return Ok(deployment.clone());
        }
        select_deployment(conn, id)?.ok_or_else(|| unknown_deployment(id))
    }
}

impl Shared {
    /// Saves the heartbeat times the file does not have yet, so a clean shutdown loses none:
    /// the writer's last job, once the store is dropped.
    fn save_heartbeats(&self, conn: &mut Connection) {
        let heartbeats = std::mem::take(&mut self.memory().heartbeats);
        let pending: Vec<(String, i64)> = heartbeats
            .into_iter()
            .map(|(node_id, heartbeat)| (node_id, heartbeat.stored_ms, to_ms(heartbeat.seen)))
            .filter(|(_, stored_ms, seen_ms)| stored_ms != seen_ms)
            .map(|(node_id, _, seen_ms)| (node_id, seen_ms))
            .collect();
        if pending.is_empty() {
            return;
        }
        let saved = conn.transaction().and_then(|tx| {
            {
                let mut update =
                    tx.prepare_cached("UPDATE nodes SET last_update = ?2 WHERE id = ?1")?;
                for (node_id, seen_ms) in &pending {
                    update.execute(params![node_id, seen_ms])?;
                }
            }
            tx.commit()
        });
        if let Err(error) = saved {
            let nodes = pending.len();
            tracing::warn!(%error, nodes, "could not save the last heartbeat times");
        }
    }

    /// The node `find` finds in memory, cloned, with its heartbeat overlaid.
    fn held_node(&self, find: impl FnOnce(&Memory) -> Option<&Node>) -> Option<Node> {
        let memory = self.memory();
        let mut node = find(&memory)?.clone();
        memory.overlay_heartbeats(std::slice::from_mut(&mut node));
        Some(node)
    }

    /// Remembers a node just read from its row (on the writer thread, outside any batch, so
    /// the row is committed), and returns it with its heartbeat overlaid.
    fn remember_read_node(&self, node: Option<Node>) -> Option<Node> {
        let mut memory = self.memory();
        let mut node = node?;
        memory.remember_node(node.clone());
        memory.overlay_heartbeats(std::slice::from_mut(&mut node));
        Some(node)
    }

    #[cfg(test)]
    fn count_commit(&self) {
        self.batch_commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(not(test))]
    fn count_commit(&self) {}
}

/// Creates the database file with mode 0600 before SQLite opens it (SQLite gives its `-wal` and
/// `-shm` files the same mode), and takes group and other bits off an existing file.
#[cfg(unix)]
fn create_private_file(path: &Path) -> crate::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let cannot = |e| {
        Error::io(
            format!("cannot create {} with mode 0600", path.display()),
            e,
        )
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(cannot)?;
    let mode = file.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(mode & 0o700))
            .map_err(cannot)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_file(_path: &Path) -> crate::Result<()> {
    Ok(())
}

/// Pages of write-ahead log between two automatic checkpoints (see [`configure`]).
const WAL_CHECKPOINT_PAGES: i64 = 10_000;

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // SQLite answers with the mode now in force: `memory` for an in-memory database, and the
    // old mode on a file system without shared memory. Both still work, only slower.
    let _mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The write-ahead log is copied into the database every 10,000 pages (40 MiB) instead of
    // SQLite's 1,000: the same few pages (a deployment's row, the index pages of its running
    // nodes) are rewritten by every commit, and a longer log copies each of them once per
    // checkpoint instead of ten times. Worth 10 - 20 % of node lifecycles a second
    // (BENCHMARKS.md); the log file keeps up to that size, and a restart after a crash reads it.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}

/// Creates the schema in a new database and refuses one whose schema this code does not know.
fn migrate(conn: &mut Connection, name: &str) -> crate::Result<()> {
    let cannot = |e| sqlite_error(format!("cannot set up the schema of {name}"), e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(cannot)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(cannot)?;
    if version > SCHEMA_VERSION {
        return Err(Error::store(
            format!("cannot use {name}"),
            Box::new(BadData(format!(
                "its schema version is {version}, and this taskfly knows only versions up to \
                 {SCHEMA_VERSION}; it was probably written by a newer taskfly"
            ))),
        ));
    }
    if version == 0 {
        tx.execute_batch(SCHEMA).map_err(cannot)?;
    }
    // Version 0 (a new file) starts from the first schema, like a taskfly 0.1 database.
    let applied = usize::try_from(version.max(1) - 1).unwrap_or(0);
    for migration in &MIGRATIONS[applied..] {
        tx.execute_batch(migration).map_err(cannot)?;
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(cannot)?;
    }
    tx.commit().map_err(cannot)
}

fn sqlite_error(message: impl Into<String>, error: rusqlite::Error) -> Error {
    Error::store(message, error)
}

/// What is wrong with data read back from the database; the cause of a store [`Error`].
#[derive(Debug)]
struct BadData(String);

impl fmt::Display for BadData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadData {}

fn bad_data(message: String) -> DbError {
    Error::store(
        "the state database holds a value this taskfly cannot read",
        BadData(message),
    )
    .into()
}

fn unknown_deployment(id: &str) -> DbError {
    Error::not_found(format!("no deployment `{id}`")).into()
}

fn unknown_node(id: &str) -> DbError {
    Error::not_found(format!("no node `{id}`")).into()
}

/// What fails inside a database call: SQLite itself, or the crate (a refused transition, an
/// unknown id, unreadable data). `?` turns either into it; [`SqliteStore::run`] turns it into
/// the crate's error.
#[derive(Debug)]
enum DbError {
    Sqlite(rusqlite::Error),
    Taskfly(Error),
}

impl DbError {
    fn into_error(self) -> Error {
        match self {
            DbError::Sqlite(error) => Error::store("the state store failed", error),
            DbError::Taskfly(error) => error,
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(error: rusqlite::Error) -> Self {
        DbError::Sqlite(error)
    }
}

impl From<Error> for DbError {
    fn from(error: Error) -> Self {
        DbError::Taskfly(error)
    }
}

/// Milliseconds since the Unix epoch, negative before it, saturating far out of range.
fn to_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The inverse of [`to_ms`]; `None` if the platform's `SystemTime` cannot hold it.
fn from_ms(ms: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

fn column_name(row: &Row<'_>, index: usize) -> String {
    row.as_ref()
        .column_name(index)
        .map_or_else(|_| format!("column {index}"), str::to_owned)
}

fn read_u32(row: &Row<'_>, index: usize) -> Result<u32, DbError> {
    let value: i64 = row.get(index)?;
    u32::try_from(value).map_err(|_| {
        bad_data(format!(
            "{} is {value}, which is not a count",
            column_name(row, index)
        ))
    })
}

fn read_u64(row: &Row<'_>, index: usize) -> Result<u64, DbError> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| {
        bad_data(format!(
            "{} is {value}, which is negative",
            column_name(row, index)
        ))
    })
}

fn time_from_ms(ms: i64, what: impl FnOnce() -> String) -> Result<SystemTime, DbError> {
    from_ms(ms).ok_or_else(|| bad_data(format!("{} is {ms}, out of range", what())))
}

fn read_time(row: &Row<'_>, index: usize) -> Result<SystemTime, DbError> {
    time_from_ms(row.get(index)?, || column_name(row, index))
}

fn read_optional_time(row: &Row<'_>, index: usize) -> Result<Option<SystemTime>, DbError> {
    let ms: Option<i64> = row.get(index)?;
    ms.map(|ms| time_from_ms(ms, || column_name(row, index)))
        .transpose()
}

fn read_hash(row: &Row<'_>, index: usize) -> Result<Option<[u8; 32]>, DbError> {
    let bytes: Option<Vec<u8>> = row.get(index)?;
    bytes
        .map(|bytes| {
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                bad_data(format!(
                    "{} holds {} bytes, not a 32-byte SHA-256 hash",
                    column_name(row, index),
                    bytes.len()
                ))
            })
        })
        .transpose()
}

fn read_status<S: std::str::FromStr<Err = Error>>(
    row: &Row<'_>,
    index: usize,
) -> Result<S, DbError> {
    let name: String = row.get(index)?;
    name.parse()
        .map_err(|e: Error| bad_data(format!("{}: {e}", column_name(row, index))))
}

fn deployment_from_row(row: &Row<'_>) -> Result<Deployment, DbError> {
    Ok(Deployment {
        id: row.get(0)?,
        status: read_status(row, 1)?,
        cloud_provider: row.get(2)?,
        total_nodes: read_u32(row, 3)?,
        retries: read_u32(row, 4)?,
        nodes_completed: read_u32(row, 5)?,
        nodes_failed: read_u32(row, 6)?,
        nodes_terminated: read_u32(row, 7)?,
        created_at: read_time(row, 8)?,
        updated_at: read_time(row, 9)?,
        completed_at: read_optional_time(row, 10)?,
        error_message: row.get(11)?,
        rerun_of: row.get(12)?,
        cleaned_at: read_optional_time(row, 13)?,
    })
}

fn node_from_row(row: &Row<'_>) -> Result<Node, DbError> {
    let exit_code: Option<i64> = row.get(8)?;
    let exit_code = exit_code
        .map(|code| {
            i32::try_from(code).map_err(|_| bad_data(format!("exit_code is {code}, out of range")))
        })
        .transpose()?;
    Ok(Node {
        id: row.get(0)?,
        deployment_id: row.get(1)?,
        index: read_u32(row, 2)?,
        status: read_status(row, 3)?,
        attempt: read_u32(row, 4)?,
        instance_id: row.get(5)?,
        ip_address: row.get(6)?,
        last_update: read_time(row, 7)?,
        exit_code,
        error_message: row.get(9)?,
        provision_token_hash: read_hash(row, 10)?,
        auth_token_hash: read_hash(row, 11)?,
        instance_locator: row.get(12)?,
        times: PhaseTimes {
            provisioning_at: read_optional_time(row, 13)?,
            booting_at: read_optional_time(row, 14)?,
            downloading_at: read_optional_time(row, 15)?,
            started_at: read_optional_time(row, 16)?,
            finished_at: read_optional_time(row, 17)?,
        },
        queue_reason: None,
    })
}

fn log_line_from_row(row: &Row<'_>) -> Result<LogLine, DbError> {
    let stream: String = row.get(3)?;
    Ok(LogLine {
        seq: read_u64(row, 0)?,
        node_id: row.get(1)?,
        node_index: read_u32(row, 2)?,
        stream: LogStream::parse(&stream)
            .ok_or_else(|| bad_data(format!("stream is `{stream}`, not stdout or stderr")))?,
        line: row.get(4)?,
        timestamp: read_time(row, 5)?,
        attempt: read_u32(row, 6)?,
    })
}

fn delivery_from_row(row: &Row<'_>) -> Result<model::WebhookDelivery, DbError> {
    Ok(model::WebhookDelivery {
        deployment_id: row.get(0)?,
        url: row.get(1)?,
        body: row.get(2)?,
        signature: row.get(3)?,
        status: read_status(row, 4)?,
        attempts: read_u32(row, 5)?,
        last_error: row.get(6)?,
        created_at: read_time(row, 7)?,
        next_attempt_at: read_time(row, 8)?,
        delivered_at: read_optional_time(row, 9)?,
    })
}

/// Runs a query and decodes every row it returns.
fn query_all<T>(
    statement: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    decode: fn(&Row<'_>) -> Result<T, DbError>,
) -> Result<Vec<T>, DbError> {
    let mut rows = statement.query(params)?;
    let mut decoded = Vec::new();
    while let Some(row) = rows.next()? {
        decoded.push(decode(row)?);
    }
    Ok(decoded)
}

/// The line caps of [`SqliteStore`], as SQLite integers.
#[derive(Debug, Clone, Copy)]
struct LogCaps {
    node: i64,
    deployment: i64,
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Stores `lines` (one chunk of a batch) in one transaction, then keeps the nodes it touched
/// and the deployment within `caps`. Returns the deployment's last `seq`.
fn append_chunk(
    tx: &Connection,
    deployment_id: &str,
    lines: &[NewLogLine],
    caps: LogCaps,
) -> Result<i64, DbError> {
    let last_seq: Option<i64> = tx
        .prepare_cached("SELECT log_seq FROM deployments WHERE id = ?1")?
        .query_row([deployment_id], |row| row.get(0))
        .optional()?;
    let Some(mut seq) = last_seq else {
        return Err(unknown_deployment(deployment_id));
    };
    if seq < 0 {
        return Err(bad_data(format!(
            "log_seq of deployment `{deployment_id}` is {seq}, which is negative"
        )));
    }
    if lines.is_empty() {
        return Ok(seq);
    }
    let mut added: Vec<(u32, i64)> = Vec::new();
    let mut inserted_lines = 0i64;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO logs (deployment_id, seq, node_id, node_index, \
             stream, line, timestamp, attempt, line_no) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for line in lines {
            let next = seq.checked_add(1).ok_or_else(|| {
                bad_data(format!(
                    "log_seq of deployment `{deployment_id}` is out of range"
                ))
            })?;
            let line_no = line.line_no.map(i64::try_from).transpose().map_err(|_| {
                bad_data(format!(
                    "log line number of `{}` is out of range",
                    line.node_id
                ))
            })?;
            let inserted = insert.execute(params![
                deployment_id,
                next,
                line.node_id,
                line.node_index,
                line.stream.as_str(),
                line.line,
                to_ms(line.timestamp),
                line.attempt,
                line_no,
            ])?;
            // Zero rows: a resent duplicate, ignored by the unique index.
            if inserted == 1 {
                seq = next;
                inserted_lines += 1;
                match added
                    .iter_mut()
                    .find(|(index, _)| *index == line.node_index)
                {
                    Some((_, count)) => *count += 1,
                    None => added.push((line.node_index, 1)),
                }
            }
        }
    }
    // The counts come back from the statements that update them (`RETURNING`), one query
    // fewer each.
    let mut total: i64 = tx
        .prepare_cached(
            "UPDATE deployments SET log_seq = ?2, log_stored = log_stored + ?3 WHERE id = ?1 \
             RETURNING log_stored",
        )?
        .query_row(params![deployment_id, seq, inserted_lines], |row| {
            row.get(0)
        })?;
    let mut over_node_cap = Vec::new();
    {
        let mut count = tx.prepare_cached(
            "INSERT INTO log_volume (deployment_id, node_index, stored) VALUES (?1, ?2, ?3) \
             ON CONFLICT (deployment_id, node_index) DO UPDATE SET stored = stored + ?3 \
             RETURNING stored, dropped, marker_seq",
        )?;
        for (index, lines) in &added {
            let volume = count.query_row(params![deployment_id, index, lines], |row| {
                Ok(NodeVolume {
                    node_index: *index,
                    stored: row.get(0)?,
                    dropped: row.get(1)?,
                    marker_seq: row.get(2)?,
                })
            })?;
            if volume.stored > caps.node {
                over_node_cap.push(volume);
            }
        }
    }
    for volume in &over_node_cap {
        drop_oldest(tx, deployment_id, volume, volume.real() + 1 - caps.node)?;
    }
    // Dropping lines changes the total: it is read again after each drop.
    let mut dropped = !over_node_cap.is_empty();
    loop {
        if dropped {
            total = tx
                .prepare_cached("SELECT log_stored FROM deployments WHERE id = ?1")?
                .query_row([deployment_id], |row| row.get(0))?;
        }
        if total <= caps.deployment {
            break;
        }
        let largest = tx
            .prepare_cached(
                "SELECT node_index FROM log_volume \
                 WHERE deployment_id = ?1 AND stored > (marker_seq IS NOT NULL) \
                 ORDER BY stored DESC, node_index LIMIT 1",
            )?
            .query_row([deployment_id], |row| row.get::<_, u32>(0))
            .optional()?;
        let Some(index) = largest else {
            break;
        };
        let volume = node_volume(tx, deployment_id, index)?;
        let over = total - caps.deployment;
        let count = over + i64::from(volume.marker_seq.is_none());
        drop_oldest(tx, deployment_id, &volume, count.min(volume.real()))?;
        dropped = true;
    }
    Ok(seq)
}

/// A row of `log_volume`.
struct NodeVolume {
    node_index: u32,
    stored: i64,
    dropped: i64,
    marker_seq: Option<i64>,
}

impl NodeVolume {
    /// Lines stored, its marker not included.
    fn real(&self) -> i64 {
        self.stored - i64::from(self.marker_seq.is_some())
    }
}

fn node_volume(
    tx: &Connection,
    deployment_id: &str,
    node_index: u32,
) -> Result<NodeVolume, DbError> {
    Ok(tx
        .prepare_cached(
            "SELECT stored, dropped, marker_seq FROM log_volume \
             WHERE deployment_id = ?1 AND node_index = ?2",
        )?
        .query_row(params![deployment_id, node_index], |row| {
            Ok(NodeVolume {
                node_index,
                stored: row.get(0)?,
                dropped: row.get(1)?,
                marker_seq: row.get(2)?,
            })
        })?)
}

/// Drop the oldest `count` (at least 1) lines of a node: the newest of them becomes its
/// marker, the previous marker is deleted. Lines of a node older than its marker never exist.
fn drop_oldest(
    tx: &Connection,
    deployment_id: &str,
    volume: &NodeVolume,
    count: i64,
) -> Result<(), DbError> {
    if count < 1 {
        return Ok(());
    }
    let index = volume.node_index;
    let newest: Option<i64> = tx
        .prepare_cached(
            "SELECT seq FROM logs WHERE deployment_id = ?1 AND node_index = ?2 AND seq > ?3 \
             ORDER BY seq LIMIT 1 OFFSET ?4",
        )?
        .query_row(
            params![
                deployment_id,
                index,
                volume.marker_seq.unwrap_or(0),
                count - 1
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(newest) = newest else {
        return Err(bad_data(format!(
            "node {index} of deployment `{deployment_id}` has fewer than {count} log lines"
        )));
    };
    let deleted = tx
        .prepare_cached(
            "DELETE FROM logs WHERE deployment_id = ?1 AND node_index = ?2 AND seq < ?3",
        )?
        .execute(params![deployment_id, index, newest])?;
    let dropped = volume.dropped + count;
    let marker = super::dropped_lines_marker(index, u64::try_from(dropped).unwrap_or(0));
    tx.prepare_cached(
        "UPDATE logs SET line = ?3, stream = 'stderr' WHERE deployment_id = ?1 AND seq = ?2",
    )?
    .execute(params![deployment_id, newest, marker])?;
    tx.prepare_cached(
        "UPDATE log_volume SET stored = stored - ?3, dropped = ?4, marker_seq = ?5 \
         WHERE deployment_id = ?1 AND node_index = ?2",
    )?
    .execute(params![
        deployment_id,
        index,
        to_i64(deleted),
        dropped,
        newest
    ])?;
    tx.prepare_cached("UPDATE deployments SET log_stored = log_stored - ?2 WHERE id = ?1")?
        .execute(params![deployment_id, to_i64(deleted)])?;
    Ok(())
}

/// Reads the rows of a log query, ending the page at its byte bound.
fn log_page(
    statement: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    query: &LogQuery,
) -> Result<Vec<LogLine>, DbError> {
    let mut rows = statement.query(params)?;
    let mut page = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let line = log_line_from_row(row)?;
        if !query.has_room(page.len(), bytes, line.line.len()) {
            break;
        }
        bytes += line.line.len();
        page.push(line);
    }
    Ok(page)
}

fn select_deployment(conn: &Connection, id: &str) -> Result<Option<Deployment>, DbError> {
    let mut select = conn.prepare_cached(concat!(
        "SELECT ",
        deployment_columns!(),
        " FROM deployments WHERE id = ?1"
    ))?;
    let mut rows = select.query([id])?;
    rows.next()?.map(deployment_from_row).transpose()
}

fn deployment_exists(conn: &Connection, id: &str) -> Result<bool, DbError> {
    let mut select = conn.prepare_cached("SELECT 1 FROM deployments WHERE id = ?1")?;
    Ok(select.exists([id])?)
}

/// One node, as its row holds it (without the heartbeat overlay).
fn select_node(conn: &Connection, id: &str) -> Result<Option<Node>, DbError> {
    let mut select = conn.prepare_cached(concat!(
        "SELECT ",
        node_columns!(),
        " FROM nodes WHERE id = ?1"
    ))?;
    let mut rows = select.query([id])?;
    rows.next()?.map(node_from_row).transpose()
}

fn insert_node(tx: &Transaction<'_>, node: &Node) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(concat!(
        "INSERT INTO nodes (",
        node_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    ))?;
    insert.execute(params![
        node.id,
        node.deployment_id,
        node.index,
        node.status.as_str(),
        node.attempt,
        node.instance_id,
        node.ip_address,
        to_ms(node.last_update),
        node.exit_code,
        node.error_message,
        node.provision_token_hash.as_ref().map(|h| h.as_slice()),
        node.auth_token_hash.as_ref().map(|h| h.as_slice()),
        node.instance_locator,
        node.times.provisioning_at.map(to_ms),
        node.times.booting_at.map(to_ms),
        node.times.downloading_at.map(to_ms),
        node.times.started_at.map(to_ms),
        node.times.finished_at.map(to_ms),
    ])?;
    Ok(())
}

/// Writes back what [`model::apply_node_update`] may change in a node. The token hash columns
/// are written only when they changed (`tokens_changed`: registration, a new provision
/// token): setting a
/// `UNIQUE` column rewrites its index even to the same value, which made every status update
/// about 40% slower.
fn write_node(tx: &Connection, node: &Node, tokens_changed: bool) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE nodes SET status = ?2, attempt = ?3, instance_id = ?4, ip_address = ?5, \
         last_update = ?6, exit_code = ?7, error_message = ?8, instance_locator = ?9, \
         provisioning_at = ?10, booting_at = ?11, downloading_at = ?12, started_at = ?13, \
         finished_at = ?14 WHERE id = ?1",
    )?
    .execute(params![
        node.id,
        node.status.as_str(),
        node.attempt,
        node.instance_id,
        node.ip_address,
        to_ms(node.last_update),
        node.exit_code,
        node.error_message,
        node.instance_locator,
        node.times.provisioning_at.map(to_ms),
        node.times.booting_at.map(to_ms),
        node.times.downloading_at.map(to_ms),
        node.times.started_at.map(to_ms),
        node.times.finished_at.map(to_ms),
    ])?;
    if tokens_changed {
        tx.prepare_cached(
            "UPDATE nodes SET provision_token_hash = ?2, auth_token_hash = ?3 WHERE id = ?1",
        )?
        .execute(params![
            node.id,
            node.provision_token_hash.as_ref().map(|h| h.as_slice()),
            node.auth_token_hash.as_ref().map(|h| h.as_slice()),
        ])?;
    }
    Ok(())
}

/// Writes back what the state machines may change in a deployment: its status, counters,
/// times and message (never its id, provider, size or retries). Node updates write it once per
/// transaction, however many of them changed it.
fn write_deployment(tx: &Connection, deployment: &Deployment) -> rusqlite::Result<()> {
    let mut update = tx.prepare_cached(
        "UPDATE deployments SET status = ?2, nodes_completed = ?3, nodes_failed = ?4, \
         nodes_terminated = ?5, updated_at = ?6, completed_at = ?7, error_message = ?8 \
         WHERE id = ?1",
    )?;
    update.execute(params![
        deployment.id,
        deployment.status.as_str(),
        deployment.nodes_completed,
        deployment.nodes_failed,
        deployment.nodes_terminated,
        to_ms(deployment.updated_at),
        deployment.completed_at.map(to_ms),
        deployment.error_message,
    ])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_deployment(&self, deployment: Deployment, nodes: Vec<Node>) -> Result<()> {
        self.run(move |_, conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if deployment_exists(&tx, &deployment.id)? {
                return Err(Error::already_exists(format!(
                    "deployment `{}` already exists",
                    deployment.id
                ))
                .into());
            }
            tx.prepare_cached(concat!(
                "INSERT INTO deployments (",
                deployment_columns!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ))?
            .execute(params![
                deployment.id,
                deployment.status.as_str(),
                deployment.cloud_provider,
                deployment.total_nodes,
                deployment.retries,
                deployment.nodes_completed,
                deployment.nodes_failed,
                deployment.nodes_terminated,
                to_ms(deployment.created_at),
                to_ms(deployment.updated_at),
                deployment.completed_at.map(to_ms),
                deployment.error_message,
                deployment.rerun_of,
                deployment.cleaned_at.map(to_ms),
            ])?;
            for node in &nodes {
                insert_node(&tx, node)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>> {
        if let Some(deployment) = self.shared.memory().deployment(id) {
            return Ok(Some(deployment.clone()));
        }
        let id = id.to_owned();
        self.run(move |shared, conn| {
            let deployment = select_deployment(conn, &id)?;
            if let Some(deployment) = &deployment {
                shared.memory().remember_deployment(deployment.clone());
            }
            Ok(deployment)
        })
        .await
    }

    async fn deployments(&self) -> Result<Vec<Deployment>> {
        self.run(|_, conn| {
            let mut select = conn.prepare_cached(concat!(
                "SELECT ",
                deployment_columns!(),
                " FROM deployments ORDER BY created_at DESC, id DESC"
            ))?;
            query_all(&mut select, [], deployment_from_row)
        })
        .await
    }

    async fn node(&self, node_id: &str) -> Result<Option<Node>> {
        if let Some(node) = self.shared.held_node(|memory| memory.node(node_id)) {
            return Ok(Some(node));
        }
        let node_id = node_id.to_owned();
        self.run(move |shared, conn| Ok(shared.remember_read_node(select_node(conn, &node_id)?)))
            .await
    }

    async fn nodes(&self, deployment_id: &str) -> Result<Vec<Node>> {
        let deployment_id = deployment_id.to_owned();
        self.run(move |shared, conn| {
            // One read transaction, so the existence check and the rows agree.
            let tx = conn.transaction()?;
            if !deployment_exists(&tx, &deployment_id)? {
                return Err(unknown_deployment(&deployment_id));
            }
            let mut nodes = {
                let mut select = tx.prepare_cached(concat!(
                    "SELECT ",
                    node_columns!(),
                    " FROM nodes WHERE deployment_id = ?1 ORDER BY node_index"
                ))?;
                query_all(&mut select, [&deployment_id], node_from_row)?
            };
            tx.commit()?;
            shared.overlay_heartbeats(&mut nodes);
            Ok(nodes)
        })
        .await
    }

    async fn node_by_provision_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        if let Some(node) = self
            .shared
            .held_node(|memory| memory.node_by_provision_token(hash))
        {
            return Ok(Some(node));
        }
        self.node_by_hash(
            concat!(
                "SELECT ",
                node_columns!(),
                " FROM nodes WHERE provision_token_hash = ?1"
            ),
            *hash,
        )
        .await
    }

    async fn last_line_no(
        &self,
        _deployment_id: &str,
        node_id: &str,
        attempt: u32,
        stream: LogStream,
    ) -> Result<Option<u64>> {
        let node_id = node_id.to_owned();
        self.run(move |_, conn| {
            let last: Option<i64> = conn
                .prepare_cached(
                    "SELECT MAX(line_no) FROM logs WHERE node_id = ?1 AND attempt = ?2 AND stream = ?3",
                )?
                .query_row(params![node_id, attempt, stream.as_str()], |row| row.get(0))?;
            Ok(last.and_then(|n| u64::try_from(n).ok()))
        })
        .await
    }

    async fn node_by_auth_token(&self, hash: &[u8; 32]) -> Result<Option<Node>> {
        if let Some(node) = self
            .shared
            .held_node(|memory| memory.node_by_auth_token(hash))
        {
            return Ok(Some(node));
        }
        self.node_by_hash(
            concat!(
                "SELECT ",
                node_columns!(),
                " FROM nodes WHERE auth_token_hash = ?1"
            ),
            *hash,
        )
        .await
    }

    async fn update_node(
        &self,
        node_id: &str,
        update: NodeUpdate,
        now: SystemTime,
    ) -> Result<Applied> {
        let node_id = node_id.to_owned();
        self.write(move |shared, conn, pending| {
            let mut node = shared.current_node(conn, pending, &node_id)?;
            let mut deployment = shared.current_deployment(conn, pending, &node.deployment_id)?;
            shared.overlay_heartbeats(std::slice::from_mut(&mut node));
            let tokens_before = (node.provision_token_hash, node.auth_token_hash);
            // A refused transition returns here, before anything is written: neither the
            // file, the store's memory nor the heartbeats change.
            let applied =
                model::apply_node_update(&mut deployment, &mut node, update.clone(), now)?;
            let tokens_changed = tokens_before != (node.provision_token_hash, node.auth_token_hash);
            write_node(conn, &node, tokens_changed)?;
            // The deployment's row is written once for the whole transaction, from `pending`
            // (see `writer::write_together`).
            pending.nodes.insert(node_id.clone(), node);
            pending
                .deployments
                .insert(deployment.id.clone(), deployment);
            Ok(applied)
        })
        .await
    }

    async fn update_deployment_status(
        &self,
        id: &str,
        to: DeploymentStatus,
        message: Option<String>,
        now: SystemTime,
    ) -> Result<Deployment> {
        let id = id.to_owned();
        self.run(move |shared, conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut deployment =
                select_deployment(&tx, &id)?.ok_or_else(|| unknown_deployment(&id))?;
            model::apply_deployment_status(&mut deployment, to, message, now)?;
            write_deployment(&tx, &deployment)?;
            tx.commit()?;
            shared.memory().remember_deployment(deployment.clone());
            Ok(deployment)
        })
        .await
    }

    async fn touch_node(&self, node_id: &str, now: SystemTime) -> Result<()> {
        // A node with an entry is known to exist and not to be final, so its heartbeat only
        // updates memory, until the time is due to be saved.
        {
            let mut memory = self.shared.memory();
            if let Some(heartbeat) = memory.heartbeats.get_mut(node_id) {
                if to_ms(now).saturating_sub(heartbeat.stored_ms) <= HEARTBEAT_FLUSH_MS {
                    heartbeat.seen = now;
                    return Ok(());
                }
            } else if let Some(node) = memory.node(node_id) {
                // A node held in memory is live, and its row holds its `last_update`.
                let stored_ms = to_ms(node.last_update);
                if to_ms(now).saturating_sub(stored_ms) <= HEARTBEAT_FLUSH_MS {
                    let heartbeat = Heartbeat {
                        deployment_id: node.deployment_id.clone(),
                        seen: now,
                        stored_ms,
                    };
                    memory.heartbeats.insert(node_id.to_owned(), heartbeat);
                    return Ok(());
                }
            }
        }
        let node_id = node_id.to_owned();
        self.run(move |shared, conn| {
            let row = conn
                .prepare_cached(
                    "SELECT deployment_id, status, last_update FROM nodes WHERE id = ?1",
                )?
                .query_row([&node_id], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })
                .optional()?;
            let live = match row {
                None => None,
                Some((deployment_id, status, stored_ms)) => {
                    let status: NodeStatus = status
                        .parse()
                        .map_err(|e: Error| bad_data(format!("status of node `{node_id}`: {e}")))?;
                    (!status.is_final()).then_some((deployment_id, stored_ms))
                }
            };
            // Unknown and final nodes are not touched, as in the in-memory store.
            let Some((deployment_id, mut stored_ms)) = live else {
                shared.memory().heartbeats.remove(&node_id);
                return Ok(());
            };
            let now_ms = to_ms(now);
            if now_ms.saturating_sub(stored_ms) > HEARTBEAT_FLUSH_MS {
                conn.prepare_cached("UPDATE nodes SET last_update = ?2 WHERE id = ?1")?
                    .execute(params![node_id, now_ms])?;
                stored_ms = now_ms;
                shared.memory().heartbeat_saved(&node_id, stored_ms);
            }
            shared.memory().heartbeats.insert(
                node_id,
                Heartbeat {
                    deployment_id,
                    seen: now,
                    stored_ms,
                },
            );
            Ok(())
        })
        .await
    }

    async fn heartbeat(
        &self,
        auth_token_hash: &[u8; 32],
        now: SystemTime,
    ) -> Result<crate::state::Heartbeat> {
        let held = self.shared.memory().heartbeat(auth_token_hash, now);
        match held {
            Some(answer) => Ok(answer),
            None => crate::state::heartbeat_by_parts(self, auth_token_hash, now).await,
        }
    }

    async fn append_logs(&self, deployment_id: &str, lines: Vec<NewLogLine>) -> Result<u64> {
        let caps = LogCaps {
            node: to_i64(super::node_log_cap(
                self.max_log_lines_per_node,
                self.max_log_lines,
            )),
            deployment: to_i64(self.max_log_lines),
        };
        let mut lines = lines.into_iter().peekable();
        loop {
            let chunk: Vec<NewLogLine> = lines.by_ref().take(LOG_CHUNK).collect();
            let deployment_id = deployment_id.to_owned();
            let seq = self
                .write(move |_, conn, _| append_chunk(conn, &deployment_id, &chunk, caps))
                .await?;
            if lines.peek().is_none() {
                return u64::try_from(seq)
                    .map_err(|_| bad_data(format!("log seq {seq} is negative")).into_error());
            }
        }
    }

    async fn logs(&self, deployment_id: &str, query: LogQuery) -> Result<Vec<LogLine>> {
        let deployment_id = deployment_id.to_owned();
        let after = i64::try_from(query.after).unwrap_or(i64::MAX);
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        self.run(move |_, conn| {
            let tx = conn.transaction()?;
            if !deployment_exists(&tx, &deployment_id)? {
                return Err(unknown_deployment(&deployment_id));
            }
            let lines = match query.node_index {
                None => {
                    let mut select = tx.prepare_cached(
                        "SELECT seq, node_id, node_index, stream, line, timestamp, attempt FROM logs \
                         WHERE deployment_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    )?;
                    log_page(&mut select, params![deployment_id, after, limit], &query)?
                }
                Some(node_index) => {
                    let mut select = tx.prepare_cached(
                        "SELECT seq, node_id, node_index, stream, line, timestamp, attempt FROM logs \
                         WHERE deployment_id = ?1 AND node_index = ?2 AND seq > ?3 \
                         ORDER BY seq LIMIT ?4",
                    )?;
                    log_page(
                        &mut select,
                        params![deployment_id, node_index, after, limit],
                        &query,
                    )?
                }
            };
            tx.commit()?;
            Ok(lines)
        })
        .await
    }

    async fn delete_deployment(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.run(move |shared, conn| {
            // The foreign keys delete its nodes and log lines in the same statement.
            let deleted = conn
                .prepare_cached("DELETE FROM deployments WHERE id = ?1")?
                .execute([&id])?;
            if deleted > 0 {
                shared.memory().forget_deleted_deployment(&id);
            }
            Ok(deleted > 0)
        })
        .await
    }

    async fn mark_cleaned(&self, id: &str, at: SystemTime) -> Result<bool> {
        let id = id.to_owned();
        self.run(move |shared, conn| {
            let marked = conn
                .prepare_cached(
                    "UPDATE deployments SET cleaned_at = COALESCE(cleaned_at, ?2) WHERE id = ?1",
                )?
                .execute(params![id, to_ms(at)])?;
            // Read again from its row when next asked for.
            shared.memory().forget_deployment(&id);
            Ok(marked > 0)
        })
        .await
    }

    async fn save_delivery(&self, delivery: model::WebhookDelivery) -> Result<()> {
        self.run(move |_, conn| {
            if !deployment_exists(conn, &delivery.deployment_id)? {
                return Err(unknown_deployment(&delivery.deployment_id));
            }
            conn.prepare_cached(&format!(
                "INSERT OR REPLACE INTO webhook_deliveries ({DELIVERY_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ))?
            .execute(params![
                delivery.deployment_id,
                delivery.url,
                delivery.body,
                delivery.signature,
                delivery.status.as_str(),
                delivery.attempts,
                delivery.last_error,
                to_ms(delivery.created_at),
                to_ms(delivery.next_attempt_at),
                delivery.delivered_at.map(to_ms),
            ])?;
            Ok(())
        })
        .await
    }

    async fn delivery(&self, deployment_id: &str) -> Result<Option<model::WebhookDelivery>> {
        let id = deployment_id.to_owned();
        self.run(move |_, conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE deployment_id = ?1"
            ))?;
            Ok(query_all(&mut select, [&id], delivery_from_row)?.pop())
        })
        .await
    }

    async fn pending_deliveries(&self) -> Result<Vec<model::WebhookDelivery>> {
        self.run(|_, conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
                 WHERE status = 'pending' ORDER BY created_at, deployment_id"
            ))?;
            query_all(&mut select, [], delivery_from_row)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
