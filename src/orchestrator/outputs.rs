//! Node outputs (SPEC §1 `outputs`, §4.2 `POST /nodes/outputs`): each node attempt's upload
//! stored in the deployment's folder, and all of them served back as one archive.
//!
//! Storage: `<deployment folder>/outputs/<index>-<attempt>.tar` (folder 0700, files 0600), a
//! plain tar of the entries that passed the bundle rules. An upload is written to a file of
//! its own and renamed into place, so a resent upload replaces the attempt's archive whole;
//! a newer attempt's archive replaces the older ones. Cleanup removes the deployment's folder,
//! and these with it.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use super::{create_private_file, Orchestrator};
use crate::bundle::{self, BundleLimits};
use crate::error::{Error, Result};
use crate::state::model::Node;

/// The folder of a deployment's outputs, inside its folder.
const OUTPUTS_DIR: &str = "outputs";

/// The size of the pieces an [`OutputsReader`] hands over.
const CHUNK_BYTES: usize = 64 * 1024;

/// How much of a refused upload is read on before answering.
const DRAIN_BYTES: u64 = 64 << 20;

/// How long reading a refused upload on may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// What one upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredOutputs {
    /// Regular files stored.
    pub(crate) files: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
}

impl Orchestrator {
    /// `POST /nodes/outputs`: stores the gzip tar `upload` as the outputs of the node's current
    /// attempt, checked entry by entry as it streams in (never held in memory).
    ///
    /// Refused once the node's attempt is final ([`Error::is_already_final`], 409). An upload
    /// over a limit ([`Config::output_limits`](super::Config::output_limits)) is refused
    /// ([`Error::is_too_large`]) and what arrived before the limit is kept as the attempt's
    /// outputs; a hostile or broken upload ([`Error::is_invalid_bundle`]) stores nothing.
    pub(crate) async fn node_outputs(
        &self,
        node: &Node,
        upload: impl AsyncRead + Unpin + Send + 'static,
    ) -> Result<StoredOutputs> {
        if node.status.is_final() {
            return Err(Error::already_final(format!(
                "node {} is {}: it takes no more outputs",
                node.id, node.status
            )));
        }
        let dir = self.deployment_dir(&node.deployment_id).join(OUTPUTS_DIR);
        create_private_dir(&dir).await?;
        let limits = self.inner.config.output_limits;
        let others = stored_bytes_except(&dir, node.index).await?;
        let remaining = limits.max_deployment_bytes.saturating_sub(others);
        let per_node = limits.max_node_bytes <= remaining;
        let bundle_limits = BundleLimits {
            max_total_bytes: limits.max_node_bytes.min(remaining),
            max_files: limits.max_node_files,
        };
        let final_path = dir.join(archive_name(node.index, node.attempt));
        let part_path = dir.join(format!(
            "{}.part-{}",
            archive_name(node.index, node.attempt),
            crate::auth::new_id()?
        ));
        let mut part = create_private_file(&part_path)?;
        let bridge = tokio_util::io::SyncIoBridge::new(upload);
        let (received, outcome, upload) = tokio::task::spawn_blocking(move || {
            let mut reader = io::BufReader::with_capacity(CHUNK_BYTES, bridge);
            let (received, outcome) =
                bundle::receive_outputs(&mut reader, &mut part, &bundle_limits);
            let synced = part
                .sync_all()
                .map_err(|e| Error::io("cannot store the outputs", e));
            (
                received,
                outcome.and(synced),
                reader.into_inner().into_inner(),
            )
        })
        .await
        .map_err(|e| Error::io("storing the outputs failed", io::Error::other(e)))?;
        if outcome.is_err() {
            drain(upload).await;
        }
        let keep = match &outcome {
            Ok(()) => true,
            Err(e) => e.is_too_large(),
        };
        if !keep {
            let _ = tokio::fs::remove_file(&part_path).await;
            return Err(outcome
                .err()
                .unwrap_or_else(|| Error::invalid_bundle("the outputs upload was refused")));
        }
        tokio::fs::rename(&part_path, &final_path)
            .await
            .map_err(|e| Error::io(format!("cannot store {}", final_path.display()), e))?;
        remove_older_attempts(&dir, node.index, node.attempt).await;
        tracing::info!(
            node_id = %node.id,
            attempt = node.attempt,
            files = received.files,
            bytes = received.bytes,
            complete = outcome.is_ok(),
            "outputs stored"
        );
        match outcome {
            Ok(()) => Ok(StoredOutputs {
                files: received.files,
                bytes: received.bytes,
            }),
            Err(e) => {
                let limit = if per_node {
                    format!(
                        "the per-node limit of {} bytes and {} entries",
                        limits.max_node_bytes, limits.max_node_files
                    )
                } else {
                    format!(
                        "the deployment's limit of {} bytes for all its nodes ({others} bytes already stored)",
                        limits.max_deployment_bytes
                    )
                };
                Err(Error::too_large(format!(
                    "the outputs of node {} are over {limit}; the {} files ({} bytes) that arrived before are kept: {e}",
                    node.index, received.files, received.bytes
                )))
            }
        }
    }

    /// The outputs of a deployment's nodes (or of node `node` alone) as one gzip tar whose
    /// entries are `node-<index>/<path>`, with each file's permission bits. Each node's
    /// outputs are those of its newest attempt. The archive is written while it is read,
    /// never built in memory; a deployment without outputs gives an empty archive.
    ///
    /// ```no_run
    /// # async fn example(engine: taskfly::Orchestrator) -> Result<(), Box<dyn std::error::Error>> {
    /// // Every node's outputs, as `taskfly outputs` downloads them.
    /// let mut archive = engine.outputs("dep-0123456789abcdef", None).await?;
    /// let mut file = tokio::fs::File::create("outputs.tar.gz").await?;
    /// tokio::io::copy(&mut archive, &mut file).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: [`Error::is_not_found`] for an unknown deployment, or a node index it does not
    /// have. A stored archive that cannot be read ends the stream with an I/O error.
    pub async fn outputs(&self, id: &str, node: Option<u32>) -> Result<OutputsReader> {
        let detail = self.deployment(id).await?;
        if let Some(index) = node {
            if !detail.nodes.iter().any(|n| n.index == index) {
                return Err(Error::not_found(format!(
                    "deployment `{id}` has no node {index} (it has {} nodes, 0 to {})",
                    detail.nodes.len(),
                    detail.nodes.len().saturating_sub(1)
                )));
            }
        }
        let dir = self.deployment_dir(id).join(OUTPUTS_DIR);
        let sources: Vec<(String, PathBuf)> = detail
            .nodes
            .iter()
            .filter(|n| node.is_none_or(|index| n.index == index))
            .map(|n| {
                (
                    format!("node-{}", n.index),
                    dir.join(archive_name(n.index, n.attempt)),
                )
            })
            .collect();
        let (sender, receiver) = mpsc::channel(4);
        self.inner.tasks.spawn_blocking(move || {
            let mut writer = ChunkWriter {
                sender: sender.clone(),
                buffer: Vec::with_capacity(CHUNK_BYTES),
            };
            let written = bundle::write_outputs_archive(&sources, &mut writer).and_then(|()| {
                writer
                    .send()
                    .map_err(|e| Error::io("cannot send the outputs", e))
            });
            if let Err(e) = written {
                // A reader that went away is no failure; anything else ends its stream.
                let _ = sender.blocking_send(Err(io::Error::other(e.report().to_string())));
            }
        });
        Ok(OutputsReader {
            receiver,
            chunk: Bytes::new(),
        })
    }
}

/// The archive of [`Orchestrator::outputs`], read as it is written (a gzip tar).
///
/// Dropping it stops the writing.
pub struct OutputsReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl std::fmt::Debug for OutputsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputsReader").finish_non_exhaustive()
    }
}

impl AsyncRead for OutputsReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.chunk.is_empty() {
            match self.receiver.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(chunk))) => self.chunk = chunk,
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        let piece = self.chunk.split_to(n);
        buf.put_slice(&piece);
        Poll::Ready(Ok(()))
    }
}

/// The blocking writer side of an [`OutputsReader`]: full chunks go to the reader; a reader
/// that went away makes every write fail, which stops the archive.
struct ChunkWriter {
    sender: mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl io::Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = CHUNK_BYTES - self.buffer.len();
        let n = buf.len().min(room);
        self.buffer.extend_from_slice(&buf[..n]);
        if self.buffer.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads (and drops) what is left of a refused upload, up to [`DRAIN_BYTES`] within
/// [`DRAIN_TIME`], so that the agent, still sending, gets the answer rather than a reset
/// connection.
async fn drain(mut upload: impl AsyncRead + Unpin) {
    let mut rest = tokio::io::AsyncReadExt::take(&mut upload, DRAIN_BYTES);
    let _ = tokio::time::timeout(
        DRAIN_TIME,
        tokio::io::copy(&mut rest, &mut tokio::io::sink()),
    )
    .await;
}

/// The stored archive of one node attempt.
fn archive_name(index: u32, attempt: u32) -> String {
    format!("{index}-{attempt}.tar")
}

/// The index and attempt of a stored archive's file name.
fn parse_archive_name(name: &str) -> Option<(u32, u32)> {
    let (index, attempt) = name.strip_suffix(".tar")?.split_once('-')?;
    Some((index.parse().ok()?, attempt.parse().ok()?))
}

async fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(|e| Error::io(format!("cannot set the mode of {}", dir.display()), e))
}

/// The bytes of every stored archive but those of node `index`.
async fn stored_bytes_except(dir: &Path, index: u32) -> Result<u64> {
    let unreadable = |e| Error::io(format!("cannot read {}", dir.display()), e);
    let mut entries = tokio::fs::read_dir(dir).await.map_err(unreadable)?;
    let mut total = 0u64;
    while let Some(entry) = entries.next_entry().await.map_err(unreadable)? {
        let name = entry.file_name();
        let Some((node, _)) = name.to_str().and_then(parse_archive_name) else {
            continue;
        };
        if node != index {
            if let Ok(meta) = entry.metadata().await {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

/// Removes node `index`'s archives of attempts before `attempt`: the newest attempt's
/// outputs are the node's.
async fn remove_older_attempts(dir: &Path, index: u32, attempt: u32) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        if let Some((node, older)) = name.to_str().and_then(parse_archive_name) {
            if node == index && older < attempt {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }
}
