//! `taskflyd`: the TaskFly daemon. Parses flags, sets up tracing and the API token, then serves
//! the engine's HTTP API until SIGINT or SIGTERM.

#[path = "shared/providers.rs"]
mod providers;

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use taskfly::{Config, Orchestrator, Server, ServerConfig};

/// The TaskFly daemon: accepts deployments and runs them on their nodes.
#[derive(Debug, Parser)]
#[command(
    name = "taskflyd",
    version,
    after_help = "Examples:\n  taskflyd --listen 0.0.0.0:8080 --advertise-url http://10.0.0.1:8080\n  \
                  taskflyd --listen 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem \\\n      \
                  --advertise-url https://10.0.0.1:8443"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TASKFLY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// The URL nodes call back on (default: `http://<listen>`, `https://<listen>` with TLS).
    #[arg(long, env = "TASKFLY_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Serve https: the PEM certificate chain (server certificate first). Needs --tls-key.
    #[arg(
        long,
        env = "TASKFLY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Serve https: the PEM private key of --tls-cert. Needs --tls-cert.
    #[arg(
        long,
        env = "TASKFLY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Require this bearer token on GET /metrics (default: metrics are open; they name no
    /// deployment, node or secret). Prefer the environment variable: a flag shows in `ps`.
    #[arg(
        long,
        env = "TASKFLY_METRICS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    metrics_token: Option<String>,
    /// State, bundles and the API token (default: ~/.taskfly).
    #[arg(long, env = "TASKFLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A node silent for longer than this is failed (e.g. 30s, 2m).
    #[arg(long, env = "TASKFLY_HEARTBEAT_TIMEOUT", default_value = "30s", value_parser = taskfly::config::parse_duration)]
    heartbeat_timeout: Duration,
    /// Log format on stderr; RUST_LOG filters (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How long a terminated node's script gets between SIGTERM and SIGKILL.
    #[arg(long, env = "TASKFLY_GRACE_PERIOD", default_value = "10s", value_parser = taskfly::config::parse_duration)]
    grace_period: Duration,
    /// Finished deployments are removed this long after they ended (files, nodes, logs).
    #[arg(long, env = "TASKFLY_RETENTION", default_value = "7days", value_parser = taskfly::config::parse_duration)]
    retention: Duration,
    /// Most log lines kept per deployment, half that per node; a node over its share loses its
    /// oldest lines first.
    #[arg(long, env = "TASKFLY_MAX_LOG_LINES", default_value_t = 1_000_000)]
    max_log_lines: usize,
    /// Most bytes of outputs (taskfly.yml `outputs:`) one node may send back: bytes, or with
    /// KiB, MiB, GiB.
    #[arg(long, env = "TASKFLY_MAX_OUTPUTS_PER_NODE", default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    max_outputs_per_node: u64,
    /// Most files and folders of outputs one node may send back.
    #[arg(
        long,
        env = "TASKFLY_MAX_OUTPUT_FILES_PER_NODE",
        default_value_t = 10_000,
        value_name = "N"
    )]
    max_output_files_per_node: u64,
    /// Most bytes of outputs all the nodes of one deployment may send back together.
    #[arg(long, env = "TASKFLY_MAX_OUTPUTS_PER_DEPLOYMENT", default_value = "4GiB", value_parser = parse_size, value_name = "SIZE")]
    max_outputs_per_deployment: u64,
    /// Keep instances for later nodes: a pool of at most this many per provider (local and
    /// aws). Finished nodes' instances wait for the next node instead of being terminated.
    /// 0 (the default): no pool, every node gets a fresh instance.
    #[arg(long, env = "TASKFLY_POOL_MAX", default_value_t = 0, value_name = "N")]
    pool_max: usize,
    /// With --pool-max: idle instances are not retired below this many.
    #[arg(long, env = "TASKFLY_POOL_MIN", default_value_t = 0, value_name = "N")]
    pool_min: usize,
    /// With --pool-max: an instance idle this long is terminated (down to --pool-min).
    #[arg(long, env = "TASKFLY_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = taskfly::config::parse_duration)]
    pool_idle_timeout: Duration,
    /// With --pool-max: spare instances started ahead of need, beyond those in use.
    #[arg(
        long,
        env = "TASKFLY_POOL_AHEAD",
        default_value_t = 0,
        value_name = "N"
    )]
    pool_ahead: usize,
    /// An option for every ssh call to nodes on `instance_config.local.hosts`, as `ssh -o`
    /// takes it (repeat for more): e.g. `UserKnownHostsFile=/etc/taskfly/known_hosts`,
    /// `ProxyJump=bastion`. The daemon user's own SSH configuration applies as well.
    #[arg(long = "ssh-option", value_name = "OPTION")]
    ssh_options: Vec<String>,
    #[command(subcommand)]
    command: Option<DaemonCommand>,
}

impl Args {
    /// The pool settings of the --pool-* flags (`None`: no pool), checked together.
    fn pool(&self) -> Result<Option<taskfly::PoolConfig>, String> {
        if self.pool_max == 0 {
            for (flag, set) in [
                ("--pool-min", self.pool_min > 0),
                ("--pool-ahead", self.pool_ahead > 0),
            ] {
                if set {
                    return Err(format!("{flag} needs --pool-max"));
                }
            }
            return Ok(None);
        }
        let pool = taskfly::PoolConfig::new(self.pool_max)
            .min_instances(self.pool_min)
            .idle_timeout(self.pool_idle_timeout)
            .provision_ahead(self.pool_ahead)
            // An agent hears of a terminate at its next heartbeat, then stops its script.
            .release_timeout(self.heartbeat_timeout + self.grace_period + Duration::from_secs(30));
        // The pool's own rules, reported in terms of the flags that set them.
        pool.validate()
            .map_err(|e| format!("{e} (set by --pool-max, --pool-min and --pool-ahead)"))?;
        Ok(Some(pool))
    }
}

/// `config` with the provider named `name` behind a pool of its own when `pool` is set.
fn pooled(config: Config, name: &str, pool: &Option<taskfly::PoolConfig>) -> Config {
    match pool {
        Some(pool) => config.pool(name, pool.clone()),
        None => config,
    }
}

#[derive(Debug, clap::Subcommand)]
enum DaemonCommand {
    /// Internal: the agent of a local node, started by this daemon (configured through
    /// TASKFLY_AGENT_* environment variables).
    #[command(hide = true)]
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The AWS SDK's runtime logs whole requests at trace level, and a RunInstances request
    // carries the node's user data with its provision token: its logs stop at info.
    #[cfg(feature = "aws")]
    let filter = match "aws_smithy_runtime=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // Colour only for a person watching a terminal, never in a redirected log file.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("taskflyd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(DaemonCommand::Agent) = args.command {
        return runtime.block_on(agent());
    }
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("taskflyd: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    // Caught from the first moment: a SIGTERM while the daemon starts stops it cleanly once
    // it runs, rather than killing it half-started.
    let signals = ShutdownSignals::catch()?;
    // Flags are checked before anything is created or bound.
    let pool = args.pool()?;
    let data_dir = match args.data_dir.clone() {
        Some(dir) => dir,
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".taskfly"))
            .ok_or("no --data-dir given and $HOME is not set")?,
    };
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("data dir {} is not writable: {e}", data_dir.display()))?;
    // Held until this function returns: one daemon per data dir.
    let _data_dir_lock = lock_data_dir(&data_dir)?;
    let token = api_token(&data_dir)?;
    let listener = bind_listener(&args.listen).await?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let tls = args.tls_cert.clone().zip(args.tls_key.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{address}"));
    // Local nodes' agents run as processes of their own (`taskflyd agent`), so they carry on
    // while this daemon restarts.
    let program =
        std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let local = taskfly::LocalProvider::new(data_dir.join("work"))
        .grace_period(args.grace_period)
        .ssh_options(args.ssh_options.clone())
        .agent_program(program, ["agent"]);
    // Durable state: deployments, nodes (token hashes only) and logs survive a restart.
    let state_path = data_dir.join("state.db");
    let store = taskfly::SqliteStore::open(&state_path)
        .map_err(|e| {
            format!(
                "cannot open the state database {}: {}",
                state_path.display(),
                e.report()
            )
        })?
        .max_log_lines(args.max_log_lines);
    let config = Config::new(&data_dir)
        .advertise_url(advertise.clone())
        .heartbeat_timeout(args.heartbeat_timeout)
        .retention(Some(args.retention))
        .output_limits(taskfly::OutputLimits {
            max_node_bytes: args.max_outputs_per_node,
            max_node_files: args.max_output_files_per_node,
            max_deployment_bytes: args.max_outputs_per_deployment,
        })
        .store(std::sync::Arc::new(store))
        .provider(std::sync::Arc::new(local));
    let config = pooled(config, "local", &pool);
    // EC2 clients are made per deployment (each names its region and endpoint) on first use.
    // The owner id keeps this daemon's leak checks to the instances it started itself.
    #[cfg(feature = "aws")]
    let config = pooled(
        config.provider(std::sync::Arc::new(
            taskfly::AwsProvider::new().owner(daemon_id(&data_dir)?),
        )),
        "aws",
        &pool,
    );
    // Slurm jobs run the shell bootstrap from files under the data dir, which the compute
    // nodes must share; the owner id keeps the leak checks to this daemon's jobs.
    let config = config.provider(std::sync::Arc::new(
        providers::slurm(&data_dir, daemon_id(&data_dir)?).grace_period(args.grace_period),
    ));
    let server_config = ServerConfig::default().api_token(token);
    let server_config =
        match args.metrics_token.as_deref().map(str::trim) {
            Some("") => return Err(
                "--metrics-token is empty; give a token, or leave the flag out for open metrics"
                    .to_owned(),
            ),
            Some(metrics_token) => server_config.metrics_token(metrics_token),
            None => server_config,
        };
    let server_config = match &tls {
        Some((cert_file, key_file)) => server_config.tls(cert_file, key_file),
        None => server_config,
    };
    let engine = Orchestrator::new(config).map_err(|e| e.report().to_string())?;
    // The certificate and key are read here: a bad one stops the start.
    let server = match Server::new(engine.clone(), server_config) {
        Ok(server) => server,
        Err(e) => {
            engine.shutdown().await;
            return Err(e.report().to_string());
        }
    };
    tracing::info!(listen = %address, advertise_url = %advertise, tls = tls.is_some(), data_dir = %data_dir.display(), "taskflyd listening");
    server
        .run(listener, async move {
            signals.received().await;
            tracing::info!("shutting down");
        })
        .await
        .map_err(|e| e.report().to_string())
}

/// `taskflyd agent`: serve one local node, as started by this daemon's local provider.
async fn agent() -> ExitCode {
    let config = match taskfly::agent::AgentConfig::from_env() {
        Ok(Some(config)) => config,
        Ok(None) => {
            eprintln!(
                "taskflyd agent: started without {}; it is run by taskflyd itself",
                taskfly::agent::ENV_DAEMON_URL
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("taskflyd agent: {}", e.report());
            return ExitCode::from(2);
        }
    };
    match taskfly::agent::run_until_signal(config).await {
        Ok(report) if report.status == taskfly::wire::NodeStatus::Completed => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = %e.report(), "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// How long an address in use is tried again before `taskflyd` gives up on it.
const BIND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Listen on `listen`. An address in use is tried again for [`BIND_RETRY_FOR`]: after a
/// crash, a node agent on this machine that reconnects to the port while nothing listens can
/// get the port itself for its own end (a TCP connection to itself) and hold it for the
/// moment it takes to see the answer is not HTTP.
async fn bind_listener(listen: &str) -> Result<tokio::net::TcpListener, String> {
    let give_up = tokio::time::Instant::now() + BIND_RETRY_FOR;
    loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "{listen} is already in use; stop the other process or pick another --listen address"
                ))
            }
            Err(e) => return Err(format!("cannot listen on {listen}: {e}")),
        }
    }
}

/// Take `<data-dir>/taskflyd.lock`: an exclusive POSIX record lock (`fcntl`), held while the
/// returned file lives, with this process' id written in the file. A second daemon on the same
/// data dir would take the first one's nodes for lost ones after a crash and stop them, so it
/// is refused, naming the pid that holds the lock. A record lock belongs to this process alone:
/// the kernel drops it when the process ends, however it ends, and a child it forks (an agent
/// being started) never holds it, so a daemon killed mid-fork leaves no lock behind (a `flock`
/// would stay with the child until its exec).
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, String> {
    let path = data_dir.join("taskflyd.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    let whole_file = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    match fcntl(file.as_raw_fd(), FcntlArg::F_SETLK(&whole_file)) {
        Ok(_) => {}
        Err(Errno::EACCES | Errno::EAGAIN) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "another process".to_owned(),
                pid => format!("taskflyd pid {pid}"),
            };
            return Err(format!(
                "data dir {} is in use by {holder}; stop it or pick another --data-dir",
                data_dir.display()
            ));
        }
        Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .and_then(|()| file.flush());
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(file)
}

/// The API token: `TASKFLY_API_TOKEN`, else `<data-dir>/api-token`, created (mode 0600) with a
/// new random token at first start.
fn api_token(data_dir: &Path) -> Result<String, String> {
    if let Ok(token) = std::env::var("TASKFLY_API_TOKEN") {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_owned());
        }
    }
    let path = data_dir.join("api-token");
    let (token, created) = read_or_create_random(&path, 32, 0o600, "a new token made")?;
    if created {
        tracing::info!(path = %path.display(), "created a new API token");
    }
    Ok(token)
}

/// The trimmed contents of `path`, or, if there is no such file, a new random hex value of
/// `bytes` bytes written there (created with `mode`, never over a file made meanwhile); says
/// whether it was created. An empty file is an error saying to delete it to have `what`.
fn read_or_create_random(
    path: &Path,
    bytes: usize,
    mode: u32,
    what: &str,
) -> Result<(String, bool), String> {
    match std::fs::read_to_string(path) {
        Ok(value) if !value.trim().is_empty() => return Ok((value.trim().to_owned(), false)),
        Ok(_) => {
            return Err(format!(
                "{} is empty; delete it to have {what}",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut random = vec![0u8; bytes];
    getrandom::fill(&mut random)
        .map_err(|e| format!("the OS random number generator failed: {e}"))?;
    let value: String = random.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            let dir = path.parent().unwrap_or(path);
            format!(
                "data dir {} is not writable: cannot create {}: {e}",
                dir.display(),
                path.display()
            )
        })?;
    file.write_all(format!("{value}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((value, true))
}

/// This daemon's id, tagged on the EC2 instances and Slurm jobs it starts:
/// `<data-dir>/daemon-id`, created with a new random id at first start. Not a secret; it only
/// has to stay the same across restarts and differ from other daemons' in the same AWS account
/// or Slurm user.
fn daemon_id(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join("daemon-id");
    let (id, created) = read_or_create_random(
        &path,
        16,
        0o644,
        "a new id made (instances tagged with the old id are then no longer checked for leaks \
         by this daemon)",
    )?;
    if created {
        tracing::info!(path = %path.display(), daemon_id = %id, "created this daemon's id");
    }
    Ok(id)
}

/// SIGINT and SIGTERM, each caught from the moment this is made until the daemon ends.
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn catch() -> Result<ShutdownSignals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let catch = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| format!("cannot catch {name}: {e}"))
        };
        Ok(ShutdownSignals {
            interrupt: catch(SignalKind::interrupt(), "SIGINT")?,
            terminate: catch(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    /// Until one of them arrives (at once if one already has).
    async fn received(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// A size in bytes: a number, optionally followed by KiB, MiB or GiB (`256MiB`).
fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a size such as 256MiB or 1048576, got `{text}`"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`: use KiB, MiB or GiB (or plain bytes)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}
