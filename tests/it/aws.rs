//! The EC2 provider (feature `aws`) against an EC2 emulator: moto's server, which
//! `scripts/test.sh` starts and names in `TASKFLY_TEST_EC2_ENDPOINT`.
//!
//! The instances moto "starts" run nothing, so where a test needs its nodes to work, it reads
//! each instance's user data back from the emulator and runs it with `sh` on this machine, as
//! the instance would at boot. Each test keeps to a region of its own, so the leak checks of
//! one test's engine never see another test's instances.
//!
//! With `TASKFLY_REQUIRE_EC2_EMULATOR=1` (the test script sets it) a missing or unreachable
//! emulator fails these tests; without it, they say they were not run and pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{Filter, InstanceStateName, ResourceType, Tag, TagSpecification};
use taskfly::wire::DeploymentView;
use taskfly::{
    async_trait, AwsProvider, BoxError, Config, DeploymentConfig, Instance, InstanceKind,
    InstanceRef, InstanceSpec, OwnedBy, Owner, PoolConfig, PooledProvider, Provider, ProviderError,
    ProviderSettings, Secret,
};

use crate::support::engine_util::{poll_until, unique_marker};
use crate::support::pool::wait_for_pool;
use crate::support::{Project, TestEngine};

/// The `taskfly:deployment-id` tag of the instances a pool starts: they belong to no
/// deployment.
const POOL_DEPLOYMENT_ID: &str = "taskfly-pool";

/// How long a test waits for EC2 states to settle or nodes to finish.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The emulator's endpoint, checked to accept connections; `None` when the tests should not
/// run. Panics when the test script asked for the emulator and it is missing or unreachable.
fn emulator(test: &str) -> Option<String> {
    let required = std::env::var("TASKFLY_REQUIRE_EC2_EMULATOR").is_ok_and(|v| v == "1");
    let endpoint = std::env::var("TASKFLY_TEST_EC2_ENDPOINT")
        .ok()
        .filter(|url| !url.trim().is_empty());
    let Some(endpoint) = endpoint else {
        assert!(
            !required,
            "TASKFLY_REQUIRE_EC2_EMULATOR=1 but TASKFLY_TEST_EC2_ENDPOINT is not set: \
             start moto_server (scripts/test.sh does) and name it there"
        );
        eprintln!(
            "{test}: NOT RUN: set TASKFLY_TEST_EC2_ENDPOINT to an EC2 emulator (moto_server) \
             or run scripts/test.sh"
        );
        return None;
    };
    let address = endpoint
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut addresses| addresses.next())
        .is_some_and(|socket| {
            std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).is_ok()
        });
    assert!(
        reachable,
        "the EC2 emulator at {endpoint} (TASKFLY_TEST_EC2_ENDPOINT) does not accept connections"
    );
    Some(endpoint)
}

/// SDK settings for the emulator: fake static credentials (no credential chain, so no call to
/// instance metadata), `region`, and one try per request so failures show quickly.
async fn sdk_config(endpoint: &str, region: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "taskfly-tests",
        ))
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .load()
        .await
}

/// A client of the emulator, to check what the provider did.
async fn ec2(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(endpoint, region).await)
}

/// A client of the emulator in `region`, and an image id it accepts there.
async fn ec2_and_image(endpoint: &str, region: &str) -> (aws_sdk_ec2::Client, String) {
    let ec2 = ec2(endpoint, region).await;
    let image_id = any_image(&ec2).await;
    (ec2, image_id)
}

/// The EC2 provider at the emulator, in `region`.
async fn aws_provider(endpoint: &str, region: &str) -> AwsProvider {
    AwsProvider::with_sdk_config(sdk_config(endpoint, region).await)
}

/// What the engine asks the provider for the first attempt of node 0 of `deployment_id`, for
/// tests that call the provider themselves.
fn first_node(deployment_id: &str, deployment: Arc<DeploymentConfig>) -> InstanceSpec {
    InstanceSpec::new(
        Owner::Node {
            deployment_id: deployment_id.to_owned(),
            node_id: format!("{deployment_id}-0"),
            node_index: 0,
            attempt: 1,
        },
        InstanceKind::new("aws"),
        "http://127.0.0.1:9",
        Secret::new("00112233445566778899aabbccddeeff"),
        deployment.provider_settings(),
    )
}

/// Starts one t3.micro instance with `tags` behind the provider's back; returns its id.
async fn run_tagged_instance(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
    tags: &[(&str, &str)],
) -> String {
    let mut specification = TagSpecification::builder().resource_type(ResourceType::Instance);
    for (key, value) in tags {
        specification = specification.tags(Tag::builder().key(*key).value(*value).build());
    }
    let started = ec2
        .run_instances()
        .image_id(image_id)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(specification.build())
        .send()
        .await
        .expect("RunInstances");
    started.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_owned()
}

/// An image id the emulator accepts in `region`.
async fn any_image(ec2: &aws_sdk_ec2::Client) -> String {
    let images = ec2.describe_images().send().await.expect("DescribeImages");
    images
        .images()
        .iter()
        .find_map(|image| image.image_id())
        .expect("the emulator lists no image")
        .to_owned()
}

/// A `taskfly.yml` for `count` EC2 nodes at the emulator, running `setup.sh`.
fn aws_yml(count: u32, endpoint: &str, region: &str, image_id: &str) -> String {
    format!(
        "cloud_provider: aws\n\
         instance_config:\n  aws:\n    region: {region}\n    image_id: {image_id}\n    \
         instance_type: t3.micro\n    endpoint_url: {endpoint}\n    \
         tags: {{team: data, purpose: taskfly-tests}}\n\
         application_files: [setup.sh]\n\
         remote_script_to_run: setup.sh\n\
         nodes:\n  count: {count}\n  distributed_lists:\n    shard: [a, b, c]\n"
    )
}

/// A project whose script prints its node index and shard.
fn project(yml: &str) -> Project {
    Project::new(yml).script("#!/bin/sh\necho \"node $TASKFLY_NODE_INDEX shard $SHARD\"\n")
}

/// Every instance tagged with `deployment_id`, as (id, state) pairs.
async fn instances_of(
    ec2: &aws_sdk_ec2::Client,
    deployment_id: &str,
) -> Vec<aws_sdk_ec2::types::Instance> {
    let output = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:taskfly:deployment-id")
                .values(deployment_id)
                .build(),
        )
        .send()
        .await
        .expect("DescribeInstances");
    output
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .cloned()
        .collect()
}

fn state_of(instance: &aws_sdk_ec2::types::Instance) -> InstanceStateName {
    instance
        .state()
        .and_then(|s| s.name())
        .cloned()
        .expect("instance state")
}

fn is_ending(state: &InstanceStateName) -> bool {
    matches!(
        state,
        InstanceStateName::ShuttingDown | InstanceStateName::Terminated
    )
}

fn tags_of(instance: &aws_sdk_ec2::types::Instance) -> BTreeMap<String, String> {
    instance
        .tags()
        .iter()
        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value()?.to_owned())))
        .collect()
}

/// Waits (bounded) until every instance of the deployment is shutting down or terminated.
async fn wait_all_ending(ec2: &aws_sdk_ec2::Client, deployment_id: &str, expected: usize) {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let instances = instances_of(ec2, deployment_id).await;
        let states: Vec<InstanceStateName> = instances.iter().map(state_of).collect();
        if states.len() == expected && states.iter().all(is_ending) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instances of {deployment_id} still alive after {WAIT_LIMIT:?}: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every node of the deployment has an instance recorded.
async fn wait_instances_recorded(engine: &TestEngine, deployment_id: &str) -> DeploymentView {
    poll_until(engine, deployment_id, "every node's instance", |view| {
        view.nodes.iter().all(|n| n.instance_id.is_some())
    })
    .await
}

/// The user data of an instance, decoded.
async fn user_data(ec2: &aws_sdk_ec2::Client, instance_id: &str) -> String {
    let attribute = ec2
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("DescribeInstanceAttribute");
    let encoded = attribute
        .user_data()
        .and_then(|value| value.value())
        .expect("the instance has user data");
    String::from_utf8(decode_base64(encoded)).expect("user data is UTF-8")
}

/// Standard base64 (with or without padding) back to bytes; panics on anything else.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: {:?}", char::from(other)),
        }
    };
    let symbols: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(symbols.len() * 3 / 4);
    for chunk in symbols.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Runs user data with `sh` as an instance would at boot: a child process in a fresh
/// directory, with `TMPDIR` and `HOME` there. Killed if the test ends first.
fn boot(script: &str, dir: &std::path::Path) -> tokio::process::Child {
    let path = dir.join("user-data.sh");
    std::fs::write(&path, script).expect("write user data");
    tokio::process::Command::new("sh")
        .arg(&path)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .env("HOME", dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run sh")
}

/// Boots every instance of the deployment from its user data; returns the processes.
async fn boot_all(
    ec2: &aws_sdk_ec2::Client,
    view: &DeploymentView,
    dir: &std::path::Path,
) -> Vec<tokio::process::Child> {
    let mut children = Vec::new();
    for node in &view.nodes {
        let instance_id = node.instance_id.as_deref().expect("instance recorded");
        let script = user_data(ec2, instance_id).await;
        let node_dir = dir.join(&node.node_id);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        children.push(boot(&script, &node_dir));
    }
    children
}

/// Waits (bounded) for the deployment to be final.
async fn wait_final(engine: &TestEngine, deployment_id: &str) -> DeploymentView {
    tokio::time::timeout(WAIT_LIMIT, engine.wait(deployment_id))
        .await
        .unwrap_or_else(|_| panic!("{deployment_id} did not end within {WAIT_LIMIT:?}"))
        .expect("wait")
}

/// An engine whose `aws` provider is `provider`, retrying provider failures quickly.
async fn engine_with(provider: Arc<dyn Provider>) -> TestEngine {
    TestEngine::start_with(|config: Config| {
        config
            .provider(provider)
            .provision_retries(5, Duration::from_millis(1))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_run_from_their_user_data_complete_and_leave_no_instance_running() {
    let Some(endpoint) = emulator("three_nodes_run_from_their_user_data") else {
        return;
    };
    let region = "eu-west-1";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let engine = engine_with(Arc::new(aws_provider(&endpoint, region).await)).await;
    let project = project(&aws_yml(3, &endpoint, region, &image_id));

    let id = engine.deploy(project.path()).await;
    let view = wait_instances_recorded(&engine, &id).await;

    let instances = instances_of(&ec2, &id).await;
    assert_eq!(instances.len(), 3, "one instance per node: {instances:#?}");
    for node in &view.nodes {
        let instance_id = node.instance_id.as_deref().expect("instance id");
        let instance = instances
            .iter()
            .find(|i| i.instance_id() == Some(instance_id))
            .unwrap_or_else(|| panic!("{instance_id} is not tagged with {id}"));
        assert_eq!(instance.image_id(), Some(image_id.as_str()));
        assert_eq!(
            instance.instance_type().map(|t| t.as_str()),
            Some("t3.micro")
        );
        let tags = tags_of(instance);
        assert_eq!(
            tags.get("Name").map(String::as_str),
            Some(format!("taskfly-{}", node.node_id).as_str())
        );
        assert_eq!(
            tags.get("taskfly:deployment-id").map(String::as_str),
            Some(id.as_str())
        );
        assert_eq!(
            tags.get("taskfly:node-id").map(String::as_str),
            Some(node.node_id.as_str())
        );
        assert_eq!(tags.get("team").map(String::as_str), Some("data"));
        assert_eq!(
            tags.get("purpose").map(String::as_str),
            Some("taskfly-tests")
        );
        let script = user_data(&ec2, instance_id).await;
        assert!(script.starts_with("#!/bin/sh"), "{script}");
        assert!(script.contains(&engine.url), "the daemon URL: {script}");
    }

    let boot_dir = tempfile::tempdir().expect("temp dir");
    let mut children = boot_all(&ec2, &view, boot_dir.path()).await;
    let done = wait_final(&engine, &id).await;
    assert_eq!(done.status.as_str(), "completed", "{done:#?}");
    assert_eq!(done.nodes_completed, 3);
    let logs = engine.all_logs(&id).await;
    for (index, shard) in ["a", "b", "c"].iter().enumerate() {
        let expected = format!("node {index} shard {shard}");
        assert!(
            logs.iter().any(|l| l.line == expected),
            "no log line {expected:?}: {logs:#?}"
        );
    }
    wait_all_ending(&ec2, &id, 3).await;
    for child in &mut children {
        let status = tokio::time::timeout(WAIT_LIMIT, child.wait())
            .await
            .expect("the user data script ends once its node is done")
            .expect("wait for sh");
        assert!(status.success(), "user data exited with {status}");
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_while_nodes_boot_leaves_no_instance_running() {
    let Some(endpoint) = emulator("down_while_nodes_boot") else {
        return;
    };
    let region = "eu-west-2";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let engine = engine_with(Arc::new(aws_provider(&endpoint, region).await)).await;
    let project = project(&aws_yml(3, &endpoint, region, &image_id));

    let id = engine.deploy(project.path()).await;
    wait_instances_recorded(&engine, &id).await;
    let running = instances_of(&ec2, &id).await;
    assert_eq!(running.len(), 3);
    assert!(running.iter().all(|i| !is_ending(&state_of(i))));

    engine.engine.terminate(&id).await.expect("terminate");
    let view = engine.view(&id).await.expect("deployment");
    assert_eq!(view.status.as_str(), "terminated", "{view:#?}");
    assert!(view.nodes.iter().all(|n| n.status.as_str() == "terminated"));
    // Terminated means EC2 already confirmed: no waiting here.
    let states: Vec<InstanceStateName> =
        instances_of(&ec2, &id).await.iter().map(state_of).collect();
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(is_ending), "{states:?}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_no_live_deployment_or_left_by_its_node_is_terminated_and_a_live_ones_is_not(
) {
    let Some(endpoint) = emulator("an_instance_of_no_live_deployment") else {
        return;
    };
    let region = "eu-west-3";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let engine = engine_with(Arc::new(aws_provider(&endpoint, region).await)).await;

    let project = project(&aws_yml(1, &endpoint, region, &image_id));
    let live_id = engine.deploy(project.path()).await;
    let view = wait_instances_recorded(&engine, &live_id).await;
    let live_instance = view.nodes[0].instance_id.clone().expect("instance");

    let ghost_id =
        run_tagged_instance(&ec2, &image_id, &[("taskfly:deployment-id", "dep-ghost")]).await;

    // A second instance of the live deployment's node, as a crash between RunInstances and
    // recording its result leaves behind once the node is provisioned again.
    let node_id = view.nodes[0].node_id.clone();
    let stray_id = run_tagged_instance(
        &ec2,
        &image_id,
        &[
            ("taskfly:deployment-id", &live_id),
            ("taskfly:node-id", &node_id),
        ],
    )
    .await;

    let terminated = engine.engine.terminate_orphans().await;
    assert!(terminated >= 2, "terminated {terminated}");
    let ghosts = instances_of(&ec2, "dep-ghost").await;
    let ghost = ghosts
        .iter()
        .find(|i| i.instance_id() == Some(ghost_id.as_str()))
        .expect("the ghost instance is still described");
    assert!(
        is_ending(&state_of(ghost)),
        "the ghost is {:?}",
        state_of(ghost)
    );
    let live = instances_of(&ec2, &live_id).await;
    assert_eq!(live.len(), 2, "the node's instance and the stray one");
    for instance in &live {
        let id = instance.instance_id().unwrap_or_default();
        if id == stray_id {
            assert!(
                is_ending(&state_of(instance)),
                "the stray is {:?}",
                state_of(instance)
            );
        } else {
            assert_eq!(id, live_instance);
            assert!(
                !is_ending(&state_of(instance)),
                "the live node's instance was terminated"
            );
        }
    }

    engine.engine.terminate(&live_id).await.expect("terminate");
    wait_all_ending(&ec2, &live_id, 2).await;
    engine.stop().await;
}

/// Fails the first `failures` provision calls with `code` (retryable), then hands over to
/// `inner`, if any; counts the calls.
struct FailingProvider {
    inner: Option<Arc<AwsProvider>>,
    code: &'static str,
    failures: u32,
    calls: AtomicU32,
}

#[async_trait]
impl Provider for FailingProvider {
    fn name(&self) -> &str {
        "aws"
    }

    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        match &self.inner {
            Some(inner) => inner.instance_kind(settings, owner),
            None => Ok(InstanceKind::new("failing")),
        }
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<Instance, BoxError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match &self.inner {
            Some(inner) if call > self.failures => inner.provision(spec).await,
            _ => Err(Box::new(ProviderError {
                code: self.code.to_owned(),
                message: format!("call {call} refused by the test"),
                retryable: true,
            })),
        }
    }

    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        match &self.inner {
            Some(inner) => inner.terminate(instance).await,
            None => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_provisioning_is_retried_and_the_node_completes() {
    let Some(endpoint) = emulator("throttled_provisioning_is_retried") else {
        return;
    };
    let region = "eu-central-1";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let aws = Arc::new(aws_provider(&endpoint, region).await);
    let flaky = Arc::new(FailingProvider {
        inner: Some(aws),
        code: "RequestLimitExceeded",
        failures: 2,
        calls: AtomicU32::new(0),
    });
    let engine = engine_with(flaky.clone()).await;
    let project = project(&aws_yml(1, &endpoint, region, &image_id));

    let id = engine.deploy(project.path()).await;
    let view = wait_instances_recorded(&engine, &id).await;
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        3,
        "two refusals, then the launch"
    );
    assert_eq!(instances_of(&ec2, &id).await.len(), 1);

    let boot_dir = tempfile::tempdir().expect("temp dir");
    let _children = boot_all(&ec2, &view, boot_dir.path()).await;
    let done = wait_final(&engine, &id).await;
    assert_eq!(done.status.as_str(), "completed", "{done:#?}");
    wait_all_ending(&ec2, &id, 1).await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_error_that_persists_fails_the_node_with_its_code_after_five_attempts() {
    // No emulator needed: the provider never gets past the refusals.
    let refusing = Arc::new(FailingProvider {
        inner: None,
        code: "InsufficientInstanceCapacity",
        failures: u32::MAX,
        calls: AtomicU32::new(0),
    });
    let engine = engine_with(refusing.clone()).await;
    let project = project(&aws_yml(
        1,
        "http://127.0.0.1:9",
        "us-east-1",
        "ami-12c6146b",
    ));
    let done = engine.run(project.path()).await;
    assert_eq!(done.status.as_str(), "failed", "{done:#?}");
    let message = done.nodes[0].error_message.clone().unwrap_or_default();
    assert!(
        message.contains("InsufficientInstanceCapacity") && message.contains("after 5 attempts"),
        "{message}"
    );
    assert_eq!(refusing.calls.load(Ordering::SeqCst), 5);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_retryable_connection_error() {
    // No emulator needed: the endpoint is a loopback port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let endpoint = format!("http://127.0.0.1:{closed}");
    let message =
        failed_with_two_attempts(sdk_config(&endpoint, "us-east-1").await, &endpoint).await;
    assert!(
        message.contains("ConnectionError") && message.contains("after 2 attempts"),
        "{message}"
    );
    assert!(!message.contains("testing"), "no credentials: {message}");
}

/// Runs one node on `endpoint` through an engine allowing 2 provisioning attempts, expects it
/// failed, and returns its error message.
async fn failed_with_two_attempts(sdk: SdkConfig, endpoint: &str) -> String {
    let provider = Arc::new(AwsProvider::with_sdk_config(sdk));
    let engine = TestEngine::start_with(|config: Config| {
        config
            .provider(provider)
            .provision_retries(2, Duration::from_millis(1))
    })
    .await;
    let project = project(&aws_yml(1, endpoint, "us-east-1", "ami-12c6146b"));
    let done = engine.run(project.path()).await;
    assert_eq!(done.status.as_str(), "failed", "{done:#?}");
    engine.stop().await;
    done.nodes[0].error_message.clone().unwrap_or_default()
}

/// An EC2 endpoint on loopback that throttles every request (503 `RequestLimitExceeded`) and
/// counts the RunInstances calls it gets.
async fn throttling_endpoint() -> (String, Arc<AtomicU32>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let run_instances = Arc::new(AtomicU32::new(0));
    let counted = run_instances.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                if String::from_utf8_lossy(&body).contains("Action=RunInstances") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                           <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.\
                           </Message></Error></Errors><RequestID>taskfly-test</RequestID></Response>";
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/xml\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{xml}",
                    xml.len()
                );
                let _ = stream.get_mut().write_all(answer.as_bytes()).await;
            });
        }
    });
    (endpoint, run_instances)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_run_instances_is_sent_once_per_engine_attempt_not_again_by_the_sdk() {
    // No emulator needed: the endpoint is a loopback server that throttles everything.
    let (endpoint, run_instances) = throttling_endpoint().await;
    // The SDK's own default: standard retries, three attempts per call.
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .retry_config(RetryConfig::standard())
        .load()
        .await;
    let message = failed_with_two_attempts(sdk, &endpoint).await;
    assert!(
        message.contains("RequestLimitExceeded") && message.contains("after 2 attempts"),
        "{message}"
    );
    assert_eq!(
        run_instances.load(Ordering::SeqCst),
        2,
        "one RunInstances request per engine attempt"
    );
}

/// What a loopback EC2 endpoint saw of TerminateInstances: the ids of each call, and the
/// most calls it had in flight at once.
#[derive(Default)]
struct TerminateCalls {
    batches: Vec<usize>,
    in_flight: u32,
    most_in_flight: u32,
}

/// An EC2 endpoint on loopback that answers every TerminateInstances call with each of its
/// instances `shutting-down` (after a short pause, so calls overlap when they can), and
/// records the calls.
async fn terminating_endpoint() -> (String, Arc<std::sync::Mutex<TerminateCalls>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let calls = Arc::new(std::sync::Mutex::new(TerminateCalls::default()));
    let recorded = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let body = String::from_utf8_lossy(&body).into_owned();
                    assert!(body.contains("Action=TerminateInstances"), "{body}");
                    let ids: Vec<&str> = body
                        .split('&')
                        .filter_map(|pair| pair.split_once('='))
                        .filter(|(key, _)| key.starts_with("InstanceId."))
                        .map(|(_, id)| id)
                        .collect();
                    {
                        let mut calls = recorded.lock().expect("calls");
                        calls.batches.push(ids.len());
                        calls.in_flight += 1;
                        calls.most_in_flight = calls.most_in_flight.max(calls.in_flight);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    recorded.lock().expect("calls").in_flight -= 1;
                    let items: String = ids
                        .iter()
                        .map(|id| {
                            format!(
                                "<item><instanceId>{id}</instanceId><currentState><code>32</code>\
                                 <name>shutting-down</name></currentState><previousState>\
                                 <code>16</code><name>running</name></previousState></item>"
                            )
                        })
                        .collect();
                    let xml = format!(
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<TerminateInstancesResponse \
                         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>taskfly-test\
                         </requestId><instancesSet>{items}</instancesSet></TerminateInstancesResponse>"
                    );
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{xml}",
                        xml.len()
                    );
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (endpoint, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_terminates_share_terminate_instances_calls_of_at_most_1000_ids() {
    // No emulator needed: the endpoint is a loopback server that terminates whatever it is
    // asked to.
    let (endpoint, calls) = terminating_endpoint().await;
    let provider = Arc::new(aws_provider(&endpoint, "us-east-1").await);
    // The locator of an instance in the provider's own place.
    let locator = r#"{"region":null,"endpoint_url":null}"#;
    let terminates = (0..2500).map(|n| {
        let provider = provider.clone();
        async move {
            let instance = InstanceRef {
                id: format!("i-{n:017x}"),
                locator: locator.to_owned(),
            };
            provider.terminate(&instance).await
        }
    });
    let results = futures_util::future::join_all(terminates).await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|result| result.err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..1]
    );
    let calls = calls.lock().expect("calls");
    assert_eq!(
        calls.batches.iter().sum::<usize>(),
        2500,
        "{:?}",
        calls.batches
    );
    assert!(
        calls.batches.iter().all(|&ids| ids <= 1000),
        "EC2 takes at most 1000 ids a call: {:?}",
        calls.batches
    );
    assert!(
        calls.batches.len() <= 10,
        "2500 instances terminated at once take a few calls, not one each: {} calls",
        calls.batches.len()
    );
    assert!(
        calls.most_in_flight <= 4,
        "{} calls at once",
        calls.most_in_flight
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_terminates_an_instance_in_another_region_from_its_locator() {
    let Some(endpoint) = emulator("a_restarted_provider_terminates") else {
        return;
    };
    let (launch_region, home_region) = ("ap-southeast-2", "ap-northeast-3");
    let (ec2_there, image_id) = ec2_and_image(&endpoint, launch_region).await;
    let yml = aws_yml(1, &endpoint, launch_region, &image_id)
        .replace(&format!("    endpoint_url: {endpoint}\n"), "");
    let deployment = Arc::new(DeploymentConfig::from_yaml(&yml).expect("taskfly.yml"));

    // The daemon before its restart: launches in the deployment's region.
    let deployment_id = format!("dep-{}", unique_marker());
    let before = aws_provider(&endpoint, home_region).await;
    let info = before
        .provision(first_node(&deployment_id, deployment))
        .await
        .expect("provision");
    assert!(info.reference.id.starts_with("i-"), "{info:?}");
    assert!(
        info.reference.locator.contains(launch_region),
        "the locator names the region: {info:?}"
    );
    let running = instances_of(&ec2_there, &deployment_id).await;
    assert_eq!(running.len(), 1);
    assert!(!is_ending(&state_of(&running[0])));

    // After it: a new provider that never saw the instance, whose own region is another one,
    // handed the instance as the engine stored it.
    let after = aws_provider(&endpoint, home_region).await;
    after.terminate(&info.reference).await.expect("terminate");
    wait_all_ending(&ec2_there, &deployment_id, 1).await;
    // Terminating again is fine.
    after
        .terminate(&info.reference)
        .await
        .expect("terminate again");
    assert!(
        after
            .owned_instances()
            .await
            .expect("owned instances")
            .iter()
            .all(|owned| owned.instance.id != info.reference.id),
        "an ending instance is not listed as owned"
    );
}

#[test]
fn base64_decoding_in_these_tests_is_right() {
    assert_eq!(decode_base64("Zm9vYmFy"), b"foobar");
    assert_eq!(decode_base64("Zm9vYg=="), b"foob");
    assert_eq!(decode_base64("Zm9vYmE="), b"fooba");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_checks_keep_to_the_instances_of_their_own_owner() {
    let Some(endpoint) = emulator("leak_checks_keep_to_their_own_owner") else {
        return;
    };
    let region = "sa-east-1";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let deployment_id = format!("dep-{}", unique_marker());
    let deployment = Arc::new(
        DeploymentConfig::from_yaml(&aws_yml(1, &endpoint, region, &image_id))
            .expect("taskfly.yml"),
    );
    let ours = aws_provider(&endpoint, region).await.owner("team-a");
    let info = ours
        .provision(first_node(&deployment_id, deployment))
        .await
        .expect("provision");
    let instance = &instances_of(&ec2, &deployment_id).await[0];
    assert_eq!(
        tags_of(instance).get("taskfly:owner").map(String::as_str),
        Some("team-a")
    );

    let other = aws_provider(&endpoint, region).await.owner("team-b");
    let listed = other.owned_instances().await.expect("owned instances");
    assert!(
        listed.iter().all(|o| o.instance.id != info.reference.id),
        "another owner's leak check lists our instance: {listed:?}"
    );
    // The same owner after a restart lists it, with its deployment and a locator the leak
    // checks terminate it by.
    let restarted = aws_provider(&endpoint, region).await.owner("team-a");
    let listed = restarted.owned_instances().await.expect("owned instances");
    let ours = listed
        .iter()
        .find(|o| o.instance.id == info.reference.id)
        .unwrap_or_else(|| panic!("not listed: {listed:?}"));
    assert_eq!(
        ours.owner,
        OwnedBy::Deployment {
            deployment_id: deployment_id.clone(),
            node_id: Some(format!("{deployment_id}-0")),
        }
    );
    restarted
        .terminate(&ours.instance)
        .await
        .expect("terminate");
    wait_all_ending(&ec2, &deployment_id, 1).await;
}

// ---------------------------------------------------------------------------------------------
// The instance pool over EC2
// ---------------------------------------------------------------------------------------------

/// The ids of the pool's instances in the emulator (tagged [`POOL_DEPLOYMENT_ID`]) that are not
/// in `before` (those of earlier runs against the same emulator).
async fn new_pool_instances(
    ec2: &aws_sdk_ec2::Client,
    before: &BTreeSet<String>,
) -> Vec<aws_sdk_ec2::types::Instance> {
    instances_of(ec2, POOL_DEPLOYMENT_ID)
        .await
        .into_iter()
        .filter(|i| !before.contains(i.instance_id().unwrap_or_default()))
        .collect()
}

fn ids_of(instances: &[aws_sdk_ec2::types::Instance]) -> BTreeSet<String> {
    instances
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

/// Waits (bounded) until every instance in `ids` is shutting down or terminated.
async fn wait_ending(ec2: &aws_sdk_ec2::Client, ids: &BTreeSet<String>) {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let states: Vec<(String, InstanceStateName)> = instances_of(ec2, POOL_DEPLOYMENT_ID)
            .await
            .iter()
            .filter(|i| ids.contains(i.instance_id().unwrap_or_default()))
            .map(|i| (i.instance_id().unwrap_or_default().to_owned(), state_of(i)))
            .collect();
        if states.len() == ids.len() && states.iter().all(|(_, state)| is_ending(state)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pooled instances {ids:?} still alive after {WAIT_LIMIT:?}: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Boots one instance from its user data in a directory of its own under `dir`.
async fn boot_one(
    ec2: &aws_sdk_ec2::Client,
    instance_id: &str,
    dir: &std::path::Path,
) -> tokio::process::Child {
    let script = user_data(ec2, instance_id).await;
    let instance_dir = dir.join(instance_id);
    std::fs::create_dir_all(&instance_dir).expect("instance dir");
    boot(&script, &instance_dir)
}

/// An engine whose `aws` provider is a pool over EC2 at the emulator, with what a pool test
/// needs beside it.
struct PooledEc2 {
    ec2: aws_sdk_ec2::Client,
    /// An image the emulator knows.
    image_id: String,
    /// The pool instances already there (other tests' ones), to tell this test's apart.
    before: BTreeSet<String>,
    pool: Arc<PooledProvider>,
    engine: TestEngine,
}

async fn pooled_ec2(endpoint: &str, region: &str, config: PoolConfig) -> PooledEc2 {
    let (ec2, image_id) = ec2_and_image(endpoint, region).await;
    let before = ids_of(&instances_of(&ec2, POOL_DEPLOYMENT_ID).await);
    let aws = Arc::new(aws_provider(endpoint, region).await);
    let pool = Arc::new(PooledProvider::new(aws, config).expect("pool settings"));
    let engine = TestEngine::start_with(|config: Config| {
        config
            .pooled_provider(pool.clone())
            .provision_retries(5, Duration::from_millis(1))
    })
    .await;
    PooledEc2 {
        ec2,
        image_id,
        before,
        pool,
        engine,
    }
}

/// Waits (bounded) until the user data script ends by itself; returns its exit status.
async fn wait_exit(child: &mut tokio::process::Child, what: &str) -> std::process::ExitStatus {
    tokio::time::timeout(WAIT_LIMIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {WAIT_LIMIT:?}"))
        .expect("wait for sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_instances_serve_a_second_deployment_then_are_terminated_when_idle() {
    let Some(endpoint) = emulator("pooled_instances_serve_a_second_deployment") else {
        return;
    };
    let region = "ca-central-1";
    let PooledEc2 {
        ec2,
        image_id,
        before,
        pool,
        engine,
    } = pooled_ec2(
        &endpoint,
        region,
        PoolConfig::new(4).idle_timeout(Duration::from_secs(4)),
    )
    .await;

    // A: two instances are started for the pool, not for A.
    let a = project(&aws_yml(2, &endpoint, region, &image_id));
    let a_id = engine
        .engine
        .deploy_dir(a.path())
        .await
        .expect("deploy A")
        .id;
    let view_a = wait_instances_recorded(&engine, &a_id).await;
    let started = new_pool_instances(&ec2, &before).await;
    assert_eq!(started.len(), 2, "one instance per node: {started:#?}");
    let pool_ids = ids_of(&started);
    let a_ids: BTreeSet<String> = view_a
        .nodes
        .iter()
        .filter_map(|n| n.instance_id.clone())
        .collect();
    assert_eq!(a_ids, pool_ids);
    for instance in &started {
        let tags = tags_of(instance);
        assert_eq!(
            tags.get("taskfly:deployment-id").map(String::as_str),
            Some(POOL_DEPLOYMENT_ID),
            "{tags:?}"
        );
        assert_eq!(tags.get("team").map(String::as_str), Some("data"));
    }
    assert!(
        instances_of(&ec2, &a_id).await.is_empty(),
        "nothing is tagged with A's id"
    );

    // Each instance boots once: its user data loops, serving one node after another.
    let boot_dir = tempfile::tempdir().expect("temp dir");
    let mut children = Vec::new();
    for instance_id in &pool_ids {
        children.push(boot_one(&ec2, instance_id, boot_dir.path()).await);
    }
    let done_a = wait_final(&engine, &a_id).await;
    assert_eq!(done_a.status.as_str(), "completed", "{done_a:#?}");
    wait_for_pool(&pool, "aws", "both instances idle after A", |s| {
        s.idle == 2 && s.instances == 2
    })
    .await;

    // B: no new instance; the same two sh processes run its nodes.
    let b = project(&aws_yml(2, &endpoint, region, &image_id));
    let b_id = engine
        .engine
        .deploy_dir(b.path())
        .await
        .expect("deploy B")
        .id;
    let view_b = wait_instances_recorded(&engine, &b_id).await;
    let b_ids: BTreeSet<String> = view_b
        .nodes
        .iter()
        .filter_map(|n| n.instance_id.clone())
        .collect();
    assert_eq!(b_ids, pool_ids, "B runs on A's instances");
    let done_b = wait_final(&engine, &b_id).await;
    assert_eq!(done_b.status.as_str(), "completed", "{done_b:#?}");
    let logs = engine.all_logs(&b_id).await;
    // Three shards over two nodes: node 0 gets a and c, node 1 gets b.
    for expected in [r#"node 0 shard ["a","c"]"#, r#"node 1 shard ["b"]"#] {
        assert!(
            logs.iter().any(|l| l.line == expected),
            "no log line {expected:?}: {logs:#?}"
        );
    }
    assert_eq!(
        ids_of(&new_pool_instances(&ec2, &before).await),
        pool_ids,
        "no instance was started for B"
    );
    for child in &mut children {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the user data scripts wait for the next node"
        );
    }
    let stats = pool.stats("aws");
    assert_eq!(
        (stats.launched_total, stats.reused_total),
        (2, 2),
        "{stats:#?}"
    );

    // Past the idle timeout, both are terminated in EC2, and their agents leave (410).
    let stats = wait_for_pool(&pool, "aws", "both idle instances retired", |s| {
        s.instances == 0
    })
    .await;
    assert_eq!(stats.retired_total, 2, "{stats:#?}");
    wait_ending(&ec2, &pool_ids).await;
    for child in &mut children {
        let status = wait_exit(child, "a retired instance's user data").await;
        assert!(status.success(), "user data exited with {status}");
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_ec2_instance_started_ahead_runs_the_next_node() {
    let Some(endpoint) = emulator("a_spare_ec2_instance_started_ahead") else {
        return;
    };
    let region = "ap-south-1";
    let PooledEc2 {
        ec2,
        image_id,
        before,
        pool,
        engine,
    } = pooled_ec2(&endpoint, region, PoolConfig::new(3).provision_ahead(1)).await;

    // The first node holds its instance until the test writes the go file.
    let go = tempfile::tempdir().expect("temp dir");
    let go_file = go.path().join("go");
    let holding = Project::new(&aws_yml(1, &endpoint, region, &image_id)).script(&format!(
        "#!/bin/sh\nwhile [ ! -e '{}' ]; do sleep 0.05; done\necho released\n",
        go_file.display()
    ));
    let holding_id = engine.deploy(holding.path()).await;
    let view = wait_instances_recorded(&engine, &holding_id).await;
    let first = view.nodes[0].instance_id.clone().expect("instance");
    let stats = wait_for_pool(&pool, "aws", "the node's instance and a spare", |s| {
        s.launched_total == 2 && s.launching == 0
    })
    .await;
    assert_eq!((stats.busy, stats.idle), (1, 1), "{stats:#?}");
    let started = ids_of(&new_pool_instances(&ec2, &before).await);
    assert_eq!(started.len(), 2, "{started:?}");
    let spare = started
        .iter()
        .find(|id| **id != first)
        .expect("a spare")
        .clone();
    let boot_dir = tempfile::tempdir().expect("temp dir");
    let mut children = Vec::new();
    for instance_id in &started {
        children.push(boot_one(&ec2, instance_id, boot_dir.path()).await);
    }
    poll_until(&engine, &holding_id, "the first node running", |view| {
        view.nodes[0].status.as_str() == "running_script"
    })
    .await;

    let next = project(&aws_yml(1, &endpoint, region, &image_id));
    let next_id = engine.deploy(next.path()).await;
    let done = wait_final(&engine, &next_id).await;
    assert_eq!(done.status.as_str(), "completed", "{done:#?}");
    assert_eq!(
        done.nodes[0].instance_id.as_deref(),
        Some(spare.as_str()),
        "the next node runs on the spare"
    );
    assert_eq!(pool.stats("aws").spares_used_total, 1);

    std::fs::write(&go_file, "go").expect("write the go file");
    let done = wait_final(&engine, &holding_id).await;
    assert_eq!(done.status.as_str(), "completed", "{done:#?}");
    let all = ids_of(&new_pool_instances(&ec2, &before).await);
    assert!(all.len() <= 3, "never more than the maximum: {all:?}");

    // At shutdown the pool terminates every instance it keeps waiting for work.
    wait_for_pool(&pool, "aws", "no node on any instance", |s| s.busy == 0).await;
    engine.stop().await;
    wait_ending(&ec2, &all).await;
    drop(children);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_nodes_send_their_outputs_back_from_user_data() {
    let Some(endpoint) = emulator("ec2_nodes_send_their_outputs_back") else {
        return;
    };
    let region = "ap-south-1";
    let (ec2, image_id) = ec2_and_image(&endpoint, region).await;
    let engine = engine_with(Arc::new(aws_provider(&endpoint, region).await)).await;
    let yml = format!(
        "{}outputs: [results/]\n",
        aws_yml(2, &endpoint, region, &image_id)
    );
    let project = Project::new(&yml)
        .script("#!/bin/sh\nmkdir -p results\necho \"shard $SHARD\" > results/shard.txt\n");
    let id = engine.deploy(project.path()).await;
    let view = wait_instances_recorded(&engine, &id).await;
    let boot_dir = tempfile::tempdir().expect("temp dir");
    let mut children = boot_all(&ec2, &view, boot_dir.path()).await;
    let done = wait_final(&engine, &id).await;
    assert_eq!(done.status.as_str(), "completed", "{done:#?}");

    let mut reader = engine.engine.outputs(&id, None).await.expect("outputs");
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
        .await
        .expect("read");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut got = Vec::new();
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").display().to_string();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut entry, &mut text).expect("read");
        got.push((path, text));
    }
    assert_eq!(
        got,
        [
            (
                "node-0/results/shard.txt".to_owned(),
                "shard [\"a\",\"c\"]\n".to_owned()
            ),
            (
                "node-1/results/shard.txt".to_owned(),
                "shard [\"b\"]\n".to_owned()
            ),
        ]
    );
    for child in &mut children {
        let status = tokio::time::timeout(WAIT_LIMIT, child.wait())
            .await
            .expect("the user data script ends once its node is done")
            .expect("wait for sh");
        assert!(status.success(), "user data exited with {status}");
    }
    engine.stop().await;
}
