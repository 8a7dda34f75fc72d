//! The resource pool: [`PooledProvider`] keeps instances between nodes, so a later node (of
//! the same deployment or another) starts on an instance that is already up instead of waiting
//! for a new one to boot.
//!
//! See [`PooledProvider`] for how reuse works.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Instance, InstanceKind, InstanceRef, InstanceSpec, OwnedBy, OwnedInstance, Owner, Provider,
};
use crate::auth;
use crate::error::{BoxError, Error};
use crate::secret::Secret;

/// Retired instance tokens remembered (32 bytes each).
const RETIRED_TOKENS_KEPT: usize = 4096;

/// How often the pool looks for idle, lost and retired instances.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(1);

/// How long an idle instance's agent may stay away between two registrations before the pool
/// takes it for lost. Agents come back as soon as a held registration is answered.
const AGENT_LOST_AFTER: Duration = Duration::from_secs(90);

/// Settings of a [`PooledProvider`] (builder-lite).
///
/// ```
/// use std::time::Duration;
/// use taskfly::PoolConfig;
/// let pool = PoolConfig::new(20)
///     .min_instances(2)
///     .idle_timeout(Duration::from_secs(600))
///     .provision_ahead(4);
/// assert_eq!(pool.max_instances, 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Instances the pool runs at most, busy, idle and booting together. A node that finds
    /// none free waits (in `provisioning`) until one is; an idle instance of another kind is
    /// retired to make room.
    pub max_instances: usize,
    /// Idle instances are not retired below this count. The pool does not start instances
    /// to reach it (it cannot know their kind before a deployment asks for one).
    pub min_instances: usize,
    /// An instance idle this long is retired (terminated), down to `min_instances`.
    pub idle_timeout: Duration,
    /// Spare instances the pool keeps booted and waiting beyond those in use, of the kind a
    /// node last asked for, so the next nodes (later provisioning rounds, retries, the next
    /// deployment) start at once. Spares are idle instances: the idle timeout retires them.
    pub provision_ahead: usize,
    /// How long the agent of an instance whose node ended (or was terminated) has to come back
    /// to the pool before the instance is terminated as unresponsive. It needs the heartbeat
    /// interval (to hear about a terminate) plus the grace period (to stop the script).
    pub release_timeout: Duration,
    /// How long a new instance's agent has to first ask for work before the instance is
    /// terminated as broken.
    pub boot_timeout: Duration,
    /// How long the engine holds an idle agent's registration before answering "no work yet"
    /// (the agent asks again at once).
    pub hold: Duration,
}

impl PoolConfig {
    /// A pool of at most `max_instances`, none kept when idle, idle timeout 5 minutes, no
    /// spares, release timeout 60 s, boot timeout 10 minutes, registrations held 20 s.
    pub fn new(max_instances: usize) -> PoolConfig {
        PoolConfig {
            max_instances,
            min_instances: 0,
            idle_timeout: Duration::from_secs(300),
            provision_ahead: 0,
            release_timeout: Duration::from_secs(60),
            boot_timeout: Duration::from_secs(600),
            hold: Duration::from_secs(20),
        }
    }

    /// See [`PoolConfig::min_instances`](PoolConfig#structfield.min_instances).
    #[must_use]
    pub fn min_instances(mut self, min: usize) -> PoolConfig {
        self.min_instances = min;
        self
    }

    /// See [`PoolConfig::idle_timeout`](PoolConfig#structfield.idle_timeout).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> PoolConfig {
        self.idle_timeout = timeout;
        self
    }

    /// See [`PoolConfig::provision_ahead`](PoolConfig#structfield.provision_ahead).
    #[must_use]
    pub fn provision_ahead(mut self, spares: usize) -> PoolConfig {
        self.provision_ahead = spares;
        self
    }

    /// See [`PoolConfig::release_timeout`](PoolConfig#structfield.release_timeout).
    #[must_use]
    pub fn release_timeout(mut self, timeout: Duration) -> PoolConfig {
        self.release_timeout = timeout;
        self
    }

    /// See [`PoolConfig::boot_timeout`](PoolConfig#structfield.boot_timeout).
    #[must_use]
    pub fn boot_timeout(mut self, timeout: Duration) -> PoolConfig {
        self.boot_timeout = timeout;
        self
    }

    /// See [`PoolConfig::hold`](PoolConfig#structfield.hold).
    #[must_use]
    pub fn hold(mut self, hold: Duration) -> PoolConfig {
        self.hold = hold;
        self
    }

    /// Checks the settings make sense together; the error names the setting.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max_instances == 0 {
            return Err(Error::invalid_input(
                "pool max_instances must be at least 1",
            ));
        }
        if self.min_instances > self.max_instances {
            return Err(Error::invalid_input(format!(
                "pool min_instances ({}) is above max_instances ({})",
                self.min_instances, self.max_instances
            )));
        }
        if self.provision_ahead >= self.max_instances {
            return Err(Error::invalid_input(format!(
                "pool provision_ahead ({}) must be below max_instances ({}), or no node could ever use a spare",
                self.provision_ahead, self.max_instances
            )));
        }
        Ok(())
    }
}

/// A pool's settings and state at one moment ([`PooledProvider::stats`]); the API shows it in
/// `GET /stats` under `pools`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// The `cloud_provider` it serves.
    pub provider: String,
    /// At most this many instances at once.
    pub max_instances: usize,
    /// Idle instances are not retired below this count.
    pub min_instances: usize,
    /// Idle instances are retired after this long.
    pub idle_timeout: Duration,
    /// Spares kept ready beyond those in use.
    pub provision_ahead: usize,
    /// Instances it runs now: busy, idle and starting.
    pub instances: u64,
    /// Instances being started.
    pub launching: u64,
    /// Instances assigned a node.
    pub busy: u64,
    /// Instances waiting for work (spares included).
    pub idle: u64,
    /// Instances whose agent has not asked for work yet (still booting), idle or busy.
    pub booting: u64,
    /// Instances started since the engine started.
    pub launched_total: u64,
    /// Nodes given an instance another node had used.
    pub reused_total: u64,
    /// Nodes given a spare (an instance started ahead of need).
    pub spares_used_total: u64,
    /// Instances terminated by the pool (idle timeout, lost agent, room, shutdown).
    pub retired_total: u64,
}

/// An adapter around a [`Provider`] that keeps instances for later nodes. Not a provider
/// itself: the engine puts a registered provider behind one ([`crate::Config::pool`]).
///
/// How reuse works: a pooled instance is started with an *instance token* the pool makes, in
/// place of a node's single-use provision token. Its agent registers with that token like any
/// agent; the engine, finding no node for it, asks the pool, which answers with the provision
/// token of the node the instance is assigned to (or holds the request until it has one). The
/// registration answer says `pooled`, so once the node has ended the agent clears the node's
/// files and registers again: back in the pool, idle. Each registration that takes a node
/// hands the agent a new token (`next_token`) and spends the one used, so the token in the
/// instance's user data (readable by anything on the instance) works once. The pool never hands
/// an instance a new node until its agent itself has asked for one, so a node's script has
/// always ended before the instance serves another node.
///
/// Instances are matched on their kind ([`Provider::instance_kind`]: for EC2, the AMI,
/// instance type, network and tags), never shared across kinds.
///
/// The engine runs its maintenance, routes its agents' registrations to it and shows its
/// state in `GET /stats`:
///
/// ```no_run
/// # fn demo() -> taskfly::Result<()> {
/// use std::sync::Arc;
/// use taskfly::{Config, LocalProvider, PoolConfig};
/// let local = Arc::new(LocalProvider::new("/tmp/taskfly/work".into()));
/// let config = Config::new("/tmp/taskfly")
///     .provider(local)
///     .pool("local", PoolConfig::new(8).provision_ahead(2));
/// # Ok(()) }
/// ```
///
/// Leak prevention: instances the pool holds idle are its own (started for an
/// [`Owner::Pool`] slot); it terminates them when idle too long, when their agent is lost,
/// and at [`PooledProvider::shutdown`]. A restarted engine does not know them any more: the
/// leak checks terminate those not running a live node.
pub struct PooledProvider {
    inner: Arc<dyn Provider>,
    config: PoolConfig,
    state: Mutex<PoolState>,
    /// Bumped on every change: wakes held registrations, releases and nodes waiting for room.
    changes: watch::Sender<u64>,
    /// Fired when the server stops: registrations are answered at once instead of held, so a
    /// graceful shutdown does not wait for them.
    draining: CancellationToken,
}

#[derive(Default)]
struct PoolState {
    slots: HashMap<String, Slot>,
    /// Instance token hash to instance id.
    tokens: HashMap<[u8; 32], String>,
    /// Instances being started (counted against the maximum).
    launching: usize,
    /// Launches ever reserved: tells the leak checks whether one started while they listed.
    launches_started: u64,
    /// Of those being started, spares, by kind (so concurrent top-ups do not start the same spare twice).
    spares_launching: HashMap<InstanceKind, usize>,
    /// Tokens of instances retired and gone, so their agents are told to stop (410) rather
    /// than refused (401); the oldest are forgotten past [`RETIRED_TOKENS_KEPT`].
    retired_tokens: std::collections::VecDeque<[u8; 32]>,
    /// The last request of each kind, to start spares from (provision token cleared).
    templates: HashMap<InstanceKind, InstanceSpec>,
    launched_total: u64,
    reused_total: u64,
    spares_used_total: u64,
    retired_total: u64,
}

struct Slot {
    /// How the inner provider finds the instance.
    instance: InstanceRef,
    kind: InstanceKind,
    token_hash: [u8; 32],
    ip_address: Option<String>,
    state: SlotState,
    /// When it entered its state.
    since: Instant,
    launched_at: Instant,
    /// When its agent last asked for work.
    last_poll: Option<Instant>,
    /// Nodes it was handed.
    served: u64,
    /// A terminate call is under way.
    terminating: bool,
}

#[derive(Clone, PartialEq, Eq)]
enum SlotState {
    /// Handed a node whose agent has not picked it up yet.
    Assigned {
        node_id: String,
        provision_token: String,
    },
    /// Its agent runs the node.
    Busy { node_id: String },
    /// Waiting for work.
    Idle,
    /// Being terminated; its agent is told to stop.
    Retired,
}

impl std::fmt::Debug for SlotState {
    /// Leaves out the provision token of an assignment.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotState::Assigned { node_id, .. } => f
                .debug_struct("Assigned")
                .field("node_id", node_id)
                .finish_non_exhaustive(),
            SlotState::Busy { node_id } => {
                f.debug_struct("Busy").field("node_id", node_id).finish()
            }
            SlotState::Idle => f.write_str("Idle"),
            SlotState::Retired => f.write_str("Retired"),
        }
    }
}

/// What the pool answers an agent asking for work with its instance token.
#[derive(PartialEq, Eq)]
pub(crate) enum Claim {
    /// Not a token of this pool.
    Unknown,
    /// Register with this node provision token.
    Assigned(String),
    /// Nothing yet; ask again.
    Wait,
    /// The instance is being terminated; stop.
    Retired,
}

impl std::fmt::Debug for Claim {
    /// Shows which provision token only by its hash's first bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Unknown => f.write_str("Unknown"),
            Claim::Assigned(token) => {
                let hash = auth::hash_token(token);
                write!(
                    f,
                    "Assigned(token hash {:02x}{:02x}{:02x}{:02x}…)",
                    hash[0], hash[1], hash[2], hash[3]
                )
            }
            Claim::Wait => f.write_str("Wait"),
            Claim::Retired => f.write_str("Retired"),
        }
    }
}

impl PooledProvider {
    /// A pool around `inner`. Errors: settings that contradict each other (see
    /// [`PoolConfig::validate`]).
    pub fn new(inner: Arc<dyn Provider>, config: PoolConfig) -> crate::Result<PooledProvider> {
        config.validate()?;
        let (changes, _) = watch::channel(0);
        Ok(PooledProvider {
            inner,
            config,
            state: Mutex::new(PoolState::default()),
            changes,
            draining: CancellationToken::new(),
        })
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The pool's state now, as `GET /stats` shows it under `provider`.
    pub fn stats(&self, provider: &str) -> PoolStats {
        let state = self.lock();
        let mut stats = PoolStats {
            provider: provider.to_owned(),
            max_instances: self.config.max_instances,
            min_instances: self.config.min_instances,
            idle_timeout: self.config.idle_timeout,
            provision_ahead: self.config.provision_ahead,
            instances: state.launching as u64,
            launching: state.launching as u64,
            busy: 0,
            idle: 0,
            booting: 0,
            launched_total: state.launched_total,
            reused_total: state.reused_total,
            spares_used_total: state.spares_used_total,
            retired_total: state.retired_total,
        };
        for slot in state.slots.values() {
            match slot.state {
                SlotState::Retired => continue,
                SlotState::Idle => stats.idle += 1,
                SlotState::Assigned { .. } | SlotState::Busy { .. } => stats.busy += 1,
            }
            stats.instances += 1;
            stats.booting += u64::from(slot.last_poll.is_none());
        }
        stats
    }

    /// Wait until anything in the pool changes, or `timeout` passes.
    pub async fn changed(&self, timeout: Duration) {
        let mut changes = self.changes.subscribe();
        changes.borrow_and_update();
        let _ = tokio::time::timeout(timeout, changes.changed()).await;
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        crate::sync::lock(&self.state)
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// An agent asks for work with its instance token (hash). Holds the request up to
    /// [`PoolConfig::hold`] while the instance has none. An agent asking again after a node
    /// proves that node over on its instance: the instance becomes idle.
    pub(crate) async fn claim(&self, token_hash: &[u8; 32]) -> Claim {
        let deadline = Instant::now() + self.config.hold;
        loop {
            let mut changes = self.changes.subscribe();
            {
                let mut state = self.lock();
                let Some(instance_id) = state.tokens.get(token_hash).cloned() else {
                    return if state.retired_tokens.contains(token_hash) {
                        Claim::Retired
                    } else {
                        Claim::Unknown
                    };
                };
                let Some(slot) = state.slots.get_mut(&instance_id) else {
                    return Claim::Unknown;
                };
                let now = Instant::now();
                slot.last_poll = Some(now);
                match std::mem::replace(&mut slot.state, SlotState::Idle) {
                    SlotState::Assigned {
                        node_id,
                        provision_token,
                    } => {
                        tracing::debug!(instance_id = %instance_id, node_id = %node_id, "pooled instance picked up its node");
                        slot.state = SlotState::Busy { node_id };
                        slot.since = now;
                        drop(state);
                        self.bump();
                        return Claim::Assigned(provision_token);
                    }
                    SlotState::Busy { node_id, .. } => {
                        tracing::info!(instance_id = %instance_id, node_id = %node_id, "pooled instance is idle again");
                        slot.since = now;
                        drop(state);
                        self.bump();
                        continue;
                    }
                    SlotState::Idle => {}
                    SlotState::Retired => {
                        slot.state = SlotState::Retired;
                        return Claim::Retired;
                    }
                }
            }
            let changed = tokio::select! {
                changed = tokio::time::timeout_at(deadline, changes.changed()) => changed.is_ok(),
                () = self.draining.cancelled() => false,
            };
            if !changed {
                if let Some(slot) = self.lock().slot_by_token(token_hash) {
                    slot.last_poll = Some(Instant::now());
                }
                return Claim::Wait;
            }
        }
    }

    /// The instance registered its node with `token_hash`: give it a new token for its next
    /// registration and make the old one worthless, so that only the agent holds a working
    /// token (the first one sits in the instance's user data, which its scripts can read).
    /// `None` if the instance is gone meanwhile (its agent is then told to stop).
    pub(crate) fn rotate(&self, token_hash: &[u8; 32]) -> crate::Result<Option<String>> {
        let token = auth::new_token()?;
        let hash = auth::hash_token(&token);
        let mut state = self.lock();
        let Some(instance_id) = state.tokens.remove(token_hash) else {
            return Ok(None);
        };
        let Some(slot) = state.slots.get_mut(&instance_id) else {
            return Ok(None);
        };
        slot.token_hash = hash;
        state.tokens.insert(hash, instance_id);
        Ok(Some(token))
    }

    /// Stop holding registrations: answer them at once from now on (the server is stopping).
    pub(crate) fn stop_holding(&self) {
        self.draining.cancel();
    }

    /// The engine could not register the node the instance picked up (it was terminated
    /// meanwhile): the instance is idle again.
    pub(crate) fn not_taken(&self, token_hash: &[u8; 32]) {
        if let Some(slot) = self.lock().slot_by_token(token_hash) {
            if matches!(slot.state, SlotState::Busy { .. }) {
                slot.state = SlotState::Idle;
                slot.since = Instant::now();
            }
        }
        self.bump();
    }

    /// Retire an instance: its agent is told to stop, then it is terminated through the inner
    /// provider and forgotten. On failure it stays retired and is tried again by maintenance.
    async fn retire(&self, instance_id: &str, why: &str) -> Result<(), BoxError> {
        {
            let mut state = self.lock();
            let PoolState {
                slots,
                retired_total,
                ..
            } = &mut *state;
            let Some(slot) = slots.get_mut(instance_id) else {
                return Ok(());
            };
            if slot.state != SlotState::Retired {
                slot.state = SlotState::Retired;
                slot.since = Instant::now();
                *retired_total += 1;
                tracing::info!(instance_id, reason = why, "retiring pooled instance");
            }
            if slot.terminating {
                return Ok(());
            }
            slot.terminating = true;
        }
        self.bump();
        let Some(instance) = self
            .lock()
            .slots
            .get(instance_id)
            .map(|s| s.instance.clone())
        else {
            return Ok(());
        };
        let result = self.inner.terminate(&instance).await;
        {
            let mut state = self.lock();
            match &result {
                Ok(()) => {
                    if let Some(slot) = state.slots.remove(instance_id) {
                        state.tokens.remove(&slot.token_hash);
                        if state.retired_tokens.len() >= RETIRED_TOKENS_KEPT {
                            state.retired_tokens.pop_front();
                        }
                        state.retired_tokens.push_back(slot.token_hash);
                    }
                }
                Err(e) => {
                    tracing::warn!(instance_id, error = %crate::error::Report::new(e.as_ref()), "cannot terminate pooled instance; trying again");
                    if let Some(slot) = state.slots.get_mut(instance_id) {
                        slot.terminating = false;
                    }
                }
            }
        }
        self.bump();
        result
    }

    /// Runs the pool's upkeep until `cancel` fires: retires instances idle past the timeout
    /// (down to the minimum) and those whose agent is lost, and finishes failed terminations.
    /// The engine runs it for every pooled provider it is given.
    pub(crate) async fn maintain(&self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(MAINTENANCE_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = cancel.cancelled() => return,
            }
            for (instance_id, why) in self.due_for_retirement(Instant::now()) {
                // Errors are logged by `retire` and tried again next round.
                let _ = self.retire(&instance_id, why).await;
            }
        }
    }

    /// Which instances to retire now, and why: lost agents, failed terminations to try again,
    /// and the longest-idle instances past the idle timeout while more than the minimum live.
    fn due_for_retirement(&self, now: Instant) -> Vec<(String, &'static str)> {
        let state = self.lock();
        let mut due = Vec::new();
        let mut live = state.launching;
        let mut idle: Vec<(Instant, &String)> = Vec::new();
        for (id, slot) in &state.slots {
            if slot.state == SlotState::Retired {
                if !slot.terminating {
                    due.push((id.clone(), "termination retried"));
                }
                continue;
            }
            let waiting = matches!(slot.state, SlotState::Idle | SlotState::Assigned { .. });
            let lost = match slot.last_poll {
                Some(polled) => now.duration_since(polled) > AGENT_LOST_AFTER,
                None => now.duration_since(slot.launched_at) > self.config.boot_timeout,
            };
            if waiting && lost {
                due.push((id.clone(), "its agent is not asking for work"));
                continue;
            }
            live += 1;
            if slot.state == SlotState::Idle
                && now.duration_since(slot.since) >= self.config.idle_timeout
            {
                idle.push((slot.since, id));
            }
        }
        idle.sort();
        for (_, id) in idle {
            if live <= self.config.min_instances {
                break;
            }
            due.push((id.clone(), "idle past the idle timeout"));
            live -= 1;
        }
        due
    }

    /// Start an instance of `template`'s kind for the pool. With `assign`, it is handed that
    /// node at once; without, it is a spare. The caller has reserved room (`launching`).
    async fn launch(
        &self,
        kind: &InstanceKind,
        template: &InstanceSpec,
        assign: Option<(String, Secret)>,
    ) -> Result<Instance, BoxError> {
        let guard = LaunchGuard {
            pool: self,
            spare_kind: assign.is_none().then(|| kind.clone()),
            armed: true,
        };
        let token = auth::new_token()?;
        let token_hash = auth::hash_token(&token);
        // A random name: a restarted engine's pool must not reuse one of the last run's.
        let request = InstanceSpec {
            owner: Owner::Pool {
                slot: format!("pool-{}", auth::new_id()?),
            },
            provision_token: Secret::from(token),
            ..template.clone()
        };
        let result = self.inner.provision(request).await;
        let mut state = self.lock();
        guard.disarm(&mut state);
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                drop(state);
                self.bump();
                return Err(e);
            }
        };
        let now = Instant::now();
        let served = u64::from(assign.is_some());
        let slot_state = match assign {
            Some((node_id, provision_token)) => SlotState::Assigned {
                node_id,
                provision_token: provision_token.expose().to_owned(),
            },
            None => SlotState::Idle,
        };
        let instance_id = info.reference.id.clone();
        tracing::info!(instance_id = %instance_id, kind = %kind, spare = slot_state == SlotState::Idle, "pooled instance launched");
        state.tokens.insert(token_hash, instance_id.clone());
        state.slots.insert(
            instance_id,
            Slot {
                instance: info.reference.clone(),
                kind: kind.clone(),
                token_hash,
                ip_address: info.ip_address.clone(),
                state: slot_state,
                since: now,
                launched_at: now,
                last_poll: None,
                served,
                terminating: false,
            },
        );
        state.launched_total += 1;
        drop(state);
        self.bump();
        Ok(info)
    }

    /// Start spares of `kind` until `provision_ahead` unassigned instances of it exist (or
    /// the pool is full). Launch failures are logged; nodes never wait on spares.
    async fn top_up(&self, kind: &InstanceKind) {
        let (wanted, template) = {
            let mut state = self.lock();
            let Some(template) = state.templates.get(kind).cloned() else {
                return;
            };
            let starting = state.spares_launching.get(kind).copied().unwrap_or(0);
            let spares = starting
                + state
                    .slots
                    .values()
                    .filter(|s| &s.kind == kind && s.state == SlotState::Idle)
                    .count();
            let room = self.config.max_instances.saturating_sub(state.live_count());
            let wanted = self.config.provision_ahead.saturating_sub(spares).min(room);
            state.launching += wanted;
            state.launches_started += wanted as u64;
            *state.spares_launching.entry(kind.clone()).or_insert(0) += wanted;
            (wanted, template)
        };
        let launches = (0..wanted).map(|_| async {
            // The reservation made above is the launch's own: `launch` releases it.
            if let Err(e) = self.launch(kind, &template, None).await {
                tracing::warn!(error = %crate::error::Report::new(e.as_ref()), "cannot start a spare pooled instance");
            }
        });
        futures_util::future::join_all(launches).await;
    }
}

/// Where a release stands.
enum Release {
    /// Not an instance of the pool: terminate it.
    NotPooled,
    /// Retired: finish terminating it.
    Retired,
    /// The node no longer runs on it.
    Done,
    /// Its agent still runs the node.
    WaitForAgent,
}

/// What a node asking for an instance of some kind does next.
enum Step {
    /// Take this idle instance.
    Reuse(String),
    /// Start a new one (room is reserved).
    Launch,
    /// Retire this idle instance of another kind to make room.
    Retire(String),
    /// Wait for a change.
    Wait,
}

impl PoolState {
    /// The slot an instance token belongs to.
    fn slot_by_token(&mut self, token_hash: &[u8; 32]) -> Option<&mut Slot> {
        let instance_id = self.tokens.get(token_hash)?;
        self.slots.get_mut(instance_id)
    }

    /// Release `node_id`'s hold on `instance_id`: an assignment its agent never picked up is
    /// undone at once (the instance is idle again, or retired if its agent never asked for
    /// work at all); a node the agent runs is waited for.
    fn release_step(&mut self, instance_id: &str, node_id: &str) -> Release {
        let Some(slot) = self.slots.get_mut(instance_id) else {
            return Release::NotPooled;
        };
        match &slot.state {
            SlotState::Retired => Release::Retired,
            // Its agent has never asked for work (the node's boot timed out, or it was
            // terminated while the instance booted): not proven healthy, so not kept.
            SlotState::Assigned { node_id: n, .. } if n == node_id && slot.last_poll.is_none() => {
                Release::Retired
            }
            SlotState::Assigned { node_id: n, .. } if n == node_id => {
                slot.state = SlotState::Idle;
                slot.since = Instant::now();
                Release::Done
            }
            SlotState::Busy { node_id: n, .. } if n == node_id => Release::WaitForAgent,
            SlotState::Assigned { .. } | SlotState::Busy { .. } | SlotState::Idle => Release::Done,
        }
    }

    /// Decide how a node gets an instance of `kind`: an idle one (a booted one first, a spare
    /// before a used one, the longest idle first), else a new one if there is room (reserved
    /// here), else room made by retiring an idle instance of another kind, else wait.
    fn next_step(&mut self, kind: &InstanceKind, config: &PoolConfig) -> Step {
        let idle = self
            .slots
            .iter()
            .filter(|(_, s)| &s.kind == kind && s.state == SlotState::Idle)
            .min_by_key(|(_, s)| (s.last_poll.is_none(), s.served > 0, s.since));
        if let Some((instance_id, _)) = idle {
            return Step::Reuse(instance_id.clone());
        }
        if self.live_count() < config.max_instances {
            self.launching += 1;
            self.launches_started += 1;
            return Step::Launch;
        }
        self.slots
            .iter()
            .filter(|(_, s)| &s.kind != kind && s.state == SlotState::Idle)
            .min_by_key(|(_, s)| s.since)
            .map_or(Step::Wait, |(id, _)| Step::Retire(id.clone()))
    }

    /// Instances counted against the maximum: all but retired ones, plus those starting.
    fn live_count(&self) -> usize {
        self.launching
            + self
                .slots
                .values()
                .filter(|s| s.state != SlotState::Retired)
                .count()
    }
}

/// Gives back a launch reservation however the launch ends (a dropped future included).
struct LaunchGuard<'a> {
    pool: &'a PooledProvider,
    /// The kind, for a spare's launch.
    spare_kind: Option<InstanceKind>,
    armed: bool,
}

impl LaunchGuard<'_> {
    /// Give the reservation back under a lock the caller already holds.
    fn disarm(mut self, state: &mut PoolState) {
        self.give_back(state);
        self.armed = false;
    }

    fn give_back(&self, state: &mut PoolState) {
        state.launching = state.launching.saturating_sub(1);
        if let Some(kind) = &self.spare_kind {
            if let Some(count) = state.spares_launching.get_mut(kind) {
                *count = count.saturating_sub(1);
            }
        }
    }
}

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.give_back(&mut self.pool.lock());
            self.pool.bump();
        }
    }
}

impl PooledProvider {
    /// The name of the provider inside.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The provider inside.
    pub fn inner(&self) -> &Arc<dyn Provider> {
        &self.inner
    }

    /// Hands the node an idle instance of its kind (a spare first, else one a node has used),
    /// else starts one if the pool has room, else retires an idle instance of another kind to
    /// make room, else waits until an instance is free. Then tops up the spares.
    /// Cancel-safe: a dropped call leaves no assignment and no reservation behind.
    pub async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let kind = spec.kind.clone();
        let template = InstanceSpec {
            provision_token: Secret::new(""),
            ..spec.clone()
        };
        self.lock().templates.insert(kind.clone(), template.clone());
        let node_id = spec.owner.name().to_owned();
        let assignment = (node_id.clone(), spec.provision_token.clone());
        loop {
            let mut changes = self.changes.subscribe();
            let action = self.lock().next_step(&kind, &self.config);
            match action {
                Step::Reuse(instance_id) => {
                    let info = {
                        let mut state = self.lock();
                        let PoolState {
                            slots,
                            reused_total,
                            spares_used_total,
                            ..
                        } = &mut *state;
                        let Some(slot) = slots
                            .get_mut(&instance_id)
                            .filter(|s| s.state == SlotState::Idle)
                        else {
                            continue;
                        };
                        if slot.served == 0 {
                            *spares_used_total += 1;
                        } else {
                            *reused_total += 1;
                        }
                        slot.served += 1;
                        slot.since = Instant::now();
                        slot.state = SlotState::Assigned {
                            node_id: assignment.0.clone(),
                            provision_token: assignment.1.expose().to_owned(),
                        };
                        Instance {
                            reference: slot.instance.clone(),
                            ip_address: slot.ip_address.clone(),
                        }
                    };
                    tracing::info!(instance_id = %instance_id, node_id = %node_id, "node handed a pooled instance");
                    self.bump();
                    self.top_up(&kind).await;
                    return Ok(info);
                }
                Step::Launch => {
                    let info = self
                        .launch(&kind, &template, Some(assignment.clone()))
                        .await?;
                    self.top_up(&kind).await;
                    return Ok(info);
                }
                Step::Retire(instance_id) => {
                    // Its room is free once it is retired; the next round launches.
                    let _ = self.retire(&instance_id, "room for another kind").await;
                }
                Step::Wait => {
                    tracing::debug!(node_id = %node_id, "pool full; the node waits for an instance");
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// Terminates the instance for good, whatever it is doing (leak checks, explicit calls).
    pub async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        if self.lock().slots.contains_key(&instance.id) {
            return self.retire(&instance.id, "terminate requested").await;
        }
        self.inner.terminate(instance).await
    }

    /// The node is done with the instance. If the instance is still running it, waits (up to
    /// [`PoolConfig::release_timeout`]) for its agent to come back for work, which proves the
    /// node's script has ended; an agent that does not come back has its instance terminated.
    /// An instance not of this pool is terminated.
    pub async fn release(&self, instance: &InstanceRef, node_id: &str) -> Result<(), BoxError> {
        let instance_id = instance.id.as_str();
        let deadline = Instant::now() + self.config.release_timeout;
        loop {
            let mut changes = self.changes.subscribe();
            let step = self.lock().release_step(instance_id, node_id);
            match step {
                Release::NotPooled => return self.inner.terminate(instance).await,
                Release::Retired => {
                    return self
                        .retire(
                            instance_id,
                            "its node let go before its agent asked for work",
                        )
                        .await
                }
                Release::Done => {
                    self.bump();
                    return Ok(());
                }
                Release::WaitForAgent => {}
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                tracing::warn!(
                    instance_id,
                    node_id,
                    "the agent of a released pooled instance did not come back; terminating it"
                );
                return self.retire(instance_id, "agent did not come back").await;
            }
        }
    }

    /// The inner provider's instances but those the pool holds: it terminates them itself
    /// (idle past the timeout, agent lost, released and not back, at shutdown), so a leak
    /// check never takes a pooled instance from the node it serves or is being released by.
    ///
    /// An instance tagged for the pool that it does not know may be one being started right
    /// now (created, its launch call not yet returned): while a launch is under way, such
    /// instances are left for the next round rather than reported.
    pub async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        let before = {
            let state = self.lock();
            (state.launching, state.launches_started)
        };
        let owned = self.inner.owned_instances().await?;
        let state = self.lock();
        let launching = before.0 > 0 || state.launching > 0 || state.launches_started != before.1;
        Ok(owned
            .into_iter()
            .filter(|instance| {
                let held = state.slots.contains_key(&instance.instance.id);
                // Maybe one whose launch call has not returned yet.
                let maybe_starting = launching && instance.owner == OwnedBy::Pool;
                !held && !maybe_starting
            })
            .collect())
    }

    /// Terminates the instances waiting for work (a restarted engine would not know them),
    /// then shuts the inner provider down. Instances running a node are left to it.
    pub async fn shutdown(&self) {
        let waiting: Vec<String> = self
            .lock()
            .slots
            .iter()
            .filter(|(_, s)| matches!(s.state, SlotState::Idle | SlotState::Assigned { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        let retirements = waiting
            .iter()
            .map(|id| self.retire(id, "engine shutting down"));
        futures_util::future::join_all(retirements).await;
        self.inner.shutdown().await;
    }
}

impl std::fmt::Debug for PooledProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("PooledProvider")
            .field("config", &self.config)
            .field("instances", &state.slots.len())
            .field("launching", &state.launching)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
