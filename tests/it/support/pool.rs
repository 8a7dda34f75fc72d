//! Helpers for the instance pool tests: a local provider that counts what it really launches
//! and terminates, an engine whose `local` provider is a [`PooledProvider`] around it, and
//! bounded waits on the pool's state.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use taskfly::provider::PoolStats;
use taskfly::{
    async_trait, BoxError, Config, Instance, InstanceKind, InstanceRef, InstanceSpec,
    LocalProvider, OwnedInstance, Owner, PoolConfig, PooledProvider, Provider, ProviderSettings,
};

use super::TestEngine;

/// How long a test waits for the pool to reach a state before it fails.
pub const POOL_WAIT_LIMIT: Duration = Duration::from_secs(30);

/// A [`LocalProvider`] that records every instance it launched and every terminate call, so a
/// test knows what the pool really did underneath (as opposed to what it says it did).
pub struct CountingProvider {
    inner: LocalProvider,
    launched: Mutex<Vec<String>>,
    terminated: Mutex<Vec<String>>,
}

impl CountingProvider {
    /// A local provider keeping its nodes' files under `work_root`, with a short grace period
    /// (the scripts of these tests stop at once on SIGTERM).
    pub fn new(work_root: &Path) -> Arc<CountingProvider> {
        Arc::new(CountingProvider {
            inner: LocalProvider::new(work_root.to_path_buf()).grace_period(Duration::from_secs(2)),
            launched: Mutex::new(Vec::new()),
            terminated: Mutex::new(Vec::new()),
        })
    }

    /// The instance ids `provision` returned, in call order.
    pub fn launched(&self) -> Vec<String> {
        lock(&self.launched).clone()
    }

    /// The instance ids passed to `terminate`, in call order.
    pub fn terminated(&self) -> Vec<String> {
        lock(&self.terminated).clone()
    }

    /// Whether the local provider still runs an agent for `instance_id`.
    pub async fn is_running(&self, instance_id: &str) -> bool {
        self.inner.is_running(instance_id).await
    }

    /// Whether the local provider no longer runs anything for `instance_id`: never started,
    /// terminated (and forgotten), or ended.
    pub async fn is_gone(&self, instance_id: &str) -> bool {
        !self.inner.is_running(instance_id).await
    }
}

#[async_trait]
impl Provider for CountingProvider {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let info = self.inner.provision(spec).await?;
        lock(&self.launched).push(info.reference.id.clone());
        Ok(info)
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        lock(&self.terminated).push(instance.id.clone());
        self.inner.terminate(instance).await
    }

    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        self.inner.owned_instances().await
    }

    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        self.inner.instance_kind(settings, owner)
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await;
    }
}

/// An engine whose `local` provider is a pool (`pool`) around a [`CountingProvider`], with
/// heartbeats every second so an agent hears of a terminate quickly.
pub struct PoolEngine {
    pub engine: TestEngine,
    pub pool: Arc<PooledProvider>,
    pub counting: Arc<CountingProvider>,
    /// The counting provider's work root.
    pub work: tempfile::TempDir,
}

impl PoolEngine {
    pub async fn start(pool: PoolConfig) -> PoolEngine {
        let work = tempfile::tempdir().expect("temp work dir");
        let counting = CountingProvider::new(work.path());
        let pool = Arc::new(PooledProvider::new(counting.clone(), pool).expect("pool settings"));
        let engine = TestEngine::start_with(|config: Config| {
            config
                .pooled_provider(pool.clone())
                .heartbeat_interval(Duration::from_secs(1))
        })
        .await;
        PoolEngine {
            engine,
            pool,
            counting,
            work,
        }
    }

    /// The pool's state now.
    pub fn stats(&self) -> PoolStats {
        self.pool.stats("local")
    }

    /// Waits (on the pool's own change signal, bounded) until `done` holds for its state, and
    /// returns that state; fails the test with `what` and the last state seen otherwise.
    pub async fn wait_for_pool(&self, what: &str, done: impl Fn(&PoolStats) -> bool) -> PoolStats {
        wait_for_pool(&self.pool, "local", what, done).await
    }

    /// Stops the engine (the pool terminates its idle instances, the local provider stops
    /// every agent).
    pub async fn stop(self) {
        self.engine.stop().await;
    }
}

/// Waits (on `pool.changed`, bounded by [`POOL_WAIT_LIMIT`]) until `done` holds for the
/// pool's state shown under `provider`, and returns that state.
pub async fn wait_for_pool(
    pool: &PooledProvider,
    provider: &str,
    what: &str,
    done: impl Fn(&PoolStats) -> bool,
) -> PoolStats {
    let deadline = tokio::time::Instant::now() + POOL_WAIT_LIMIT;
    loop {
        let stats = pool.stats(provider);
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what} after {POOL_WAIT_LIMIT:?}; the pool is at {stats:#?}"
        );
        // A change between `stats` and the subscription is caught by the short timeout.
        pool.changed(Duration::from_millis(200)).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
