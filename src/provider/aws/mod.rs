//! [`AwsProvider`]: nodes on EC2 instances (feature `aws`).
//!
//! One `RunInstances` call starts one node. The instance carries its tags from the moment it
//! exists (`TagSpecifications`), so no instance of TaskFly's is ever untagged, and its user data
//! is the bootstrap script (`agent::bootstrap`) that registers with the engine, downloads the
//! bundle, runs the script and reports back over the node API.
//!
//! Where instances live: each deployment names its own `region` and `endpoint_url` in
//! `taskfly.yml`, so the provider keeps one EC2 client per (region, endpoint) pair, created the
//! first time a deployment needs it. The engine terminates and describes instances by id alone,
//! so the provider remembers where each instance it started or found lives. After a restart it
//! has forgotten: it then looks for the instance in the places it knows and, failing that, in
//! every region the daemon's own account lists (`DescribeRegions`).
//!
//! Leak checks ([`Provider::owned_instances`]) list the instances tagged
//! `taskfly:deployment-id` (or, with [`AwsProvider::owner`], `taskfly:owner`) in the daemon's
//! own region and in every place this provider has started or found an instance since it
//! began. The daemon's own region is `AWS_REGION`, `AWS_DEFAULT_REGION` or the shared profile's;
//! instance metadata is not asked for it, so a daemon without one makes no AWS call until a
//! deployment asks for one.
//!
//! Only this module knows aws-sdk types; the rest of the crate sees [`InstanceInfo`],
//! [`OwnedInstance`] and [`ProviderError`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::ErrorKind;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, Instance, InstanceMarketOptionsRequest,
    InstanceStateName, InstanceType, MarketType, ResourceType, Tag, TagSpecification,
};
use aws_sdk_ec2::Client;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{
    Instance as NewInstance, InstanceKind, InstanceRef, InstanceSpec, InstanceState, OwnedBy,
    OwnedInstance, Owner, Provider, ProviderError, ProviderSettings,
};
use crate::config::aws_settings;
use crate::config::AwsConfig;
use crate::error::BoxError;
use crate::sync::lock;

/// The tag naming the deployment an instance was started for; leak checks look for it.
pub(crate) const DEPLOYMENT_TAG: &str = "taskfly:deployment-id";

/// The tag naming the node an instance runs.
pub(crate) const NODE_TAG: &str = "taskfly:node-id";

/// The tag naming the engine that started an instance, when the provider has an owner.
pub(crate) const OWNER_TAG: &str = "taskfly:owner";

/// How long `terminate` waits for EC2 to report an instance shutting down or gone.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);

/// How often `terminate` asks again while it waits.
const CONFIRM_POLL: Duration = Duration::from_secs(2);

/// Most instance ids EC2 takes in one TerminateInstances call.
const TERMINATE_BATCH: usize = 1000;

/// How long the first `terminate` of a batch waits for others to join it.
const TERMINATE_GATHER: Duration = Duration::from_millis(20);

/// Most TerminateInstances calls this provider has in flight at once.
const TERMINATE_CALLS: usize = 4;

/// EC2 error codes after which the same request may well succeed later: throttling, capacity
/// shortages, and EC2's own transient failures. `ConnectionError` and `Timeout` are this
/// provider's codes for an endpoint that could not be reached or did not answer in time.
const RETRYABLE_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
    "ConnectionError",
    "Timeout",
];

/// The code EC2 answers for an instance id it does not know (never existed, or terminated
/// long enough ago to be forgotten).
const NOT_FOUND_CODE: &str = "InvalidInstanceID.NotFound";

/// Runs nodes on EC2 instances (`cloud_provider: aws`).
///
/// Credentials come from the AWS SDK's default chain (environment, shared config and
/// credentials files including SSO and `credential_process`, web identity, ECS, instance
/// metadata); each deployment's `instance_config.aws` names the region (else the SDK's usual
/// lookup) and, optionally, an EC2-compatible `endpoint_url`.
///
/// ```no_run
/// use std::sync::Arc;
/// let config = taskfly::Config::new("/var/lib/taskfly")
///     .advertise_url("http://10.0.0.1:8080")
///     .provider(Arc::new(taskfly::AwsProvider::new()));
/// ```
///
/// Cancellation: a dropped `provision` future leaves at most one instance behind, and that
/// instance is tagged with its deployment, so the engine's leak checks terminate it once the
/// deployment is final.
///
/// Logging: this provider never logs a provision token or user data, but the AWS SDK logs
/// whole requests at trace level (target `aws_smithy_runtime`), user data included; a program
/// embedding TaskFly should keep that target at `info` or above (`taskflyd` does).
pub struct AwsProvider {
    base: Base,
    /// One EC2 client per place, each created once, on first use.
    clients: Mutex<HashMap<Location, Arc<OnceCell<Client>>>>,
    /// Where each instance this provider started or found lives.
    instances: Mutex<HashMap<String, Location>>,
    /// Places where this provider started or found instances: the leak checks list them.
    used: Mutex<BTreeSet<Location>>,
    /// The daemon's own place, if it has a region of its own; worked out once.
    home: OnceCell<Option<Location>>,
    /// Tagged on every instance and required by leak checks, when set.
    owner: Option<String>,
    /// Instances waiting to be terminated, by place, each with where to send its outcome:
    /// concurrent `terminate` calls share TerminateInstances calls of up to
    /// [`TERMINATE_BATCH`] ids.
    terminating: Arc<Mutex<HashMap<Location, Vec<PendingTerminate>>>>,
    /// Bounds the TerminateInstances calls in flight ([`TERMINATE_CALLS`]).
    terminate_calls: Arc<tokio::sync::Semaphore>,
}

/// One instance waiting in a terminate batch, and where its outcome goes: whether EC2
/// reported it shutting down or gone.
type PendingTerminate = (
    String,
    tokio::sync::oneshot::Sender<Result<bool, ProviderError>>,
);

/// Where the settings every client starts from come from.
enum Base {
    /// The AWS SDK's default chains, loaded for each place.
    DefaultChain,
    /// Settings given by the embedding program.
    Given(Box<SdkConfig>),
}

/// A place instances live in: a region at an endpoint. `None` means the base settings' own
/// (the default chain's region, or the given [`SdkConfig`]'s region and endpoint).
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
struct Location {
    region: Option<String>,
    endpoint_url: Option<String>,
}

impl Location {
    fn of(config: &AwsConfig) -> Location {
        Location {
            region: config.region.clone(),
            endpoint_url: config.endpoint_url.clone(),
        }
    }
}

impl Location {
    /// The locator of an instance here ([`InstanceRef::locator`]): the location as JSON.
    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The location a locator names; `None` for an empty one (an instance of taskfly 0.1).
    fn decode(locator: &str) -> Result<Option<Location>, ProviderError> {
        if locator.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(locator)
            .map(Some)
            .map_err(|e| invalid_configuration(format!("an invalid EC2 locator {locator:?}: {e}")))
    }
}

/// The kind of the instances `aws` starts: every setting, spelled out.
fn aws_kind(aws: &AwsConfig) -> InstanceKind {
    let tags: Vec<String> = aws.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    InstanceKind::new(format!(
        "aws region={} endpoint={} image={} type={} key={} groups={} subnet={} profile={} spot={} tags={}",
        aws.region.as_deref().unwrap_or("-"),
        aws.endpoint_url.as_deref().unwrap_or("-"),
        aws.image_id,
        aws.instance_type,
        aws.key_name.as_deref().unwrap_or("-"),
        aws.security_groups.join(","),
        aws.subnet_id.as_deref().unwrap_or("-"),
        aws.iam_instance_profile.as_deref().unwrap_or("-"),
        aws.spot,
        tags.join(","),
    ))
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.region.as_deref().unwrap_or("default region"))?;
        if let Some(url) = &self.endpoint_url {
            write!(f, " at {url}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = match &self.base {
            Base::DefaultChain => "default chain",
            Base::Given(_) => "given SdkConfig",
        };
        f.debug_struct("AwsProvider")
            .field("base", &base)
            .field("owner", &self.owner)
            .field("places", &lock(&self.used).len())
            .field("instances", &lock(&self.instances).len())
            .finish_non_exhaustive()
    }
}

impl Default for AwsProvider {
    fn default() -> Self {
        AwsProvider::new()
    }
}

impl AwsProvider {
    /// A provider using the AWS SDK's default credential and region chains. Nothing is loaded
    /// or called until a deployment needs it, so creating one is cheap and never fails.
    pub fn new() -> AwsProvider {
        AwsProvider::build(Base::DefaultChain)
    }

    /// A provider whose clients start from `config` instead of the default chains: its
    /// credentials, region, endpoint, retry and timeout settings and HTTP client. Each
    /// deployment's `region` and `endpoint_url` still override the region and endpoint.
    ///
    /// This is the one public signature with an AWS SDK type in it, on purpose: a program that
    /// embeds TaskFly and already talks to AWS has its settings in an [`SdkConfig`] (assumed
    /// roles, static test credentials, a proxy), and converting them to a TaskFly type would
    /// lose options. It is only compiled with the `aws` feature, which brings the SDK anyway.
    ///
    /// ```no_run
    /// # async fn demo() {
    /// use aws_config::{BehaviorVersion, Region};
    /// let sdk = aws_config::defaults(BehaviorVersion::latest())
    ///     .region(Region::new("eu-west-1"))
    ///     .profile_name("batch-jobs")
    ///     .load()
    ///     .await;
    /// let provider = taskfly::AwsProvider::with_sdk_config(sdk);
    /// # let _ = provider;
    /// # }
    /// ```
    pub fn with_sdk_config(config: SdkConfig) -> AwsProvider {
        AwsProvider::build(Base::Given(Box::new(config)))
    }

    fn build(base: Base) -> AwsProvider {
        AwsProvider {
            base,
            clients: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            used: Mutex::new(BTreeSet::new()),
            home: OnceCell::new(),
            owner: None,
            terminating: Arc::new(Mutex::new(HashMap::new())),
            terminate_calls: Arc::new(tokio::sync::Semaphore::new(TERMINATE_CALLS)),
        }
    }

    /// Tag every instance with `taskfly:owner = owner`, and let leak checks consider only
    /// instances with that tag. Without an owner, leak checks take every instance tagged
    /// `taskfly:deployment-id` in the regions they list as TaskFly's; so two engines sharing
    /// an AWS account and region must each have an owner of their own, or each would
    /// terminate the other's instances. `taskflyd` uses an id kept in its data directory.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> AwsProvider {
        self.owner = Some(owner.into());
        self
    }

    /// The client for `location`, created on first use.
    async fn client(&self, location: &Location) -> Client {
        let cell = lock(&self.clients)
            .entry(location.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| self.new_client(location)).await.clone()
    }

    async fn new_client(&self, location: &Location) -> Client {
        let mut builder = match &self.base {
            Base::DefaultChain => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_attempt_timeout(Duration::from_secs(30))
                        .operation_timeout(Duration::from_secs(90))
                        .build(),
                );
                if let Some(region) = &location.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                aws_sdk_ec2::config::Builder::from(&loader.load().await)
            }
            Base::Given(config) => aws_sdk_ec2::config::Builder::from(config.as_ref()),
        };
        if let Some(region) = &location.region {
            builder = builder.region(Region::new(region.clone()));
        }
        if let Some(url) = &location.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        Client::from_conf(builder.build())
    }

    /// The client for `location`, or an error naming how to set a region when none is known.
    async fn usable_client(&self, location: &Location) -> Result<Client, ProviderError> {
        let client = self.client(location).await;
        if client.config().region().is_none() {
            return Err(ProviderError {
                code: "MissingRegion".to_owned(),
                message: "no AWS region is set: set instance_config.aws.region in taskfly.yml, \
                          or AWS_REGION for the daemon"
                    .to_owned(),
                retryable: false,
            });
        }
        Ok(client)
    }

    /// The daemon's own place: the given settings' region, or a region set in the environment
    /// or the shared config file. Instance metadata is deliberately not asked: a daemon with no
    /// region of its own makes no AWS call until a deployment asks for one.
    async fn home(&self) -> Option<Location> {
        self.home
            .get_or_init(|| async {
                match &self.base {
                    Base::Given(config) => config.region().map(|_| Location::default()),
                    Base::DefaultChain => {
                        let chain = aws_config::meta::region::RegionProviderChain::first_try(
                            aws_config::environment::EnvironmentVariableRegionProvider::new(),
                        )
                        .or_else(aws_config::profile::region::ProfileFileRegionProvider::new());
                        chain.region().await.map(|region| Location {
                            region: Some(region.as_ref().to_owned()),
                            endpoint_url: None,
                        })
                    }
                }
            })
            .await
            .clone()
    }

    /// The daemon's own place and every place this provider has used, each once.
    async fn known_places(&self) -> Vec<Location> {
        let mut places: Vec<Location> = self.home().await.into_iter().collect();
        for location in lock(&self.used).iter() {
            if !places.contains(location) {
                places.push(location.clone());
            }
        }
        places
    }

    /// Remember that `instance_id` lives at `location`, and list `location` for leak checks.
    fn remember(&self, instance_id: &str, location: &Location) {
        lock(&self.instances).insert(instance_id.to_owned(), location.clone());
        lock(&self.used).insert(location.clone());
    }

    /// Where `instance_id` lives: remembered, else found by asking every known place and
    /// then every region of the daemon's account. `Ok(None)`: every region was asked and none
    /// knows it. Without a region of the daemon's own, not every region can be asked, and an
    /// instance found nowhere is an error rather than taken for gone.
    async fn locate(&self, instance_id: &str) -> Result<Option<(Location, Client)>, ProviderError> {
        let remembered = lock(&self.instances).get(instance_id).cloned();
        if let Some(location) = remembered {
            let client = self.usable_client(&location).await?;
            return Ok(Some((location, client)));
        }
        let candidates = self.known_places().await;
        let mut asked = HashSet::new();
        let mut failure = None;
        for location in candidates {
            if !asked.insert(location.clone()) {
                continue;
            }
            match self.find_in(instance_id, &location).await {
                Ok(Some(client)) => return Ok(Some((location, client))),
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        // Not in any place this process has used: after a restart, the deployment may have
        // run in another region. Ask every region the daemon's own account lists.
        let Some(home) = self.home().await else {
            return Err(ProviderError {
                code: "InstanceNotLocated".to_owned(),
                message: format!(
                    "{instance_id} is not in any region this daemon has used since it started, \
                     and with no region of its own (AWS_REGION) it cannot search the others"
                ),
                retryable: false,
            });
        };
        let regions = self
            .usable_client(&home)
            .await?
            .describe_regions()
            .send()
            .await
            .map_err(|e| provider_error("DescribeRegions", e))?;
        for name in regions.regions().iter().filter_map(|r| r.region_name()) {
            let location = Location {
                region: Some(name.to_owned()),
                endpoint_url: home.endpoint_url.clone(),
            };
            if !asked.insert(location.clone()) {
                continue;
            }
            match self.find_in(instance_id, &location).await {
                Ok(Some(client)) => return Ok(Some((location, client))),
                Ok(None) => {}
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// The client for `location` if `instance_id` lives there (and remember that it does).
    async fn find_in(
        &self,
        instance_id: &str,
        location: &Location,
    ) -> Result<Option<Client>, ProviderError> {
        let client = self.usable_client(location).await?;
        match describe_one(&client, instance_id).await? {
            Some(_) => {
                self.remember(instance_id, location);
                Ok(Some(client))
            }
            None => Ok(None),
        }
    }

    /// Terminate `instance_id` in one TerminateInstances call shared with the other
    /// instances of `location` being terminated at the same time (up to [`TERMINATE_BATCH`]
    /// ids a call, at most [`TERMINATE_CALLS`] calls at once). Returns whether EC2 reported it
    /// shutting down or gone.
    ///
    /// The call that finds no batch waiting for its place starts a task that sends the
    /// batches: it waits [`TERMINATE_GATHER`] for others to join, then sends until nothing is
    /// left. A task, so that a dropped `terminate` never strands the others of its batch.
    async fn terminate_batched(
        &self,
        location: &Location,
        client: &Client,
        instance_id: &str,
    ) -> Result<bool, ProviderError> {
        let (sender, outcome) = tokio::sync::oneshot::channel();
        let first = {
            let mut terminating = lock(&self.terminating);
            let waiting = terminating.entry(location.clone()).or_default();
            waiting.push((instance_id.to_owned(), sender));
            waiting.len() == 1
        };
        if first {
            let sender = BatchSender {
                terminating: self.terminating.clone(),
                calls: self.terminate_calls.clone(),
                client: client.clone(),
                location: location.clone(),
            };
            tokio::spawn(sender.send_all());
        }
        outcome.await.unwrap_or_else(|_| {
            Err(ProviderError {
                code: "TerminateNotSent".to_owned(),
                message: format!("the terminate call for {instance_id} was abandoned"),
                retryable: true,
            })
        })
    }

    /// Ask EC2 until it reports `instance_id` shutting down or gone, for a bounded time.
    async fn confirm_terminated(&self, client: &Client, instance_id: &str) -> Result<(), BoxError> {
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        loop {
            match describe_one(client, instance_id).await {
                Ok(None) => return Ok(()),
                Ok(Some(instance)) if is_ending(instance_state(&instance)) => return Ok(()),
                Ok(Some(_)) => {}
                // A transient failure while confirming: ask again until the deadline.
                Err(e) if e.retryable => {}
                Err(e) => return Err(e.into()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError {
                    code: "TerminationNotConfirmed".to_owned(),
                    message: format!(
                        "EC2 accepted terminating {instance_id} but did not report it shutting \
                         down within {}s",
                        CONFIRM_TIMEOUT.as_secs()
                    ),
                    retryable: true,
                }
                .into());
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }
}

/// The deployment-id tag of a pool slot's instance: it belongs to no deployment.
const POOL_TAG_VALUE: &str = "taskfly-pool";

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &str {
        "aws"
    }

    async fn provision(&self, spec: InstanceSpec) -> Result<NewInstance, BoxError> {
        let aws = aws_settings(&spec.settings).map_err(|e| invalid_configuration(e.to_string()))?;
        let aws = &aws;
        let deployment_id = match &spec.owner {
            Owner::Node { deployment_id, .. } => deployment_id.as_str(),
            Owner::Pool { .. } => POOL_TAG_VALUE,
        };
        let node_id = spec.owner.name();
        let groups = security_groups(&aws.security_groups, aws.subnet_id.is_some())
            .map_err(invalid_configuration)?;
        let tags = instance_tags(deployment_id, node_id, self.owner.as_deref(), &aws.tags)
            .map_err(invalid_configuration)?;
        let script = crate::agent::bootstrap::bootstrap_script(
            &spec.daemon_url,
            spec.provision_token.expose(),
            spec.ca_pem.as_deref(),
        )
        .map_err(|e| invalid_configuration(format!("cannot build the bootstrap script: {e}")))?;
        let location = Location::of(aws);
        let client = self.usable_client(&location).await?;

        let mut tag_spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (key, value) in &tags {
            tag_spec = tag_spec.tags(Tag::builder().key(key).value(value).build());
        }
        let mut request = client
            .run_instances()
            .image_id(&aws.image_id)
            .instance_type(InstanceType::from(aws.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(client_token(
                node_id,
                spec.owner.attempt(),
                spec.provision_token.expose(),
            ))
            .user_data(crate::encode::base64(script.as_bytes()))
            .tag_specifications(tag_spec.build())
            .set_key_name(aws.key_name.clone())
            .set_subnet_id(aws.subnet_id.clone());
        request = match groups {
            SecurityGroups::Ids(ids) => request.set_security_group_ids(Some(ids)),
            SecurityGroups::Names(names) => request.set_security_groups(Some(names)),
            SecurityGroups::SubnetDefault => request,
        };
        if let Some(profile) = &aws.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        if aws.spot {
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .build(),
            );
        }
        // The engine retries RunInstances itself, with backoff, jitter and the same client
        // token (so at most one instance comes of it): the SDK's own retries inside each of
        // those attempts would only multiply the requests of a throttled account.
        let output = request
            .customize()
            .config_override(
                aws_sdk_ec2::config::Config::builder()
                    .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| provider_error("RunInstances", e))?;
        let Some(instance) = output.instances().first() else {
            return Err(ProviderError {
                code: "EmptyResponse".to_owned(),
                message: "RunInstances succeeded but returned no instance".to_owned(),
                retryable: true,
            }
            .into());
        };
        let info = instance_info(instance).ok_or_else(|| ProviderError {
            code: "EmptyResponse".to_owned(),
            message: "RunInstances returned an instance without an id".to_owned(),
            retryable: true,
        })?;
        lock(&self.used).insert(location.clone());
        tracing::info!(
            instance_id = %info.instance_id,
            node_id = %node_id,
            place = %location,
            image_id = %aws.image_id,
            instance_type = %aws.instance_type,
            spot = aws.spot,
            "EC2 instance launched"
        );
        Ok(NewInstance {
            reference: InstanceRef {
                id: info.instance_id,
                locator: location.encode(),
            },
            ip_address: info.ip_address,
        })
    }

    /// Terminates the instance in the region and at the endpoint its locator names (one of
    /// taskfly 0.1, without a locator, is looked for in every region).
    async fn terminate(&self, instance: &InstanceRef) -> Result<(), BoxError> {
        let instance_id = instance.id.as_str();
        let (location, client) = match Location::decode(&instance.locator)? {
            Some(location) => {
                let client = self.usable_client(&location).await?;
                lock(&self.used).insert(location.clone());
                (location, client)
            }
            None => match self.locate(instance_id).await? {
                Some(found) => found,
                None => {
                    // No place knows the instance: it is gone (EC2 forgets terminated instances).
                    tracing::info!(instance_id, "EC2 instance already gone");
                    return Ok(());
                }
            },
        };
        let confirmed = self
            .terminate_batched(&location, &client, instance_id)
            .await?;
        if !confirmed {
            self.confirm_terminated(&client, instance_id).await?;
        }
        lock(&self.instances).remove(instance_id);
        tracing::info!(instance_id, place = %location, "EC2 instance terminated");
        Ok(())
    }

    /// Every `instance_config.aws` setting: instances differing in any of them (AMI, type,
    /// region, endpoint, key, network, profile, spot, tags) are never pooled together.
    fn instance_kind(
        &self,
        settings: &ProviderSettings,
        _owner: &Owner,
    ) -> Result<InstanceKind, BoxError> {
        let aws = aws_settings(settings)?;
        Ok(aws_kind(&aws))
    }

    async fn owned_instances(&self) -> Result<Vec<OwnedInstance>, BoxError> {
        let places = self.known_places().await;
        let mut owned = Vec::new();
        let mut seen = HashSet::new();
        let mut failures = Vec::new();
        let asked = places.len();
        for location in places {
            match self.list_owned(&location).await {
                Ok(found) => {
                    for instance in found {
                        if seen.insert(instance.instance.id.clone()) {
                            owned.push(instance);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(place = %location, error = %crate::error::Report::new(&e), "cannot list TaskFly's EC2 instances");
                    failures.push(e);
                }
            }
        }
        // Some places answered: leak checks act on what they listed. None did: say why.
        if asked > 0 && failures.len() == asked {
            if let Some(e) = failures.pop() {
                return Err(e.into());
            }
        }
        Ok(owned)
    }
}

impl AwsProvider {
    /// Every instance at `location` tagged with a deployment, that is not already ending.
    async fn list_owned(&self, location: &Location) -> Result<Vec<OwnedInstance>, ProviderError> {
        let client = self.usable_client(location).await?;
        let owned_by = match &self.owner {
            Some(owner) => Filter::builder()
                .name(format!("tag:{OWNER_TAG}"))
                .values(owner)
                .build(),
            None => Filter::builder()
                .name("tag-key")
                .values(DEPLOYMENT_TAG)
                .build(),
        };
        let mut pages = client
            .describe_instances()
            .filters(owned_by)
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .into_paginator()
            .page_size(1000)
            .send();
        let mut owned = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| provider_error("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let tag = |key: &str| {
                    instance
                        .tags()
                        .iter()
                        .find(|tag| tag.key() == Some(key))
                        .and_then(|tag| tag.value())
                };
                let deployment_id = tag(DEPLOYMENT_TAG);
                if let (Some(instance_id), Some(deployment_id)) =
                    (instance.instance_id(), deployment_id)
                {
                    let owner = if deployment_id == POOL_TAG_VALUE {
                        OwnedBy::Pool
                    } else {
                        OwnedBy::Deployment {
                            deployment_id: deployment_id.to_owned(),
                            node_id: tag(NODE_TAG).map(str::to_owned),
                        }
                    };
                    owned.push(OwnedInstance {
                        instance: InstanceRef {
                            id: instance_id.to_owned(),
                            locator: location.encode(),
                        },
                        owner,
                        state: instance_state(instance),
                    });
                }
            }
        }
        Ok(owned)
    }
}

/// The instance, or `None` if EC2 does not know the id.
/// Sends the terminate batches of one place ([`AwsProvider::terminate_batched`]).
struct BatchSender {
    terminating: Arc<Mutex<HashMap<Location, Vec<PendingTerminate>>>>,
    calls: Arc<tokio::sync::Semaphore>,
    client: Client,
    location: Location,
}

impl BatchSender {
    /// Wait for a batch to gather, then send batches until none is waiting.
    async fn send_all(self) {
        tokio::time::sleep(TERMINATE_GATHER).await;
        loop {
            let batch: Vec<PendingTerminate> = {
                let mut terminating = lock(&self.terminating);
                let Some(waiting) = terminating.get_mut(&self.location) else {
                    return;
                };
                let take = waiting.len().min(TERMINATE_BATCH);
                let batch = waiting.drain(..take).collect();
                if waiting.is_empty() {
                    terminating.remove(&self.location);
                }
                batch
            };
            self.send(batch).await;
        }
    }

    /// One TerminateInstances call for `batch`, each instance told its outcome. EC2 refuses a
    /// whole call when one id is unknown: then each is terminated alone (an unknown one is
    /// gone).
    async fn send(&self, batch: Vec<PendingTerminate>) {
        let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
        let response = {
            let _slot = self.calls.acquire().await;
            self.client
                .terminate_instances()
                .set_instance_ids(Some(ids))
                .send()
                .await
        };
        match response {
            Ok(output) => {
                let ending: HashSet<&str> = output
                    .terminating_instances()
                    .iter()
                    .filter(|change| {
                        change
                            .current_state()
                            .and_then(|state| state.name())
                            .is_some_and(|state| is_ending(state_from_name(state)))
                    })
                    .filter_map(|change| change.instance_id())
                    .collect();
                for (id, sender) in batch {
                    let _ = sender.send(Ok(ending.contains(id.as_str())));
                }
            }
            Err(e) if e.code() == Some(NOT_FOUND_CODE) && batch.len() > 1 => {
                for pending in batch {
                    Box::pin(self.send(vec![pending])).await;
                }
            }
            Err(e) if e.code() == Some(NOT_FOUND_CODE) => {
                for (_, sender) in batch {
                    let _ = sender.send(Ok(true));
                }
            }
            Err(e) => {
                let error = provider_error("TerminateInstances", e);
                for (_, sender) in batch {
                    let _ = sender.send(Err(error.clone()));
                }
            }
        }
    }
}

async fn describe_one(
    client: &Client,
    instance_id: &str,
) -> Result<Option<Instance>, ProviderError> {
    match client
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
    {
        Ok(output) => Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .cloned()),
        Err(e) if e.code() == Some(NOT_FOUND_CODE) => Ok(None),
        Err(e) => Err(provider_error("DescribeInstances", e)),
    }
}

/// What RunInstances said of a new instance.
struct Launched {
    instance_id: String,
    ip_address: Option<String>,
}

fn instance_info(instance: &Instance) -> Option<Launched> {
    Some(Launched {
        instance_id: instance.instance_id()?.to_owned(),
        ip_address: instance
            .public_ip_address()
            .or(instance.private_ip_address())
            .map(str::to_owned),
    })
}

fn instance_state(instance: &Instance) -> InstanceState {
    instance
        .state()
        .and_then(|state| state.name())
        .map_or(InstanceState::Pending, state_from_name)
}

/// EC2's state, as coarse as leak prevention needs. A stopping or stopped instance still
/// exists (and its volumes still cost money), so it counts as running.
fn state_from_name(name: &InstanceStateName) -> InstanceState {
    match name {
        InstanceStateName::Pending => InstanceState::Pending,
        InstanceStateName::ShuttingDown => InstanceState::ShuttingDown,
        InstanceStateName::Terminated => InstanceState::Terminated,
        _ => InstanceState::Running,
    }
}

fn is_ending(state: InstanceState) -> bool {
    matches!(
        state,
        InstanceState::ShuttingDown | InstanceState::Terminated
    )
}

/// An AWS SDK failure as a [`ProviderError`]: EC2's own code when it answered, else this
/// provider's `ConnectionError`, `Timeout` or `ResponseError`. The message is EC2's message or
/// the SDK's description of the failure; neither carries credentials.
fn provider_error<E>(action: &str, error: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16());
    let (code, message) = match &error {
        SdkError::ServiceError(service) => {
            let meta = service.err();
            let code = meta
                .code()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP{}", status.unwrap_or(0)));
            let message = meta
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| DisplayErrorContext(&error).to_string());
            (code, message)
        }
        // The request got no answer. Connection and transport failures are worth another
        // try; the rest (no credentials found, a request the SDK cannot send) are not.
        SdkError::DispatchFailure(failure) => {
            let transient = failure.is_io()
                || failure.is_timeout()
                || matches!(
                    failure.as_other(),
                    Some(ErrorKind::TransientError | ErrorKind::ServerError)
                );
            let code = if transient {
                "ConnectionError"
            } else {
                "ClientError"
            };
            (code.to_owned(), DisplayErrorContext(&error).to_string())
        }
        SdkError::TimeoutError(_) => (
            "Timeout".to_owned(),
            DisplayErrorContext(&error).to_string(),
        ),
        SdkError::ResponseError(_) => (
            "ResponseError".to_owned(),
            DisplayErrorContext(&error).to_string(),
        ),
        _ => (
            "ClientError".to_owned(),
            DisplayErrorContext(&error).to_string(),
        ),
    };
    let retryable = is_retryable(&code) || status.is_some_and(|s| s >= 500);
    ProviderError {
        code,
        message: format!("{action}: {message}"),
        retryable,
    }
}

/// Whether a failure with this EC2 (or provider) error code may succeed if tried again later.
fn is_retryable(code: &str) -> bool {
    RETRYABLE_CODES.contains(&code)
}

fn invalid_configuration(message: impl Into<String>) -> ProviderError {
    ProviderError {
        code: "InvalidConfiguration".to_owned(),
        message: message.into(),
        retryable: false,
    }
}

/// The tags an instance is launched with: `Name`, the user's tags, then the tags TaskFly
/// relies on. A user's `Name` replaces TaskFly's; a user tag using one of TaskFly's own keys
/// is refused, since leak checks depend on them.
fn instance_tags(
    deployment_id: &str,
    node_id: &str,
    owner: Option<&str>,
    user: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let mut tags = Vec::with_capacity(user.len() + 4);
    if !user.contains_key("Name") {
        tags.push(("Name".to_owned(), format!("taskfly-{node_id}")));
    }
    for (key, value) in user {
        if key == DEPLOYMENT_TAG || key == NODE_TAG || key == OWNER_TAG {
            return Err(format!(
                "instance_config.aws.tags: `{key}` is set by TaskFly itself; remove it"
            ));
        }
        tags.push((key.clone(), value.clone()));
    }
    tags.push((DEPLOYMENT_TAG.to_owned(), deployment_id.to_owned()));
    tags.push((NODE_TAG.to_owned(), node_id.to_owned()));
    if let Some(owner) = owner {
        tags.push((OWNER_TAG.to_owned(), owner.to_owned()));
    }
    Ok(tags)
}

/// How `security_groups` is passed to RunInstances.
#[derive(Debug, PartialEq, Eq)]
enum SecurityGroups {
    /// `SecurityGroupIds`.
    Ids(Vec<String>),
    /// `SecurityGroups` (names; default VPC only).
    Names(Vec<String>),
    /// Nothing: the subnet's VPC applies its default group.
    SubnetDefault,
}

/// With a subnet, EC2 takes group ids only; the lone name `default` (also the value when the
/// field is left out) means the VPC's default group, which EC2 applies when none is given.
/// Without a subnet, groups are names in the default VPC, unless every entry is an id
/// (`sg-…`), which EC2 accepts there too.
fn security_groups(groups: &[String], has_subnet: bool) -> Result<SecurityGroups, String> {
    let all_ids = groups.iter().all(|g| is_group_id(g));
    if has_subnet {
        if groups.len() == 1 && groups[0] == "default" {
            return Ok(SecurityGroups::SubnetDefault);
        }
        if let Some(name) = groups.iter().find(|g| !is_group_id(g)) {
            return Err(format!(
                "instance_config.aws.security_groups: with subnet_id, give security group ids \
                 (sg-…); `{name}` is not one"
            ));
        }
        return Ok(SecurityGroups::Ids(groups.to_vec()));
    }
    if all_ids && !groups.is_empty() {
        Ok(SecurityGroups::Ids(groups.to_vec()))
    } else {
        Ok(SecurityGroups::Names(groups.to_vec()))
    }
}

fn is_group_id(group: &str) -> bool {
    group
        .strip_prefix("sg-")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The RunInstances idempotency token of one provisioning request: the same for every try of
/// the same request (the SDK's retries and the engine's backoff retries resend it unchanged,
/// so at most one instance is created), and different for another node, attempt or provision
/// token (a node provisioned again after a daemon restart gets a new token, so EC2 starts a new
/// instance rather than answering `IdempotentParameterMismatch` for the changed user data).
/// A one-way hash, so the token it is visible in (`DescribeInstances`) reveals nothing.
fn client_token(node_id: &str, attempt: u32, provision_token: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"taskfly ec2 client token\0");
    hash.update(node_id.as_bytes());
    hash.update(b"\0");
    hash.update(attempt.to_string().as_bytes());
    hash.update(b"\0");
    hash.update(provision_token.as_bytes());
    let digest = hash.finalize();
    format!("taskfly-{}", crate::auth::hex(&digest[..24]))
}

#[cfg(test)]
mod tests;
