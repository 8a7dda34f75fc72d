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

use taskfly::{Config, Orchestrator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let project: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/hello"));
    let data_dir = std::env::temp_dir().join(format!("taskfly-embed-{}", std::process::id()));

    // The engine serves the node protocol on a port of our choosing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let engine = Orchestrator::new(Config::new(&data_dir))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });

    let created = engine.deploy_dir(&project).await?;
    println!(
        "deployment {} with {} nodes",
        created.deployment_id, created.nodes
    );
    let finished = engine.wait(&created.deployment_id).await?;

    let logs = engine.logs(&created.deployment_id, None, 0, 10_000).await?;
    for line in &logs.logs {
        println!("[node {}] {}", line.node_index, line.line);
    }
    for node in &finished.nodes {
        println!(
            "node {}: {} (exit code {})",
            node.node_index,
            node.status,
            node.exit_code.map_or("-".to_owned(), |c| c.to_string())
        );
    }
    println!("deployment {}", finished.status);

    engine.shutdown().await;
    let _ = stop.send(());
    server.await??;
    std::fs::remove_dir_all(&data_dir)?;
    Ok(())
}
