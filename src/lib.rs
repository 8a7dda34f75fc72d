//! TaskFly runs a program on N machines at once, gives each machine its own slice of the work,
//! watches every machine to the end, and leaves nothing running afterwards.
//!
//! This crate is the engine, embeddable in any tokio program; the `taskflyd` daemon and the
//! `taskfly` CLI are thin binaries on top of it.
//!
//! # The parts
//! - [`DeploymentConfig`]: a parsed and validated `taskfly.yml` (every problem reported at once).
//! - [`MetadataGenerator`]: what each node gets — its slice of `distributed_lists`, the
//!   `global_metadata`, the resolved `config_template`, as environment variables.
//! - [`Orchestrator`]: the engine, set up by [`Config`]. Accepts a bundle, provisions nodes
//!   through a [`Provider`], tracks every node through the state machines of
//!   [`state::model`], and terminates what it started. It knows nothing of HTTP, and answers
//!   with model types: [`DeploymentSummary`](state::model::DeploymentSummary) from
//!   [`deploy_dir`](Orchestrator::deploy_dir), [`summary`](Orchestrator::summary) and
//!   [`wait`](Orchestrator::wait), [`DeploymentDetail`](state::model::DeploymentDetail) from
//!   [`deployment`](Orchestrator::deployment), a [`DeploymentWatch`] from
//!   [`watch`](Orchestrator::watch) that cannot miss a change.
//! - [`Server`]: serves the engine's node protocol and client API over HTTP ([`ServerConfig`]:
//!   API token, limits, TLS, an accept hook), until a shutdown future completes
//!   ([`Server::run`]) or in a task of its own ([`Server::spawn`], a [`ServerHandle`]); either
//!   way it stops server and engine in the right order.
//! - [`Store`]: where deployments, nodes and logs are kept ([`MemoryStore`] built in).
//! - [`Provider`]: where nodes run ([`LocalProvider`]: local processes, or SSH hosts;
//!   [`SlurmProvider`]: the tasks of Slurm job arrays). A host
//!   program adds its own with [`Config::provider`], implementing the trait with the
//!   re-exported [`macro@async_trait`]; [`Config::pool`] puts any provider behind a
//!   [`PooledProvider`] that keeps instances warm between nodes.
//! - [`Client`]: a typed client of a daemon's HTTP API; [`agent`]: the node agent.
//!
//! The code map and the rules the code keeps are in `ARCHITECTURE.md`; the HTTP API and node
//! protocol are specified in `docs/SPEC.md`.
//!
//! # Features
//! - default: the engine, the in-memory store, the local provider, the HTTP API and the agent.
//!   No AWS SDK, no CLI crates.
//! - `cli`: the `taskfly` binary. `daemon`: the `taskflyd` binary.
//! - `sqlite`: `SqliteStore`, a durable [`Store`] in one SQLite file (SQLite is compiled in).
//!   Enabled by `daemon`.
//! - `tls`: https for the HTTP API (rustls with `ring`): `ServerConfig::tls` on the server,
//!   `https://` URLs and `Client::with_ca_file` on the client; nodes verify the daemon too.
//!   Enabled by `cli` and `daemon`; without it an `https://` URL is refused.
//! - `aws`: the EC2 provider. `full`: all of the above.
//!
//! # Example
//! Run the project in `examples/hello` on local processes, follow it to the end, and stop:
//! ```no_run
//! # async fn demo() -> taskfly::Result<()> {
//! use taskfly::{Config, Orchestrator, Server, ServerConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let engine = Orchestrator::new(Config::new("/tmp/taskfly-data"))?;
//! let server = Server::new(engine.clone(), ServerConfig::default())?.spawn(listener)?;
//! let created = engine.deploy_dir("examples/hello".as_ref()).await?;
//! let mut watch = engine.watch(&created.id).await?;
//! while !watch.current().is_final() {
//!     let now = watch.changed().await?;
//!     println!("{}: {}/{} nodes completed", now.status, now.nodes_completed, now.total_nodes);
//! }
//! server.stop().await?; // stops serving, then the engine
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod agent;
mod api;
mod auth;
mod backoff;
pub mod bundle;
pub mod config;
#[cfg(any(feature = "tls", feature = "aws"))]
mod encode;
mod error;
pub mod metadata;
mod metrics;
mod notify;
mod orchestrator;
mod process;
pub mod provider;
mod secret;
pub mod state;
mod sync;

pub use api::client::{Client, EventStream, Registration};
pub use api::server::{Server, ServerConfig, ServerHandle};
pub use api::wire;
/// Re-exported so that implementing [`Provider`] needs no direct dependency on `async-trait`.
pub use async_trait::async_trait;
pub use config::DeploymentConfig;
pub use error::{BoxError, Error, Report, Result};
pub use metadata::MetadataGenerator;
pub use orchestrator::{
    Config, DeploymentWatch, Orchestrator, OutputLimits, OutputsReader, RerunNodes,
};
#[cfg(feature = "aws")]
pub use provider::AwsProvider;
pub use provider::{
    Instance, InstanceKind, InstanceRef, InstanceSpec, InstanceState, LocalProvider, OwnedBy,
    OwnedInstance, Owner, PoolConfig, PooledProvider, Provider, ProviderError, ProviderSettings,
    SlurmProvider,
};
pub use secret::Secret;
#[cfg(feature = "sqlite")]
pub use state::SqliteStore;
pub use state::{MemoryStore, Store};
