//! The node protocol under load: an embedded engine and simulated agents driving the real HTTP
//! node protocol (issue #12; figures in BENCHMARKS.md).
//!
//! Run it with (release build, default features; `--store sqlite` needs `--features sqlite`):
//!
//! ```text
//! cargo run --release --example load -- --nodes 10000 --connections 64 --store memory --runs 5
//! cargo run --release --example load -- --serve-one-node
//! ```
//!
//! The engine serves its HTTP API on a loopback port. A provider of this program (`loadsim`)
//! hands each node's provision token to the simulated agents: `--connections` tasks, each with
//! one keep-alive HTTP/1.1 connection (hyper's client, `TCP_NODELAY` as the real client sets
//! it), each taking one node at a time through the 7 requests of a node's life: register,
//! status `downloading_assets`, `GET /nodes/assets`, status `running_script`, heartbeat, logs,
//! status `completed`. Each run deploys `--nodes` nodes, waits with `Orchestrator::wait`, cleans
//! the deployment up and forgets it (`--keep-records` keeps its record, to see what a finished
//! deployment costs); it prints node lifecycles per second (from `deploy_dir` to the end of
//! `wait`), the p50/p99 latency of each endpoint as the agents saw it, the peak RSS of the
//! process during the run (VmHWM; engine and simulated agents together, as they share the
//! process), and its RSS once the deployment is gone (with `--runs 10`, whether memory stays
//! flat across rounds).
//!
//! `--agents-process` runs the simulated agents in a child process of their own (this program
//! again), fed the provision tokens through a pipe: the peak RSS printed is then the engine's
//! alone (with this tool's provider and bookkeeping, a few MB), and the agents' is printed
//! apart. That is the figure for issue #12's "peak RSS ≤ 150 MB in the engine" at 100,000
//! nodes; without it the agents' connections, token queue and latency samples count too.
//!
//! `--rss-trace` also samples this process's RSS (VmRSS) every 0.5 s from the deployment to
//! the end of `wait`, and prints the samples: when the peak comes, and what steps lead to it.
//!
//! `--bundle-mb M` adds M MiB of incompressible data to the bundle every node downloads.
//!
//! `--events N` also opens N event streams (`GET /api/v1/events`, as the dashboard does) before
//! each run and reads them to the deployment's end: it prints the events and bytes each stream
//! got, the bytes per event, and the process's CPU time for the run (compare with `--events 0`).
//!
//! `--serve-one-node` deploys one node, registers it and reports it running, prints the
//! engine's URL, the node's auth token and the bundle file it is served (`url=...`,
//! `token=...`, `bundle=...`), and serves until killed: `scripts/bench-heartbeat.sh` and
//! `scripts/bench-bundle.sh` point wrk at it.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use taskfly::state::model::DeploymentStatus;
use taskfly::wire::RegisterResponse;
use taskfly::{
    async_trait, BoxError, Config, Instance, InstanceKind, InstanceRef, InstanceSpec, Orchestrator,
    Owner, Provider, ProviderSettings, Server, ServerConfig,
};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type Failure = Box<dyn Error + Send + Sync>;

const USAGE: &str = "usage: load [--nodes N] [--connections C] [--store memory|sqlite] [--runs R] \
                     [--events N] [--keep-records] [--agents-process] [--rss-trace] \
                     [--bundle-mb M] [--serve-one-node]";

/// The hidden option that makes this program the agents' process of `--agents-process`:
/// `--agents-child <engine address>`, provision tokens one a line on stdin.
const AGENTS_CHILD: &str = "--agents-child";

/// What to run, from the command line.
struct Options {
    nodes: u32,
    connections: usize,
    store: String,
    runs: u32,
    /// Event streams read during each run.
    events: usize,
    /// Keep each run's deployment record after its cleanup instead of forgetting it.
    keep_records: bool,
    /// Run the simulated agents in a child process, so the peak RSS is the engine's.
    agents_process: bool,
    /// Sample the RSS every 0.5 s during each run, and print the samples.
    rss_trace: bool,
    /// This is the agents' process, driving the engine at this address.
    agents_child: Option<String>,
    /// MiB of incompressible data in the project's bundle, besides the script.
    bundle_mb: u32,
    serve_one_node: bool,
}

impl Options {
    fn parse() -> Result<Options, Failure> {
        let mut options = Options {
            nodes: 1000,
            connections: 64,
            store: "memory".to_owned(),
            runs: 1,
            events: 0,
            keep_records: false,
            agents_process: false,
            rss_trace: false,
            agents_child: None,
            bundle_mb: 0,
            serve_one_node: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--nodes" => options.nodes = value()?.parse()?,
                "--connections" => options.connections = value()?.parse::<usize>()?.max(1),
                "--store" => options.store = value()?,
                "--runs" => options.runs = value()?.parse::<u32>()?.max(1),
                "--events" => options.events = value()?.parse()?,
                "--keep-records" => options.keep_records = true,
                "--agents-process" => options.agents_process = true,
                "--rss-trace" => options.rss_trace = true,
                AGENTS_CHILD => options.agents_child = Some(value()?),
                "--bundle-mb" => options.bundle_mb = value()?.parse()?,
                "--serve-one-node" => options.serve_one_node = true,
                _ => return Err(format!("unknown argument `{arg}`\n{USAGE}").into()),
            }
        }
        Ok(options)
    }
}

/// The provider `loadsim`: "starting an instance" is handing its provision token to the
/// simulated agents.
struct SimProvider {
    tokens: mpsc::UnboundedSender<String>,
}

#[async_trait]
impl Provider for SimProvider {
    fn name(&self) -> &str {
        "loadsim"
    }

    fn instance_kind(
        &self,
        _settings: &ProviderSettings,
        _owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        Ok(InstanceKind::new("loadsim"))
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        self.tokens.send(spec.provision_token.expose().to_owned())?;
        Ok(Instance {
            reference: InstanceRef {
                id: format!("sim-{}-{}", spec.owner.name(), spec.owner.attempt()),
                locator: String::new(),
            },
            ip_address: None,
        })
    }

    async fn terminate(&self, _instance: &InstanceRef) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The node endpoints, in the order a node calls them.
#[derive(Clone, Copy)]
enum Endpoint {
    Register,
    Status,
    Assets,
    Heartbeat,
    Logs,
}

const ENDPOINTS: [(Endpoint, &str); 5] = [
    (Endpoint::Register, "register"),
    (Endpoint::Status, "status"),
    (Endpoint::Assets, "assets"),
    (Endpoint::Heartbeat, "heartbeat"),
    (Endpoint::Logs, "logs"),
];

/// Request latencies in microseconds, per endpoint.
#[derive(Default)]
struct Latencies([Vec<u32>; 5]);

impl Latencies {
    fn record(&mut self, endpoint: Endpoint, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        self.0[endpoint as usize].push(micros);
    }

    fn merge(&mut self, other: Latencies) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            mine.extend(theirs);
        }
    }

    /// `name p50/p99` in milliseconds for each endpoint.
    fn percentiles(&mut self) -> Vec<(&'static str, f64, f64)> {
        ENDPOINTS
            .iter()
            .map(|(endpoint, name)| {
                let samples = &mut self.0[*endpoint as usize];
                samples.sort_unstable();
                (*name, percentile(samples, 50), percentile(samples, 99))
            })
            .collect()
    }
}

/// The `p`th percentile of sorted microsecond samples, in milliseconds.
fn percentile(sorted: &[u32], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

/// One simulated agent's keep-alive connection to the engine.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    latencies: Latencies,
}

impl Connection {
    async fn open(address: &str) -> Result<Connection, Failure> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Drives the connection; it ends when `sender` is dropped.
        tokio::spawn(connection);
        Ok(Connection {
            sender,
            host: address.to_owned(),
            latencies: Latencies::default(),
        })
    }

    /// One request; its answer's body, which must come with a 2xx status.
    async fn call(
        &mut self,
        endpoint: Endpoint,
        method: Method,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<Bytes, Failure> {
        let name = ENDPOINTS[endpoint as usize].1;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/api/v1/nodes/{name}"))
            .header(HOST, &self.host);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(json) => request
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))?,
            None => request.body(Full::new(Bytes::new()))?,
        };
        let started = Instant::now();
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        self.latencies.record(endpoint, started.elapsed());
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(format!("{name}: {status}: {text}").into());
        }
        Ok(body)
    }

    /// Registers with `provision_token` and reports the node running; its auth token.
    async fn start_node(&mut self, provision_token: &str) -> Result<String, Failure> {
        let registered = self
            .call(
                Endpoint::Register,
                Method::POST,
                None,
                Some(serde_json::json!({ "provision_token": provision_token }).to_string()),
            )
            .await?;
        let registered: RegisterResponse = serde_json::from_slice(&registered)?;
        let token = registered.auth_token;
        self.status(&token, r#"{"status":"downloading_assets"}"#)
            .await?;
        self.call(Endpoint::Assets, Method::GET, Some(&token), None)
            .await?;
        self.status(&token, r#"{"status":"running_script"}"#)
            .await?;
        Ok(token)
    }

    /// A node's whole life: the 7 requests.
    async fn run_node(&mut self, provision_token: &str) -> Result<(), Failure> {
        let token = self.start_node(provision_token).await?;
        let beat = self
            .call(
                Endpoint::Heartbeat,
                Method::POST,
                Some(&token),
                Some("{}".to_owned()),
            )
            .await?;
        let beat: serde_json::Value = serde_json::from_slice(&beat)?;
        if beat["shutdown"] != serde_json::Value::Bool(false) {
            return Err(format!("heartbeat answered {beat}").into());
        }
        let logs = r#"{"lines":[{"stream":"stdout","line":"simulated node done"}],"offset":0}"#;
        self.call(
            Endpoint::Logs,
            Method::POST,
            Some(&token),
            Some(logs.to_owned()),
        )
        .await?;
        self.status(&token, r#"{"status":"completed","exit_code":0}"#)
            .await?;
        Ok(())
    }

    async fn status(&mut self, token: &str, body: &str) -> Result<(), Failure> {
        self.call(
            Endpoint::Status,
            Method::POST,
            Some(token),
            Some(body.to_owned()),
        )
        .await?;
        Ok(())
    }
}

/// The engine, its API, and where provision tokens arrive.
struct Engine {
    engine: Orchestrator,
    server: taskfly::ServerHandle,
    address: String,
    tokens: Arc<Mutex<mpsc::UnboundedReceiver<String>>>,
}

async fn start_engine(data_dir: &Path, store: &str, config: Config) -> Result<Engine, Failure> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let config = with_store(config, store, data_dir)?;
    let engine = Orchestrator::new(config.provider(Arc::new(SimProvider { tokens: sender })))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let server = Server::new(
        engine.clone(),
        ServerConfig::default().api_token(EVENTS_TOKEN),
    )?
    .spawn(listener)?;
    Ok(Engine {
        engine,
        server,
        address,
        tokens: Arc::new(Mutex::new(receiver)),
    })
}

fn with_store(config: Config, store: &str, data_dir: &Path) -> Result<Config, Failure> {
    match store {
        "memory" => Ok(config),
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let store = taskfly::SqliteStore::open(&data_dir.join("state.db"))?;
            Ok(config.store(Arc::new(store)))
        }
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => {
            let _ = data_dir;
            Err("--store sqlite needs the `sqlite` feature: add `--features sqlite`".into())
        }
        other => Err(format!("--store: expected memory or sqlite, got `{other}`").into()),
    }
}

/// A project of `nodes` nodes on `loadsim`.
/// The project: the script, and with `bundle_mb` that many MiB of incompressible bytes
/// (`data.bin`), so the bundle is as large on the wire.
fn write_project(dir: &Path, nodes: u32, bundle_mb: u32) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho simulated\n")?;
    let mut files = "run.sh".to_owned();
    if bundle_mb > 0 {
        // xorshift64: not compressible by gzip, cheap to make.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let data: Vec<u8> = (0..u64::from(bundle_mb) * 1024 * 1024 / 8)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        std::fs::write(dir.join("data.bin"), data)?;
        files.push_str(", data.bin");
    }
    let yml = format!(
        "cloud_provider: loadsim\ninstance_config:\n  loadsim: {{}}\n\
         application_files: [{files}]\nremote_script_to_run: run.sh\nnodes:\n  count: {nodes}\n"
    );
    std::fs::write(dir.join("taskfly.yml"), yml)?;
    Ok(())
}

/// The API token of the engine, for the event streams.
const EVENTS_TOKEN: &str = "load-events-token-0123456789abcdef";

/// What one event stream got: events, bytes.
struct StreamCount {
    events: u64,
    bytes: u64,
}

/// An open event stream: its connection (which lives as long as this sender), its body, and
/// the bytes read so far.
type EventStream = (SendRequest<Full<Bytes>>, hyper::body::Incoming, u64);

/// Opens `GET /api/v1/events` once the first bytes arrived (the daemon sends them once the
/// stream is subscribed).
async fn open_events(address: &str) -> Result<EventStream, Failure> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("/api/v1/events")
        .header(HOST, address)
        .header(AUTHORIZATION, format!("Bearer {EVENTS_TOKEN}"))
        .body(Full::new(Bytes::new()))?;
    let mut body = sender.send_request(request).await?.into_body();
    let first = body
        .frame()
        .await
        .ok_or("the event stream ended at once")??;
    let bytes = first.into_data().map_or(0, |data| data.len() as u64);
    Ok((sender, body, bytes))
}

/// Reads an event stream until a deployment event says `completed`.
async fn read_events(stream: EventStream) -> Result<StreamCount, Failure> {
    let (_connection, mut body, opening) = stream;
    let mut count = StreamCount {
        events: 0,
        bytes: opening,
    };
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        count.bytes += data.len() as u64;
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if !event.starts_with("id: ") {
                continue;
            }
            count.events += 1;
            if event.contains("event: deployment") && event.contains("\"status\":\"completed\"") {
                return Ok(count);
            }
        }
    }
    Err("the event stream ended before the deployment".into())
}

/// CPU time (user + system) of this process so far, in seconds, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after its closing `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state field's start.
    (ticks(11) + ticks(12)) / 100.0
}

/// The simulated agents of one run: tasks of this process, or a process of their own
/// (`--agents-process`).
enum Agents {
    InProcess(JoinSet<Result<Latencies, Failure>>),
    Child {
        process: tokio::process::Child,
        /// Writes the provision tokens to the child's stdin until the run is over; the
        /// child's agents end once it is closed.
        feeder: tokio::task::JoinHandle<Result<(), Failure>>,
        /// The child's report, read from its stdout.
        report: tokio::task::JoinHandle<Result<String, Failure>>,
    },
}

/// What the agents measured.
struct AgentsReport {
    latencies: Vec<(&'static str, f64, f64)>,
    /// The peak RSS of the agents' own process, when they had one.
    peak_rss_mb: Option<f64>,
}

impl Agents {
    /// Starts `connections` agents taking the provision tokens the engine hands out, until
    /// `stop` fires.
    async fn start(
        engine: &Engine,
        options: &Options,
        stop: &CancellationToken,
    ) -> Result<Agents, Failure> {
        if options.agents_process {
            return Agents::start_child(engine, options.connections, stop);
        }
        let mut agents = JoinSet::new();
        for _ in 0..options.connections {
            let mut connection = Connection::open(&engine.address).await?;
            let (tokens, stop) = (engine.tokens.clone(), stop.clone());
            agents.spawn(async move {
                loop {
                    let token = tokio::select! {
                        () = stop.cancelled() => break,
                        token = async { tokens.lock().await.recv().await } => token,
                    };
                    let Some(token) = token else { break };
                    connection.run_node(&token).await?;
                }
                Ok::<Latencies, Failure>(connection.latencies)
            });
        }
        Ok(Agents::InProcess(agents))
    }

    fn start_child(
        engine: &Engine,
        connections: usize,
        stop: &CancellationToken,
    ) -> Result<Agents, Failure> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut process = tokio::process::Command::new(std::env::current_exe()?)
            .args([AGENTS_CHILD, &engine.address])
            .args(["--connections", &connections.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = process
            .stdin
            .take()
            .ok_or("the agents' process has no stdin")?;
        let mut stdout = process
            .stdout
            .take()
            .ok_or("the agents' process has no stdout")?;
        let (tokens, stop) = (engine.tokens.clone(), stop.clone());
        let feeder = tokio::spawn(async move {
            let mut batch = String::new();
            loop {
                let mut tokens = tokens.lock().await;
                let token = tokio::select! {
                    () = stop.cancelled() => break,
                    token = tokens.recv() => token,
                };
                let Some(token) = token else { break };
                // The tokens waiting go out together, one a line.
                batch.clear();
                batch.push_str(&token);
                batch.push('\n');
                while let Ok(token) = tokens.try_recv() {
                    batch.push_str(&token);
                    batch.push('\n');
                }
                drop(tokens);
                stdin.write_all(batch.as_bytes()).await?;
            }
            Ok::<(), Failure>(())
        });
        let report = tokio::spawn(async move {
            let mut report = String::new();
            stdout.read_to_string(&mut report).await?;
            Ok::<String, Failure>(report)
        });
        Ok(Agents::Child {
            process,
            feeder,
            report,
        })
    }

    /// Waits until an agent (or the agents' process) stops before the run's end: why.
    async fn stopped_early(&mut self) -> Failure {
        match self {
            Agents::InProcess(agents) => match agents.join_next().await {
                Some(joined) => {
                    format!("a simulated agent stopped: {:?}", joined.map(|r| r.err())).into()
                }
                None => std::future::pending().await,
            },
            Agents::Child { process, .. } => match process.wait().await {
                Ok(status) => format!("the agents' process ended early: {status}").into(),
                Err(e) => e.into(),
            },
        }
    }

    /// Once every node is done (and `stop` fired): what the agents measured.
    async fn finish(self) -> Result<AgentsReport, Failure> {
        match self {
            Agents::InProcess(mut agents) => {
                let mut latencies = Latencies::default();
                while let Some(joined) = agents.join_next().await {
                    latencies.merge(joined??);
                }
                Ok(AgentsReport {
                    latencies: latencies.percentiles(),
                    peak_rss_mb: None,
                })
            }
            Agents::Child {
                mut process,
                feeder,
                report,
            } => {
                feeder.await??;
                let status = process.wait().await?;
                let report = report.await??;
                if !status.success() {
                    return Err(format!("the agents' process failed: {status}").into());
                }
                parse_agents_report(&report)
            }
        }
    }
}

/// The report of the agents' process: `latency <endpoint> <p50 ms> <p99 ms>` lines and
/// `peak_rss_kb <KiB>`.
fn parse_agents_report(report: &str) -> Result<AgentsReport, Failure> {
    let mut latencies = Vec::new();
    let mut peak_rss_mb = None;
    for line in report.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["latency", name, p50, p99] => {
                let (_, name) = ENDPOINTS
                    .iter()
                    .find(|(_, known)| known == name)
                    .ok_or_else(|| format!("the agents' process reported `{line}`"))?;
                latencies.push((*name, p50.parse()?, p99.parse()?));
            }
            ["peak_rss_kb", kb] => peak_rss_mb = Some(kb.parse::<f64>()? / 1024.0),
            _ => return Err(format!("the agents' process reported `{line}`").into()),
        }
    }
    if latencies.len() != ENDPOINTS.len() || peak_rss_mb.is_none() {
        return Err(format!("the agents' process reported too little: {report:?}").into());
    }
    Ok(AgentsReport {
        latencies,
        peak_rss_mb,
    })
}

/// The agents' process of `--agents-process`: `connections` agents driving the engine at
/// `address`, taking provision tokens from stdin (one a line) until it is closed; then the
/// report [`parse_agents_report`] reads, on stdout.
async fn agents_child(address: &str, connections: usize) -> Result<(), Failure> {
    use std::io::BufRead;
    let (sender, receiver) = mpsc::unbounded_channel::<String>();
    // Blocking reads on a thread of their own: tokio's stdin is not among the features.
    let reader = tokio::task::spawn_blocking(move || {
        for token in std::io::stdin().lock().lines() {
            if sender.send(token?).is_err() {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    });
    let tokens = Arc::new(Mutex::new(receiver));
    let mut agents = JoinSet::new();
    for _ in 0..connections {
        let mut connection = Connection::open(address).await?;
        let tokens = tokens.clone();
        agents.spawn(async move {
            loop {
                let token = tokens.lock().await.recv().await;
                let Some(token) = token else { break };
                connection.run_node(&token).await?;
            }
            Ok::<Latencies, Failure>(connection.latencies)
        });
    }
    let mut latencies = Latencies::default();
    while let Some(joined) = agents.join_next().await {
        latencies.merge(joined??);
    }
    reader.await??;
    for (name, p50, p99) in latencies.percentiles() {
        println!("latency {name} {p50} {p99}");
    }
    println!("peak_rss_kb {}", peak_rss_kb());
    Ok(())
}

/// What one run measured.
struct RunResult {
    took: Duration,
    lifecycles_per_s: f64,
    /// Peak RSS of this process: the engine's, and the agents' unless `--agents-process`.
    peak_rss_mb: f64,
    /// Peak RSS of the agents' process, with `--agents-process`.
    agents_peak_rss_mb: Option<f64>,
    /// VmRSS once the deployment is cleaned up: flat across runs when nothing is kept.
    rss_after_cleanup_mb: f64,
    latencies: Vec<(&'static str, f64, f64)>,
    cpu_s: f64,
    streams: Vec<StreamCount>,
    /// VmRSS in KiB every 0.5 s from the deployment to the end of `wait`, with `--rss-trace`.
    rss_samples: Vec<u64>,
}

/// One deployment of `--nodes` nodes, driven over `--connections` connections, cleaned up
/// and (unless `--keep-records`) forgotten after.
async fn run_once(
    engine: &Engine,
    project: &Path,
    options: &Options,
) -> Result<RunResult, Failure> {
    let (nodes, event_streams) = (options.nodes, options.events);
    let mut streams = JoinSet::new();
    for _ in 0..event_streams {
        let stream = open_events(&engine.address).await?;
        streams.spawn(read_events(stream));
    }
    let stop = CancellationToken::new();
    let mut agents = Agents::start(engine, options, &stop).await?;
    reset_peak_rss();
    // Stops the sampling however this run ends.
    let sampling = CancellationToken::new();
    let _stop_sampling = sampling.clone().drop_guard();
    let sampler = options
        .rss_trace
        .then(|| tokio::spawn(sample_rss(sampling.clone())));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let created = engine.engine.deploy_dir(project).await?;
    let done = tokio::select! {
        done = engine.engine.wait(&created.id) => done?,
        failure = agents.stopped_early() => return Err(failure),
    };
    let took = started.elapsed();
    let peak_rss_mb = peak_rss_kb() as f64 / 1024.0;
    sampling.cancel();
    let rss_samples = match sampler {
        Some(sampler) => sampler.await?,
        None => Vec::new(),
    };
    if done.status != DeploymentStatus::Completed || done.nodes_completed != nodes {
        return Err(format!("the deployment ended {done:?}").into());
    }
    // Every node is done, so every agent waits for a token: stop them, keep what they measured.
    stop.cancel();
    let agents = agents.finish().await?;
    let mut counts = Vec::new();
    while let Some(joined) = streams.join_next().await {
        counts.push(joined??);
    }
    let cpu_s = cpu_seconds() - cpu_before;
    engine.engine.cleanup(&created.id).await?;
    if !options.keep_records {
        engine.engine.forget_deployment(&created.id).await?;
    }
    Ok(RunResult {
        took,
        lifecycles_per_s: f64::from(nodes) / took.as_secs_f64(),
        peak_rss_mb,
        agents_peak_rss_mb: agents.peak_rss_mb,
        rss_after_cleanup_mb: status_kb("VmRSS:") as f64 / 1024.0,
        latencies: agents.latencies,
        cpu_s,
        streams: counts,
        rss_samples,
    })
}

/// VmRSS in KiB every 0.5 s (the first at once) until `stop` fires.
async fn sample_rss(stop: CancellationToken) -> Vec<u64> {
    let mut samples = Vec::new();
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = every.tick() => samples.push(status_kb("VmRSS:")),
            () = stop.cancelled() => return samples,
        }
    }
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (Linux: `5` to `clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM from /proc/self/status, in KiB (0 where there is none).
fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:")
}

/// A `kB` field of /proc/self/status (0 where there is none).
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn min_median_max(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

async fn load(options: &Options, data_dir: &Path) -> Result<(), Failure> {
    let engine = start_engine(data_dir, &options.store, Config::new(data_dir)).await?;
    let project = data_dir.join("project");
    write_project(&project, options.nodes, options.bundle_mb)?;
    println!(
        "{} nodes, {} connections, {} store, {} runs",
        options.nodes, options.connections, options.store, options.runs
    );
    let mut results = Vec::new();
    for run in 1..=options.runs {
        let result = run_once(&engine, &project, options).await?;
        let endpoints: Vec<String> = result
            .latencies
            .iter()
            .map(|(name, p50, p99)| format!("{name} {p50:.1}/{p99:.1}"))
            .collect();
        let whose = match result.agents_peak_rss_mb {
            Some(agents) => format!("engine; the agents' process {agents:.1} MB"),
            None => "engine and agents".to_owned(),
        };
        println!(
            "run {run}: {:.2} s, {:.0} node lifecycles/s, peak RSS {:.1} MB ({whose}), \
             RSS after cleanup {:.1} MB; p50/p99 ms: {}",
            result.took.as_secs_f64(),
            result.lifecycles_per_s,
            result.peak_rss_mb,
            result.rss_after_cleanup_mb,
            endpoints.join(", ")
        );
        let (events, bytes): (u64, u64) = result
            .streams
            .iter()
            .fold((0, 0), |(e, b), s| (e + s.events, b + s.bytes));
        let per_stream = result.streams.len().max(1) as u64;
        println!(
            "run {run}: process CPU {:.2} s; {} event streams, {} events and {} KiB each, {:.0} bytes per event",
            result.cpu_s,
            result.streams.len(),
            events / per_stream,
            bytes / per_stream / 1024,
            if events == 0 { 0.0 } else { bytes as f64 / events as f64 },
        );
        if !result.rss_samples.is_empty() {
            let samples: Vec<String> = result
                .rss_samples
                .iter()
                .map(|kb| format!("{:.0}", *kb as f64 / 1024.0))
                .collect();
            println!("run {run}: RSS every 0.5 s MB: {}", samples.join(" "));
        }
        results.push(result);
    }
    let (low, median, high) = min_median_max(results.iter().map(|r| r.lifecycles_per_s).collect());
    println!("node lifecycles/s: {low:.0} - {median:.0} - {high:.0} (min - median - max)");
    let (low, median, high) = min_median_max(results.iter().map(|r| r.peak_rss_mb).collect());
    println!("peak RSS MB: {low:.1} - {median:.1} - {high:.1}");
    let after: Vec<String> = results
        .iter()
        .map(|r| format!("{:.1}", r.rss_after_cleanup_mb))
        .collect();
    println!("RSS after each cleanup MB: {}", after.join(", "));
    let mut by_endpoint: BTreeMap<usize, (&str, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for result in &results {
        for (i, (name, p50, p99)) in result.latencies.iter().enumerate() {
            let entry = by_endpoint
                .entry(i)
                .or_insert((name, Vec::new(), Vec::new()));
            entry.1.push(*p50);
            entry.2.push(*p99);
        }
    }
    for (name, p50s, p99s) in by_endpoint.into_values() {
        let p50 = min_median_max(p50s);
        let p99 = min_median_max(p99s);
        println!(
            "{name:>9}: p50 {:.1} - {:.1} - {:.1} ms, p99 {:.1} - {:.1} - {:.1} ms",
            p50.0, p50.1, p50.2, p99.0, p99.1, p99.2
        );
    }
    engine.server.stop().await?;
    Ok(())
}

/// One running node for wrk: prints the URL and its auth token, then serves until killed.
async fn serve_one_node(options: &Options, data_dir: &Path) -> Result<(), Failure> {
    // The node must stay running however long wrk takes between heartbeats.
    let config = Config::new(data_dir).heartbeat_timeout(Duration::from_secs(24 * 3600));
    let engine = start_engine(data_dir, &options.store, config).await?;
    let project = data_dir.join("project");
    write_project(&project, 1, options.bundle_mb)?;
    let id = engine.engine.deploy_dir(&project).await?.id;
    let provision_token = engine
        .tokens
        .lock()
        .await
        .recv()
        .await
        .ok_or("the engine stopped before provisioning")?;
    let mut connection = Connection::open(&engine.address).await?;
    let token = connection.start_node(&provision_token).await?;
    println!("url=http://{}", engine.address);
    println!("token={token}");
    // The file `GET /nodes/assets` serves, for a static file server to serve the same.
    let bundle = data_dir.join("deployments").join(&id).join("worker.tar.gz");
    println!("bundle={}", bundle.display());
    tokio::signal::ctrl_c().await?;
    engine.server.stop().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let options = Options::parse()?;
    if let Some(address) = &options.agents_child {
        return agents_child(address, options.connections).await;
    }
    let data_dir: PathBuf =
        std::env::temp_dir().join(format!("taskfly-load-{}", std::process::id()));
    let outcome = if options.serve_one_node {
        serve_one_node(&options, &data_dir).await
    } else {
        load(&options, &data_dir).await
    };
    let _ = std::fs::remove_dir_all(&data_dir);
    outcome
}
