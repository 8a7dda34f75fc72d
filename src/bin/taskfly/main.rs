//! `taskfly`: the command-line client, the in-process runner (`taskfly run`) and the node agent
//! (`taskfly agent`). Parses arguments, sets up tracing, and hands off to `commands`.

mod commands;
mod follow;
mod output;
mod outputs;
#[path = "../shared/providers.rs"]
mod providers;
mod watch;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Run a program on N machines at once, each with its own slice of the work.
#[derive(Debug, Parser)]
#[command(name = "taskfly", version, about, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// URL of the taskflyd daemon.
    #[arg(
        long,
        global = true,
        env = "TASKFLY_DAEMON",
        default_value = "http://127.0.0.1:8080"
    )]
    pub daemon: String,
    /// The Go tool's spelling: the daemon's address (use with --daemon-port).
    #[arg(long, global = true, hide = true)]
    pub daemon_ip: Option<String>,
    /// The Go tool's spelling: the daemon's port (use with --daemon-ip).
    #[arg(long, global = true, hide = true)]
    pub daemon_port: Option<u16>,
    /// API token (default: $TASKFLY_API_TOKEN, else ~/.taskfly/api-token). For `agent`, the
    /// node's provision token.
    #[arg(long, global = true, env = "TASKFLY_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// daemon: a PEM file of the certificates to trust (its CA, or its
    /// self-signed certificate) instead of the system's trust store.
    #[arg(long, global = true, env = "TASKFLY_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "Examples:
  taskfly run examples/hello          run a deployment on local processes, no daemon needed
  taskfly validate .                  check taskfly.yml and show each node's environment
  taskfly up . --wait                 deploy to a running taskflyd and follow it
  taskfly status dep-1a2b3c4d5e6f7a8b
  taskfly logs dep-1a2b3c4d5e6f7a8b -f";

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// For people.
    Text,
    /// Exactly one JSON document on stdout.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a deployment in-process (no daemon), streaming its logs: on local processes, or,
    /// given an --advertise-url the nodes can reach, on Slurm or SSH hosts.
    #[command(
        after_help = "Examples:\n  taskfly run examples/hello\n  taskfly run . --advertise-url http://login1:8080     Slurm or SSH hosts: nodes call back on that URL\n\nExit code: 0 if every node completed, 1 if any failed, 2 if taskfly.yml is invalid."
    )]
    Run {
        /// Project folder holding taskfly.yml.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Do not collect the nodes' outputs into ./<deployment id>/ after the run.
        #[arg(long)]
        no_outputs: bool,
        /// The URL of this machine the nodes call back on; needed for nodes elsewhere
        /// (cloud_provider: slurm, instance_config.local.hosts).
        #[arg(long, value_name = "URL")]
        advertise_url: Option<String>,
        /// With --advertise-url: the address to listen on (default 0.0.0.0:<the URL's port>).
        #[arg(long, value_name = "ADDR", requires = "advertise_url")]
        listen: Option<String>,
        /// Where to keep the run's data, in a taskfly-run-<pid>-<n> folder removed at the end
        /// (default: the system's temporary folder; for Slurm ~/.taskfly, as the compute nodes
        /// must read it).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// An option for every ssh call to nodes on instance_config.local.hosts, as `ssh -o`
        /// takes it (repeat for more), as taskflyd's --ssh-option.
        #[arg(long = "ssh-option", value_name = "OPTION")]
        ssh_options: Vec<String>,
    },
    /// Bundle a project and deploy it to the daemon.
    #[command(
        after_help = "Example:\n  taskfly up . --wait\n\nWith --wait, Ctrl-C stops following (exit 130) and leaves the deployment running;\n`taskfly down ID` stops it, or give --down-on-interrupt to stop it on Ctrl-C."
    )]
    Up {
        /// Project folder holding taskfly.yml.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Follow progress until the deployment ends; exit code as `run`.
        #[arg(long)]
        wait: bool,
        /// With --wait: Ctrl-C terminates the deployment (by default it keeps running).
        #[arg(long, requires = "wait")]
        down_on_interrupt: bool,
    },
    /// List deployments, newest first.
    List,
    /// Show one deployment and its nodes.
    #[command(after_help = "Example:\n  taskfly status dep-1a2b3c4d5e6f7a8b")]
    Status {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: Option<String>,
        /// Deployment id (the Go tool's spelling).
        #[arg(long = "id", conflicts_with = "id", hide = true)]
        id_flag: Option<String>,
    },
    /// Show a deployment's logs, prefixed by node.
    #[command(
        after_help = "Examples:\n  taskfly logs dep-1a2b3c4d5e6f7a8b\n  taskfly logs dep-1a2b3c4d5e6f7a8b --node 3 -f"
    )]
    Logs {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: String,
        /// Only this node (index or node id).
        #[arg(long)]
        node: Option<String>,
        /// Keep following until the deployment ends.
        #[arg(short, long)]
        follow: bool,
        /// Prefix each line with the time it was written on its node.
        #[arg(long)]
        timestamps: bool,
    },
    /// Run some nodes of a finished deployment again, as a new deployment: each with the same
    /// environment and slice of the work it had.
    #[command(
        after_help = "Examples:\n  taskfly rerun last                     every node that failed or was terminated\n  taskfly rerun dep-1a2b --nodes 1,4,7-9 --wait\n\nExit code: as `up` (with --wait, as `run`)."
    )]
    Rerun {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: String,
        /// Every node that failed or was terminated (the default).
        #[arg(long, conflicts_with = "nodes")]
        failed: bool,
        /// These node indexes: a comma-separated list of indexes and ranges.
        #[arg(long, value_name = "LIST", value_parser = commands::parse_node_list)]
        nodes: Option<NodeList>,
        /// Follow progress until the rerun ends; exit code as `run`.
        #[arg(long)]
        wait: bool,
    },
    /// Terminate a deployment: every instance is terminated.
    Down {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: String,
    },
    /// Download the files the nodes sent back (taskfly.yml `outputs:`).
    #[command(
        after_help = "Examples:\n  taskfly outputs last\n  taskfly outputs dep-1a2b3c4d5e6f7a8b --dest results --node 3\n\nWrites DIR/node-<index>/<path>; an existing file is an error (exit 1) unless --force."
    )]
    Outputs {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: String,
        /// Folder to write into (default ./<deployment id>/).
        #[arg(long, value_name = "DIR")]
        dest: Option<PathBuf>,
        /// Only this node's outputs (its index).
        #[arg(long, value_name = "I")]
        node: Option<u32>,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Delete the files of a finished deployment (or all of them); --forget deletes records too.
    #[command(
        after_help = "Examples:\n  taskfly cleanup dep-1a2b3c4d5e6f7a8b   delete its files; status and logs stay\n  taskfly cleanup --forget --dry-run     list the finished deployments --forget would delete\n  taskfly cleanup --forget               delete every finished deployment, records and all"
    )]
    Cleanup {
        /// Deployment id, a unique prefix of one, or `last` for the newest.
        id: Option<String>,
        /// Every finished deployment.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Also delete the records (status, nodes, logs): of ID, or without ID of every
        /// finished deployment.
        #[arg(long)]
        forget: bool,
        /// With --forget: print what would be deleted, delete nothing.
        #[arg(long, requires = "forget")]
        dry_run: bool,
    },
    /// Follow deployment and node events live (all deployments, or one until it ends).
    #[command(
        after_help = "Examples:\n  taskfly watch\n  taskfly watch last\n  taskfly watch dep-1a2b3c4d5e6f7a8b --output json\n\nExit code: 0 once the deployment is final (or on interrupt without one)."
    )]
    Watch {
        /// Deployment id, a unique prefix of one, or `last` for the newest; all when omitted.
        id: Option<String>,
    },
    /// Check taskfly.yml and print the environment each node will get (secrets masked).
    Validate {
        /// Project folder holding taskfly.yml.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// The node agent: register with the daemon, run this node's slice, report back.
    // Started on each node by its provider, not by people: out of the main help.
    #[command(
        hide = true,
        after_help = "Example:\n  taskfly agent --daemon http://10.0.0.1:8080 --token <provision token>"
    )]
    Agent {
        /// Where to extract the bundle when the deployment names no remote_dest_dir.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

/// Node indexes given on the command line (`--nodes 1,4,7-9`), ascending, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeList(pub Vec<u32>);

/// The global flags that only matter when talking to a daemon.
const DAEMON_FLAGS: [&str; 3] = ["daemon", "token", "ca_file"];

/// The commands that never talk to a daemon: their help leaves out [`DAEMON_FLAGS`].
const OFFLINE_COMMANDS: [&str; 2] = ["run", "validate"];

/// The command line's definition: [`Cli`], with the daemon flags still accepted by the offline
/// commands (anywhere on the line, as before) but hidden from their help.
fn command() -> clap::Command {
    let command = Cli::command();
    let hidden: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| DAEMON_FLAGS.contains(&arg.get_id().as_str()))
        .map(|arg| arg.clone().hide(true))
        .collect();
    OFFLINE_COMMANDS.iter().fold(command, |command, name| {
        // A subcommand that has an argument already does not get the global one copied in.
        command.mut_subcommand(name, |sub| sub.args(hidden.clone()))
    })
}

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only for a person watching a terminal, never in a redirected log file.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(commands::EXIT_USAGE);
        }
    };
    let code = runtime.block_on(commands::run(cli));
    // Don't let a stuck blocking task (a hung file system call, say) keep the process alive
    // after its work is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    ExitCode::from(code)
}
