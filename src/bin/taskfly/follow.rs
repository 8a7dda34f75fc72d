//! `up --wait`, `rerun --wait` and `logs -f`: follow a deployment on the daemon to its end,
//! its nodes' log lines as they come and its progress as it changes (SPEC §5.2).
//!
//! The deployment is read whole once, at the start, then kept current from the daemon's events
//! (`GET /events?deployment=ID`): each node event replaces its node and the counters, so
//! following costs one event per change, not a read of every node every refresh. The whole
//! deployment is read again only when events were missed (a `reload`, a lost stream) and once
//! at the end, for the summary. A daemon without the events endpoint is polled instead.

use std::time::{Duration, Instant};

use taskfly::wire::{DeploymentView, Event};
use taskfly::{Client, Error, EventStream};

use crate::commands::{exit_for, failed, failure, Failure, EXIT_INTERRUPTED};
use crate::output::Progress;
use crate::Cli;

/// How often progress and followed logs are refreshed.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Follow a deployment on the daemon to its end, printing logs and progress. Ctrl-C stops
/// following (exit 130), leaving the deployment running unless `down_on_interrupt`.
pub(crate) async fn follow(
    cli: &Cli,
    client: &Client,
    id: &str,
    nodes: u32,
    down_on_interrupt: bool,
) -> Result<u8, Failure> {
    let mut progress = Progress::new(cli.output, nodes);
    let following = follow_to_end(client, id, &mut progress);
    tokio::select! {
        outcome = following => match outcome.map_err(|e| failure(Some(cli), e))? {
            Some(code) => Ok(code),
            // Nobody reads the lines any more (`up --wait | head`): stop following rather than
            // wait unseen for the end, and leave the deployment as Ctrl-C would.
            None if down_on_interrupt => {
                eprintln!("standard output was closed: terminating deployment {id}");
                client.terminate(id).await.map_err(|e| failure(Some(cli), e))?;
                Err(failed(format!(
                    "deployment {id} is terminating: standard output was closed"
                )))
            }
            None => Err(failed(format!(
                "stopped following: standard output was closed; deployment {id} keeps running \
                 (`taskfly logs {id} -f` follows it again)"
            ))),
        },
        _ = tokio::signal::ctrl_c() => {
            progress.abandon();
            if down_on_interrupt {
                eprintln!("interrupted: terminating deployment {id}");
                client.terminate(id).await.map_err(|e| failure(Some(cli), e))?;
                eprintln!("deployment {id} is terminating; `taskfly status {id}` shows when it has ended");
            } else {
                eprintln!(
                    "interrupted: deployment {id} keeps running; follow it again with \
                     `taskfly logs {id} -f`, stop it with `taskfly down {id}`"
                );
            }
            Ok(EXIT_INTERRUPTED)
        }
    }
}

/// The loop of [`follow`]: logs and progress until the deployment is final; its exit code, or
/// `None` once standard output is closed.
async fn follow_to_end(
    client: &Client,
    id: &str,
    progress: &mut Progress,
) -> Result<Option<u8>, Error> {
    let started = Instant::now();
    let mut followed = Followed::open(client, id).await?;
    let mut cursor = 0;
    loop {
        if followed.view.is_final() {
            // The summary is of the final deployment as `GET /deployments/{id}` shows it, and
            // every line its nodes wrote comes before it.
            let view = client.deployment(id).await?;
            print_new_logs(client, id, &mut cursor, progress).await?;
            if progress.stdout_closed() {
                progress.abandon();
                return Ok(None);
            }
            progress.finish(&view, started.elapsed());
            return Ok(Some(exit_for(&view)));
        }
        print_new_logs(client, id, &mut cursor, progress).await?;
        if progress.stdout_closed() {
            progress.abandon();
            return Ok(None);
        }
        progress.update(&followed.view, started.elapsed());
        followed.next().await?;
    }
}

/// A deployment on the daemon, kept current from its events (see the module's text).
pub(crate) struct Followed<'a> {
    client: &'a Client,
    id: &'a str,
    events: Events<'a>,
    refresh: tokio::time::Interval,
    /// The deployment as last known, its nodes included.
    pub(crate) view: DeploymentView,
}

impl<'a> Followed<'a> {
    /// Start following deployment `id`: its events first, then one read, so a change in
    /// between is not missed.
    pub(crate) async fn open(client: &'a Client, id: &'a str) -> Result<Followed<'a>, Error> {
        let events = Events::open(client, id).await?;
        let view = client.deployment(id).await?;
        let mut refresh = tokio::time::interval(POLL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the caller has just seen the view.
        refresh.tick().await;
        Ok(Followed {
            client,
            id,
            events,
            refresh,
            view,
        })
    }

    /// Wait for the next refresh ([`POLL`]) or the deployment's end, keeping the view current
    /// meanwhile (read again when events were missed).
    pub(crate) async fn next(&mut self) -> Result<(), Error> {
        if self
            .events
            .follow_until(&mut self.view, &mut self.refresh)
            .await?
            == Stale::Yes
        {
            self.view = self.client.deployment(self.id).await?;
        }
        Ok(())
    }
}

/// Print the log lines after `cursor`, page by page, moving it on.
async fn print_new_logs(
    client: &Client,
    id: &str,
    cursor: &mut u64,
    progress: &mut Progress,
) -> Result<(), Error> {
    loop {
        let page = client.logs(id, None, *cursor, 1000).await?;
        if page.logs.is_empty() {
            return Ok(());
        }
        *cursor = page.next;
        progress.print_logs(&page.logs);
    }
}

/// Whether the view may have missed changes and must be read again.
#[derive(Debug, PartialEq, Eq)]
enum Stale {
    Yes,
    No,
}

/// Where the followed deployment's changes come from.
enum Events<'a> {
    /// Its event stream, open.
    Stream {
        client: &'a Client,
        id: &'a str,
        stream: Box<EventStream>,
    },
    /// The stream was lost (the daemon restarted, the connection broke): it is opened again
    /// at the next refresh, after the last event read; meanwhile the deployment is read.
    Lost {
        client: &'a Client,
        id: &'a str,
        last_event_id: Option<u64>,
    },
    /// The daemon has no events endpoint: the deployment is read at every refresh.
    Unavailable,
}

impl<'a> Events<'a> {
    async fn open(client: &'a Client, id: &'a str) -> Result<Events<'a>, Error> {
        match client.events(Some(id), None).await {
            Ok(stream) => Ok(Events::Stream {
                client,
                id,
                stream: Box::new(stream),
            }),
            // A daemon from before events (or a deployment that is not there, which the read
            // that follows reports): follow it by reading.
            Err(e) if e.is_not_found() => Ok(Events::Unavailable),
            Err(e) if e.is_transport() => Ok(Events::Lost {
                client,
                id,
                last_event_id: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// Apply the events that come to `view` until the next tick of `refresh` (or until the
    /// view is final); whether the view must be read again instead.
    async fn follow_until(
        &mut self,
        view: &mut DeploymentView,
        refresh: &mut tokio::time::Interval,
    ) -> Result<Stale, Error> {
        match self {
            Events::Unavailable => {
                refresh.tick().await;
                Ok(Stale::Yes)
            }
            Events::Lost {
                client,
                id,
                last_event_id,
            } => {
                refresh.tick().await;
                // Quietly: a daemon that is down is reported by the (patient) read that
                // follows, once.
                if let Ok(stream) = client.events(Some(id), *last_event_id).await {
                    *self = Events::Stream {
                        client,
                        id,
                        stream: Box::new(stream),
                    };
                }
                Ok(Stale::Yes)
            }
            Events::Stream { client, id, stream } => loop {
                tokio::select! {
                    // Both are cancel-safe: an event half read stays in the stream's buffer.
                    next = stream.next() => match next {
                        Ok(Some(event)) => {
                            if apply(view, event) == Stale::Yes {
                                return Ok(Stale::Yes);
                            }
                            if view.is_final() {
                                return Ok(Stale::No);
                            }
                        }
                        // Ended (the daemon is stopping) or broken.
                        Ok(None) | Err(_) => {
                            *self = Events::Lost {
                                client,
                                id,
                                last_event_id: stream.last_event_id(),
                            };
                            return Ok(Stale::Yes);
                        }
                    },
                    _ = refresh.tick() => return Ok(Stale::No),
                }
            },
        }
    }
}

/// Bring `view` up to date with `event` of its deployment: a node event replaces its node and
/// the deployment's state and counters, a deployment event those alone.
fn apply(view: &mut DeploymentView, event: Event) -> Stale {
    match event {
        Event::Reload(_) => Stale::Yes,
        Event::Deployment(changed) => {
            set_summary(view, changed.deployment);
            Stale::No
        }
        Event::Node(changed) => {
            let changed = *changed;
            let slot = view
                .nodes
                .binary_search_by_key(&changed.node.node_index, |node| node.node_index);
            set_summary(view, changed.deployment);
            match slot {
                Ok(slot) => {
                    view.nodes[slot] = changed.node;
                    Stale::No
                }
                // A node the view does not have: read it all again.
                Err(_) => Stale::Yes,
            }
        }
        // A kind of event from a newer daemon: what it changed is read.
        _ => Stale::Yes,
    }
}

/// Take the deployment's state and counters from `summary` (as events carry it: without its
/// nodes and webhook notification), keeping the view's nodes and notification.
fn set_summary(view: &mut DeploymentView, summary: DeploymentView) {
    if summary.deployment_id != view.deployment_id {
        return;
    }
    let nodes = std::mem::take(&mut view.nodes);
    let notify = view.notify.take();
    *view = summary;
    view.nodes = nodes;
    view.notify = notify;
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfly::wire::{DeploymentStatus, NodeStatus};

    fn view_with(nodes: &[(u32, &str)], status: &str) -> DeploymentView {
        let nodes: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(index, status)| {
                serde_json::json!({
                    "node_id": format!("dep-1-{index}"), "node_index": index, "status": status,
                    "attempt": 1, "last_update": "2026-12-06T12:00:00.000Z", "phases": {}
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "deployment_id": "dep-1", "status": status, "cloud_provider": "local",
            "total_nodes": nodes.len(), "nodes_completed": 0, "nodes_failed": 0,
            "created_at": "2026-12-06T12:00:00.000Z", "updated_at": "2026-12-06T12:00:00.000Z",
            "nodes": nodes, "notify": {"status": "pending", "attempts": 1}
        }))
        .expect("a deployment view")
    }

    fn node_event(deployment: DeploymentView, index: u32, status: &str) -> Event {
        let node = view_with(&[(index, status)], "running").nodes.remove(0);
        Event::Node(Box::new(
            serde_json::from_value(serde_json::json!({
                "deployment": deployment, "node": node, "previous": "running_script"
            }))
            .expect("a node event"),
        ))
    }

    #[test]
    fn a_node_event_replaces_its_node_and_the_counters_keeping_the_rest() {
        let mut view = view_with(&[(0, "running_script"), (1, "running_script")], "running");
        let mut summary = view_with(&[], "running");
        summary.nodes_completed = 1;
        summary.total_nodes = 2;
        assert_eq!(
            apply(&mut view, node_event(summary, 1, "completed")),
            Stale::No
        );
        assert_eq!(view.nodes_completed, 1);
        assert_eq!(view.nodes.len(), 2);
        assert_eq!(view.nodes[0].status, NodeStatus::RunningScript);
        assert_eq!(view.nodes[1].status, NodeStatus::Completed);
        assert!(view.notify.is_some(), "the notification is kept");
    }

    #[test]
    fn an_event_of_an_unknown_node_or_a_reload_asks_for_a_new_read() {
        let mut view = view_with(&[(0, "running_script")], "running");
        let summary = view_with(&[], "running");
        assert_eq!(
            apply(&mut view, node_event(summary, 5, "completed")),
            Stale::Yes
        );
        let reload = serde_json::from_value::<taskfly::wire::ReloadEvent>(
            serde_json::json!({"reason": "missed"}),
        )
        .expect("a reload event");
        assert_eq!(apply(&mut view, Event::Reload(reload)), Stale::Yes);
    }

    #[test]
    fn a_summary_of_another_deployment_changes_nothing() {
        let mut view = view_with(&[(0, "running_script")], "running");
        let mut other = view_with(&[], "completed");
        other.deployment_id = "dep-2".to_owned();
        set_summary(&mut view, other);
        assert_eq!(view.status, DeploymentStatus::Running);
    }
}
