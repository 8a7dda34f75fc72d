//! The integration tests: one binary, real processes, real HTTP on 127.0.0.1:0.

#[macro_use]
mod support;

mod agents;
#[cfg(feature = "aws")]
mod aws;
mod bundle;
mod cli;
mod cli2;
mod dashboard;
mod durability;
mod engine;
mod events;
mod heartbeat;
mod hostile;
mod metrics;
mod outputs;
mod pool;
mod provider;
mod reliability;
mod rerun;
mod slurm;
mod ssh;
mod tidy;
mod timings;
#[cfg(feature = "tls")]
mod tls;
mod watch;
mod webhooks;
