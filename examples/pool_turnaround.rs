//! How long a deployment takes from `deploy` to its last node's end, with and without the
//! instance pool, when starting an instance costs `BOOT_MS` milliseconds (as booting a cloud
//! instance does; local processes start in a few milliseconds, so the delay is simulated).
//!
//! Run it with (release build; the figures are in BENCHMARKS.md):
//!
//! ```text
//! cargo run --release --example pool_turnaround -- examples/hello 2000 5
//! ```
//!
//! Arguments: the project folder, the simulated boot time in milliseconds, and how many
//! deployments to run one after another in each mode. Waits are on the engine's own state
//! changes (`Orchestrator::wait`), never polls.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskfly::state::model::DeploymentStatus;
use taskfly::{
    async_trait, BoxError, Config, Instance, InstanceKind, InstanceRef, InstanceSpec,
    LocalProvider, Orchestrator, Owner, PoolConfig, Provider, ProviderSettings, Server,
    ServerConfig,
};

/// A local provider whose instances take `boot` to start.
struct SlowBoot {
    local: LocalProvider,
    boot: Duration,
}

#[async_trait]
impl Provider for SlowBoot {
    fn name(&self) -> &str {
        self.local.name()
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        tokio::time::sleep(self.boot).await;
        self.local.provision(spec).await
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        self.local.terminate(instance).await
    }

    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        self.local.instance_kind(settings, owner)
    }

    async fn shutdown(&self) {
        self.local.shutdown().await;
    }
}

/// Runs `runs` deployments of `project` one after another; returns each one's duration.
async fn measure(
    project: &std::path::Path,
    boot: Duration,
    runs: usize,
    pooled: bool,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    let data_dir = tempfile_dir(if pooled { "pooled" } else { "plain" })?;
    let slow: Arc<dyn Provider> = Arc::new(SlowBoot {
        local: LocalProvider::new(data_dir.join("work")),
        boot,
    });
    let config = Config::new(&data_dir).provider(slow);
    let config = if pooled {
        config.pool("local", PoolConfig::new(64))
    } else {
        config
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let engine = Orchestrator::new(config)?;
    let server = Server::new(engine.clone(), ServerConfig::default())?.spawn(listener)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let created = engine.deploy_dir(project).await?;
        let done = engine.wait(&created.id).await?;
        times.push(started.elapsed());
        if done.status != DeploymentStatus::Completed {
            return Err(format!("deployment {} ended {}", done.id, done.status).into());
        }
    }
    server.stop().await?;
    std::fs::remove_dir_all(&data_dir)?;
    Ok(times)
}

fn tempfile_dir(mode: &str) -> std::io::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("taskfly-pool-bench-{mode}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn show(label: &str, times: &[Duration]) {
    let ms: Vec<String> = times
        .iter()
        .map(|t| format!("{:.0}", t.as_secs_f64() * 1000.0))
        .collect();
    let later = &times[1.min(times.len())..];
    let mean = later.iter().sum::<Duration>().as_secs_f64() * 1000.0 / later.len().max(1) as f64;
    println!(
        "{label:>7}: first {} ms, then mean {mean:.0} ms   (each: {} ms)",
        ms[0],
        ms.join(", ")
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let project = PathBuf::from(args.next().unwrap_or_else(|| "examples/hello".into()));
    let boot = Duration::from_millis(args.next().map_or(Ok(2000), |a| a.parse())?);
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    if runs == 0 {
        return Err("run at least one deployment".into());
    }
    println!(
        "{} deployments of {} in a row, instances taking {} ms to start",
        runs,
        project.display(),
        boot.as_millis()
    );
    let plain = measure(&project, boot, runs, false).await?;
    show("plain", &plain);
    let pooled = measure(&project, boot, runs, true).await?;
    show("pooled", &pooled);
    Ok(())
}
