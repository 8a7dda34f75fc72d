//! How fast the stores create deployments and take node updates and heartbeats; the figures in
//! `BENCHMARKS.md` come from this.
//!
//! Run it with `cargo bench --features sqlite --bench store` (release mode). It prints one
//! Markdown table row per store and deployment size. For each size it creates a deployment of
//! N nodes (in a fresh SQLite file in a temporary directory, or in a `MemoryStore`), takes every
//! node through four updates (provisioning, booting via `Provisioned`, running_script,
//! completed), sends heartbeats for every live node, and reads all nodes back. Updates and
//! heartbeats come from several tasks at once (8, or `TASKFLY_BENCH_CALLERS`), as they do from
//! many nodes in the engine.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use taskfly::state::model::{Deployment, DeploymentStatus, Node, NodeStatus, NodeUpdate};
use taskfly::{BoxError, MemoryStore, SqliteStore, Store};

/// Deployment sizes, in nodes.
const SIZES: [u32; 3] = [1_000, 10_000, 100_000];

/// How many tasks send updates and heartbeats at once, unless `TASKFLY_BENCH_CALLERS` says.
const DEFAULT_CALLERS: u32 = 8;

/// Heartbeat rounds over every node after the first (the first is measured on its own: it is
/// the one that makes each node's heartbeat entry, from the node's row in the SQLite store, or
/// from the node held in memory while it is live).
const WARM_HEARTBEAT_ROUNDS: u32 = 3;

/// What each caller task does to each of its nodes.
#[derive(Clone, Copy)]
enum Step {
    /// provisioning, booting (via `Provisioned`), running_script: three updates.
    StartScript,
    /// One heartbeat.
    Heartbeat,
    /// completed: one update.
    Complete,
}

/// The figures of one store and size.
struct Figures {
    create: Duration,
    updates: u64,
    updating: Duration,
    first_heartbeats: Duration,
    warm_heartbeats: Duration,
    read_nodes: Duration,
    file_bytes: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let callers = match std::env::var("TASKFLY_BENCH_CALLERS") {
        Ok(value) => value
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or("TASKFLY_BENCH_CALLERS must be a positive number")?,
        Err(_) => DEFAULT_CALLERS,
    };
    println!("{callers} calling tasks, {} cores", cores());
    println!();
    println!(
        "| store | nodes | create | updates | updates/s | first heartbeats/s | heartbeats/s \
         | read all nodes | file size |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and then only the smallest size runs, as a quick check that the benchmark still works.
    let sizes: &[u32] = if std::env::args().any(|arg| arg == "--bench") {
        &SIZES
    } else {
        &SIZES[..1]
    };
    for &nodes in sizes {
        let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
        report("memory", nodes, &bench(memory, nodes, callers).await?);

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("taskfly.db");
        let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&path)?);
        let mut figures = bench(sqlite, nodes, callers).await?;
        // The store is dropped by now, which checkpoints the write-ahead log into the file.
        figures.file_bytes = Some(database_bytes(&path));
        report("sqlite", nodes, &figures);
    }
    Ok(())
}

async fn bench(store: Arc<dyn Store>, count: u32, callers: u32) -> Result<Figures, BoxError> {
    let now = SystemTime::now();
    let id: Arc<str> = Arc::from(format!("dep-bench{count}"));
    let deployment = Deployment {
        id: id.to_string(),
        status: DeploymentStatus::Pending,
        cloud_provider: "local".to_owned(),
        total_nodes: count,
        retries: 0,
        nodes_completed: 0,
        nodes_failed: 0,
        nodes_terminated: 0,
        created_at: now,
        updated_at: now,
        completed_at: None,
        error_message: None,
        rerun_of: None,
        cleaned_at: None,
    };
    let nodes: Vec<Node> = (0..count)
        .map(|index| {
            let mut node = Node::new(&id, index, now);
            // Every node holds a distinct provision token hash, as in the engine.
            let mut hash = [0xA5; 32];
            hash[..4].copy_from_slice(&index.to_le_bytes());
            node.provision_token_hash = Some(hash);
            node
        })
        .collect();

    let started = Instant::now();
    store.create_deployment(deployment, nodes).await?;
    let create = started.elapsed();
    store
        .update_deployment_status(&id, DeploymentStatus::Provisioning, None, now)
        .await?;

    let mut updating = drive(&store, &id, count, callers, Step::StartScript).await;
    let first_heartbeats = drive(&store, &id, count, callers, Step::Heartbeat).await;
    let mut warm_heartbeats = Duration::ZERO;
    for _ in 0..WARM_HEARTBEAT_ROUNDS {
        warm_heartbeats += drive(&store, &id, count, callers, Step::Heartbeat).await;
    }
    updating += drive(&store, &id, count, callers, Step::Complete).await;

    let started = Instant::now();
    let read = store.nodes(&id).await?;
    let read_nodes = started.elapsed();
    let done = store
        .deployment(&id)
        .await?
        .ok_or("the deployment vanished")?;
    if read.len() != count as usize
        || done.status != DeploymentStatus::Completed
        || done.nodes_completed != count
    {
        return Err(format!(
            "expected {count} completed nodes, found {} nodes and deployment {} with {} completed",
            read.len(),
            done.status,
            done.nodes_completed
        )
        .into());
    }
    Ok(Figures {
        create,
        updates: 4 * u64::from(count),
        updating,
        first_heartbeats,
        warm_heartbeats,
        read_nodes,
        file_bytes: None,
    })
}

/// Runs `step` on every node of deployment `id`, spread over `callers` tasks, and returns how
/// long it took.
async fn drive(
    store: &Arc<dyn Store>,
    id: &Arc<str>,
    count: u32,
    callers: u32,
    step: Step,
) -> Duration {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let store = Arc::clone(store);
        let id = Arc::clone(id);
        tasks.spawn(async move {
            for index in (caller..count).step_by(callers as usize) {
                let node_id = format!("{id}-{index}");
                let now = SystemTime::now();
                let updates: &[NodeUpdate] = match step {
                    Step::StartScript => &[
                        status(NodeStatus::Provisioning),
                        NodeUpdate::Provisioned {
                            instance: taskfly::InstanceRef {
                                id: format!("i-{index}"),
                                locator: String::new(),
                            },
                            ip_address: Some("10.0.0.1".to_owned()),
                            attempt: 1,
                        },
                        status(NodeStatus::RunningScript),
                    ],
                    Step::Complete => &[NodeUpdate::Status {
                        status: NodeStatus::Completed,
                        exit_code: Some(0),
                        message: None,
                    }],
                    Step::Heartbeat => {
                        if let Err(e) = store.touch_node(&node_id, now).await {
                            panic!("heartbeat of {node_id}: {e}");
                        }
                        &[]
                    }
                };
                for update in updates {
                    if let Err(e) = store.update_node(&node_id, update.clone(), now).await {
                        panic!("update of {node_id}: {e}");
                    }
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            panic!("a bench task failed: {e}");
        }
    }
    started.elapsed()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn status(status: NodeStatus) -> NodeUpdate {
    NodeUpdate::Status {
        status,
        exit_code: None,
        message: None,
    }
}

/// The database file and its write-ahead log, in bytes.
fn database_bytes(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn report(store: &str, nodes: u32, f: &Figures) {
    let per_second = |count: u64, took: Duration| count as f64 / took.as_secs_f64().max(1e-9);
    let heartbeats = u64::from(nodes);
    let file = f
        .file_bytes
        .map_or_else(|| "-".to_owned(), |b| format!("{:.1} MB", b as f64 / 1e6));
    let create_ms = f.create.as_secs_f64() * 1e3;
    let (updates, updating) = (f.updates, f.updating.as_secs_f64());
    println!(
        "| {store} | {nodes} | {create_ms:.1} ms | {updates} in {updating:.3} s | {:.0} | {:.0} \
         | {:.0} | {:.1} ms | {file} |",
        per_second(f.updates, f.updating),
        per_second(heartbeats, f.first_heartbeats),
        per_second(
            heartbeats * u64::from(WARM_HEARTBEAT_ROUNDS),
            f.warm_heartbeats
        ),
        f.read_nodes.as_secs_f64() * 1e3,
    );
}
