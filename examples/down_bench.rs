//! How long `down` of many local nodes takes, and how much memory the engine holds while they
//! run (figures in BENCHMARKS.md).
//!
//! Each node's script is `exec sleep 3600`: one process per node, so what is measured is the
//! engine's own work. The engine keeps its state in SQLite as `taskflyd` does, and serves the
//! node protocol on 127.0.0.1. Run it with:
//!
//! ```text
//! cargo run --features sqlite --example down_bench -- 1000 10000
//! cargo run --features full --example down_bench -- --agent-program target/debug/taskflyd 1000
//! ```
//!
//! Arguments: node counts, one deployment each. By default agents run as tasks in this process
//! (the library's `LocalProvider`); with `--agent-program P`, as processes `P agent` of their
//! own, as `taskflyd` runs them (then this process is the daemon). For each count it prints
//! the time until every node runs its script, this process' resident memory then, and the wall
//! time and CPU time (user + system, of this process) of `Orchestrator::terminate`.
//!
//! With `--scripts-only`, no agent runs: each node's instance is its script alone (`sleep 3600`
//! carrying the node's `TASKFLY_NODE_ID`, as a script looks after its agent was killed), and
//! terminating goes through `LocalProvider`'s search of `/proc` for the processes of nodes it
//! no longer tracks. Nodes then stay `booting`. This reaches counts where an agent per node
//! does not fit the machine (an agent task holds four file descriptors of this process, an
//! agent process four threads).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskfly::state::model::NodeStatus;
use taskfly::{
    async_trait, BoxError, Config, Instance, InstanceKind, InstanceRef, InstanceSpec,
    LocalProvider, Orchestrator, Owner, Provider, ProviderSettings, Server, ServerConfig,
    SqliteStore,
};

/// `--scripts-only`: instances that are a node's script alone; terminated by `LocalProvider`
/// as scripts it does not track (an agent program that is never started makes it look for
/// them in `/proc`).
struct ScriptsOnly {
    local: LocalProvider,
}

#[async_trait]
impl Provider for ScriptsOnly {
    fn name(&self) -> &str {
        "local"
    }

    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        self.local.instance_kind(settings, owner)
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let node_id = spec.owner.name().to_owned();
        let mut script = tokio::process::Command::new("sleep")
            .arg("3600")
            .env("TASKFLY_NODE_ID", &node_id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()?;
        tokio::spawn(async move { script.wait().await });
        Ok(Instance {
            reference: InstanceRef {
                id: format!("local-{node_id}-{}", spec.owner.attempt()),
                locator: node_id,
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        self.local.terminate(instance).await
    }
}

/// How the nodes' agents run.
enum Agents {
    Tasks,
    Processes(PathBuf),
    None,
}

/// What one deployment measured.
struct Figures {
    nodes: u32,
    start: Duration,
    rss_mib: f64,
    down: Duration,
    down_cpu: Duration,
}

/// This process' CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Fields 14 and 15 of the line (utime, stime), counted after the command name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Linux reports them in USER_HZ, 100 on every architecture Rust targets.
    Duration::from_millis(ticks * 10)
}

/// This process' resident memory in MiB, from `/proc/self/status`.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn write_project(dir: &Path, nodes: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("taskfly.yml"),
        format!(
            "cloud_provider: local\napplication_files: [run.sh]\nremote_script_to_run: run.sh\n\
             nodes:\n  count: {nodes}\n"
        ),
    )?;
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\nexec sleep 3600\n")
}

async fn measure(nodes: u32, agents: &Agents) -> Result<Figures, Box<dyn std::error::Error>> {
    let root =
        std::env::temp_dir().join(format!("taskfly-down-bench-{}-{nodes}", std::process::id()));
    let data_dir = root.join("data");
    let project = root.join("project");
    write_project(&project, nodes)?;
    std::fs::create_dir_all(&data_dir)?;
    let local = LocalProvider::new(data_dir.join("work")).grace_period(Duration::from_secs(5));
    let provider: Arc<dyn Provider> = match agents {
        Agents::Tasks => Arc::new(local),
        Agents::Processes(program) => Arc::new(local.agent_program(program, ["agent"])),
        Agents::None => Arc::new(ScriptsOnly {
            local: local.agent_program("/nonexistent/taskfly-agent", ["agent"]),
        }),
    };
    let ready = match agents {
        Agents::None => NodeStatus::Booting,
        _ => NodeStatus::RunningScript,
    };
    let store = SqliteStore::open(&data_dir.join("state.db"))?;
    let config = Config::new(&data_dir)
        .store(Arc::new(store))
        .provider(provider)
        .max_nodes(nodes)
        .heartbeat_timeout(Duration::from_secs(120))
        .boot_timeout(Duration::from_secs(1800));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let engine = Orchestrator::new(config)?;
    let server = Server::new(engine.clone(), ServerConfig::default())?.spawn(listener)?;

    let started = Instant::now();
    let id = engine.deploy_dir(&project).await?.id;
    loop {
        let detail = engine.deployment(&id).await?;
        let running = detail
            .nodes
            .iter()
            .filter(|node| node.status == ready)
            .count();
        if let Some(node) = detail.nodes.iter().find(|node| node.status.is_final()) {
            let why = node.error_message.as_deref().unwrap_or("");
            return Err(
                format!("node {} ended {} before down: {why}", node.id, node.status).into(),
            );
        }
        if running == nodes as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = started.elapsed();
    let rss_mib = rss_mib();

    let (cpu_before, down_started) = (cpu_time(), Instant::now());
    engine.terminate(&id).await?;
    let down = down_started.elapsed();
    let down_cpu = cpu_time().saturating_sub(cpu_before);

    server.stop().await?;
    std::fs::remove_dir_all(&root)?;
    Ok(Figures {
        nodes,
        start,
        rss_mib,
        down,
        down_cpu,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut agents = Agents::Tasks;
    let mut counts = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent-program" => {
                let program = args.next().ok_or("--agent-program needs a path")?;
                agents = Agents::Processes(program.into());
            }
            "--scripts-only" => agents = Agents::None,
            count => counts.push(count.parse::<u32>()?),
        }
    }
    if counts.is_empty() {
        counts = vec![1000, 10_000];
    }
    let described = match &agents {
        Agents::Tasks => "agent tasks in this process".to_owned(),
        Agents::Processes(program) => format!("agent processes ({})", program.display()),
        Agents::None => "no agents (scripts only; nodes stay booting)".to_owned(),
    };
    println!("local nodes running `sleep 3600`; {described}");
    println!("| nodes | all running after | RSS while running | down (wall) | down (CPU) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for nodes in counts {
        let f = measure(nodes, &agents).await?;
        println!(
            "| {} | {:.1} s | {:.0} MiB | {:.2} s | {:.2} s |",
            f.nodes,
            f.start.as_secs_f64(),
            f.rss_mib,
            f.down.as_secs_f64(),
            f.down_cpu.as_secs_f64()
        );
    }
    Ok(())
}
