//! Running some nodes of a finished deployment again (SPEC §3, "Reruns"): a new deployment with
//! the same worker bundle and `taskfly.yml`, whose nodes keep the indexes they had, so each gets
//! exactly the environment and the slice of the work it had.
//!
//! Everything a rerun needs comes from the store and the original deployment's folder, so it
//! works the same after a restart of the daemon.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{Live, Orchestrator, WORKER_BUNDLE};

use crate::auth;
use crate::config::{DeploymentConfig, CONFIG_FILE_NAME};
use crate::error::{Error, Result};
use crate::metadata::MetadataGenerator;
use crate::state::model::{Deployment, DeploymentDetail, DeploymentStatus, Node, NodeStatus};

/// Which nodes of a finished deployment [`Orchestrator::rerun`] runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RerunNodes {
    /// Every node that did not complete: those that failed (after their last retry) and
    /// those terminated by a terminate request.
    Failed,
    /// These node indexes, in any order; a repeated index runs once.
    Indexes(Vec<u32>),
}

impl Orchestrator {
    /// Run some nodes of the finished deployment `id` again, as a new deployment: the same
    /// bundle and `taskfly.yml`, and for each chosen node the same `TASKFLY_NODE_INDEX`,
    /// `TASKFLY_TOTAL_NODES` (the original deployment's count) and slice of every distributed
    /// list. Only the variables that name the deployment or the node
    /// (`TASKFLY_DEPLOYMENT_ID`, `TASKFLY_NODE_ID`, and templates using `{deployment_id}` or
    /// `{node_id}`) differ, since the rerun has an id of its own.
    ///
    /// The new deployment's `rerun_of` names `id`, its nodes keep their indexes, and its
    /// `total_nodes` is the number of nodes it runs. Returns it with its nodes, once accepted;
    /// they are provisioned in the background.
    ///
    /// Refused while `id` still runs ([`Error::is_not_final`]), once its files were cleaned up
    /// ([`Error::is_conflict`]), when [`RerunNodes::Failed`] finds no such node (a conflict),
    /// and for an empty list or an index that is not one of its nodes
    /// ([`Error::is_invalid_input`]).
    ///
    /// ```no_run
    /// # async fn demo(engine: taskfly::Orchestrator) -> taskfly::Result<()> {
    /// use taskfly::RerunNodes;
    /// let rerun = engine.rerun("dep-0123456789abcdef", RerunNodes::Failed).await?;
    /// let done = engine.wait(&rerun.deployment.id).await?;
    /// println!("rerun {}: {}", done.id, done.status);
    /// # Ok(()) }
    /// ```
    pub async fn rerun(&self, id: &str, nodes: RerunNodes) -> Result<DeploymentDetail> {
        let original = self.deployment_row(id).await?;
        if !original.status.is_final() {
            return Err(Error::not_final(format!(
                "deployment `{id}` is {}; a rerun starts once it has ended (wait for it, or \
                 terminate it with `taskfly down {id}`)",
                original.status
            )));
        }
        let source = self.deployment_dir(id);
        for name in [CONFIG_FILE_NAME, WORKER_BUNDLE] {
            check_kept(id, &source.join(name)).await?;
        }
        let config_path = source.join(CONFIG_FILE_NAME);
        let yaml = tokio::fs::read_to_string(&config_path)
            .await
            .map_err(|e| Error::io(format!("cannot read {}", config_path.display()), e))?;
        let config = DeploymentConfig::from_yaml(&yaml)?;
        let metadata = MetadataGenerator::new(&config.nodes)?;
        self.provider_for(&config)?;
        let original_nodes = self.inner.store.nodes(id).await?;
        let chosen = chosen_indexes(id, &original_nodes, &nodes)?;

        let rerun_id = format!("dep-{}", auth::new_id()?);
        let dir = self.deployment_dir(&rerun_id);
        let copied = copy_files(&source, &dir).await;
        if copied.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        copied?;

        let now = SystemTime::now();
        let deployment = Deployment {
            id: rerun_id.clone(),
            status: DeploymentStatus::Pending,
            cloud_provider: original.cloud_provider.clone(),
            total_nodes: u32::try_from(chosen.len()).unwrap_or(u32::MAX),
            retries: config.nodes.retries,
            nodes_completed: 0,
            nodes_failed: 0,
            nodes_terminated: 0,
            created_at: now,
            updated_at: now,
            completed_at: None,
            error_message: None,
            rerun_of: Some(id.to_owned()),
            cleaned_at: None,
        };
        let nodes: Vec<Node> = chosen
            .iter()
            .map(|&index| Node::new(&rerun_id, index, now))
            .collect();
        let described = describe_indexes(&chosen);
        let live = Arc::new(Live::new(config, metadata));
        if let Err(e) = self.start(deployment.clone(), chosen, live).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        tracing::info!(deployment_id = %rerun_id, rerun_of = %id, nodes = %described, "rerun accepted");
        Ok(DeploymentDetail {
            deployment,
            nodes,
            resources: Default::default(),
            notify: None,
        })
    }
}

/// A file of deployment `id`'s folder that a rerun needs; its absence means the deployment
/// was cleaned up.
async fn check_kept(id: &str, path: &Path) -> Result<()> {
    match tokio::fs::metadata(path).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::conflict(format!(
            "the files of deployment `{id}` were cleaned up, and a rerun needs its bundle and \
             taskfly.yml; deploy the project again instead (`taskfly up`)"
        ))),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

/// The original's worker bundle and `taskfly.yml`, into the rerun's new folder: hard links
/// when the file system allows (the files never change once written), copies otherwise. Both
/// stay private (mode 0600), like the originals.
async fn copy_files(from: &Path, to: &Path) -> Result<()> {
    tokio::fs::create_dir_all(to)
        .await
        .map_err(|e| Error::io(format!("cannot create {}", to.display()), e))?;
    for name in [CONFIG_FILE_NAME, WORKER_BUNDLE] {
        let (source, dest) = (from.join(name), to.join(name));
        if tokio::fs::hard_link(&source, &dest).await.is_err() {
            tokio::fs::copy(&source, &dest).await.map_err(|e| {
                Error::io(
                    format!("cannot copy {} to {}", source.display(), dest.display()),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// The indexes `selection` names among the nodes of deployment `id`, ascending, each once.
fn chosen_indexes(id: &str, nodes: &[Node], selection: &RerunNodes) -> Result<Vec<u32>> {
    let mut chosen: Vec<u32> = match selection {
        RerunNodes::Failed => nodes
            .iter()
            .filter(|n| matches!(n.status, NodeStatus::Failed | NodeStatus::Terminated))
            .map(|n| n.index)
            .collect(),
        RerunNodes::Indexes(indexes) => indexes.clone(),
    };
    chosen.sort_unstable();
    chosen.dedup();
    let mut known: Vec<u32> = nodes.iter().map(|n| n.index).collect();
    known.sort_unstable();
    match selection {
        RerunNodes::Failed if chosen.is_empty() => Err(Error::conflict(format!(
            "every node of deployment `{id}` completed: nothing failed to rerun; to run \
             completed nodes again, name them (its nodes are {}) with `--nodes LIST`, or \
             `{{\"nodes\": [...]}}` in the API",
            describe_indexes(&known)
        ))),
        RerunNodes::Indexes(_) if chosen.is_empty() => Err(Error::invalid_input(format!(
            "no node to rerun was named; give at least one of deployment `{id}`'s nodes: {}",
            describe_indexes(&known)
        ))),
        _ => {
            let unknown: Vec<u32> = chosen
                .iter()
                .copied()
                .filter(|index| known.binary_search(index).is_err())
                .collect();
            if unknown.is_empty() {
                return Ok(chosen);
            }
            let (these, are_not) = if unknown.len() == 1 {
                ("node", "is not a node")
            } else {
                ("nodes", "are not nodes")
            };
            Err(Error::invalid_input(format!(
                "{these} {} {are_not} of deployment `{id}`, whose nodes are {}",
                describe_indexes(&unknown),
                describe_indexes(&known)
            )))
        }
    }
}

/// Ascending indexes as short text: `0-3, 7, 9-10`, or `none`.
fn describe_indexes(indexes: &[u32]) -> String {
    if indexes.is_empty() {
        "none".to_owned()
    } else {
        crate::state::model::index_ranges(indexes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(statuses: &[NodeStatus]) -> Vec<Node> {
        statuses
            .iter()
            .enumerate()
            .map(|(index, status)| Node {
                status: *status,
                ..Node::new("dep-1", index as u32, SystemTime::UNIX_EPOCH)
            })
            .collect()
    }

    use NodeStatus::{Completed, Failed, Terminated};

    #[test]
    fn failed_means_every_node_that_did_not_complete() {
        let all = nodes(&[Completed, Failed, Completed, Terminated, Failed]);
        assert_eq!(
            chosen_indexes("dep-1", &all, &RerunNodes::Failed).unwrap(),
            [1, 3, 4]
        );
    }

    #[test]
    fn nothing_failed_is_a_conflict_naming_the_nodes() {
        let all = nodes(&[Completed, Completed, Completed]);
        let err = chosen_indexes("dep-1", &all, &RerunNodes::Failed).unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert!(err.to_string().contains("(its nodes are 0-2)"), "{err}");
    }

    #[test]
    fn listed_indexes_are_sorted_and_counted_once() {
        let all = nodes(&[Completed, Failed, Completed, Completed]);
        let listed = RerunNodes::Indexes(vec![3, 0, 3]);
        assert_eq!(chosen_indexes("dep-1", &all, &listed).unwrap(), [0, 3]);
    }

    #[test]
    fn an_index_that_is_no_node_is_named() {
        let all = nodes(&[Completed, Failed, Completed, Completed]);
        let listed = RerunNodes::Indexes(vec![1, 9, 4]);
        let err = chosen_indexes("dep-1", &all, &listed).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
        assert_eq!(
            err.to_string(),
            "nodes 4, 9 are not nodes of deployment `dep-1`, whose nodes are 0-3"
        );
    }

    #[test]
    fn a_rerun_of_a_rerun_knows_only_the_nodes_it_ran() {
        let ran: Vec<Node> = [2, 5]
            .iter()
            .map(|&i| Node {
                status: Failed,
                ..Node::new("dep-2", i, SystemTime::UNIX_EPOCH)
            })
            .collect();
        let err = chosen_indexes("dep-2", &ran, &RerunNodes::Indexes(vec![3])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node 3 is not a node of deployment `dep-2`, whose nodes are 2, 5"
        );
        assert_eq!(
            chosen_indexes("dep-2", &ran, &RerunNodes::Failed).unwrap(),
            [2, 5]
        );
    }

    #[test]
    fn an_empty_list_is_invalid_input() {
        let all = nodes(&[Failed]);
        let err = chosen_indexes("dep-1", &all, &RerunNodes::Indexes(Vec::new())).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }

    #[test]
    fn indexes_are_described_as_ranges() {
        assert_eq!(describe_indexes(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(
            describe_indexes(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
        assert_eq!(describe_indexes(&[]), "none");
    }
}
