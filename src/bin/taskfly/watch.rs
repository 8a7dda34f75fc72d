//! `taskfly watch [DEP]`: the daemon's deployment and node events as they happen (SPEC §5),
//! one line each (`--output json`: one JSON object per line). Follows until interrupted, or,
//! given a deployment, until it is final (exit 0); given one, its state as read comes first
//! (in JSON a `deployment` event with `id: null`). A dropped stream is opened again from the
//! last event seen, for as long as the daemon comes back within a minute.

use std::time::{Duration, Instant};

use taskfly::wire::{DeploymentView, Event};
use taskfly::{Client, Error};

use crate::commands::{client, failure, resolve_id, Failure, EXIT_OK};
use crate::{Cli, Output};

/// How long a lost stream is tried again before `watch` gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

pub(crate) async fn watch(cli: &Cli, deployment: Option<&str>) -> Result<u8, Failure> {
    let client = client(cli)?;
    let deployment = match deployment {
        Some(arg) => Some(resolve_id(cli, &client, arg).await?),
        None => None,
    };
    // Listen first, then read the deployment: a change in between is not missed.
    let mut stream = client
        .events(deployment.as_deref(), None)
        .await
        .map_err(|e| failure(Some(cli), e))?;
    if let Some(id) = &deployment {
        // Its state now comes first (in JSON, as a deployment event without an id).
        let mut view = client
            .deployment(id)
            .await
            .map_err(|e| failure(Some(cli), e))?;
        view.nodes.clear();
        print_state(cli.output, &view);
        if view.is_final() {
            return Ok(EXIT_OK);
        }
    }
    let mut lost_since: Option<Instant> = None;
    loop {
        let event = match stream.next().await {
            Ok(Some(event)) => {
                lost_since = None;
                event
            }
            lost => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                let last_id = stream.last_event_id();
                stream = reconnect(
                    cli,
                    &client,
                    deployment.as_deref(),
                    last_id,
                    since,
                    lost.err(),
                )
                .await?;
                continue;
            }
        };
        print_event(cli.output, stream.last_event_id(), &event);
        if let (Some(id), Event::Reload(_)) = (&deployment, &event) {
            // Events were missed: the deployment's state is read again.
            let mut view = client
                .deployment(id)
                .await
                .map_err(|e| failure(Some(cli), e))?;
            view.nodes.clear();
            print_state(cli.output, &view);
            if view.is_final() {
                return Ok(EXIT_OK);
            }
        }
        if let (Some(_), Event::Deployment(changed)) = (&deployment, &event) {
            if changed.deployment.is_final() {
                return Ok(EXIT_OK);
            }
        }
    }
}

/// Open the stream again after `last_event_id`, pausing between tries, until
/// [`RECONNECT_FOR`] after the loss; then fail with the last error. `lost` is the error that
/// ended the stream, `None` when the daemon closed it (it is stopping).
async fn reconnect(
    cli: &Cli,
    client: &Client,
    deployment: Option<&str>,
    last_event_id: Option<u64>,
    since: Instant,
    lost: Option<Error>,
) -> Result<taskfly::EventStream, Failure> {
    if cli.output == Output::Text {
        match &lost {
            Some(e) => eprintln!("event stream lost ({e}); reconnecting"),
            None => eprintln!("the daemon ended the event stream; reconnecting"),
        }
    }
    let mut last_error = lost;
    while since.elapsed() < RECONNECT_FOR {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match client.events(deployment, last_event_id).await {
            Ok(stream) => return Ok(stream),
            Err(e) if e.is_transport() => last_error = Some(e),
            Err(e) => return Err(failure(Some(cli), e)),
        }
    }
    Err(match last_error {
        Some(e) => failure(Some(cli), e),
        None => Failure::unreachable(
            "the daemon ended the event stream and did not come back within a minute",
        ),
    })
}

/// A deployment's state as read (not from an event).
fn print_state(output: Output, view: &DeploymentView) {
    match output {
        Output::Text => println!("{}", deployment_line(view)),
        Output::Json => println!(
            "{}",
            serde_json::json!({"id": null, "event": "deployment", "data": {"deployment": view}})
        ),
    }
}

fn print_event(output: Output, id: Option<u64>, event: &Event) {
    match output {
        Output::Json => {
            let (kind, data) = match event {
                Event::Deployment(e) => ("deployment", serde_json::to_value(e)),
                Event::Node(e) => ("node", serde_json::to_value(e)),
                Event::Reload(e) => ("reload", serde_json::to_value(e)),
                _ => return,
            };
            let data = data.unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::json!({"id": id, "event": kind, "data": data})
            );
        }
        Output::Text => match event {
            Event::Deployment(e) => println!("{}", deployment_line(&e.deployment)),
            Event::Node(e) => println!(
                "{}  {}  node {}  {} -> {}{}  ({})",
                e.node.last_update,
                e.deployment.deployment_id,
                e.node.node_index,
                e.previous,
                e.node.status,
                node_detail(&e.node),
                counts(&e.deployment)
            ),
            Event::Reload(e) => eprintln!("events were missed: {}", e.reason),
            _ => {}
        },
    }
}

fn deployment_line(view: &DeploymentView) -> String {
    let error = view
        .error_message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    format!(
        "{}  {}  deployment {}{error}  ({})",
        view.updated_at,
        view.deployment_id,
        view.status,
        counts(view)
    )
}

fn node_detail(node: &taskfly::wire::NodeView) -> String {
    let mut detail = String::new();
    if node.attempt > 1 {
        detail.push_str(&format!(", attempt {}", node.attempt));
    }
    if let Some(code) = node.exit_code {
        detail.push_str(&format!(", exit {code}"));
    }
    if let Some(message) = &node.error_message {
        detail.push_str(&format!(": {message}"));
    }
    detail
}

fn counts(view: &DeploymentView) -> String {
    let mut text = format!("{}/{} completed", view.nodes_completed, view.total_nodes);
    if view.nodes_failed > 0 {
        text.push_str(&format!(", {} failed", view.nodes_failed));
    }
    text
}
