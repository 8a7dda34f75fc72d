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
use crate::{Cli, Command, Output};

pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_FAILED: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;

/// How often progress and followed logs are refreshed.
const POLL: Duration = Duration::from_millis(250);

pub(crate) async fn run(cli: Cli) -> u8 {
    let format = cli.output;
    let result = match &cli.command {
        Command::Run { dir } => match project_dir(dir) {
            Ok(dir) => run_local(&dir, format).await,
            Err(failure) => Err(failure),
        },
        Command::Validate { dir } => project_dir(dir).and_then(|dir| validate(&dir, format)),
        Command::Agent { work_dir } => agent(&cli, work_dir.clone()).await,
        Command::Up { dir, wait } => match project_dir(dir) {
            Ok(dir) => up(&cli, &dir, *wait).await,
            Err(failure) => Err(failure),
        },
        Command::List => list(&cli).await,
        Command::Status { id, id_flag } => match id.as_ref().or(id_flag.as_ref()) {
            Some(id) => status(&cli, id).await,
            None => Err(usage("status needs a deployment id: taskfly status ID")),
        },
        Command::Logs { id, node, follow } => logs(&cli, id, node.as_deref(), *follow).await,
        Command::Down { id } => down(&cli, id).await,
        Command::Cleanup { id, all } => cleanup(&cli, id.as_deref(), *all).await,
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

fn exit_for(view: &DeploymentView) -> u8 {
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

fn validate(dir: &Path, format: Output) -> Result<u8, Failure> {
    let config = load_config(dir)?;
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

async fn run_local(dir: &Path, format: Output) -> Result<u8, Failure> {
    // Validate before anything starts, so mistakes are reported with exit code 2.
    let config = load_config(dir)?;
    if !config.local.hosts.is_empty() {
        // Its engine listens on 127.0.0.1 only, which other hosts cannot call back.
        return Err(Failure {
            hint: Some(
                "start taskflyd with an --advertise-url the hosts can reach, then run \
                 `taskfly up --wait`"
                    .to_owned(),
            ),
            ..usage(
                "taskfly run runs nodes on this machine only; this taskfly.yml sends them to SSH \
                 hosts (instance_config.local.hosts)",
            )
        });
    }
    let data_dir = std::env::temp_dir().join(format!(
        "taskfly-run-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let result = run_local_in(dir, &data_dir, format).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn run_local_in(dir: &Path, data_dir: &Path, format: Output) -> Result<u8, Failure> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| usage(&format!("cannot open a local port for the nodes: {e}")))?;
    // Local processes register within moments; a node that has not after a minute never will.
    let config = Config::new(data_dir).boot_timeout(Duration::from_secs(60));
    let engine = Orchestrator::new(config).map_err(|e| failure(None, e))?;
    let server = Server::new(engine.clone(), ServerConfig::default())
        .and_then(|server| server.spawn(listener))
        .map_err(|e| failure(None, e))?;
    let outcome = run_and_follow(&engine, dir, format).await;
    // Ctrl-C or the end: stop the server, then every node.
    if tokio::time::timeout(Duration::from_secs(45), server.stop())
        .await
        .is_err()
    {
        eprintln!("warning: some nodes took more than 45 s to stop");
    }
    outcome
}

async fn run_and_follow(engine: &Orchestrator, dir: &Path, format: Output) -> Result<u8, Failure> {
    let created = engine.deploy_dir(dir).await.map_err(|e| failure(None, e))?;
    let id = created.id;
    let mut progress = Progress::new(format, created.total_nodes);
    let mut watch = engine.watch(&id).await.map_err(|e| failure(None, e))?;
    let started = Instant::now();
    let mut cursor = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let page = engine
            .logs(&id, None, cursor, 1000)
            .await
            .map_err(|e| failure(None, e))?;
        cursor = page.next;
        progress.print_logs(&log_views(&page.lines));
        let detail = engine.deployment(&id).await.map_err(|e| failure(None, e))?;
        let view = DeploymentView::from(&detail);
        if view.is_final() {
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
            return Ok(exit_for(&view));
        }
        progress.update(&view, started.elapsed());
        tokio::select! {
            // Log lines change nothing the watch sees: poll for them at least every POLL.
            _ = tokio::time::timeout(POLL, watch.changed()) => {}
            _ = &mut ctrl_c => {
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

async fn up(cli: &Cli, dir: &Path, wait: bool) -> Result<u8, Failure> {
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
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string(&created).unwrap_or_default());
        } else {
            println!(
                "deployment {} accepted: {} node(s)\n  follow it: taskfly status {0}  |  taskfly logs {0} -f",
                created.deployment_id, created.nodes
            );
        }
        return Ok(EXIT_OK);
    }
    follow(cli, &client, &created.deployment_id, created.nodes, true).await
}

/// Follow a deployment on the daemon to its end, printing logs and progress.
async fn follow(
    cli: &Cli,
    client: &Client,
    id: &str,
    nodes: u32,
    with_progress: bool,
) -> Result<u8, Failure> {
    let mut progress = Progress::new(cli.output, nodes);
    let started = Instant::now();
    let mut cursor = 0;
    loop {
        let view = client
            .deployment(id)
            .await
            .map_err(|e| failure(Some(cli), e))?;
        loop {
            let page = client
                .logs(id, None, cursor, 1000)
                .await
                .map_err(|e| failure(Some(cli), e))?;
            if page.logs.is_empty() {
                break;
            }
            cursor = page.next;
            progress.print_logs(&page.logs);
        }
        if view.is_final() {
            progress.finish(&view, started.elapsed());
            return Ok(exit_for(&view));
        }
        if with_progress {
            progress.update(&view, started.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
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
    let matches: Vec<&str> = all
        .iter()
        .map(|d| d.deployment_id.as_str())
        .filter(|id| {
            id.starts_with(arg)
                || id
                    .strip_prefix("dep-")
                    .is_some_and(|rest| rest.starts_with(arg))
        })
        .collect();
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

async fn logs(cli: &Cli, id: &str, node: Option<&str>, follow_logs: bool) -> Result<u8, Failure> {
    let client = client(cli)?;
    let id = &resolve_id(cli, &client, id).await?;
    let mut cursor = 0;
    let mut collected = Vec::new();
    let color = output::use_color();
    loop {
        let view = if follow_logs {
            Some(
                client
                    .deployment(id)
                    .await
                    .map_err(|e| failure(Some(cli), e))?,
            )
        } else {
            None
        };
        loop {
            let page = client
                .logs(id, node, cursor, 1000)
                .await
                .map_err(|e| failure(Some(cli), e))?;
            if page.logs.is_empty() {
                break;
            }
            cursor = page.next;
            if cli.output == Output::Json {
                collected.extend(page.logs);
            } else {
                let mut out = std::io::stdout().lock();
                for line in &page.logs {
                    let _ = writeln!(out, "{}", output::log_line(line, color));
                }
            }
        }
        match view {
            Some(view) if !view.is_final() => tokio::time::sleep(POLL).await,
            _ => break,
        }
    }
    if cli.output == Output::Json {
        println!("{}", serde_json::json!({"logs": collected, "next": cursor}));
    }
    Ok(EXIT_OK)
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
    // Wait for the nodes to be gone, so `down` returning means nothing runs any more.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = client
            .deployment(id)
            .await
            .map_err(|e| failure(Some(cli), e))?;
        if view.is_final() || Instant::now() > deadline {
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
            return Ok(EXIT_OK);
        }
        tokio::time::sleep(POLL).await;
    }
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
                println!("deployment {id} cleaned up");
            }
        }
        (None, false) => return Err(usage("cleanup needs a deployment id, or --all")),
    }
    Ok(EXIT_OK)
}
