//! One function per command. Each returns the process exit code (SPEC §5): 0 success,
//! 1 deployment failed (or the daemon refused the request: unknown id, wrong state), 2 usage or
//! validation error (a missing or wrong API token included: the invocation needs fixing),
//! 3 cannot reach the daemon.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use taskfly::wire::{DeploymentStatus, DeploymentView, LogLineView, NodeStatus};
use taskfly::{
    Client, Config, DeploymentConfig, Error, MetadataGenerator, Orchestrator, Report, Server,
    ServerConfig,
};

use crate::output::{self, Progress};
use crate::{Cli, Command, NodeList, Output};

pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_FAILED: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;
/// Stopped by Ctrl-C (128 + SIGINT), as shells report it.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

use crate::follow::{follow, Followed, POLL};

pub(crate) async fn run(cli: Cli) -> u8 {
    let format = cli.output;
    let result = match &cli.command {
        Command::Run {
            dir,
            no_outputs,
            advertise_url,
            listen,
            data_dir,
            ssh_options,
        } => match project_dir(dir) {
            Ok(dir) => {
                let options = RunOptions {
                    outputs: !no_outputs,
                    advertise_url: advertise_url.as_deref(),
                    listen: listen.as_deref(),
                    data_dir: data_dir.as_deref(),
                    ssh_options,
                };
                run_local(&dir, format, &options).await
            }
            Err(failure) => Err(failure),
        },
        Command::Validate { dir } => project_dir(dir).and_then(|dir| validate(&dir, format)),
        Command::Agent { work_dir } => agent(&cli, work_dir.clone()).await,
        Command::Up {
            dir,
            wait,
            down_on_interrupt,
        } => match project_dir(dir) {
            Ok(dir) => up(&cli, &dir, *wait, *down_on_interrupt).await,
            Err(failure) => Err(failure),
        },
        Command::List => list(&cli).await,
        Command::Status { id, id_flag } => match id.as_ref().or(id_flag.as_ref()) {
            Some(id) => status(&cli, id).await,
            None => Err(usage("status needs a deployment id: taskfly status ID")),
        },
        Command::Logs {
            id,
            node,
            follow,
            timestamps,
        } => logs(&cli, id, node.as_deref(), *follow, *timestamps).await,
        Command::Rerun {
            id, nodes, wait, ..
        } => rerun(&cli, id, nodes.as_ref(), *wait).await,
        Command::Down { id } => down(&cli, id).await,
        Command::Outputs {
            id,
            dest,
            node,
            force,
        } => crate::outputs::outputs(&cli, id, dest.as_deref(), *node, *force).await,
        Command::Cleanup {
            id,
            all,
            forget,
            dry_run,
        } => match (id.as_deref(), *all, *forget) {
            (Some(id), _, true) => forget_one(&cli, id, *dry_run).await,
            (None, _, true) => forget_finished(&cli, *dry_run).await,
            (id, all, false) => cleanup(&cli, id, all).await,
        },
        Command::Watch { id } => crate::watch::watch(&cli, id.as_deref()).await,
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            failure.report(&cli);
            failure.code
        }
    }
}

/// A command that could not do its job: what to print and which exit code.
pub(crate) struct Failure {
    code: u8,
    message: String,
    /// What to do about it, printed on a line of its own.
    hint: Option<String>,
    details: Vec<String>,
}

impl Failure {
    /// What went wrong, in one line.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    fn report(&self, cli: &Cli) {
        if cli.output == Output::Json {
            let mut doc = serde_json::json!({"error": self.message, "details": self.details});
            if let Some(hint) = &self.hint {
                doc["hint"] = serde_json::Value::String(hint.clone());
            }
            println!("{doc}");
        }
        eprintln!("error: {}", self.message);
        if let Some(hint) = &self.hint {
            eprintln!("  {hint}");
        }
        for detail in &self.details {
            eprintln!("  - {detail}");
        }
    }
}

impl Failure {
    /// The daemon could not be reached (exit 3).
    pub(crate) fn unreachable(message: &str) -> Failure {
        Failure {
            code: EXIT_UNREACHABLE,
            ..usage(message)
        }
    }
}

fn usage(message: &str) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: message.to_owned(),
        hint: None,
        details: Vec::new(),
    }
}

/// A command that could not finish its own work on this machine (a file it cannot write):
/// exit 1.
pub(crate) fn failed(message: String) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message,
        hint: None,
        details: Vec::new(),
    }
}

/// Maps a library error to what the user sees, with a hint where one helps.
pub(crate) fn failure(cli: Option<&Cli>, error: Error) -> Failure {
    let code = if error.is_transport() {
        EXIT_UNREACHABLE
    } else if error.is_invalid_config()
        || error.is_invalid_bundle()
        || error.is_invalid_input()
        || error.is_unauthorized()
    {
        EXIT_USAGE
    } else {
        EXIT_FAILED
    };
    let mut message = error.message().to_owned();
    if let Some(source) = std::error::Error::source(&error) {
        message = format!("{message}: {}", Report::new(source));
    }
    let mut hint = None;
    if let Some(cli) = cli {
        if error.is_certificate() {
            // Reached, but not trusted: starting a daemon would not help.
            message = format!(
                "{message}; give the certificate of the CA that signed it (or the daemon's own \
                 self-signed certificate) with --ca-file FILE or TASKFLY_CA_FILE"
            );
        } else if error.is_transport() {
            // One line: the URL tried (in the message) and how to get a daemon there.
            message = format!(
                "{message}; start a daemon with `taskflyd` (or point --daemon / TASKFLY_DAEMON \
                 at a running one), or use `taskfly run`, which needs no daemon"
            );
        } else if error.is_unauthorized() {
            hint = Some(api_token(cli).1);
        }
    }
    Failure {
        code,
        message,
        hint,
        details: error.details().to_vec(),
    }
}

fn daemon_url(cli: &Cli) -> String {
    match (&cli.daemon_ip, cli.daemon_port) {
        (Some(ip), Some(port)) => format!("http://{ip}:{port}"),
        (Some(ip), None) => format!("http://{ip}:8080"),
        (None, Some(port)) => format!("http://127.0.0.1:{port}"),
        (None, None) => cli.daemon.clone(),
    }
}

fn token_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".taskfly").join("api-token"))
}

/// The API token to send, and a sentence saying where it came from (or where it was looked for),
/// for when the daemon refuses it.
fn api_token(cli: &Cli) -> (Option<String>, String) {
    if let Some(token) = &cli.token {
        return (
            Some(token.clone()),
            "the API token was taken from --token / TASKFLY_API_TOKEN; the daemon's is its \
             TASKFLY_API_TOKEN or the file <data-dir>/api-token"
                .to_owned(),
        );
    }
    let Some(path) = token_file() else {
        return (
            None,
            "no API token was sent: set --token or TASKFLY_API_TOKEN ($HOME is not set, so \
             ~/.taskfly/api-token cannot be read)"
                .to_owned(),
        );
    };
    let token = std::fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let source = if token.is_some() {
        format!(
            "the API token was read from {}; set --token or TASKFLY_API_TOKEN to use another",
            path.display()
        )
    } else {
        format!(
            "no API token was sent: set --token or TASKFLY_API_TOKEN, or copy the daemon's \
             <data-dir>/api-token to {} (not found or empty)",
            path.display()
        )
    };
    (token, source)
}

pub(crate) fn client(cli: &Cli) -> Result<Client, Failure> {
    let client =
        Client::new(&daemon_url(cli), api_token(cli).0).map_err(|e| failure(Some(cli), e))?;
    match &cli.ca_file {
        // A CA file that cannot be used is a mistake in the invocation.
        Some(ca_file) => client.with_ca_file(ca_file).map_err(|e| Failure {
            code: EXIT_USAGE,
            ..failure(None, e)
        }),
        None => Ok(client),
    }
}

pub(crate) fn exit_for(view: &DeploymentView) -> u8 {
    if view.status == DeploymentStatus::Completed {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// The project folder a `run`/`up`/`validate` argument names: a folder holding `taskfly.yml`, or
/// that file itself (meaning its folder). Anything else is a mistake in the invocation (exit 2).
fn project_dir(path: &Path) -> Result<PathBuf, Failure> {
    const FILE: &str = "taskfly.yml";
    let metadata = std::fs::metadata(path)
        .map_err(|e| usage(&format!("cannot open {}: {e}", path.display())))?;
    if metadata.is_file() {
        if path.file_name() != Some(std::ffi::OsStr::new(FILE)) {
            return Err(usage(&format!(
                "{} is a file, not a project: give the folder that holds {FILE} (or {FILE} itself)",
                path.display()
            )));
        }
        return Ok(match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        });
    }
    if !path.join(FILE).exists() {
        return Err(usage(&format!(
            "{} has no {FILE}; create it, or point taskfly at the folder that holds it",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

fn load_config(dir: &Path) -> Result<DeploymentConfig, Failure> {
    DeploymentConfig::from_dir(dir).map_err(|e| failure(None, e))
}

/// Every check a deployment of the project in `dir` passes before it starts, as the engine of
/// `run` (and a daemon with this build's providers) makes them: `taskfly.yml`, the bundled
/// files, the script among them, the provider's settings.
fn check_project(dir: &Path) -> Result<DeploymentConfig, Failure> {
    // Nothing is written there: the providers are only asked to judge their settings.
    let engine = Config::new(std::env::temp_dir().join("taskfly-validate"));
    #[cfg(feature = "aws")]
    let engine = engine.provider(std::sync::Arc::new(taskfly::AwsProvider::new()));
    // Slurm judges its section (`instance_config.slurm`) without running anything.
    let engine = engine.provider(std::sync::Arc::new(taskfly::SlurmProvider::new(
        std::env::temp_dir().join("taskfly-validate"),
    )));
    let mut built_in = vec!["local", "slurm"];
    if cfg!(feature = "aws") {
        built_in.push("aws");
    }
    // A provider this build does not have (a daemon's own) judges its section on the daemon.
    let engine = match load_config(dir)?.cloud_provider.as_str() {
        name if built_in.contains(&name) => engine,
        name => engine.provider(std::sync::Arc::new(ElsewhereProvider(name.to_owned()))),
    };
    engine.check_dir(dir).map_err(|e| {
        // Offline, a taskfly.yml over the size limit is a mistake in the invocation.
        let too_large = e.is_too_large();
        let failure = failure(None, e);
        Failure {
            code: if too_large { EXIT_USAGE } else { failure.code },
            ..failure
        }
    })
}

/// Stands in, for [`check_project`], for a provider this build does not have: it accepts any
/// section (the daemon that has the provider judges it) and starts nothing.
struct ElsewhereProvider(String);

#[taskfly::async_trait]
impl taskfly::Provider for ElsewhereProvider {
    fn name(&self) -> &str {
        &self.0
    }

    async fn provision(
        &self,
        _spec: taskfly::InstanceSpec,
    ) -> Result<taskfly::Instance, taskfly::BoxError> {
        Err(format!("the `{}` provider is not in this build of taskfly", self.0).into())
    }

    async fn terminate(&self, _instance: &taskfly::InstanceRef) -> Result<(), taskfly::BoxError> {
        Ok(())
    }
}

fn validate(dir: &Path, format: Output) -> Result<u8, Failure> {
    let config = check_project(dir)?;
    let generator = MetadataGenerator::new(&config.nodes).map_err(|e| failure(None, e))?;
    let deployment_id = "<deployment-id>";
    let total = generator.total_nodes();
    // Over SSH, where each node runs: `user@host:port`.
    let hosts = &config.local.hosts;
    let host_of = |i: u32| {
        (!hosts.is_empty()).then(|| {
            format!(
                "{}@{}:{}",
                config.local.ssh_user.as_deref().unwrap_or_default(),
                hosts[i as usize % hosts.len()],
                config.local.ssh_port
            )
        })
    };
    if format == Output::Json {
        let nodes: Vec<serde_json::Value> = (0..total)
            .map(|i| {
                let node_id = format!("{deployment_id}-{i}");
                let env: serde_json::Map<String, serde_json::Value> = generator
                    .node_env(deployment_id, &node_id, i)
                    .redacted()
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                let mut node = serde_json::json!({"node_index": i, "env": env});
                if let Some(host) = host_of(i) {
                    node["ssh_host"] = serde_json::Value::String(host);
                }
                node
            })
            .collect();
        let doc = serde_json::json!({
            "valid": true,
            "cloud_provider": config.cloud_provider.as_str(),
            "total_nodes": total,
            "remote_script_to_run": config.remote_script_to_run,
            "nodes": nodes,
        });
        println!("{doc}");
        return Ok(EXIT_OK);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "taskfly.yml is valid: {total} node(s) on {}, running {}",
        config.cloud_provider.as_str(),
        config.remote_script_to_run
    );
    for i in 0..total {
        let node_id = format!("{deployment_id}-{i}");
        match host_of(i) {
            Some(host) => {
                let _ = writeln!(out, "\nnode {i} (on {host}):");
            }
            None => {
                let _ = writeln!(out, "\nnode {i}:");
            }
        }
        for (name, value) in generator.node_env(deployment_id, &node_id, i).redacted() {
            let _ = writeln!(out, "  {name}={}", output::quote_for_display(&value));
        }
    }
    Ok(EXIT_OK)
}

/// What `taskfly run` is told beyond the project folder.
struct RunOptions<'a> {
    /// Collect the nodes' outputs after the run.
    outputs: bool,
    /// `--advertise-url`: the URL nodes elsewhere call back on.
    advertise_url: Option<&'a str>,
    /// `--listen`: the address the engine listens on for them.
    listen: Option<&'a str>,
    /// `--data-dir`: where the run's own data folder is made.
    data_dir: Option<&'a Path>,
    /// `--ssh-option`s for the calls to SSH hosts.
    ssh_options: &'a [String],
}

/// Where the nodes of a `taskfly run --advertise-url` call the embedded engine.
#[derive(Debug, PartialEq, Eq)]
struct Callback {
    /// The URL the nodes are given.
    advertise_url: String,
    /// The address the engine listens on.
    listen: String,
}

/// Reads `--advertise-url` (and `--listen`): the URL must be `http://HOST[:PORT][/PATH]`, and
/// without `--listen` name its port, which the engine then listens on on every interface.
fn callback(url: &str, listen: Option<&str>) -> Result<Callback, Failure> {
    let bad = |why: &str| Failure {
        hint: Some(
            "give the URL of this machine the nodes can reach, e.g. --advertise-url \
             http://login1:8080"
                .to_owned(),
        ),
        ..usage(&format!("--advertise-url {url}: {why}"))
    };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(bad(
                "taskfly run serves plain http; for https, start taskflyd with --tls-cert and \
                 --tls-key and run `taskfly up --wait`",
            ))
        }
        _ => return Err(bad("it must start with http://")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(bad("it must name no user or password"));
    }
    // The port follows the last `:`, outside an IPv6 address's brackets.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("it names no host"));
    }
    let port = match port {
        Some(port) => Some(
            port.parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| bad(&format!("`{port}` is not a port number")))?,
        ),
        None => None,
    };
    let listen =
        match (listen, port) {
            (Some(listen), _) => listen.to_owned(),
            (None, Some(port)) => format!("0.0.0.0:{port}"),
            (None, None) => return Err(Failure {
                hint: Some(
                    "add the port to listen on to the URL (http://HOST:PORT), or give --listen \
                     ADDR when the nodes reach this machine through another port"
                        .to_owned(),
                ),
                ..usage(&format!(
                    "--advertise-url {url} names no port, so taskfly run cannot tell where to \
                     listen"
                ))
            }),
        };
    Ok(Callback {
        advertise_url: url.trim_end_matches('/').to_owned(),
        listen,
    })
}

/// `taskfly run` of a project whose nodes run elsewhere (`what`) without `--advertise-url`:
/// refused, since the nodes could not call back.
fn nodes_elsewhere(what: &str) -> Failure {
    Failure {
        hint: Some(
            "give --advertise-url with a URL of this machine the nodes can reach (e.g. \
             `taskfly run --advertise-url http://login1:8080`, which listens on 0.0.0.0:8080; \
             --listen sets another address), or start taskflyd with an --advertise-url and run \
             `taskfly up --wait`"
                .to_owned(),
        ),
        ..usage(&format!(
            "taskfly run runs nodes on this machine only unless given --advertise-url; this \
             taskfly.yml sends them to {what}"
        ))
    }
}

async fn run_local(dir: &Path, format: Output, options: &RunOptions<'_>) -> Result<u8, Failure> {
    // Validate before anything starts, so mistakes are reported with exit code 2.
    let config = check_project(dir)?;
    let slurm = config.cloud_provider.as_str() == "slurm";
    // Nodes elsewhere call the engine back, which listens on 127.0.0.1 unless told otherwise.
    let elsewhere = if slurm {
        Some("Slurm (cloud_provider: slurm)")
    } else if !config.local.hosts.is_empty() {
        Some("SSH hosts (instance_config.local.hosts)")
    } else {
        None
    };
    let callback = match (options.advertise_url, elsewhere) {
        (Some(url), _) => Some(callback(url, options.listen)?),
        (None, Some(what)) => return Err(nodes_elsewhere(what)),
        (None, None) => None,
    };
    let data_dir = run_data_dir(options.data_dir, slurm)?;
    let result = run_local_in(dir, &data_dir, format, options, callback.as_ref()).await;
    tracing::debug!(data_dir = %data_dir.display(), "engine stopped; removing the run's data folder");
    if let Err(e) = remove_run_data(&data_dir) {
        eprintln!(
            "warning: cannot remove the run's data folder {}: {e}; remove it by hand",
            data_dir.display()
        );
    }
    tracing::debug!("removed the run's data folder");
    result
}

/// How many threads remove the nodes' work folders at the end of a run.
const REMOVERS: usize = 8;

/// Removes the run's data folder. Most of it is the nodes' work folders
/// (`work/<deployment>/<node>/`): several threads remove them at once, since on a file system
/// that discards freed blocks (`mount -o discard`, common on cloud disks) every removal waits
/// for the disk, and those waits then overlap instead of adding up. Links are never followed.
fn remove_run_data(data_dir: &Path) -> std::io::Result<()> {
    let node_folders: Vec<PathBuf> = std::fs::read_dir(data_dir.join("work"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|deployment| std::fs::read_dir(deployment.path()).ok())
        .flat_map(|nodes| nodes.flatten().map(|node| node.path()))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..REMOVERS.min(node_folders.len()) {
            scope.spawn(|| {
                while let Some(folder) =
                    node_folders.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    // A failure shows in the removal of the whole folder below.
                    let _ = std::fs::remove_dir_all(folder);
                }
            });
        }
    });
    match std::fs::remove_dir_all(data_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        removed => removed,
    }
}

/// Makes the run's own data folder (mode 0700, removed at the end): `taskfly-run-<pid>-<n>` in
/// `--data-dir`, else in the system's temporary folder, or for Slurm in `~/.taskfly` (the
/// compute nodes read the node bootstraps from there, so it must be on a file system they
/// share, as home folders on clusters are, and as `taskflyd`'s data dir must be).
fn run_data_dir(given: Option<&Path>, slurm: bool) -> Result<PathBuf, Failure> {
    let parent = match given {
        Some(dir) => dir.to_path_buf(),
        None if slurm => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".taskfly"))
            .ok_or_else(|| {
                usage(
                    "$HOME is not set, so there is no ~/.taskfly for the run's data: give \
                     --data-dir with a folder the compute nodes share",
                )
            })?,
        None => std::env::temp_dir(),
    };
    let data_dir = parent.join(format!(
        "taskfly-run-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::create_dir_all(&parent)
        .and_then(|()| std::fs::DirBuilder::new().mode(0o700).create(&data_dir))
        .map_err(|e| {
            let what = if given.is_some() {
                "pick another --data-dir"
            } else {
                "give --data-dir with a folder that is"
            };
            usage(&format!(
                "cannot create the run's data folder {}: {e}; {what} writable{}",
                data_dir.display(),
                if slurm {
                    " and shared with the compute nodes"
                } else {
                    ""
                }
            ))
        })?;
    Ok(data_dir)
}

async fn run_local_in(
    dir: &Path,
    data_dir: &Path,
    format: Output,
    options: &RunOptions<'_>,
    callback: Option<&Callback>,
) -> Result<u8, Failure> {
    let listen = callback.map_or("127.0.0.1:0", |callback| callback.listen.as_str());
    let listener =
        tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| match (callback, e.kind()) {
                (None, _) => usage(&format!("cannot open a local port for the nodes: {e}")),
                (Some(_), std::io::ErrorKind::AddrInUse) => usage(&format!(
                    "{listen} is already in use; stop the other process or pick another port \
                 (--advertise-url, --listen)"
                )),
                (Some(_), _) => usage(&format!("cannot listen on {listen}: {e} (--listen)")),
            })?;
    let config = match callback {
        // Local processes register within moments; a node that has not after a minute never
        // will.
        None => Config::new(data_dir).boot_timeout(Duration::from_secs(60)),
        // Nodes elsewhere: Slurm's (SSH hosts are the local provider's), tagged with an owner
        // id of this run's own, so its leak checks touch no other job.
        Some(callback) => Config::new(data_dir)
            .advertise_url(callback.advertise_url.clone())
            .provider(std::sync::Arc::new(crate::providers::slurm(
                data_dir,
                random_id()?,
            ))),
    };
    // SSH hosts' calls with the user's options (the local provider's work folder as by default).
    let config = if options.ssh_options.is_empty() {
        config
    } else {
        config.provider(std::sync::Arc::new(
            taskfly::LocalProvider::new(data_dir.join("work"))
                .ssh_options(options.ssh_options.to_vec()),
        ))
    };
    let engine = Orchestrator::new(config).map_err(|e| failure(None, e))?;
    let server = Server::new(engine.clone(), ServerConfig::default())
        .and_then(|server| server.spawn(listener))
        .map_err(|e| failure(None, e))?;
    let outcome = run_and_follow(&engine, dir, format, options.outputs).await;
    tracing::debug!("the deployment ended; stopping the engine");
    // Ctrl-C or the end: stop the server, then every node.
    if tokio::time::timeout(Duration::from_secs(45), server.stop())
        .await
        .is_err()
    {
        eprintln!("warning: some nodes took more than 45 s to stop");
    }
    outcome
}

/// A new random id: 16 bytes, in hex.
fn random_id() -> Result<String, Failure> {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random)
        .map_err(|e| failed(format!("the OS random number generator failed: {e}")))?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// Follows the deployment of `dir` on `engine` to its end: its log lines as they come, its
/// progress from the engine's counters (one row read per change, whatever the node count),
/// the whole deployment (its nodes) read once, at the end.
async fn run_and_follow(
    engine: &Orchestrator,
    dir: &Path,
    format: Output,
    outputs: bool,
) -> Result<u8, Failure> {
    let created = engine.deploy_dir(dir).await.map_err(|e| failure(None, e))?;
    let id = created.id;
    let mut progress = Progress::new(format, created.total_nodes);
    let mut watch = engine.watch(&id).await.map_err(|e| failure(None, e))?;
    let started = Instant::now();
    let mut cursor = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    // Set once Ctrl-C came: its future is done and must not be polled again (the watch may
    // see the end only a moment after the terminate returned, so the loop goes round once
    // more).
    let mut interrupted = false;
    loop {
        let page = engine
            .logs(&id, None, cursor, 1000)
            .await
            .map_err(|e| failure(None, e))?;
        cursor = page.next;
        progress.print_logs(&log_views(&page.lines));
        if progress.stdout_closed() && !watch.current().is_final() {
            // Nobody reads the nodes' lines any more (`taskfly run | head`): stop them, as
            // Ctrl-C would, rather than run on unseen.
            progress.message("standard output was closed: terminating every node");
            let _ = engine.terminate(&id).await;
            return Err(failed(format!(
                "deployment {id} terminated: standard output was closed"
            )));
        }
        if watch.current().is_final() {
            let detail = engine.deployment(&id).await.map_err(|e| failure(None, e))?;
            let view = DeploymentView::from(&detail);
            // Lines that arrived between the last page and the final state.
            loop {
                let page = engine
                    .logs(&id, None, cursor, 1000)
                    .await
                    .map_err(|e| failure(None, e))?;
                if page.lines.is_empty() {
                    break;
                }
                cursor = page.next;
                progress.print_logs(&log_views(&page.lines));
            }
            progress.finish(&view, started.elapsed());
            let collected = if outputs {
                crate::outputs::collect_after_run(engine, &id, format).await
            } else {
                EXIT_OK
            };
            return Ok(exit_for(&view).max(collected));
        }
        progress.update_summary(watch.current(), started.elapsed());
        tokio::select! {
            // Log lines change nothing the watch sees: poll for them at least every POLL.
            changed = tokio::time::timeout(POLL, watch.changed()) => {
                if let Ok(Err(e)) = changed {
                    return Err(failure(None, e));
                }
            }
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                progress.message("interrupted: terminating every node");
                let _ = engine.terminate(&id).await;
            }
        }
    }
}

fn log_views(lines: &[taskfly::state::LogLine]) -> Vec<LogLineView> {
    lines.iter().map(LogLineView::from).collect()
}

async fn agent(cli: &Cli, work_dir: Option<PathBuf>) -> Result<u8, Failure> {
    // Started by a local provider: everything comes from the environment.
    let from_env = taskfly::agent::AgentConfig::from_env().map_err(|e| failure(None, e))?;
    let config = match from_env {
        Some(config) => config,
        None => {
            let Some(token) = cli.token.clone() else {
                return Err(usage("agent needs --token PROVISION_TOKEN"));
            };
            let work_dir = work_dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("taskfly-agent-{}", std::process::id()))
            });
            let config = taskfly::agent::AgentConfig::new(daemon_url(cli), token, work_dir);
            match &cli.ca_file {
                Some(ca_file) => config.ca_file(ca_file),
                None => config,
            }
        }
    };
    let report = taskfly::agent::run_until_signal(config)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"node_id": report.node_id, "status": report.status, "exit_code": report.exit_code})
        );
    }
    Ok(if report.status == NodeStatus::Completed {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

async fn up(cli: &Cli, dir: &Path, wait: bool, down_on_interrupt: bool) -> Result<u8, Failure> {
    let config = load_config(dir)?;
    let project = dir.to_path_buf();
    let patterns = config.application_files.clone();
    let bundle = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        taskfly::bundle::write_client_bundle(&project, &patterns, &mut bytes).map(|_| bytes)
    })
    .await
    .map_err(|e| usage(&format!("bundling failed: {e}")))?
    .map_err(|e| failure(None, e))?;
    let client = client(cli)?;
    let created = client
        .create_deployment(bundle.into())
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if !wait {
        let what = format!("{} node(s)", created.nodes);
        print_accepted(cli, &created, &created.deployment_id, &what);
        return Ok(EXIT_OK);
    }
    follow(
        cli,
        &patient(client),
        &created.deployment_id,
        created.nodes,
        down_on_interrupt,
    )
    .await
}

/// The answer to `up` or `rerun` without `--wait`: the 202 document with `--output json`, else
/// what was accepted and how to follow it.
fn print_accepted(cli: &Cli, answer: &impl serde::Serialize, id: &str, what: &str) {
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(answer).unwrap_or_default());
    } else {
        println!(
            "deployment {id} accepted: {what}\n  follow it: taskfly status {id}  |  taskfly logs {id} -f"
        );
    }
}

/// The client of a command that follows a deployment: its reads ride out a daemon restart
/// (retrying as long as a node agent does), saying so in one line on stderr.
fn patient(client: Client) -> Client {
    client.retry_reads(|error, budget| {
        eprintln!(
            "daemon unreachable, retrying for up to {} ({})",
            humantime::format_duration(budget),
            error.message()
        );
    })
}

async fn list(cli: &Cli) -> Result<u8, Failure> {
    let all = client(cli)?
        .deployments()
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&all).unwrap_or_default());
    } else {
        print!("{}", output::deployments_table(&all));
    }
    Ok(EXIT_OK)
}

/// The deployment id an argument names: a whole id, a unique prefix of one (with or without
/// `dep-`), or `last` for the newest. A prefix of several is a usage error listing them; one of
/// none is passed on as it is, for the daemon's usual "no deployment" answer.
pub(crate) async fn resolve_id(cli: &Cli, client: &Client, arg: &str) -> Result<String, Failure> {
    let whole = arg.len() == "dep-".len() + 16 && arg.starts_with("dep-");
    if whole || arg.is_empty() {
        return Ok(arg.to_owned());
    }
    let all = client
        .deployments()
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if arg == "last" {
        // The daemon lists them newest first.
        return all
            .first()
            .map(|d| d.deployment_id.clone())
            .ok_or_else(|| Failure {
                code: EXIT_FAILED,
                ..usage("no deployments yet, so there is no `last`")
            });
    }
    let matches = ids_starting_with(all.iter().map(|d| d.deployment_id.as_str()), arg);
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Ok(arg.to_owned()),
        many => Err(Failure {
            hint: Some("give more of the id".to_owned()),
            details: many.iter().map(|id| (*id).to_owned()).collect(),
            ..usage(&format!(
                "`{arg}` is the start of {} deployment ids",
                many.len()
            ))
        }),
    }
}

/// The ids that `arg` is the start of. Without `dep-`, the argument is the start of the hex
/// part: `d4` must not also match every id by its `dep-`.
fn ids_starting_with<'a>(ids: impl Iterator<Item = &'a str>, arg: &str) -> Vec<&'a str> {
    let hex = arg.strip_prefix("dep-").unwrap_or(arg);
    ids.filter(|id| {
        id.strip_prefix("dep-")
            .is_some_and(|rest| rest.starts_with(hex))
    })
    .collect()
}

async fn status(cli: &Cli, id: &str) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = &resolve_id(cli, &client, id).await?;
    let view = client
        .deployment(id)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&view).unwrap_or_default());
    } else {
        print!("{}", output::deployment_details(&view));
    }
    Ok(EXIT_OK)
}

async fn logs(
    cli: &Cli,
    id: &str,
    node: Option<&str>,
    follow_logs: bool,
    timestamps: bool,
) -> Result<u8, Failure> {
    let client = if follow_logs {
        patient(client(cli)?)
    } else {
        client(cli)?
    };
    let id = &resolve_id(cli, &client, id).await?;
    let mut printer = LogPrinter {
        cursor: 0,
        collected: Vec::new(),
        color: output::use_color() && cli.output == Output::Text,
        // Followed with `--output json`: one JSON object per line (NDJSON), each written as
        // it arrives, instead of one document at the end.
        streaming_json: follow_logs && cli.output == Output::Json,
        output: cli.output,
        timestamps,
    };
    let fail = |e| failure(Some(cli), e);
    // The deployment says which nodes ran more than once (their lines carry the attempt)
    // and, when following, whether it has ended; followed, its events keep it current.
    if follow_logs {
        let mut followed = Followed::open(&client, id).await.map_err(fail)?;
        loop {
            let ended = followed.view.is_final();
            let retried = output::retried_nodes(&followed.view);
            printer
                .print_new(&client, id, node, &retried)
                .await
                .map_err(fail)?;
            if ended {
                break;
            }
            followed.next().await.map_err(fail)?;
        }
    } else {
        let view = client.deployment(id).await.map_err(fail)?;
        let retried = output::retried_nodes(&view);
        printer
            .print_new(&client, id, node, &retried)
            .await
            .map_err(fail)?;
    }
    if cli.output == Output::Json && !printer.streaming_json {
        println!(
            "{}",
            serde_json::json!({"logs": printer.collected, "next": printer.cursor})
        );
    }
    Ok(EXIT_OK)
}

/// How `taskfly logs` writes the lines it reads, and where it is.
struct LogPrinter {
    /// The `next` of the last page read.
    cursor: u64,
    /// `--output json` without `-f`: every line, printed as one document at the end.
    collected: Vec<LogLineView>,
    color: bool,
    streaming_json: bool,
    output: Output,
    timestamps: bool,
}

impl LogPrinter {
    /// Read and write the lines after the cursor, page by page; `retried`: the nodes that
    /// ran more than once, whose lines are marked with their attempt.
    async fn print_new(
        &mut self,
        client: &Client,
        id: &str,
        node: Option<&str>,
        retried: &std::collections::BTreeSet<u32>,
    ) -> Result<(), Error> {
        loop {
            let page = client.logs(id, node, self.cursor, 1000).await?;
            if page.logs.is_empty() {
                return Ok(());
            }
            self.cursor = page.next;
            let mut out = std::io::stdout().lock();
            if self.streaming_json {
                for line in &page.logs {
                    let _ = writeln!(out, "{}", serde_json::to_string(line).unwrap_or_default());
                }
            } else if self.output == Output::Json {
                self.collected.extend(page.logs);
            } else {
                for line in &page.logs {
                    let mark = line.attempt > 1 || retried.contains(&line.node_index);
                    let text = output::log_line(line, self.color, mark);
                    if self.timestamps {
                        let _ = writeln!(out, "{}", output::with_timestamp(line, &text));
                    } else {
                        let _ = writeln!(out, "{text}");
                    }
                }
            }
            let _ = out.flush();
        }
    }
}

async fn down(cli: &Cli, id: &str) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = &resolve_id(cli, &client, id).await?;
    let before = client
        .deployment(id)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if before.is_final() {
        return Ok(already_final(cli, &before));
    }
    if let Err(e) = client.terminate(id).await {
        // It may have ended between the look and the request: that is not a failure either.
        match client.deployment(id).await {
            Ok(view) if view.is_final() => return Ok(already_final(cli, &view)),
            _ => return Err(failure(Some(cli), e)),
        }
    }
    // Wait for the nodes to be gone, so `down` returning means nothing runs any more: by its
    // events, then one read of the deployment as it ended.
    let deadline = Instant::now() + Duration::from_secs(120);
    let fail = |e| failure(Some(cli), e);
    let mut followed = Followed::open(&client, id).await.map_err(fail)?;
    while !followed.view.is_final() && Instant::now() <= deadline {
        followed.next().await.map_err(fail)?;
    }
    let view = client.deployment(id).await.map_err(fail)?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&view).unwrap_or_default());
    } else {
        println!("deployment {id} {}", view.status);
    }
    if !view.is_final() {
        eprintln!(
            "error: deployment {id} is still {} after 2 minutes; check `taskfly status {id}`",
            view.status
        );
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}

/// `down` of a deployment that had already ended: nothing to stop, so success, saying so.
fn already_final(cli: &Cli, view: &DeploymentView) -> u8 {
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(view).unwrap_or_default());
    } else {
        println!(
            "deployment {} was already {}; nothing to stop",
            view.deployment_id, view.status
        );
    }
    EXIT_OK
}

async fn cleanup(cli: &Cli, id: Option<&str>, all: bool) -> Result<u8, Failure> {
    let client = client(cli)?;
    match (id, all) {
        (_, true) => {
            let result = client
                .cleanup_all()
                .await
                .map_err(|e| failure(Some(cli), e))?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&result).unwrap_or_default());
            } else {
                println!(
                    "cleaned up {} deployment(s), {} failed",
                    result.cleaned_count, result.failed_count
                );
            }
        }
        (Some(id), false) => {
            let id = &resolve_id(cli, &client, id).await?;
            client
                .cleanup(id)
                .await
                .map_err(|e| failure(Some(cli), e))?;
            if cli.output == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"deployment_id": id, "status": "cleaned"})
                );
            } else {
                println!(
                    "deployment {id} cleaned up: its files are deleted; its status and logs stay \
                     until `taskfly cleanup {id} --forget`"
                );
            }
        }
        (None, false) => {
            return Err(usage(
                "cleanup needs a deployment id, --all, or --forget (with --dry-run to see what it would delete)",
            ))
        }
    }
    Ok(EXIT_OK)
}

/// `cleanup ID --forget`: the deployment's files, then its record.
async fn forget_one(cli: &Cli, id: &str, dry_run: bool) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = &resolve_id(cli, &client, id).await?;
    if dry_run {
        let view = client
            .deployment(id)
            .await
            .map_err(|e| failure(Some(cli), e))?;
        if !view.is_final() {
            return Err(Failure {
                code: EXIT_FAILED,
                ..usage(&format!(
                    "deployment {id} is {}; it can be forgotten once it has ended",
                    view.status
                ))
            });
        }
        if cli.output == Output::Json {
            println!(
                "{}",
                serde_json::json!({"forgotten_count": 1, "deployment_ids": [id], "failed_count": 0, "dry_run": true})
            );
        } else {
            println!("would forget 1 deployment (dry run; nothing deleted):\n  {id}");
        }
        return Ok(EXIT_OK);
    }
    client.forget(id).await.map_err(|e| failure(Some(cli), e))?;
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"deployment_id": id, "status": "forgotten"})
        );
    } else {
        println!("deployment {id} forgotten: its files, status and logs are deleted");
    }
    Ok(EXIT_OK)
}

/// `cleanup --forget`: every finished deployment's files and record.
async fn forget_finished(cli: &Cli, dry_run: bool) -> Result<u8, Failure> {
    let client = client(cli)?;
    let planned = client
        .forget_finished(true)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if dry_run {
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string(&planned).unwrap_or_default());
        } else {
            println!(
                "would forget {} finished deployment(s) (dry run; nothing deleted){}",
                planned.forgotten_count,
                if planned.deployment_ids.is_empty() {
                    ""
                } else {
                    ":"
                }
            );
            for id in &planned.deployment_ids {
                println!("  {id}");
            }
        }
        return Ok(EXIT_OK);
    }
    if cli.output == Output::Text {
        println!(
            "forgetting {} finished deployment(s): files, status and logs",
            planned.forgotten_count
        );
    }
    let done = client
        .forget_finished(false)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&done).unwrap_or_default());
    } else {
        println!(
            "forgot {} deployment(s), {} failed",
            done.forgotten_count, done.failed_count
        );
    }
    Ok(if done.failed_count == 0 {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// `taskfly rerun`: the chosen nodes (every one that did not complete, unless `--nodes` names
/// them) of a finished deployment run again as a new deployment, followed like `up --wait`.
async fn rerun(cli: &Cli, id: &str, nodes: Option<&NodeList>, wait: bool) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = &resolve_id(cli, &client, id).await?;
    let selection = match nodes {
        Some(NodeList(indexes)) => taskfly::wire::RerunSelection::Indexes(indexes.clone()),
        None => taskfly::wire::RerunSelection::Failed,
    };
    let created = client
        .rerun(id, selection)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if !wait {
        let what = format!(
            "reruns node(s) {} of {id}",
            output::index_list(&created.node_indexes)
        );
        print_accepted(cli, &created, &created.deployment_id, &what);
        return Ok(EXIT_OK);
    }
    if cli.output == Output::Text {
        eprintln!(
            "deployment {} reruns node(s) {} of {id}",
            created.deployment_id,
            output::index_list(&created.node_indexes)
        );
    }
    follow(cli, &client, &created.deployment_id, created.nodes, true).await
}

/// Most node indexes one `--nodes` list may name: `nodes.count`'s own limit.
const MAX_LISTED_NODES: usize = 100_000;

/// `--nodes 1,4,7-9`: indexes and inclusive ranges, separated by commas.
pub(crate) fn parse_node_list(text: &str) -> Result<NodeList, String> {
    const FORM: &str = "a comma-separated list of node indexes and ranges, like 1,4,7-9";
    let mut indexes = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("an empty item in `{text}`; expected {FORM}"));
        }
        let index = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{part}` is not a node index or range; expected {FORM}"))
        };
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (index(first)?, index(last)?),
            None => (index(part)?, index(part)?),
        };
        if last < first {
            return Err(format!(
                "the range `{part}` runs backwards; write it as {last}-{first}"
            ));
        }
        if (last - first) as usize >= MAX_LISTED_NODES - indexes.len().min(MAX_LISTED_NODES) {
            return Err(format!(
                "`{text}` names more than {MAX_LISTED_NODES} nodes, more than a deployment has"
            ));
        }
        indexes.extend(first..=last);
    }
    indexes.sort_unstable();
    indexes.dedup();
    Ok(NodeList(indexes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_data_goes_whole_and_nothing_a_link_points_to() {
        let temp = tempfile::tempdir().expect("tempdir");
        let outside = temp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep.txt"), "keep").expect("write");
        let data_dir = temp.path().join("taskfly-run-1-2");
        for node in 0..20 {
            let bundle = data_dir.join(format!("work/dep-1/{node}-1/bundle"));
            std::fs::create_dir_all(bundle.join("sub")).expect("mkdir");
            std::fs::write(bundle.join("sub/out.txt"), "x").expect("write");
            std::os::unix::fs::symlink(&outside, bundle.join("link")).expect("symlink");
        }
        std::fs::create_dir_all(data_dir.join("deployments/dep-1")).expect("mkdir");
        std::fs::write(data_dir.join("deployments/dep-1/bundle.tar.gz"), "b").expect("write");
        std::fs::write(data_dir.join("work/stray"), "a file beside the deployments")
            .expect("write");

        remove_run_data(&data_dir).expect("removed");
        assert!(!data_dir.exists());
        assert!(outside.join("keep.txt").is_file());
        // Already gone is fine.
        remove_run_data(&data_dir).expect("nothing to remove");
    }

    #[test]
    fn an_id_prefix_without_dep_is_the_start_of_the_hex_part() {
        let ids = [
            "dep-d1aa000000000000",
            "dep-0bbb000000000000",
            "dep-d2cc000000000000",
        ];
        let of = |arg: &str| ids_starting_with(ids.iter().copied(), arg);
        assert_eq!(of("0"), ["dep-0bbb000000000000"], "not every id by its `d`");
        assert_eq!(of("d1"), ["dep-d1aa000000000000"]);
        assert_eq!(of("dep-d2"), ["dep-d2cc000000000000"]);
        assert_eq!(of("d").len(), 2);
        assert_eq!(of("dep-").len(), 3);
        assert!(of("dep").is_empty(), "`dep` is no hex");
        assert!(of("e").is_empty());
    }

    #[test]
    fn an_advertise_url_gives_the_port_to_listen_on() {
        let given = |url: &str, listen: Option<&str>| callback(url, listen).map_err(|f| f.message);
        assert_eq!(
            given("http://login1:8080/", None),
            Ok(Callback {
                advertise_url: "http://login1:8080".to_owned(),
                listen: "0.0.0.0:8080".to_owned(),
            })
        );
        assert_eq!(
            given("http://gateway.example/taskfly", Some("10.0.0.1:9000")),
            Ok(Callback {
                advertise_url: "http://gateway.example/taskfly".to_owned(),
                listen: "10.0.0.1:9000".to_owned(),
            })
        );
        let no_port = given("http://login1", None).expect_err("no port");
        assert!(no_port.contains("names no port"), "{no_port}");
        let https = given("https://login1:8443", None).expect_err("https");
        assert!(https.contains("plain http"), "{https}");
        let no_scheme = given("login1:8080", None).expect_err("no scheme");
        assert!(no_scheme.contains("http://"), "{no_scheme}");
        assert_eq!(
            given("http://[::1]:8080", None).map(|c| c.listen),
            Ok("0.0.0.0:8080".to_owned())
        );
        let no_ipv6_port = given("http://[::1]", None).expect_err("no port");
        assert!(no_ipv6_port.contains("names no port"), "{no_ipv6_port}");
        let bad_port = given("http://login1:80x/", None).expect_err("bad port");
        assert!(
            bad_port.contains("`80x` is not a port number"),
            "{bad_port}"
        );
        let no_host = given("http://:8080", None).expect_err("no host");
        assert!(no_host.contains("names no host"), "{no_host}");
    }

    #[test]
    fn node_lists_take_indexes_and_ranges() {
        assert_eq!(
            parse_node_list("1,4,7-9"),
            Ok(NodeList(vec![1, 4, 7, 8, 9]))
        );
        assert_eq!(parse_node_list(" 9 , 3-4,3"), Ok(NodeList(vec![3, 4, 9])));
        assert_eq!(parse_node_list("5-5"), Ok(NodeList(vec![5])));
    }

    #[test]
    fn a_bad_node_list_says_what_is_wrong() {
        let err = |text: &str| parse_node_list(text).err().unwrap_or_default();
        assert!(
            err("1,,2").contains("an empty item in `1,,2`"),
            "{}",
            err("1,,2")
        );
        assert!(err("x").contains("`x` is not a node index or range"));
        assert!(err("-1").contains("`-1` is not a node index or range"));
        assert!(err("7-").contains("`7-` is not a node index or range"));
        assert!(err("9-7").contains("runs backwards; write it as 7-9"));
        assert!(err("0-4294967295").contains("more than 100000 nodes"));
        assert!(err("0-60000,70000-119999").contains("more than 100000 nodes"));
    }
}
