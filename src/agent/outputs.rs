//! Sending the node's outputs back (SPEC §2): once the script has ended, the files the
//! `outputs` patterns match in the bundle folder are packed and uploaded, before the final
//! status report.

use std::path::Path;

use super::files::remove_quietly;
use super::node::Node;
use crate::api::wire;
use crate::bundle;

/// The archive's name in the agent's work directory, while it is packed and uploaded.
const OUTPUTS_FILE: &str = "taskfly-outputs.tar.gz";

impl Node<'_> {
    /// Packs and uploads the outputs of the script run in `root`. Returns why they could not
    /// all be sent, if so (the daemon keeps what arrived); nothing when `outputs` is empty.
    pub(super) async fn send_outputs(&self, root: &Path) -> Option<String> {
        let patterns = self.registration.outputs.clone();
        if patterns.is_empty() {
            return None;
        }
        let archive = self.config.work_dir.join(OUTPUTS_FILE);
        let packed = {
            let (root, archive) = (root.to_path_buf(), archive.clone());
            tokio::task::spawn_blocking(move || -> crate::Result<bundle::PackedOutputs> {
                let file = std::io::BufWriter::new(create_archive(&archive)?);
                bundle::pack_outputs(&root, &patterns, &archive, file)
            })
            .await
        };
        let packed = match packed {
            Ok(Ok(packed)) => packed,
            Ok(Err(error)) => {
                remove_quietly(&archive).await;
                return Some(format!("cannot pack the outputs: {}", error.report()));
            }
            Err(error) => {
                remove_quietly(&archive).await;
                return Some(format!("cannot pack the outputs: {error}"));
            }
        };
        if packed.files.is_empty() {
            remove_quietly(&archive).await;
        }
        if !packed.skipped.is_empty() {
            for skipped in &packed.skipped {
                tracing::warn!(node_id = %self.node_id(), "outputs: left out {skipped}");
            }
            self.note(format!(
                "[taskfly agent: outputs left out: {}]",
                packed.skipped.join("; ")
            ))
            .await;
        }
        if packed.files.is_empty() {
            tracing::info!(node_id = %self.node_id(), "no outputs to upload: the patterns match no file");
            return None;
        }
        tracing::info!(
            node_id = %self.node_id(),
            files = packed.files.len(),
            bytes = packed.bytes,
            "uploading the outputs"
        );
        let uploaded = self.call(self.client.upload_outputs(&archive)).await;
        remove_quietly(&archive).await;
        match uploaded {
            Ok(stored) => {
                tracing::info!(node_id = %self.node_id(), files = stored.files, bytes = stored.bytes, "outputs uploaded");
                None
            }
            Err(error) => {
                tracing::warn!(node_id = %self.node_id(), error = %error.report(), "the outputs upload failed");
                Some(format!("the outputs upload failed: {}", error.report()))
            }
        }
    }

    /// One stderr line in the node's log, from the agent itself (best effort).
    async fn note(&self, line: String) {
        let request = wire::LogsRequest {
            lines: vec![wire::LogLineIn {
                stream: "stderr".to_owned(),
                line,
                timestamp: None,
                line_no: None,
            }],
            offset: None,
        };
        if let Err(error) = self.call(self.client.send_logs(&request)).await {
            tracing::warn!(node_id = %self.node_id(), error = %error.report(), "cannot send a note to the node's log");
        }
    }
}

/// Creates the archive file (mode 0600), replacing one a previous node left.
fn create_archive(path: &Path) -> crate::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| crate::Error::io(format!("cannot create {}", path.display()), e))
}
