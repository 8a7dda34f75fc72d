//! One registered node, from the first state report to the last: what the agent tells the
//! daemon, and how a call to it ends once the agent is cancelled.

use std::future::Future;
use std::process::ExitStatus;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::files::BundleFiles;
use super::script::failure_message;
use super::{AgentConfig, AgentReport};
use crate::api::client::Client;
use crate::api::wire;
use crate::error::{Error, Result};
use crate::state::model::NodeStatus;
/// Once cancelled, each remaining call to the daemon gets at most this long.
const AFTER_CANCEL_BUDGET: Duration = Duration::from_secs(3);

/// One registered node.
pub(super) struct Node<'a> {
    pub(super) config: &'a AgentConfig,
    pub(super) registration: wire::RegisterResponse,
    /// Authenticated with the node token.
    pub(super) client: Client,
    /// Cancellation from the agent's owner.
    pub(super) cancel: CancellationToken,
    /// Fired by `cancel` or by a heartbeat answer asking the node to stop.
    pub(super) stop: CancellationToken,
    /// What to remove of the bundle once the node has ended, set just before extracting it.
    pub(super) bundle_files: std::sync::OnceLock<BundleFiles>,
    /// The running script's process group (0 when none runs), for the resource readings
    /// heartbeats carry.
    pub(super) script_group: std::sync::atomic::AtomicI32,
    /// Where the bundle was extracted, for its disk use.
    pub(super) bundle_root: std::sync::OnceLock<std::path::PathBuf>,
}

/// Why the script's supervision ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The script's leader exited by itself.
    Exited(ExitStatus),
    /// The daemon asked the node to stop, or the agent was cancelled.
    Stopped,
    /// `nodes.timeout` elapsed.
    TimedOut(Duration),
}

impl Node<'_> {
    pub(super) fn node_id(&self) -> &str {
        &self.registration.node_id
    }

    /// The values of the node's secret variables.
    fn secrets(&self) -> Vec<&str> {
        let registration = &self.registration;
        registration
            .secret_names
            .iter()
            .filter_map(|name| registration.env.get(name).map(String::as_str))
            .collect()
    }

    /// Everything after registration.
    pub(super) async fn serve(&self) -> Result<AgentReport> {
        if let Err(error) = self.report(NodeStatus::DownloadingAssets, None, None).await {
            return self.stopped_or(error);
        }
        let prepared = match self.prepare().await {
            Ok(Some(prepared)) => prepared,
            Ok(None) => return Ok(AgentReport::terminated(self.node_id())),
            Err(problem) => {
                tracing::warn!(node_id = %self.node_id(), "cannot run the script: {problem}");
                return self.fail(problem, None).await;
            }
        };
        if self.stop.is_cancelled() {
            return Ok(AgentReport::terminated(self.node_id()));
        }
        if let Err(error) = self.report(NodeStatus::RunningScript, None, None).await {
            return self.stopped_or(error);
        }
        tracing::info!(node_id = %self.node_id(), script = %self.registration.script, "running the script");
        let (ending, last_stderr) = match self.run_script(&prepared).await {
            Ok(outcome) => outcome,
            Err(problem) => {
                tracing::warn!(node_id = %self.node_id(), "cannot run the script: {problem}");
                return self.fail(problem, None).await;
            }
        };
        if matches!(ending, Ending::Stopped) {
            return Ok(AgentReport::terminated(self.node_id()));
        }
        // The outputs go before the final report, whatever the script's end: a failed run's
        // partial results help find out why.
        let outputs_failed = self.send_outputs(&prepared.root).await;
        if self.stop.is_cancelled() {
            return Ok(AgentReport::terminated(self.node_id()));
        }
        let with_outputs = |message: String| match &outputs_failed {
            Some(why) => format!("{message}; {why}"),
            None => message,
        };
        match ending {
            Ending::Stopped => Ok(AgentReport::terminated(self.node_id())),
            Ending::TimedOut(limit) => {
                let message = format!("timed out after {}", humantime::format_duration(limit));
                self.fail(with_outputs(message), None).await
            }
            Ending::Exited(status) if status.success() && outputs_failed.is_some() => {
                // The script's work did not all come back: the node failed (with exit code 0),
                // so it shows, and a retry runs it again.
                let why = outputs_failed.unwrap_or_default();
                self.fail(format!("the script completed, but {why}"), Some(0))
                    .await
            }
            Ending::Exited(status) if status.success() => {
                if let Err(error) = self.report(NodeStatus::Completed, None, Some(0)).await {
                    return self.stopped_or(error);
                }
                Ok(AgentReport {
                    node_id: self.node_id().to_string(),
                    exit_code: Some(0),
                    status: NodeStatus::Completed,
                    message: None,
                })
            }
            Ending::Exited(status) => {
                let (exit_code, message) =
                    failure_message(status, last_stderr.as_deref(), &self.secrets());
                self.fail(with_outputs(message), exit_code).await
            }
        }
    }

    /// Reports `failed` with `message` and returns the matching report. The message is not
    /// logged: it may quote the script's stderr, which may hold a secret; the daemon masks
    /// secrets before it stores or shows it.
    async fn fail(&self, message: String, exit_code: Option<i32>) -> Result<AgentReport> {
        tracing::info!(node_id = %self.node_id(), exit_code = ?exit_code, "node failed");
        if let Err(error) = self
            .report(NodeStatus::Failed, Some(message.clone()), exit_code)
            .await
        {
            return self.stopped_or(error);
        }
        Ok(AgentReport {
            node_id: self.node_id().to_string(),
            exit_code,
            status: NodeStatus::Failed,
            message: Some(message),
        })
    }

    /// A report the daemon did not take is an error, unless the node is being stopped anyway
    /// or the daemon has moved the node on itself (409: it failed or terminated the node, for
    /// example while this report's first try went unanswered): the node then ends here.
    fn stopped_or(&self, error: Error) -> Result<AgentReport> {
        if self.stop.is_cancelled() {
            Ok(AgentReport::terminated(self.node_id()))
        } else if error.is_conflict() {
            tracing::warn!(node_id = %self.node_id(), %error, "the daemon has ended this node; the agent stops");
            self.stop.cancel();
            Ok(AgentReport::terminated(self.node_id()))
        } else {
            Err(error)
        }
    }

    async fn report(
        &self,
        status: NodeStatus,
        message: Option<String>,
        exit_code: Option<i32>,
    ) -> Result<()> {
        let request = wire::StatusRequest {
            status,
            message,
            exit_code,
        };
        self.call(self.client.report_status(&request)).await
    }

    /// Runs a daemon call; once the agent is cancelled the call gets only a short while more, so
    /// an agent whose daemon is gone (daemon shutdown) still ends promptly.
    pub(super) async fn call<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(call);
        tokio::select! {
            biased;
            answer = &mut call => return answer,
            () = self.cancel.cancelled() => {}
        }
        match tokio::time::timeout(AFTER_CANCEL_BUDGET, call).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::transport(
                "gave up waiting for the daemon: the agent is shutting down",
            )),
        }
    }
}
