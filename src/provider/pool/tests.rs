use super::*;

/// An inner provider that starts nothing: it names instances `i-1`, `i-2`, ... and
/// records what it was asked. The engine sets each spec's kind; the tests name kinds.
#[derive(Default)]
struct Fake {
    provisioned: Mutex<Vec<InstanceSpec>>,
    terminated: Mutex<Vec<String>>,
    /// When set, `provision` waits for a permit.
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

#[async_trait::async_trait]
impl Provider for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let instance_id = {
            let mut provisioned = self.provisioned.lock().unwrap();
            provisioned.push(spec);
            format!("i-{}", provisioned.len())
        };
        if let Some(gate) = &self.gate {
            gate.acquire().await?.forget();
        }
        Ok(Instance {
            reference: InstanceRef {
                id: instance_id,
                locator: "fake-place".into(),
            },
            ip_address: Some("10.0.0.1".into()),
        })
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        assert_eq!(
            instance.locator, "fake-place",
            "terminated where it was started"
        );
        self.terminated.lock().unwrap().push(instance.id.clone());
        Ok(())
    }

    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        let provisioned = self.provisioned.lock().unwrap();
        Ok((1..=provisioned.len())
            .map(|n| OwnedInstance {
                instance: InstanceRef {
                    id: format!("i-{n}"),
                    locator: "fake-place".into(),
                },
                owner: OwnedBy::Pool,
                state: super::super::InstanceState::Running,
            })
            .collect())
    }
}

impl Fake {
    /// The instance token `i-{n}` was started with.
    fn token(&self, n: usize) -> [u8; 32] {
        auth::hash_token(
            self.provisioned.lock().unwrap()[n - 1]
                .provision_token
                .expose(),
        )
    }

    fn terminated(&self) -> Vec<String> {
        self.terminated.lock().unwrap().clone()
    }

    fn launched(&self) -> usize {
        self.provisioned.lock().unwrap().len()
    }
}

fn pool(config: PoolConfig) -> (Arc<Fake>, Arc<PooledProvider>) {
    let fake = Arc::new(Fake::default());
    let pool = PooledProvider::new(fake.clone(), config).unwrap();
    (fake, Arc::new(pool))
}

/// A node's provision request for an instance of `kind`.
fn node(deployment_id: &str, node_id: &str, kind: &str) -> InstanceSpec {
    InstanceSpec {
        owner: Owner::Node {
            deployment_id: deployment_id.into(),
            node_id: node_id.into(),
            node_index: 0,
            attempt: 1,
        },
        kind: InstanceKind::new(kind),
        daemon_url: "http://127.0.0.1:1".into(),
        ca_pem: None,
        provision_token: Secret::new(format!("provision-{node_id}")),
        settings: super::super::ProviderSettings::new("fake", serde_yaml::Value::Null),
    }
}

/// The instance `id` as the fake started it.
fn at(id: &str) -> InstanceRef {
    InstanceRef {
        id: id.into(),
        locator: "fake-place".into(),
    }
}

/// The agent of instance `n` finishes its node and comes back: idle.
async fn agent_back(fake: &Fake, pool: &PooledProvider, n: usize) {
    assert_eq!(pool.claim(&fake.token(n)).await, Claim::Wait);
}

#[tokio::test(start_paused = true)]
async fn an_idle_instance_is_handed_the_next_node_instead_of_a_new_launch() {
    let (fake, pool) = pool(PoolConfig::new(4));
    let first = pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    assert_eq!(first.reference.id, "i-1");
    let spec = fake.provisioned.lock().unwrap()[0].clone();
    assert!(matches!(spec.owner, Owner::Pool { .. }), "{:?}", spec.owner);
    assert_ne!(
        spec.provision_token.expose(),
        "provision-d1-0",
        "the instance gets its own token"
    );
    assert_eq!(
        pool.claim(&fake.token(1)).await,
        Claim::Assigned("provision-d1-0".into())
    );
    assert_eq!(pool.stats("p").busy, 1);
    agent_back(&fake, &pool, 1).await;
    assert_eq!(pool.stats("p").idle, 1);

    let second = pool.provision(node("d2", "d2-0", "a.sh")).await.unwrap();
    assert_eq!(second.reference.id, "i-1");
    assert_eq!(second.reference.locator, "fake-place");
    assert_eq!(
        pool.claim(&fake.token(1)).await,
        Claim::Assigned("provision-d2-0".into())
    );
    let stats = pool.stats("p");
    assert_eq!((stats.launched_total, stats.reused_total), (1, 1));
    assert_eq!(fake.launched(), 1);
    assert!(fake.terminated().is_empty());
}

#[tokio::test(start_paused = true)]
async fn once_the_server_stops_held_registrations_are_answered_at_once() {
    let (fake, pool) = pool(PoolConfig::new(1).hold(Duration::from_secs(20)));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    let held = tokio::spawn({
        let (fake, pool) = (fake.clone(), pool.clone());
        async move {
            let started = Instant::now();
            (pool.claim(&fake.token(1)).await, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    pool.stop_holding();
    let (claim, waited) = held.await.unwrap();
    assert_eq!(claim, Claim::Wait);
    assert_eq!(
        waited,
        Duration::from_secs(5),
        "answered when the server stopped"
    );
    let started = Instant::now();
    assert_eq!(pool.claim(&fake.token(1)).await, Claim::Wait);
    assert_eq!(started.elapsed(), Duration::ZERO, "no longer held");
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_replaces_the_one_from_the_user_data() {
    let (fake, pool) = pool(PoolConfig::new(1));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    let first = fake.token(1);
    pool.claim(&first).await;
    let next = pool.rotate(&first).unwrap().expect("the instance is there");
    let next = auth::hash_token(&next);
    assert_eq!(
        pool.claim(&first).await,
        Claim::Unknown,
        "the user data's token is spent"
    );
    assert_eq!(
        pool.claim(&next).await,
        Claim::Wait,
        "the agent's new token works"
    );
    assert_eq!(pool.stats("p").idle, 1);
    assert_eq!(pool.rotate(&first).unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_token_is_not_the_pools() {
    let (_, pool) = pool(PoolConfig::new(1));
    assert_eq!(pool.claim(&auth::hash_token("nope")).await, Claim::Unknown);
}

#[tokio::test(start_paused = true)]
async fn a_release_waits_for_the_agent_and_keeps_the_instance_when_it_comes_back() {
    let (fake, pool) = pool(PoolConfig::new(2));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    let release = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.release(&at("i-1"), "d1-0")
                .await
                .map_err(|e| e.to_string())
        }
    });
    tokio::task::yield_now().await;
    assert!(!release.is_finished(), "the script may still run");
    agent_back(&fake, &pool, 1).await;
    release.await.unwrap().unwrap();
    assert!(fake.terminated().is_empty());
    assert_eq!(pool.stats("p").idle, 1);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_does_not_come_back_has_its_instance_terminated() {
    let (fake, pool) = pool(PoolConfig::new(2).release_timeout(Duration::from_secs(60)));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    let started = Instant::now();
    pool.release(&at("i-1"), "d1-0").await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert_eq!(fake.terminated(), ["i-1"]);
    let stats = pool.stats("p");
    assert_eq!((stats.instances, stats.retired_total), (0, 1));
    assert_eq!(pool.claim(&fake.token(1)).await, Claim::Retired);
}

#[tokio::test(start_paused = true)]
async fn a_late_release_for_an_earlier_node_leaves_the_instance_to_its_new_node() {
    let (fake, pool) = pool(PoolConfig::new(2));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    agent_back(&fake, &pool, 1).await;
    pool.provision(node("d2", "d2-0", "a.sh")).await.unwrap();
    pool.release(&at("i-1"), "d1-0").await.unwrap();
    assert_eq!(
        pool.claim(&fake.token(1)).await,
        Claim::Assigned("provision-d2-0".into())
    );
    assert!(fake.terminated().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_node_released_before_its_agent_picked_it_up_frees_the_instance_at_once() {
    let (fake, pool) = pool(PoolConfig::new(2));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    agent_back(&fake, &pool, 1).await;
    pool.provision(node("d2", "d2-0", "a.sh")).await.unwrap();
    pool.release(&at("i-1"), "d2-0").await.unwrap();
    assert_eq!(pool.stats("p").idle, 1);
    // The agent comes back later and finds no work rather than the dead node.
    assert_eq!(pool.claim(&fake.token(1)).await, Claim::Wait);
    assert!(fake.terminated().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_instance_whose_agent_was_never_heard_of_is_not_kept_when_its_node_lets_go() {
    let (fake, pool) = pool(PoolConfig::new(2));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    // The node's boot timed out: the engine releases the instance.
    pool.release(&at("i-1"), "d1-0").await.unwrap();
    assert_eq!(fake.terminated(), ["i-1"]);
    assert_eq!(pool.stats("p").instances, 0);
    assert_eq!(pool.claim(&fake.token(1)).await, Claim::Retired);
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_makes_the_next_node_wait_for_a_free_instance() {
    let (fake, pool) = pool(PoolConfig::new(1));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.provision(node("d1", "d1-1", "a.sh"))
                .await
                .map_err(|e| e.to_string())
        }
    });
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!waiting.is_finished(), "no instance is free");
    // The agent is back: the waiting node gets the instance while the agent's call is held.
    assert_eq!(
        pool.claim(&fake.token(1)).await,
        Claim::Assigned("provision-d1-1".into())
    );
    assert_eq!(waiting.await.unwrap().unwrap().reference.id, "i-1");
    assert_eq!(fake.launched(), 1);
}

#[tokio::test(start_paused = true)]
async fn instances_are_never_shared_across_kinds_and_a_full_pool_retires_the_other_kind() {
    let (fake, pool) = pool(PoolConfig::new(1));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    agent_back(&fake, &pool, 1).await;
    let other = pool.provision(node("d2", "d2-0", "b.sh")).await.unwrap();
    assert_eq!(other.reference.id, "i-2");
    assert_eq!(fake.terminated(), ["i-1"]);
    assert_eq!(pool.claim(&fake.token(1)).await, Claim::Retired);
}

#[tokio::test(start_paused = true)]
async fn spares_are_started_ahead_and_handed_to_later_nodes_first() {
    let (fake, pool) = pool(PoolConfig::new(4).provision_ahead(2));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    assert_eq!(fake.launched(), 3, "the node's instance and two spares");
    agent_back(&fake, &pool, 2).await;
    agent_back(&fake, &pool, 3).await;
    let next = pool.provision(node("d1", "d1-1", "a.sh")).await.unwrap();
    assert!(
        ["i-2", "i-3"].contains(&next.reference.id.as_str()),
        "{next:?}"
    );
    let stats = pool.stats("p");
    assert_eq!(stats.spares_used_total, 1);
    assert_eq!(fake.launched(), 4, "topped up to two spares again");
}

#[tokio::test(start_paused = true)]
async fn idle_instances_past_the_timeout_are_retired_down_to_the_minimum() {
    let config = PoolConfig::new(4)
        .min_instances(1)
        .idle_timeout(Duration::from_secs(300));
    let (fake, pool) = pool(config);
    for n in 0..3 {
        pool.provision(node("d1", &format!("d1-{n}"), "a.sh"))
            .await
            .unwrap();
    }
    for n in 1..=3 {
        pool.claim(&fake.token(n)).await;
    }
    let cancel = CancellationToken::new();
    let upkeep = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.maintain(cancel).await }
    });
    // Agents poll while they wait, as real ones do (each call is held 20 s).
    let polls = (1..=3).map(|n| {
        let (fake, pool) = (fake.clone(), pool.clone());
        tokio::spawn(async move { while pool.claim(&fake.token(n)).await == Claim::Wait {} })
    });
    let polls: Vec<_> = polls.collect();
    tokio::time::sleep(Duration::from_secs(299)).await;
    assert!(fake.terminated().is_empty(), "not idle long enough yet");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut terminated = fake.terminated();
    terminated.sort();
    assert_eq!(terminated.len(), 2, "{terminated:?}");
    let stats = pool.stats("p");
    assert_eq!(
        (stats.instances, stats.idle, stats.retired_total),
        (1, 1, 2)
    );
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(fake.terminated().len(), 2, "the minimum stays");
    cancel.cancel();
    upkeep.await.unwrap();
    for poll in polls {
        poll.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_spare_whose_agent_never_asks_for_work_is_terminated_after_the_boot_timeout() {
    let config = PoolConfig::new(3)
        .provision_ahead(1)
        .boot_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(3600));
    let (fake, pool) = pool(config);
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    let cancel = CancellationToken::new();
    let upkeep = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.maintain(cancel).await }
    });
    tokio::time::sleep(Duration::from_secs(602)).await;
    assert_eq!(fake.terminated(), ["i-2"]);
    cancel.cancel();
    upkeep.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_provision_call_leaves_no_reservation_behind() {
    let fake = Arc::new(Fake {
        gate: Some(Arc::new(tokio::sync::Semaphore::new(0))),
        ..Fake::default()
    });
    let pool = PooledProvider::new(fake.clone(), PoolConfig::new(1)).unwrap();
    let call = pool.provision(node("d1", "d1-0", "a.sh"));
    assert!(tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .is_err());
    let stats = pool.stats("p");
    assert_eq!((stats.instances, stats.launching), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn leak_checks_see_only_the_instances_the_pool_does_not_hold() {
    let (fake, pool) = pool(PoolConfig::new(3));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.provision(node("d1", "d1-1", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    pool.claim(&fake.token(2)).await;
    agent_back(&fake, &pool, 2).await;
    // i-3 is not the pool's: a leftover of an earlier run.
    fake.provisioned
        .lock()
        .unwrap()
        .push(node("old", "old-0", "a.sh"));
    let owned = pool.owned_instances().await.unwrap();
    let seen: Vec<(&str, OwnedBy)> = owned
        .iter()
        .map(|o| (o.instance.id.as_str(), o.owner.clone()))
        .collect();
    assert_eq!(seen, [("i-3", OwnedBy::Pool)]);
}

#[tokio::test(start_paused = true)]
async fn leak_checks_do_not_see_an_instance_whose_launch_has_not_returned_yet() {
    let fake = Arc::new(Fake {
        gate: Some(Arc::new(tokio::sync::Semaphore::new(0))),
        ..Fake::default()
    });
    let pool = Arc::new(PooledProvider::new(fake.clone(), PoolConfig::new(2)).unwrap());
    let launching = tokio::spawn({
        let pool = pool.clone();
        async move { pool.provision(node("d1", "d1-0", "a.sh")).await.is_ok() }
    });
    while fake.launched() == 0 {
        tokio::task::yield_now().await;
    }
    // EC2 has the instance, the pool not yet.
    assert!(pool.owned_instances().await.unwrap().is_empty());
    if let Some(gate) = &fake.gate {
        gate.add_permits(1);
    }
    assert!(launching.await.unwrap());
    // Now the pool holds it: still not the leak checks' business.
    assert!(pool.owned_instances().await.unwrap().is_empty());
    // An instance tagged for the pool that it does not hold, with no launch under way, is.
    fake.provisioned
        .lock()
        .unwrap()
        .push(node("old", "old-0", "a.sh"));
    let owned = pool.owned_instances().await.unwrap();
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!(owned[0].instance.id, "i-2");
}

#[tokio::test(start_paused = true)]
async fn shutdown_terminates_the_instances_waiting_for_work_and_leaves_busy_ones() {
    let (fake, pool) = pool(PoolConfig::new(3));
    pool.provision(node("d1", "d1-0", "a.sh")).await.unwrap();
    pool.provision(node("d1", "d1-1", "a.sh")).await.unwrap();
    pool.claim(&fake.token(1)).await;
    pool.claim(&fake.token(2)).await;
    agent_back(&fake, &pool, 2).await;
    pool.shutdown().await;
    assert_eq!(fake.terminated(), ["i-2"]);
}

#[test]
fn debug_output_never_shows_a_provision_token() {
    let state = SlotState::Assigned {
        node_id: "d1-0".into(),
        provision_token: "SECRET-TOKEN".into(),
    };
    let shown = format!("{state:?} {:?}", Claim::Assigned("SECRET-TOKEN".into()));
    assert!(!shown.contains("SECRET-TOKEN"), "{shown}");
    assert!(shown.contains("d1-0"), "{shown}");
}

#[test]
fn settings_that_contradict_each_other_are_refused_naming_the_setting() {
    let e = PoolConfig::new(0).validate().unwrap_err();
    assert!(e.to_string().contains("max_instances"), "{e}");
    let e = PoolConfig::new(2).min_instances(3).validate().unwrap_err();
    assert!(e.to_string().contains("min_instances (3)"), "{e}");
    let e = PoolConfig::new(2)
        .provision_ahead(2)
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("provision_ahead"), "{e}");
    assert!(PoolConfig::new(2)
        .min_instances(2)
        .provision_ahead(1)
        .validate()
        .is_ok());
}
