//! Embedding the TaskFly engine in a host program, using only the public API.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example embed -- examples/hello
//! ```
//!
//! It starts the engine's HTTP API on a free loopback port (the nodes' agents call back on
//! it), deploys the project folder given as the first argument on local processes, prints
//! every log line and each node's result, and shuts everything down.

use std::path::PathBuf;

use taskfly::{Config, Orchestrator, Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let project: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/hello"));
    let data_dir = std::env::temp_dir().join(format!("taskfly-embed-{}", std::process::id()));

    // The engine, and its HTTP API served on a port of our choosing (the nodes call back on it).
    let engine = Orchestrator::new(Config::new(&data_dir))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = Server::new(engine.clone(), ServerConfig::default())?.spawn(listener)?;

    let created = engine.deploy_dir(&project).await?;
    println!(
        "deployment {} with {} nodes",
        created.id, created.total_nodes
    );
    // Follow it: every change of its state or node counts, without reading its nodes.
    let mut watch = engine.watch(&created.id).await?;
    while !watch.current().is_final() {
        let now = watch.changed().await?;
        println!(
            "  {}: {}/{} nodes completed",
            now.status, now.nodes_completed, now.total_nodes
        );
    }

    let logs = engine.logs(&created.id, None, 0, 10_000).await?;
    for line in &logs.lines {
        println!("[node {}] {}", line.node_index, line.line);
    }
    let finished = engine.deployment(&created.id).await?;
    for node in &finished.nodes {
        println!(
            "node {}: {} (exit code {})",
            node.index,
            node.status,
            node.exit_code.map_or("-".to_owned(), |c| c.to_string())
        );
    }
    println!("deployment {}", finished.deployment.status);

    // Stops serving, lets in-flight requests finish, then stops the engine and its nodes.
    server.stop().await?;
    std::fs::remove_dir_all(&data_dir)?;
    Ok(())
}
