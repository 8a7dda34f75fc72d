//! The daemon's Prometheus metrics (SPEC §4.3), kept with the `prometheus-client` crate and
//! written in the OpenMetrics text format.
//!
//! Two kinds of numbers: counters and histograms the engine and the API move as things
//! happen ([`Metrics::node_changed`], [`Metrics::http_request`], [`Metrics::provider_call`]),
//! and gauges read at scrape time from what the engine already counts ([`Snapshot`]: the
//! deployments' own node counters, and a per-status count of the nodes of deployments that
//! are not final, kept here in memory). A scrape never reads every node: its cost grows with
//! the number of deployments, not of nodes.
//!
//! No label names a deployment or a node, so the number of series stays bounded whatever the
//! fleet's size.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::state::model::{DeploymentStatus, Node, NodeStatus};
use crate::sync::lock;

/// The media type of [`Metrics::encode`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The route label of requests to no known endpoint, so unknown paths make one series.
pub(crate) const OTHER_ROUTE: &str = "other";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteCodeLabels {
    route: &'static str,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderCallLabels {
    provider: String,
    op: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Phase durations: 50 ms to about 3.6 hours.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 4.0, 9))
}

/// Request durations: 0.5 ms to about 8 s.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 8))
}

/// The part of a node's life a `taskfly_node_phase_seconds` observation measures; `None` for
/// states that are no phase (pending, final ones, terminating).
fn phase_of(status: NodeStatus) -> Option<&'static str> {
    match status {
        NodeStatus::Provisioning => Some("provisioning"),
        // Registering is the moment between booting and downloading: part of booting.
        NodeStatus::Booting | NodeStatus::Registering => Some("booting"),
        NodeStatus::DownloadingAssets => Some("downloading"),
        NodeStatus::RunningScript => Some("running"),
        _ => None,
    }
}

/// The metrics of one engine and the API serving it.
pub(crate) struct Metrics {
    registry: Registry,
    transitions: Family<StatusLabel, Counter>,
    phase_seconds: HistogramFamily<PhaseLabel>,
    http_requests: Family<RouteCodeLabels, Counter>,
    http_duration: HistogramFamily<RouteLabel>,
    provider_calls: Family<ProviderCallLabels, Counter>,
    /// Per-status node counts of deployments that are not final, by deployment id.
    live_nodes: Mutex<HashMap<String, [u64; NODE_STATES]>>,
}

const NODE_STATES: usize = NodeStatus::ALL.len();

fn node_slot(status: NodeStatus) -> usize {
    NodeStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or_default()
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("taskfly");
        let transitions = Family::<StatusLabel, Counter>::default();
        registry.register(
            "node_transitions",
            "Node state changes, by the state entered",
            transitions.clone(),
        );
        let phase_seconds: HistogramFamily<PhaseLabel> =
            Family::new_with_constructor(phase_histogram);
        registry.register(
            "node_phase_seconds",
            "Time nodes spent in each phase of their life (provisioning, booting, downloading, running)",
            phase_seconds.clone(),
        );
        let http_requests = Family::<RouteCodeLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by endpoint pattern and status code",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (until the response head), by endpoint pattern",
            http_duration.clone(),
        );
        let provider_calls = Family::<ProviderCallLabels, Counter>::default();
        registry.register(
            "provider_calls",
            "Calls to providers, by provider, operation and result",
            provider_calls.clone(),
        );
        // A gauge fixed at 1 rather than an OpenMetrics `info`, which Prometheus' own text
        // parser (promtool, older servers) does not know.
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running taskfly version", build_info);
        for status in NodeStatus::ALL {
            // Every state's series exists from the start, so a rate over it is never missing.
            drop(transitions.get_or_create(&StatusLabel {
                status: status.as_str(),
            }));
        }
        Metrics {
            registry,
            transitions,
            phase_seconds,
            http_requests,
            http_duration,
            provider_calls,
            live_nodes: Mutex::new(HashMap::new()),
        }
    }

    /// A deployment of `total` nodes, all pending, was created.
    pub(crate) fn deployment_created(&self, deployment_id: &str, total: u32) {
        let mut counts = [0; NODE_STATES];
        counts[node_slot(NodeStatus::Pending)] = u64::from(total);
        lock(&self.live_nodes).insert(deployment_id.to_owned(), counts);
    }

    /// A deployment became final: its per-status node counts are no longer kept (the
    /// exposition counts final deployments' nodes from the store), so they do not pile up
    /// with every deployment when nothing scrapes `/metrics`.
    pub(crate) fn deployment_ended(&self, deployment_id: &str) {
        let mut live = lock(&self.live_nodes);
        live.remove(deployment_id);
        crate::state::memory::shrink_if_sparse(&mut live);
    }

    /// A node went from `previous` to `node.status`: counted, and the phase it left timed
    /// from its phase times ([`crate::state::model::PhaseTimes::durations`]).
    pub(crate) fn node_changed(&self, previous: NodeStatus, node: &Node) {
        let status = node.status;
        self.transitions
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .inc();
        if let Some(counts) = lock(&self.live_nodes).get_mut(&node.deployment_id) {
            let from = &mut counts[node_slot(previous)];
            *from = from.saturating_sub(1);
            counts[node_slot(status)] += 1;
        }
        let Some(left) = phase_of(previous).filter(|p| phase_of(status) != Some(*p)) else {
            return;
        };
        let durations = node.times.durations(SystemTime::now());
        let spent = match left {
            "provisioning" => durations.provisioning,
            "booting" => durations.booting,
            "downloading" => durations.downloading,
            _ => durations.running,
        };
        if let Some(spent) = spent {
            self.observe_phase(left, spent);
        }
    }

    fn observe_phase(&self, phase: &'static str, spent: Duration) {
        self.phase_seconds
            .get_or_create(&PhaseLabel { phase })
            .observe(spent.as_secs_f64());
    }

    /// One HTTP request to `route` answered with `code` after `elapsed`. A 200 answer and
    /// the duration are counted through the handles `route` keeps, without a label lookup;
    /// other codes through the family.
    pub(crate) fn http_request(&self, route: &RouteMetrics, code: u16, elapsed: Duration) {
        let labels = || RouteCodeLabels {
            route: route.route,
            code,
        };
        if code == 200 {
            route
                .answered_ok
                .get_or_init(|| self.http_requests.get_or_create_owned(&labels()))
                .inc();
        } else {
            self.http_requests.get_or_create(&labels()).inc();
        }
        route
            .duration
            .get_or_init(|| {
                self.http_duration
                    .get_or_create_owned(&RouteLabel { route: route.route })
            })
            .observe(elapsed.as_secs_f64());
    }

    /// One call to a provider: `op` is `provision`, `release`, `terminate` or `list`.
    pub(crate) fn provider_call(&self, provider: &str, op: &'static str, ok: bool) {
        self.provider_calls
            .get_or_create(&ProviderCallLabels {
                provider: provider.to_owned(),
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Whether the per-status node counts of this (not final) deployment are kept.
    pub(crate) fn knows_live(&self, deployment_id: &str) -> bool {
        lock(&self.live_nodes).contains_key(deployment_id)
    }

    /// Start keeping a deployment's node counts from one reading of its nodes (after a
    /// restart); kept as they are if something counted them meanwhile.
    pub(crate) fn seed_live(
        &self,
        deployment_id: &str,
        statuses: impl Iterator<Item = NodeStatus>,
    ) {
        let mut counts = [0; NODE_STATES];
        for status in statuses {
            counts[node_slot(status)] += 1;
        }
        lock(&self.live_nodes)
            .entry(deployment_id.to_owned())
            .or_insert(counts);
    }

    /// The whole exposition: the metrics kept here, then the gauges of `snapshot`.
    pub(crate) fn encode(&self, snapshot: &Snapshot) -> String {
        let mut live = lock(&self.live_nodes);
        live.retain(|id, _| snapshot.live_ids.contains(id));
        let mut nodes = snapshot.final_nodes;
        for counts in live.values() {
            for (total, count) in nodes.iter_mut().zip(counts) {
                *total += count;
            }
        }
        drop(live);

        let mut scraped = Registry::with_prefix("taskfly");
        let deployments = Family::<StatusLabel, Gauge>::default();
        for (status, count) in DeploymentStatus::ALL.iter().zip(snapshot.deployments) {
            deployments
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(count as i64);
        }
        scraped.register("deployments", "Deployments known, by state", deployments);
        let node_gauge = Family::<StatusLabel, Gauge>::default();
        for (status, count) in NodeStatus::ALL.iter().zip(nodes) {
            node_gauge
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(count as i64);
        }
        scraped.register("nodes", "Nodes of known deployments, by state", node_gauge);
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        uptime.set(snapshot.uptime.as_secs_f64());
        scraped.register("uptime_seconds", "Seconds since the engine started", uptime);
        if !snapshot.pools.is_empty() {
            type Reading = fn(&crate::provider::PoolStats) -> u64;
            let gauges: [(&str, &str, Reading); 3] = [
                (
                    "pool_instances",
                    "Instances a pool runs: busy, idle and starting",
                    |p| p.instances,
                ),
                ("pool_idle", "Pool instances waiting for work", |p| p.idle),
                ("pool_busy", "Pool instances serving a node", |p| p.busy),
            ];
            for (name, help, reading) in gauges {
                let family = Family::<ProviderLabel, Gauge>::default();
                for pool in &snapshot.pools {
                    family
                        .get_or_create(&ProviderLabel {
                            provider: pool.provider.clone(),
                        })
                        .set(reading(pool) as i64);
                }
                scraped.register(name, help, family);
            }
            let counters: [(&str, &str, Reading); 3] = [
                ("pool_launched", "Instances pools started", |p| {
                    p.launched_total
                }),
                (
                    "pool_reused",
                    "Nodes given an instance already running (reused or a spare)",
                    |p| p.reused_total + p.spares_used_total,
                ),
                ("pool_retired", "Instances pools terminated", |p| {
                    p.retired_total
                }),
            ];
            for (name, help, reading) in counters {
                let family = Family::<ProviderLabel, Counter>::default();
                for pool in &snapshot.pools {
                    family
                        .get_or_create(&ProviderLabel {
                            provider: pool.provider.clone(),
                        })
                        .inc_by(reading(pool));
                }
                scraped.register(name, help, family);
            }
        }

        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut text, &self.registry);
        let _ = encode_registry(&mut text, &scraped);
        let _ = encode_eof(&mut text);
        text
    }
}

/// The request metrics of one endpoint pattern (never a path with an id in it), or of
/// [`OTHER_ROUTE`]: the series of its 200 answers and of its durations, taken from their
/// families on first use and kept, so counting a request costs no label hashing or lookup.
/// A series appears in the exposition once the first request counted in it was answered.
/// Each handle is for one [`Metrics`]: the first it counts a request in.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    route: &'static str,
    answered_ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
}

impl RouteMetrics {
    pub(crate) fn new(route: &'static str) -> RouteMetrics {
        RouteMetrics {
            route,
            answered_ok: OnceLock::new(),
            duration: OnceLock::new(),
        }
    }

    /// The endpoint pattern.
    #[cfg(test)]
    pub(crate) fn route(&self) -> &'static str {
        self.route
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// What a scrape reads from the engine, computed from the deployments alone.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Deployments per state, in [`DeploymentStatus::ALL`] order.
    pub(crate) deployments: [u64; DeploymentStatus::ALL.len()],
    /// Nodes of final deployments per state, in [`NodeStatus::ALL`] order (from the
    /// deployments' counters).
    pub(crate) final_nodes: [u64; NODE_STATES],
    /// The deployments that are not final: their nodes are counted by [`Metrics`].
    pub(crate) live_ids: HashSet<String>,
    pub(crate) uptime: Duration,
    pub(crate) pools: Vec<crate::provider::PoolStats>,
}

impl Snapshot {
    /// Count one deployment.
    pub(crate) fn add(&mut self, deployment: &crate::state::model::Deployment) {
        let slot = DeploymentStatus::ALL
            .iter()
            .position(|s| *s == deployment.status)
            .unwrap_or_default();
        self.deployments[slot] += 1;
        if deployment.status.is_final() {
            for (status, count) in [
                (NodeStatus::Completed, deployment.nodes_completed),
                (NodeStatus::Failed, deployment.nodes_failed),
                (NodeStatus::Terminated, deployment.nodes_terminated),
            ] {
                self.final_nodes[node_slot(status)] += u64::from(count);
            }
        } else {
            self.live_ids.insert(deployment.id.clone());
        }
    }
}

#[cfg(test)]
mod tests;
