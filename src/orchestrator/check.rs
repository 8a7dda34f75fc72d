//! What a deployment must pass before it is accepted, beyond `taskfly.yml` read on its own: the
//! file's size, the daemon's node maximum, `remote_script_to_run` among the bundled files, the
//! provider registered and accepting its section. One code path for the engine's deploy
//! ([`Orchestrator::deploy_bundle`](super::Orchestrator::deploy_bundle)) and for checking a
//! project without deploying it ([`Config::check_dir`]), so `taskfly validate` passes exactly
//! what `taskfly run` and `taskfly up` accept.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::Config;
use crate::bundle::resolve_application_files;
use crate::config::{invalid_config, DeploymentConfig, CONFIG_FILE_NAME};
use crate::error::{Error, Result};
use crate::provider::{LocalProvider, Owner, Provider, Registered};

/// The engine's limits and providers a deployment is checked against.
pub(super) struct Checks<'a> {
    pub(super) providers: &'a HashMap<String, Registered>,
    pub(super) max_nodes: u32,
    pub(super) max_config_bytes: usize,
}

impl Checks<'_> {
    /// A `taskfly.yml` of `len` bytes over the limit: refused before it is parsed.
    pub(super) fn config_size(&self, len: usize) -> Result<()> {
        if len > self.max_config_bytes {
            return Err(Error::too_large(format!(
                "taskfly.yml is {len} bytes, more than this daemon's {}-byte limit",
                self.max_config_bytes
            )));
        }
        Ok(())
    }

    /// Every problem of a parsed `config` whose bundle holds `bundle_files` (`None` when they
    /// could not be listed), each as `<field path>: <what is wrong>`, for deployment
    /// `deployment_id`. An error only when the provider fails in another way than refusing
    /// its settings.
    pub(super) fn problems(
        &self,
        config: &DeploymentConfig,
        bundle_files: Option<&[String]>,
        deployment_id: &str,
    ) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        if config.nodes.count > self.max_nodes {
            problems.push(format!(
                "nodes.count: {} is more than this daemon allows ({})",
                config.nodes.count, self.max_nodes
            ));
        }
        if let Some(files) = bundle_files {
            if !files.iter().any(|f| f == &config.remote_script_to_run) {
                problems.push(format!(
                    "remote_script_to_run: `{}` is not in the bundle; add it to application_files",
                    config.remote_script_to_run
                ));
            }
        }
        let provider_name = config.cloud_provider.as_str();
        let Some(provider) = self.providers.get(provider_name) else {
            let mut registered: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            registered.sort_unstable();
            problems.push(format!(
                "cloud_provider: `{provider_name}` is not available in this build of TaskFly{} \
                 (registered: {})",
                if provider_name == "aws" {
                    " (build it with the `aws` feature)"
                } else {
                    ""
                },
                registered.join(", ")
            ));
            return Ok(problems);
        };
        // The provider judges its own settings now, so a deployment it cannot run is refused
        // before anything starts.
        let first = Owner::Node {
            deployment_id: deployment_id.to_owned(),
            node_id: format!("{deployment_id}-0"),
            node_index: 0,
            attempt: 1,
        };
        if let Err(e) = provider
            .provider()
            .instance_kind(&config.provider_settings(), &first)
        {
            match e.downcast::<Error>() {
                Ok(e) if e.is_invalid_config() => problems.extend(e.details().iter().cloned()),
                Ok(e) => {
                    return Err(Error::provider(
                        format!("{provider_name} refused the deployment"),
                        e,
                    ))
                }
                Err(e) => {
                    return Err(Error::provider(
                        format!("{provider_name} refused the deployment"),
                        e,
                    ))
                }
            }
        }
        Ok(problems)
    }
}

impl Config {
    /// Checks the project in `dir` as an engine with these settings would when deploying it
    /// ([`Orchestrator::deploy_dir`](super::Orchestrator::deploy_dir)), without deploying it
    /// or writing anything: `taskfly.yml` itself, its size, the files `application_files`
    /// selects, `remote_script_to_run` among them, the node maximum, and the provider named by
    /// `cloud_provider` (registered with [`Config::provider`], or the built-in `local`)
    /// accepting its `instance_config` section.
    ///
    /// # Errors
    ///
    /// An [`is_invalid_config`](Error::is_invalid_config) error listing every problem found
    /// (`taskfly.yml`'s own first: the others need a readable file), an
    /// [`is_too_large`](Error::is_too_large) one for a file over the size limit, and an
    /// [`is_io`](Error::is_io) one when `dir` or its files cannot be read.
    pub fn check_dir(&self, dir: &Path) -> Result<DeploymentConfig> {
        let path = dir.join(CONFIG_FILE_NAME);
        let local;
        let mut providers = self.providers.clone();
        if !providers.contains_key("local") {
            local = Arc::new(LocalProvider::new(self.data_dir.join("work")));
            providers.insert(
                "local".to_owned(),
                Registered::Plain(local as Arc<dyn Provider>),
            );
        }
        let checks = Checks {
            providers: &providers,
            max_nodes: self.max_nodes,
            max_config_bytes: self.max_config_bytes,
        };
        if let Ok(metadata) = std::fs::metadata(&path) {
            checks.config_size(usize::try_from(metadata.len()).unwrap_or(usize::MAX))?;
        }
        let config = DeploymentConfig::from_dir(dir)?;
        let mut problems = Vec::new();
        let files = match resolve_application_files(dir, &config.application_files) {
            Ok(files) => Some(
                files
                    .iter()
                    .filter_map(|f| f.to_str().map(str::to_owned))
                    .collect::<Vec<_>>(),
            ),
            Err(e) if e.is_invalid_config() => {
                problems.extend(e.details().iter().cloned());
                None
            }
            Err(e) => return Err(e),
        };
        problems.extend(checks.problems(&config, files.as_deref(), "<deployment-id>")?);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid_config(&path.display().to_string(), problems))
        }
    }
}
