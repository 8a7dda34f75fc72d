//! Deployments, nodes and their state machines (SPEC §3). Pure: no I/O, no clock, no tokio.
//!
//! Every change of state goes through [`apply_node_update`] or [`apply_deployment_status`], so
//! every [`crate::Store`] backend enforces the same rules: illegal transitions are refused, a final
//! state never regresses, and whether a deployment is finished is decided from counters in O(1).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::provider::InstanceRef;

/// Where a deployment is in its life (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeploymentStatus {
    /// Accepted, nothing provisioned yet.
    Pending,
    /// Nodes are being provisioned.
    Provisioning,
    /// At least one node is up; not every node is final.
    Running,
    /// Every node completed.
    Completed,
    /// Every node is final and at least one failed, or no node could be provisioned.
    Failed,
    /// A terminate request is tearing the nodes down.
    Terminating,
    /// Terminated on request; every instance was terminated.
    Terminated,
}

/// Where a node is in its life (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeStatus {
    /// Created, not yet handed to a provider.
    Pending,
    /// The provider is creating its instance or process.
    Provisioning,
    /// The instance exists; its agent has not registered yet.
    Booting,
    /// The agent registered with its provision token.
    Registering,
    /// The agent is fetching and extracting the worker bundle.
    DownloadingAssets,
    /// The user's script is running.
    RunningScript,
    /// The script exited 0.
    Completed,
    /// The script failed, timed out, or the node was lost.
    Failed,
    /// The node's instance is being terminated on request.
    Terminating,
    /// The node's instance was terminated on request.
    Terminated,
}

macro_rules! status_names {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];

            /// The `snake_case` name used in the API, the CLI and the store.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),* }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($name => Ok($ty::$variant),)*
                    other => Err(Error::invalid_input(format!(
                        "unknown {} `{other}`; expected one of: {}",
                        stringify!($ty),
                        [$($name),*].join(", ")
                    ))),
                }
            }
        }
    };
}

status_names!(DeploymentStatus {
    Pending => "pending",
    Provisioning => "provisioning",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Terminating => "terminating",
    Terminated => "terminated",
});

status_names!(NodeStatus {
    Pending => "pending",
    Provisioning => "provisioning",
    Booting => "booting",
    Registering => "registering",
    DownloadingAssets => "downloading_assets",
    RunningScript => "running_script",
    Completed => "completed",
    Failed => "failed",
    Terminating => "terminating",
    Terminated => "terminated",
});

impl DeploymentStatus {
    /// Completed, failed or terminated: nothing will change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeploymentStatus::Completed | DeploymentStatus::Failed | DeploymentStatus::Terminated
        )
    }

    /// Whether SPEC §3 allows going from `self` to `to`.
    pub fn can_become(self, to: DeploymentStatus) -> bool {
        use DeploymentStatus::*;
        matches!(
            (self, to),
            (Pending, Provisioning)
                | (Pending, Terminating)
                | (Provisioning, Running)
                | (Provisioning, Failed)
                | (Provisioning, Terminating)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Terminating)
                | (Terminating, Terminated)
        )
    }
}

impl NodeStatus {
    /// Completed, failed or terminated. (A failed node with retries left is revived by the
    /// orchestrator through [`NodeUpdate::Retry`], which the node's attempt counter allows.)
    pub fn is_final(self) -> bool {
        matches!(
            self,
            NodeStatus::Completed | NodeStatus::Failed | NodeStatus::Terminated
        )
    }

    /// Whether SPEC §3 allows going from `self` to `to` (retries aside).
    pub fn can_become(self, to: NodeStatus) -> bool {
        use NodeStatus::*;
        if self.is_final() {
            return false;
        }
        match to {
            // Every state before running_script may fail, and so may running_script itself.
            Failed => true,
            // Every non-final state may be terminated.
            Terminating => self != Terminating,
            Terminated => self == Terminating,
            Completed => self == RunningScript,
            _ => {
                // Forward along the happy path, possibly skipping steps (an agent that is
                // quick may report running_script before its downloading_assets arrives).
                let order = |s: NodeStatus| match s {
                    Pending => Some(0),
                    Provisioning => Some(1),
                    Booting => Some(2),
                    Registering => Some(3),
                    DownloadingAssets => Some(4),
                    RunningScript => Some(5),
                    _ => None,
                };
                matches!((order(self), order(to)), (Some(a), Some(b)) if b > a)
            }
        }
    }
}

/// One deployment as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// Unguessable id, `dep-` followed by hex.
    pub id: String,
    /// Current state.
    pub status: DeploymentStatus,
    /// `local` or `aws`.
    pub cloud_provider: String,
    /// How many nodes it runs: `nodes.count` from taskfly.yml, or for a rerun the number of
    /// nodes chosen to run again.
    pub total_nodes: u32,
    /// How many times a failed node may be started again.
    pub retries: u32,
    /// Nodes in `completed`.
    pub nodes_completed: u32,
    /// Nodes in `failed` with no retry left.
    pub nodes_failed: u32,
    /// Nodes in `terminated`.
    pub nodes_terminated: u32,
    /// When it was accepted.
    pub created_at: SystemTime,
    /// When anything about it last changed.
    pub updated_at: SystemTime,
    /// When it reached a final state.
    pub completed_at: Option<SystemTime>,
    /// Why it failed, if it did.
    pub error_message: Option<String>,
    /// For a rerun ([`crate::Orchestrator::rerun`]): the deployment whose nodes it runs again.
    /// Its nodes keep their indexes there, and `total_nodes` counts only the nodes it runs.
    pub rerun_of: Option<String>,
    /// When its files (bundle, node work directories) were deleted by a cleanup; its record,
    /// nodes and logs stay until it is forgotten.
    pub cleaned_at: Option<SystemTime>,
}

impl Deployment {
    /// Nodes that will not change any more.
    pub fn nodes_final(&self) -> u32 {
        self.nodes_completed + self.nodes_failed + self.nodes_terminated
    }
}

/// One node as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `<deployment id>-<index>`.
    pub id: String,
    /// The deployment it belongs to.
    pub deployment_id: String,
    /// 0-based index, `0..nodes.count` of its `taskfly.yml`. A rerun's nodes keep the indexes
    /// they had in the deployment it reruns, so they need not start at 0 nor be contiguous.
    pub index: u32,
    /// Current state.
    pub status: NodeStatus,
    /// Starts at 1, incremented by every retry.
    pub attempt: u32,
    /// The provider's id of its instance or process, once provisioned.
    pub instance_id: Option<String>,
    /// Where the provider finds that instance again ([`InstanceRef::locator`]); `None` for
    /// nodes recorded before taskfly 0.2.
    pub instance_locator: Option<String>,
    /// The instance's address, when the provider knows it.
    pub ip_address: Option<String>,
    /// When its state last changed, or it last sent a heartbeat (see the store).
    pub last_update: SystemTime,
    /// The script's exit code, once it ended.
    pub exit_code: Option<i32>,
    /// Why it failed, if it did.
    pub error_message: Option<String>,
    /// SHA-256 of the single-use provision token, until it is used. After a registration that
    /// sent a nonce, the registration key instead (SHA-256 of token
    /// and nonce): only that registration, resent after a lost answer, finds the node again.
    pub provision_token_hash: Option<[u8; 32]>,
    /// SHA-256 of the agent's bearer token, once registered.
    pub auth_token_hash: Option<[u8; 32]>,
    /// When its current attempt entered each phase; a retry starts them afresh.
    pub times: PhaseTimes,
    /// Why the node's instance still waits in its provider's queue (Slurm's reason, like
    /// `Priority` or `Resources`) while the node is `provisioning`
    /// ([`crate::Provider::queue_reason`]). Not stored: the engine fills it in for views.
    pub queue_reason: Option<String>,
}

/// When a node's current attempt entered each phase of its life, as the engine's clock saw
/// it: set by [`apply_node_update`] on the transition into the phase, never moved afterwards,
/// and reset by a retry (which keeps only the new `provisioning_at`). A phase the node skipped
/// (an agent may report `running_script` before `downloading_assets` arrives) stays `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseTimes {
    /// Entered `provisioning`: the provider was asked for an instance (the time a node waits
    /// in a scheduler's queue counts here).
    pub provisioning_at: Option<SystemTime>,
    /// Entered `booting`, or `registering` when the agent registered before the provider's
    /// answer was recorded: the instance exists and its agent is starting.
    pub booting_at: Option<SystemTime>,
    /// Entered `downloading_assets`.
    pub downloading_at: Option<SystemTime>,
    /// Entered `running_script`: the script started.
    pub started_at: Option<SystemTime>,
    /// Entered `completed`, `failed` or `terminated`.
    pub finished_at: Option<SystemTime>,
}

/// How long a node's current attempt spent in each phase (see [`PhaseTimes::durations`]);
/// `None` for a phase it has not entered, or skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseDurations {
    /// From `provisioning` until the instance existed.
    pub provisioning: Option<Duration>,
    /// Booting and registering, until the bundle download began.
    pub booting: Option<Duration>,
    /// Fetching and extracting the worker bundle.
    pub downloading: Option<Duration>,
    /// The script's run.
    pub running: Option<Duration>,
}

impl PhaseTimes {
    /// The times of a node entering `status` at `now`, from these times: a new phase's start
    /// is recorded once, the times of the phases before it are kept.
    fn entered(mut self, status: NodeStatus, now: SystemTime) -> PhaseTimes {
        let slot = match status {
            NodeStatus::Provisioning => &mut self.provisioning_at,
            NodeStatus::Booting | NodeStatus::Registering => &mut self.booting_at,
            NodeStatus::DownloadingAssets => &mut self.downloading_at,
            NodeStatus::RunningScript => &mut self.started_at,
            NodeStatus::Completed | NodeStatus::Failed | NodeStatus::Terminated => {
                &mut self.finished_at
            }
            NodeStatus::Pending | NodeStatus::Terminating => return self,
        };
        slot.get_or_insert(now);
        self
    }

    /// The time spent in each phase. A phase lasts from its start to the start of the next
    /// phase the node entered (a skipped phase's time counts in the one before it); the phase
    /// a node is still in lasts until `now`, unless the node has finished. A clock that went
    /// backwards gives zero, never a negative time.
    pub fn durations(&self, now: SystemTime) -> PhaseDurations {
        let marks = [
            self.provisioning_at,
            self.booting_at,
            self.downloading_at,
            self.started_at,
        ];
        let end_of = |phase: usize| {
            marks[phase + 1..]
                .iter()
                .chain(std::iter::once(&self.finished_at))
                .find_map(|mark| *mark)
                .unwrap_or(now)
        };
        let lasted = |phase: usize| {
            marks[phase].map(|start| end_of(phase).duration_since(start).unwrap_or_default())
        };
        PhaseDurations {
            provisioning: lasted(0),
            booting: lasted(1),
            downloading: lasted(2),
            running: lasted(3),
        }
    }

    /// The time spent in each phase the node has left: as [`PhaseTimes::durations`], but the
    /// phase it is still in (none once it has finished) is `None`. Depends on the node alone,
    /// not on the clock, so it changes only when the node does.
    pub fn ended_durations(&self) -> PhaseDurations {
        let Some(finished) = self.finished_at else {
            let mut durations = self.durations(SystemTime::UNIX_EPOCH);
            let current = [
                (self.started_at, &mut durations.running),
                (self.downloading_at, &mut durations.downloading),
                (self.booting_at, &mut durations.booting),
                (self.provisioning_at, &mut durations.provisioning),
            ]
            .into_iter()
            .find(|(mark, _)| mark.is_some());
            if let Some((_, lasted)) = current {
                *lasted = None;
            }
            return durations;
        };
        self.durations(finished)
    }
}

/// The id the engine gives node `index` of deployment `deployment_id`:
/// `<deployment id>-<index>`.
pub(crate) fn node_id(deployment_id: &str, index: u32) -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(deployment_id.len() + 11);
    id.push_str(deployment_id);
    // Writing to a String cannot fail.
    let _ = write!(id, "-{index}");
    id
}

impl Node {
    /// A fresh node in `pending`.
    pub fn new(deployment_id: &str, index: u32, now: SystemTime) -> Node {
        Node {
            id: node_id(deployment_id, index),
            deployment_id: deployment_id.to_owned(),
            index,
            status: NodeStatus::Pending,
            attempt: 1,
            instance_id: None,
            instance_locator: None,
            ip_address: None,
            last_update: now,
            exit_code: None,
            error_message: None,
            provision_token_hash: None,
            auth_token_hash: None,
            times: PhaseTimes::default(),
            queue_reason: None,
        }
    }
}

impl Node {
    /// Its instance, once provisioned, as its provider named it (an empty locator for nodes
    /// recorded before taskfly 0.2).
    pub fn instance(&self) -> Option<InstanceRef> {
        Some(InstanceRef {
            id: self.instance_id.clone()?,
            locator: self.instance_locator.clone().unwrap_or_default(),
        })
    }
}

/// A change to one node. Applied by [`apply_node_update`] under the store's lock or transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeUpdate {
    /// Move to `status`, recording what is given.
    Status {
        /// The new state.
        status: NodeStatus,
        /// Exit code of the script, for completed and failed.
        exit_code: Option<i32>,
        /// Why, for failed.
        message: Option<String>,
    },
    /// The provider created the instance for `attempt`: record it and move to `booting`.
    ///
    /// A quick agent may register, or even finish, before the provider's answer arrives (a
    /// Slurm task that runs while its submission is still being watched): the instance is
    /// then recorded and the node keeps its state. The caller releases the instance of a
    /// node that has ended ([`Applied::node`] is final, failed or terminating). An answer for
    /// an earlier attempt than the node's is refused: that instance is nobody's now.
    Provisioned {
        /// The instance, as the provider names it.
        instance: InstanceRef,
        /// Its address, if known.
        ip_address: Option<String>,
        /// The attempt the instance was asked for ([`Node::attempt`] at the request).
        attempt: u32,
    },
    /// Arm a new single-use provision token (before provisioning or a retry).
    ProvisionToken {
        /// SHA-256 of the token.
        hash: [u8; 32],
    },
    /// A provisioning attempt begins: as [`NodeUpdate::ProvisionToken`], and a `pending`
    /// node moves to `provisioning` in the same write (a node already there, retried or
    /// resumed after a restart, keeps its state).
    ProvisioningStarted {
        /// SHA-256 of the provision token.
        hash: [u8; 32],
    },
    /// The agent registered: consume the provision token, store the auth token, move to
    /// `registering`.
    Registered {
        /// SHA-256 of the new auth token.
        auth_token_hash: [u8; 32],
    },
    /// The agent registered and sent a nonce: as [`NodeUpdate::Registered`], but the provision
    /// token's hash is replaced by `resend_key`, so the same registration, resent because its
    /// answer was lost, can find the node again ([`NodeUpdate::RegistrationResent`]).
    RegisteredWithNonce {
        /// SHA-256 of the new auth token.
        auth_token_hash: [u8; 32],
        /// The registration key: SHA-256 of the provision token and the nonce.
        resend_key: [u8; 32],
    },
    /// A registration resent with the same token and nonce: the node's state stays, a new auth
    /// token replaces the one whose answer was lost. Refused once the node is final.
    RegistrationResent {
        /// The key the node was found by; must still be the node's.
        resend_key: [u8; 32],
        /// SHA-256 of the new auth token.
        auth_token_hash: [u8; 32],
    },
    /// Start a failed node again (attempt + 1), back to `provisioning`.
    Retry,
}

/// What an applied update did, so the caller can act on it (terminate an instance, wake
/// waiters) without reading the store again.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The node after the update.
    pub node: Node,
    /// The state the node was in before.
    pub previous: NodeStatus,
    /// Set when this update made the deployment change state.
    pub deployment_changed: Option<DeploymentStatus>,
    /// The deployment after the update (its state and node counters), so the engine can tell
    /// event subscribers without reading the store again.
    pub deployment: Deployment,
}

/// Apply `update` to `node` of `deployment`, enforcing SPEC §3. On error nothing is changed.
pub fn apply_node_update(
    deployment: &mut Deployment,
    node: &mut Node,
    update: NodeUpdate,
    now: SystemTime,
) -> Result<Applied> {
    let previous = node.status;
    let mut next = node.clone();
    match update {
        NodeUpdate::Status {
            status,
            exit_code,
            message,
        } => {
            // A node being terminated that fails (its script killed by the stop, its agent
            // reporting that before the engine marks the node) ends terminated, as asked:
            // its exit code and message are kept.
            let status = if status == NodeStatus::Failed && node.status == NodeStatus::Terminating {
                NodeStatus::Terminated
            } else {
                status
            };
            if status == node.status {
                // A repeated report (an answer was lost and the call resent): nothing changes.
                return Ok(Applied {
                    node: node.clone(),
                    previous,
                    deployment_changed: None,
                    deployment: deployment.clone(),
                });
            }
            check_node_transition(deployment, node, status)?;
            next.status = status;
            if exit_code.is_some() {
                next.exit_code = exit_code;
            }
            if message.is_some() {
                next.error_message = message;
            }
        }
        NodeUpdate::Provisioned {
            instance,
            ip_address,
            attempt,
        } => {
            if attempt != node.attempt {
                return Err(Error::invalid_transition(format!(
                    "node {} is at attempt {}; the instance {} of attempt {attempt} is no longer \
                     wanted",
                    node.id, node.attempt, instance.id
                )));
            }
            // Only a node still waiting for its instance moves to `booting`; one already up
            // keeps its later state, and one that has ended keeps its end (the caller then
            // releases the instance).
            if matches!(node.status, NodeStatus::Pending | NodeStatus::Provisioning) {
                check_node_transition(deployment, node, NodeStatus::Booting)?;
                next.status = NodeStatus::Booting;
            }
            next.instance_id = Some(instance.id);
            next.instance_locator = Some(instance.locator);
            next.ip_address = ip_address;
        }
        NodeUpdate::ProvisionToken { hash } => {
            if is_node_final(deployment, node) {
                return Err(refused(node, "arm a provision token for"));
            }
            next.provision_token_hash = Some(hash);
        }
        NodeUpdate::ProvisioningStarted { hash } => {
            if is_node_final(deployment, node) {
                return Err(refused(node, "arm a provision token for"));
            }
            if node.status == NodeStatus::Pending {
                check_node_transition(deployment, node, NodeStatus::Provisioning)?;
                next.status = NodeStatus::Provisioning;
            }
            next.provision_token_hash = Some(hash);
        }
        NodeUpdate::Registered { auth_token_hash } => {
            if node.provision_token_hash.is_none() {
                return Err(Error::invalid_transition(format!(
                    "node {} has already registered; a provision token works once",
                    node.id
                )));
            }
            check_node_transition(deployment, node, NodeStatus::Registering)?;
            next.status = NodeStatus::Registering;
            next.provision_token_hash = None;
            next.auth_token_hash = Some(auth_token_hash);
        }
        NodeUpdate::RegisteredWithNonce {
            auth_token_hash,
            resend_key,
        } => {
            if node.provision_token_hash.is_none() {
                return Err(Error::conflict(format!(
                    "node {} has already registered; a provision token works once",
                    node.id
                )));
            }
            check_node_transition(deployment, node, NodeStatus::Registering)?;
            next.status = NodeStatus::Registering;
            next.provision_token_hash = Some(resend_key);
            next.auth_token_hash = Some(auth_token_hash);
        }
        NodeUpdate::RegistrationResent {
            resend_key,
            auth_token_hash,
        } => {
            let same = node
                .provision_token_hash
                .is_some_and(|key| crate::auth::hashes_equal(&key, &resend_key));
            if !same || node.status.is_final() || node.status == NodeStatus::Terminating {
                return Err(refused(node, "accept a resent registration for"));
            }
            next.auth_token_hash = Some(auth_token_hash);
        }
        NodeUpdate::Retry => {
            if node.status != NodeStatus::Failed || !has_retry_left(deployment, node) {
                return Err(refused(node, "retry"));
            }
            next.status = NodeStatus::Provisioning;
            next.attempt += 1;
            next.instance_id = None;
            next.instance_locator = None;
            next.ip_address = None;
            next.exit_code = None;
            next.error_message = None;
            next.auth_token_hash = None;
            next.provision_token_hash = None;
            next.times = PhaseTimes::default();
        }
    }
    next.last_update = now;
    if next.status != previous {
        next.times = next.times.entered(next.status, now);
    }

    // Counters: a node entering a final state counts once; a failed node that may still be
    // retried does not count until its last attempt fails.
    let mut dep = deployment.clone();
    if next.status != previous {
        match next.status {
            NodeStatus::Completed => dep.nodes_completed += 1,
            NodeStatus::Failed if !has_retry_left(&dep, &next) => dep.nodes_failed += 1,
            NodeStatus::Terminated => dep.nodes_terminated += 1,
            _ => {}
        }
    }
    let deployment_changed = deployment_status_after_node(&mut dep, &next, now);
    dep.updated_at = now;

    *deployment = dep;
    *node = next.clone();
    Ok(Applied {
        node: next,
        previous,
        deployment_changed,
        deployment: deployment.clone(),
    })
}

/// Whether a failed `node` may be started again.
pub fn has_retry_left(deployment: &Deployment, node: &Node) -> bool {
    node.attempt <= deployment.retries
}

/// Whether `node` will never change again: a final state, except a failure with a retry left
/// (which the orchestrator either retries or, on a terminate request, terminates).
pub fn is_node_final(deployment: &Deployment, node: &Node) -> bool {
    node.status.is_final()
        && !(node.status == NodeStatus::Failed && has_retry_left(deployment, node))
}

fn check_node_transition(deployment: &Deployment, node: &Node, to: NodeStatus) -> Result<()> {
    let allowed = if node.status == NodeStatus::Failed && has_retry_left(deployment, node) {
        to == NodeStatus::Terminating
    } else {
        node.status.can_become(to)
    };
    if allowed {
        Ok(())
    } else {
        Err(Error::invalid_transition(format!(
            "node {} cannot go from {} to {}",
            node.id, node.status, to
        )))
    }
}

fn refused(node: &Node, what: &str) -> Error {
    Error::invalid_transition(format!(
        "cannot {what} node {} in state {}",
        node.id, node.status
    ))
}

/// The deployment's own move caused by a node update, in O(1).
fn deployment_status_after_node(
    deployment: &mut Deployment,
    node: &Node,
    now: SystemTime,
) -> Option<DeploymentStatus> {
    use DeploymentStatus as D;
    let target = if deployment.nodes_final() == deployment.total_nodes {
        match deployment.status {
            D::Terminating => D::Terminated,
            _ if deployment.nodes_failed > 0 => D::Failed,
            // Terminated nodes outside a terminate request cannot happen; treat as completed
            // only if every node completed.
            _ if deployment.nodes_completed == deployment.total_nodes => D::Completed,
            _ => D::Failed,
        }
    } else if deployment.status == D::Provisioning
        && matches!(
            node.status,
            NodeStatus::Booting
                | NodeStatus::Registering
                | NodeStatus::DownloadingAssets
                | NodeStatus::RunningScript
        )
    {
        D::Running
    } else {
        return None;
    };
    if target == deployment.status {
        return None;
    }
    // Provisioning may skip straight to a final state when every node ended quickly.
    if deployment.status == D::Provisioning && matches!(target, D::Completed) {
        deployment.status = D::Running;
    }
    if !deployment.status.can_become(target) {
        return None;
    }
    set_deployment_status(deployment, target, now);
    if target == D::Failed && deployment.error_message.is_none() {
        deployment.error_message = Some(format!(
            "{} of {} nodes failed",
            deployment.nodes_failed, deployment.total_nodes
        ));
    }
    Some(target)
}

fn set_deployment_status(deployment: &mut Deployment, to: DeploymentStatus, now: SystemTime) {
    deployment.status = to;
    deployment.updated_at = now;
    if to.is_final() {
        deployment.completed_at = Some(now);
    }
}

/// Move a deployment to `to` on the orchestrator's decision (provisioning started, terminate
/// requested, nothing could be provisioned). Refused with a conflict if SPEC §3 does not allow it.
pub fn apply_deployment_status(
    deployment: &mut Deployment,
    to: DeploymentStatus,
    message: Option<String>,
    now: SystemTime,
) -> Result<()> {
    if !deployment.status.can_become(to) {
        return Err(Error::invalid_transition(format!(
            "deployment {} cannot go from {} to {}",
            deployment.id, deployment.status, to
        )));
    }
    set_deployment_status(deployment, to, now);
    if message.is_some() {
        deployment.error_message = message;
    }
    Ok(())
}

/// A deployment's state and node counters: what waiting and watching need, read from the
/// deployment alone (never its nodes), so following a deployment costs the same for 1 node
/// or 100,000.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeploymentSummary {
    /// Its id.
    pub id: String,
    /// Current state.
    pub status: DeploymentStatus,
    /// `nodes.count`.
    pub total_nodes: u32,
    /// Nodes in `completed`.
    pub nodes_completed: u32,
    /// Nodes in `failed` with no retry left.
    pub nodes_failed: u32,
    /// Nodes in `terminated`.
    pub nodes_terminated: u32,
    /// Why it failed, if it did.
    pub error_message: Option<String>,
    /// The deployment it reruns, if it is a rerun.
    pub rerun_of: Option<String>,
}

impl DeploymentSummary {
    /// Whether the deployment reached `completed`, `failed` or `terminated`.
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

impl From<&Deployment> for DeploymentSummary {
    fn from(deployment: &Deployment) -> DeploymentSummary {
        DeploymentSummary {
            id: deployment.id.clone(),
            status: deployment.status,
            total_nodes: deployment.total_nodes,
            nodes_completed: deployment.nodes_completed,
            nodes_failed: deployment.nodes_failed,
            nodes_terminated: deployment.nodes_terminated,
            error_message: deployment.error_message.clone(),
            rerun_of: deployment.rerun_of.clone(),
        }
    }
}

/// One deployment with every node, by index.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeploymentDetail {
    /// The deployment.
    pub deployment: Deployment,
    /// Its nodes, by index.
    pub nodes: Vec<Node>,
    /// What the scripts of its nodes used, by node index, for nodes that reported it.
    pub resources: std::collections::BTreeMap<u32, NodeResources>,
    /// Its webhook notification (`notify:`), once its final state made one.
    pub notify: Option<WebhookDelivery>,
}

/// A page of a deployment's log.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LogsPage {
    /// Lines after the cursor, oldest first.
    pub lines: Vec<super::LogLine>,
    /// Pass as `after` to read the lines that follow.
    pub next: u64,
}

/// Counts over every deployment the engine knows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Deployments known.
    pub total_deployments: u64,
    /// Nodes of those deployments.
    pub total_nodes: u64,
    /// Deployments per state (states with none are absent).
    pub deployment_status: std::collections::BTreeMap<DeploymentStatus, u64>,
    /// How long the engine has run.
    pub uptime: std::time::Duration,
}

/// What cleaning up every final deployment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CleanupCounts {
    /// Deployments whose files were deleted.
    pub cleaned: u32,
    /// Deployments whose files could not be deleted.
    pub failed: u32,
}

/// The answer to a node's registration, one type for the engine and the node's client (which
/// names it [`crate::Registration`]): `A` is the work order, in the engine's form or the wire's.
///
/// An ordinary node's single-use provision token is always answered with a work order. A
/// pooled instance's token (an instance kept alive between nodes) is used again after every
/// node: the engine then answers with the next work order, with "no work yet" after holding
/// the request for a while, or with "retired" once the pool no longer wants the instance.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Registration<A> {
    /// A node to serve. Its `pooled` flag says whether to register again once it has ended.
    Assigned(A),
    /// No work for this pooled instance yet: register again (at once; the engine already
    /// made the request wait).
    NoWork,
    /// The pool retired this instance, which is being terminated: stop.
    Retired {
        /// Why, for the log.
        reason: String,
    },
}

/// Everything a registered node needs to run its slice.
#[derive(Clone, PartialEq)]
pub(crate) struct Assignment {
    /// Bearer token for every later node call (a secret).
    pub(crate) auth_token: String,
    pub(crate) deployment_id: String,
    pub(crate) node_id: String,
    pub(crate) node_index: u32,
    /// The script's environment, secrets included.
    pub(crate) env: std::collections::BTreeMap<String, String>,
    /// The names of the variables of `env` that hold secrets.
    pub(crate) secret_names: Vec<String>,
    /// `remote_script_to_run`.
    pub(crate) script: String,
    /// `remote_dest_dir`.
    pub(crate) dest_dir: Option<String>,
    /// How often to send heartbeats.
    pub(crate) heartbeat_interval: std::time::Duration,
    /// `nodes.timeout` (whole seconds, at least 1).
    pub(crate) timeout: Option<std::time::Duration>,
    /// Registered with a pooled instance's token.
    pub(crate) pooled: bool,
    /// For a pooled instance: the token to register with next time (a secret).
    pub(crate) next_token: Option<String>,
    /// `outputs`: what the agent sends back once the script has ended.
    pub(crate) outputs: Vec<String>,
}

impl fmt::Debug for Assignment {
    /// Leaves out the tokens and the environment, which hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("deployment_id", &self.deployment_id)
            .field("node_id", &self.node_id)
            .field("node_index", &self.node_index)
            .field("script", &self.script)
            .finish_non_exhaustive()
    }
}

/// A node's report of its progress or result (`POST /nodes/status`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StatusReport {
    pub(crate) status: NodeStatus,
    pub(crate) message: Option<String>,
    pub(crate) exit_code: Option<i32>,
}

/// One line a node sends (`POST /nodes/logs`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReportedLine {
    pub(crate) stream: super::LogStream,
    pub(crate) line: String,
    /// When the node wrote it; the engine's clock when absent.
    pub(crate) timestamp: Option<SystemTime>,
    /// Its number for recognising resent lines (see [`super::NewLogLine::line_no`]).
    pub(crate) line_no: Option<u64>,
}

/// A batch of lines a node sends, in the order they were written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogBatch {
    pub(crate) lines: Vec<ReportedLine>,
    /// How many lines the agent sent before this batch: numbers lines without their own.
    pub(crate) offset: Option<u64>,
}

/// What a node's script used, as its heartbeats said (SPEC §4.2): the newest reading of each
/// value and the highest resident memory seen. Kept by the engine in memory, not in the store.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct NodeResources {
    /// CPU use of the script's process tree since the previous heartbeat, in percent of one
    /// CPU (above 100 on several).
    pub cpu_percent: Option<f64>,
    /// Resident memory of the script's process tree.
    pub rss_bytes: Option<u64>,
    /// The highest `rss_bytes` reported for the node (over every attempt), kept after it ends.
    pub peak_rss_bytes: Option<u64>,
    /// Disk space the node's bundle folder takes.
    pub disk_bytes: Option<u64>,
    /// When the newest reading arrived.
    pub sampled_at: SystemTime,
}

/// One heartbeat's reading of a node's resources; absent values are not known this time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct ResourceSample {
    pub(crate) cpu_percent: Option<f64>,
    pub(crate) rss_bytes: Option<u64>,
    pub(crate) disk_bytes: Option<u64>,
}

impl NodeResources {
    /// `sample` added to what was known (`None` at a node's first reading): values it lacks
    /// stay as they were, the peak only grows.
    pub(crate) fn updated(
        known: Option<NodeResources>,
        sample: ResourceSample,
        now: SystemTime,
    ) -> NodeResources {
        let peak = known.and_then(|k| k.peak_rss_bytes);
        NodeResources {
            cpu_percent: sample.cpu_percent.or(known.and_then(|k| k.cpu_percent)),
            rss_bytes: sample.rss_bytes.or(known.and_then(|k| k.rss_bytes)),
            peak_rss_bytes: match (peak, sample.rss_bytes) {
                (Some(peak), Some(rss)) => Some(peak.max(rss)),
                (peak, rss) => peak.or(rss),
            },
            disk_bytes: sample.disk_bytes.or(known.and_then(|k| k.disk_bytes)),
            sampled_at: now,
        }
    }
}

/// Where a deployment's webhook notification stands (`notify:`, SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeliveryStatus {
    /// Not delivered yet; tried again until an hour has passed.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Not delivered within the hour; no more tries.
    Failed,
}

status_names!(DeliveryStatus {
    Pending => "pending",
    Delivered => "delivered",
    Failed => "failed",
});

/// One webhook notification of a deployment's final state: the body is made once, when the
/// deployment ends, and sent as it is until the receiver takes it. The `notify.secret` itself
/// is never kept: only the body's signature.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct WebhookDelivery {
    /// The deployment it tells about (one notification per deployment).
    pub deployment_id: String,
    /// `notify.webhook`: where it goes. May hold a credential (many services put one in the
    /// path), so it is never logged nor shown.
    pub url: String,
    /// The JSON body.
    pub body: String,
    /// `sha256=<hex>`: the body's HMAC-SHA256 with `notify.secret`, when one is set.
    pub signature: Option<String>,
    /// Delivered, failed, or still being tried.
    pub status: DeliveryStatus,
    /// Tries so far.
    pub attempts: u32,
    /// Why the last try failed (the receiver's status code, or the connection error).
    pub last_error: Option<String>,
    /// When the deployment ended and the notification was made.
    pub created_at: SystemTime,
    /// When to try next, while pending.
    pub next_attempt_at: SystemTime,
    /// When the receiver took it.
    pub delivered_at: Option<SystemTime>,
}

impl fmt::Debug for WebhookDelivery {
    /// Leaves out the URL, which may hold a credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookDelivery")
            .field("deployment_id", &self.deployment_id)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .field("last_error", &self.last_error)
            .field("next_attempt_at", &self.next_attempt_at)
            .field("delivered_at", &self.delivered_at)
            .finish_non_exhaustive()
    }
}

/// Ascending node indexes as short text, runs as ranges: `0-3, 7, 9-10` (empty for none), as
/// error messages and the CLI name a set of nodes.
pub fn index_ranges(indexes: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut rest = indexes.iter().copied().peekable();
    while let Some(first) = rest.next() {
        let mut last = first;
        while rest
            .next_if(|&next| Some(next) == last.checked_add(1))
            .is_some()
        {
            last += 1;
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests;
