//! Helpers shared by the integration tests: an engine served on 127.0.0.1:0, project folders
//! written on the fly, and process checks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use taskfly::wire::DeploymentView;
use taskfly::{Client, Config, Orchestrator, Server, ServerConfig, ServerHandle};

/// Generates, for each scenario `async fn name(agent: &str)` of the calling module, the tests
/// `rust::name` and `script::name`: one per node agent (`instance_config.local.agent`).
macro_rules! for_both_agents {
    ($($name:ident),* $(,)?) => {
        mod rust {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("rust").await;
                }
            )*
        }
        mod script {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("script").await;
                }
            )*
        }
    };
}

/// The API token every test engine uses.
pub const API_TOKEN: &str = "test-api-token-0123456789abcdef";

/// An engine serving its HTTP API on a free loopback port, with its own data dir.
pub struct TestEngine {
    pub engine: Orchestrator,
    pub url: String,
    pub data_dir: tempfile::TempDir,
    server: ServerHandle,
}

impl TestEngine {
    /// Start an engine with default settings.
    pub async fn start() -> TestEngine {
        TestEngine::start_with(|config| config).await
    }

    /// Start an engine, letting the test adjust its [`Config`].
    pub async fn start_with(adjust: impl FnOnce(Config) -> Config) -> TestEngine {
        TestEngine::start_serving("http", adjust, |server| server).await
    }

    /// Start an engine, letting the test adjust its [`Config`] and its [`ServerConfig`].
    pub async fn start_with_server(
        adjust: impl FnOnce(Config) -> Config,
        adjust_server: impl FnOnce(ServerConfig) -> ServerConfig,
    ) -> TestEngine {
        TestEngine::start_serving("http", adjust, adjust_server).await
    }

    /// Start an engine serving https with the PEM `cert_file` and `key_file`, letting the test
    /// adjust its [`Config`]. Its `url` (the advertise URL too) is `https://127.0.0.1:PORT`.
    #[cfg(feature = "tls")]
    pub async fn start_tls(
        cert_file: &Path,
        key_file: &Path,
        adjust: impl FnOnce(Config) -> Config,
    ) -> TestEngine {
        TestEngine::start_serving("https", adjust, |server| server.tls(cert_file, key_file)).await
    }

    async fn start_serving(
        scheme: &str,
        adjust: impl FnOnce(Config) -> Config,
        adjust_server: impl FnOnce(ServerConfig) -> ServerConfig,
    ) -> TestEngine {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("{scheme}://{}", listener.local_addr().expect("address"));
        let config = adjust(Config::new(data_dir.path()).advertise_url(&url));
        let engine = Orchestrator::new(config).expect("engine");
        let server = Server::new(
            engine.clone(),
            adjust_server(ServerConfig::default().api_token(API_TOKEN)),
        )
        .expect("server")
        .spawn(listener)
        .expect("serve");
        TestEngine {
            engine,
            url,
            data_dir,
            server,
        }
    }

    /// A client with the API token.
    pub fn client(&self) -> Client {
        Client::new(&self.url, Some(API_TOKEN.to_owned())).expect("client")
    }

    /// Deploy a project folder; returns the deployment id.
    pub async fn deploy(&self, project: &Path) -> String {
        self.engine.deploy_dir(project).await.expect("deploy").id
    }

    /// A deployment and its nodes as the API shows them.
    pub async fn view(&self, deployment_id: &str) -> taskfly::Result<DeploymentView> {
        let detail = self.engine.deployment(deployment_id).await?;
        Ok(DeploymentView::from(&detail))
    }

    /// Wait until the deployment is final, and return it as the API shows it.
    pub async fn wait(&self, deployment_id: &str) -> taskfly::Result<DeploymentView> {
        self.engine.wait(deployment_id).await?;
        self.view(deployment_id).await
    }

    /// Deploy a project folder and wait for the deployment to be final.
    pub async fn run(&self, project: &Path) -> DeploymentView {
        let id = self.deploy(project).await;
        self.wait(&id).await.expect("wait")
    }

    /// Every log line of a deployment, in order.
    pub async fn all_logs(&self, deployment_id: &str) -> Vec<taskfly::wire::LogLineView> {
        let mut lines = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .engine
                .logs(deployment_id, None, after, 1000)
                .await
                .expect("logs");
            if page.lines.is_empty() {
                return lines;
            }
            after = page.next;
            lines.extend(page.lines.iter().map(taskfly::wire::LogLineView::from));
        }
    }

    /// Stop the server and then the engine (killing every local node).
    pub async fn stop(self) {
        self.server.stop().await.expect("server");
    }
}

/// A project folder: `taskfly.yml` plus files, in a temp dir.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// A project with this `taskfly.yml`.
    pub fn new(taskfly_yml: &str) -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("taskfly.yml"), taskfly_yml).expect("write taskfly.yml");
        Project { dir }
    }

    /// Add a file (parents created) with the given mode.
    pub fn file(self, relative: &str, contents: &str, mode: u32) -> Project {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, contents).expect("write file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        self
    }

    /// Add an executable `setup.sh`.
    pub fn script(self, contents: &str) -> Project {
        self.file("setup.sh", contents, 0o755)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A `taskfly.yml` for `count` local nodes running `setup.sh`, with extra `nodes:` lines.
pub fn local_yml(count: u32, nodes_extra: &str) -> String {
    let mut yml = format!(
        "cloud_provider: local\napplication_files: [setup.sh]\nremote_script_to_run: setup.sh\nnodes:\n  count: {count}\n"
    );
    for line in nodes_extra.lines() {
        yml.push_str("  ");
        yml.push_str(line);
        yml.push('\n');
    }
    yml
}

/// `local_yml` for nodes run by `agent` (`rust` or `script`).
pub fn agent_yml(agent: &str, count: u32, nodes_extra: &str) -> String {
    format!(
        "{}instance_config:\n  local:\n    agent: {agent}\n",
        local_yml(count, nodes_extra)
    )
}

/// The `global_metadata:` line giving every node `MARKER=marker`, by which the test finds its
/// processes ([`processes_with_env`]).
pub fn marker_metadata(marker: &str) -> String {
    format!("global_metadata: {{marker: {marker}}}")
}

/// Every process listed in /proc: its pid and its folder there.
pub fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// Process ids whose environment contains `marker` (read from /proc), for checking that no
/// process of a test is left running.
pub fn processes_with_env(marker: &str) -> Vec<u32> {
    processes()
        .filter(|(_, dir)| {
            // Zombies have no environment left; a readable one means the process lives.
            std::fs::read(dir.join("environ"))
                .is_ok_and(|bytes| bytes.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Path of a binary built by this package.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "taskfly" => PathBuf::from(env!("CARGO_BIN_EXE_taskfly")),
        "taskflyd" => PathBuf::from(env!("CARGO_BIN_EXE_taskflyd")),
        other => panic!("no binary {other}"),
    }
}
pub mod chaos;
pub mod cli_daemon;
pub mod cli_run;
pub mod engine_http;
pub mod engine_provider;
pub mod engine_util;
pub mod hostile_http;
pub mod hostile_state;
pub mod hostile_tar;
pub mod pool;
pub mod sshd;
