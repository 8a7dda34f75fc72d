//! The node-side calls: registration, assets, heartbeats, status reports and logs. Each
//! retries transient failures (see [`super::retry`]), so an agent survives a daemon restart.

use std::path::Path;

use hyper::{Method, StatusCode};

use super::retry::Failure;
use super::{
    decode, error_text, status_failure, Call, Client, Downloaded, Registration, GZIP,
    REGISTER_TIMEOUT, UPLOAD_TIMEOUT,
};
use crate::api::wire;
use crate::error::{Error, Result};

impl Client {
    /// `POST /nodes/register`: trades the node's provision token for its work order and node
    /// token. Retries transient failures.
    ///
    /// For a token that may get an answer other than a work order (a pooled instance's token),
    /// use [`Client::register_for_work`]: here "no work yet" (204) and "retired" (410) are
    /// [`Error::is_transport`] errors saying so.
    pub async fn register(&self, provision_token: &str) -> Result<wire::RegisterResponse> {
        match self.register_for_work(provision_token).await? {
            Registration::Assigned(registration) => Ok(registration),
            Registration::NoWork => Err(Error::transport(format!(
                "the daemon at {} has no work for this token yet (204 No Content): it is a \
                 pooled instance's token, which waits for work with `register_for_work`",
                self.base
            ))),
            Registration::Retired { reason } => Err(Error::transport(format!(
                "the daemon at {} retired the pooled instance of this token (410 Gone): {reason}",
                self.base
            ))),
        }
    }

    /// `POST /nodes/register`, as the agent of a pooled instance calls it again and again (with
    /// the `next_token` of its last work order): a work order, no work yet, or the instance
    /// retired.
    ///
    /// The daemon may hold the request for about 20 s before it answers "no work yet", so
    /// this call is allowed at least 60 s whatever [`Client::timeout`] says. Retries transient
    /// failures (connection problems, 429, 502, 503, 504, time-outs) like [`Client::register`].
    ///
    /// Errors: any other answer, with the kind of its status (401 is
    /// [`Error::is_unauthorized`]: the token is unknown, or the daemon forgot the instance).
    ///
    /// ```no_run
    /// # async fn example(token: &str) -> taskfly::Result<()> {
    /// use taskfly::{Client, Registration};
    /// let client = Client::new("http://127.0.0.1:8080", None)?;
    /// loop {
    ///     match client.register_for_work(token).await? {
    ///         Registration::Assigned(work) => println!("serving {}", work.node_id),
    ///         Registration::NoWork => continue,
    ///         Registration::Retired { reason } => {
    ///             println!("retired: {reason}");
    ///             return Ok(());
    ///         }
    ///         _ => return Ok(()),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn register_for_work(&self, provision_token: &str) -> Result<Registration> {
        let call = self.register_call(provision_token)?;
        self.retrying("register", || async {
            let (status, body) = self.exchange(&call).await?;
            match status {
                StatusCode::NO_CONTENT => Ok(Registration::NoWork),
                StatusCode::GONE => Ok(Registration::Retired {
                    reason: error_text(status, &body),
                }),
                status if status.is_success() => decode(&call, &body)
                    .map(Registration::Assigned)
                    .map_err(Failure::permanent),
                status => Err(status_failure(status, &body)),
            }
        })
        .await
    }

    /// The registration request, with a time limit longer than the daemon's hold.
    pub(super) fn register_call(&self, provision_token: &str) -> Result<Call> {
        // One nonce per registration, sent again with each retry of it: a retry after a lost
        // answer is then recognised as this registration, not a second use of the token.
        let request = wire::RegisterRequest {
            provision_token: provision_token.to_string(),
            nonce: Some(crate::auth::new_token()?),
        };
        Ok(Call::new(Method::POST, "/nodes/register".to_string())
            .json(&request)?
            .timeout(self.timeout.max(REGISTER_TIMEOUT)))
    }

    /// `GET /nodes/assets`: streams the worker bundle into `dest_file` (created or truncated,
    /// mode 0600) chunk by chunk, never holding the whole body in memory. Returns the number of
    /// bytes written. Retries transient failures, starting the file over each time.
    pub async fn download_assets(&self, dest_file: &Path) -> Result<u64> {
        self.download_assets_or_keep(dest_file, None)
            .await
            .map(|downloaded| downloaded.bytes())
    }

    /// `GET /nodes/assets` as [`Client::download_assets`], except that a bundle the answer
    /// announces at no more than `in_memory_up_to` bytes is kept in memory instead: the
    /// agent's path for small bundles, which then costs no file (nor its `fsync`) per node.
    pub(crate) async fn download_assets_or_keep(
        &self,
        dest_file: &Path,
        in_memory_up_to: Option<u64>,
    ) -> Result<Downloaded> {
        let call = Call::new(Method::GET, "/nodes/assets".to_string());
        self.retrying("download_assets", || {
            self.download_attempt(&call, "assets", dest_file, in_memory_up_to)
        })
        .await
    }

    /// `POST /nodes/heartbeat`: tells the daemon the node is alive; the answer says whether the
    /// daemon wants the script stopped. Retries transient failures.
    pub async fn heartbeat(&self) -> Result<wire::HeartbeatResponse> {
        self.heartbeat_with(&wire::HeartbeatRequest::default())
            .await
    }

    /// `POST /nodes/heartbeat` carrying `request` (the script's resources: SPEC §4.2).
    /// Retries transient failures.
    pub async fn heartbeat_with(
        &self,
        request: &wire::HeartbeatRequest,
    ) -> Result<wire::HeartbeatResponse> {
        let call = Call::new(Method::POST, "/nodes/heartbeat".to_string()).json(request)?;
        self.json_retrying("heartbeat", &call).await
    }

    /// `POST /nodes/status`: reports a node state (`downloading_assets`, `running_script`,
    /// `completed`, `failed`). Retries transient failures.
    pub async fn report_status(&self, status: &wire::StatusRequest) -> Result<()> {
        let call = Call::new(Method::POST, "/nodes/status".to_string()).json(status)?;
        self.retrying("report_status", || self.attempt(&call))
            .await
            .map(drop)
    }

    /// `POST /nodes/outputs`: uploads the node's outputs, the gzip tar `archive`, streamed
    /// from disk. Retries transient failures, sending the whole file again (the daemon keeps
    /// the last upload of an attempt). A 413 ([`Error::is_too_large`]) says which limit was
    /// reached; the daemon kept what arrived before it.
    pub async fn upload_outputs(&self, archive: &Path) -> Result<wire::OutputsStored> {
        let call = Call::new(Method::POST, "/nodes/outputs".to_string())
            .file_body(archive, GZIP)
            .timeout(self.timeout.max(UPLOAD_TIMEOUT));
        self.json_retrying("upload_outputs", &call).await
    }

    /// `POST /nodes/logs`: sends a batch of output lines, in the order they were written.
    /// Retries transient failures.
    pub async fn send_logs(&self, logs: &wire::LogsRequest) -> Result<()> {
        let call = Call::new(Method::POST, "/nodes/logs".to_string()).json(logs)?;
        self.retrying("send_logs", || self.attempt(&call))
            .await
            .map(drop)
    }
}
