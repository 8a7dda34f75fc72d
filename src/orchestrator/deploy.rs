//! Accepting a deployment: the client bundle split into `taskfly.yml` and the worker bundle, the
//! config validated, the deployment and its nodes stored, provisioning started.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWriteExt};

use super::check::Checks;
use super::{create_private_file, Live, Orchestrator, WORKER_BUNDLE};

use crate::auth;
use crate::bundle;
use crate::config::{invalid_config, DeploymentConfig, CONFIG_FILE_NAME};
use crate::error::{Error, Result};
use crate::metadata::MetadataGenerator;
use crate::state::model::{Deployment, DeploymentStatus, DeploymentSummary};
use crate::sync::lock;

impl Orchestrator {
    /// Bundle the project in `dir` (its `taskfly.yml` and `application_files`) and deploy it.
    pub async fn deploy_dir(&self, dir: &Path) -> Result<DeploymentSummary> {
        let config = DeploymentConfig::from_dir(dir)?;
        let uploads = self.inner.config.data_dir.join("uploads");
        tokio::fs::create_dir_all(&uploads)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", uploads.display()), e))?;
        let path = uploads.join(format!("{}.tar.gz", auth::new_id()?));
        let file = create_private_file(&path)?;
        let project = dir.to_path_buf();
        let patterns = config.application_files.clone();
        let written = tokio::task::spawn_blocking(move || {
            bundle::write_client_bundle(&project, &patterns, std::io::BufWriter::new(file))
        })
        .await
        .map_err(|e| Error::io("bundling failed", std::io::Error::other(e)))?;
        let result = match written {
            Ok(_) => match tokio::fs::File::open(&path).await {
                Ok(file) => self.deploy_bundle(file).await,
                Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
            },
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    /// Deploy a client bundle (a gzip tar holding `taskfly.yml` and the application files),
    /// read from `bundle`. Returns once the deployment is accepted; nodes are provisioned in
    /// the background.
    pub async fn deploy_bundle(
        &self,
        mut bundle: impl AsyncRead + Unpin + Send,
    ) -> Result<DeploymentSummary> {
        let id = format!("dep-{}", auth::new_id()?);
        let dir = self.deployment_dir(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let result = self.accept_bundle(&id, &dir, &mut bundle).await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }

    pub(super) async fn accept_bundle(
        &self,
        id: &str,
        dir: &Path,
        bundle: &mut (impl AsyncRead + Unpin + Send),
    ) -> Result<DeploymentSummary> {
        // The client bundle holds taskfly.yml, secrets included: private file, deleted once
        // split into the worker bundle and the config.
        let client_path = dir.join("client.tar.gz");
        let limit = self.inner.config.max_bundle_upload;
        {
            let file = create_private_file(&client_path)?;
            let mut file = tokio::fs::File::from_std(file);
            let mut limited = tokio::io::AsyncReadExt::take(&mut *bundle, limit + 1);
            let copied = tokio::io::copy(&mut limited, &mut file)
                .await
                .map_err(|e| Error::io("cannot receive the bundle", e))?;
            if copied > limit {
                return Err(Error::too_large(format!(
                    "the bundle is larger than the {limit}-byte upload limit"
                )));
            }
            file.flush()
                .await
                .map_err(|e| Error::io("cannot store the bundle", e))?;
        }
        let worker_path = dir.join(WORKER_BUNDLE);
        let limits = self.inner.config.bundle_limits;
        let (client_for_split, worker_for_split) = (client_path.clone(), worker_path.clone());
        let (yaml, summary) = tokio::task::spawn_blocking(move || -> Result<_> {
            let client = std::fs::File::open(&client_for_split)
                .map_err(|e| Error::io("cannot read the stored bundle", e))?;
            // Private like the client bundle: it holds the application's files.
            let worker = create_private_file(&worker_for_split)?;
            let mut worker = std::io::BufWriter::new(worker);
            let split =
                bundle::split_client_bundle(std::io::BufReader::new(client), &mut worker, &limits)?;
            std::io::Write::flush(&mut worker)
                .map_err(|e| Error::io("cannot write the worker bundle", e))?;
            Ok(split)
        })
        .await
        .map_err(|e| Error::io("bundle processing failed", std::io::Error::other(e)))??;
        let _ = tokio::fs::remove_file(&client_path).await;

        let checks = Checks {
            providers: &self.inner.providers,
            max_nodes: self.inner.config.max_nodes,
            max_config_bytes: self.inner.config.max_config_bytes,
        };
        checks.config_size(yaml.len())?;
        let config = DeploymentConfig::from_yaml(&yaml)?;
        let problems = checks.problems(&config, Some(&summary.files), id)?;
        if !problems.is_empty() {
            return Err(invalid_config(CONFIG_FILE_NAME, problems));
        }
        let provider_name = config.cloud_provider.as_str().to_owned();
        let metadata = MetadataGenerator::new(&config.nodes)?;
        std::io::Write::write_all(
            &mut create_private_file(&dir.join(CONFIG_FILE_NAME))?,
            yaml.as_bytes(),
        )
        .map_err(|e| Error::io("cannot store taskfly.yml", e))?;

        let now = SystemTime::now();
        let total = config.nodes.count;
        let deployment = Deployment {
            id: id.to_owned(),
            status: DeploymentStatus::Pending,
            cloud_provider: provider_name.clone(),
            total_nodes: total,
            retries: config.nodes.retries,
            nodes_completed: 0,
            nodes_failed: 0,
            nodes_terminated: 0,
            created_at: now,
            updated_at: now,
            completed_at: None,
            error_message: None,
            rerun_of: None,
            cleaned_at: None,
        };
        let created = self
            .start(
                deployment,
                (0..total).collect(),
                Arc::new(Live::new(config, metadata)),
            )
            .await?;
        tracing::info!(deployment_id = %id, nodes = total, provider = %provider_name, files = summary.files.len(), "deployment accepted");
        Ok(created)
    }

    /// Store a new deployment (its files already in its folder) and its nodes, new ones of
    /// `node_indexes`, and start provisioning them in the background.
    pub(super) async fn start(
        &self,
        deployment: Deployment,
        node_indexes: Vec<u32>,
        live: Arc<Live>,
    ) -> Result<DeploymentSummary> {
        let created = DeploymentSummary::from(&deployment);
        let id = deployment.id.clone();
        let total = deployment.total_nodes;
        let published = deployment.clone();
        // Noted before it is stored, so a recovery still running never sees it unnoted.
        if let Some(created) = lock(&self.inner.created_during_recovery).as_mut() {
            created.insert(id.clone());
        }
        self.inner
            .store
            .create_deployment_with_indexes(deployment.clone(), &node_indexes)
            .await?;
        self.inner.metrics.deployment_created(&id, total);
        self.publish_deployment(published);
        lock(&self.inner.live).insert(id.clone(), live.clone());
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            if let Err(e) = this.provision_all(&id, live, node_indexes).await {
                tracing::error!(deployment_id = %id, error = %e.report(), "provisioning stopped");
            }
        });
        Ok(created)
    }
}
