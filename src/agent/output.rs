//! The script's output: cutting it into lines, and shipping them to the daemon in batches.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::node::Node;
use crate::api::wire;

/// The longest output line sent as one line; longer ones are split.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// A batch of output lines is sent when it has this many lines...
const BATCH_LINES: usize = 200;
/// ...or this many bytes of text, well below the daemon's body limit (4 MiB by default) even
/// once JSON escapes it (a daemon with a lower limit answers 413, and the batch is split)...
const BATCH_BYTES: usize = 512 * 1024;
/// ...or when its first line is this old, or when the script's output ends.
const BATCH_INTERVAL: Duration = Duration::from_millis(250);
/// After the script's group is gone, its output is read for at most this long (a process that
/// left the group may still hold the pipes open).
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Output lines on their way to the daemon: the batch being filled, and what was sent.
#[derive(Default)]
struct Shipping {
    batch: Vec<wire::LogLineIn>,
    /// Bytes of text in `batch`.
    bytes: usize,
    /// Lines handed to the daemon so far: numbers every batch, so a resent batch is
    /// recognised and stored once.
    sent: u64,
    /// Lines the daemon could not be given since the last marker saying so.
    dropped: u64,
}

impl Shipping {
    fn push(&mut self, line: wire::LogLineIn) {
        self.bytes += line.line.len();
        self.batch.push(line);
    }

    fn is_full(&self) -> bool {
        self.batch.len() >= BATCH_LINES || self.bytes >= BATCH_BYTES
    }
}

impl Node<'_> {
    /// Sends output lines to the daemon in batches until both streams have ended.
    pub(super) async fn ship_logs(&self, mut receiver: mpsc::Receiver<wire::LogLineIn>) {
        let mut shipping = Shipping::default();
        let mut flush_at: Option<Instant> = None;
        loop {
            let next = tokio::select! {
                line = receiver.recv() => line,
                () = sleep_until(flush_at) => {
                    self.send_batch(&mut shipping).await;
                    flush_at = None;
                    continue;
                }
            };
            match next {
                Some(line) => {
                    if shipping.batch.is_empty() {
                        flush_at = Some(Instant::now() + BATCH_INTERVAL);
                    }
                    shipping.push(line);
                    if shipping.is_full() {
                        self.send_batch(&mut shipping).await;
                        flush_at = None;
                    }
                }
                None => {
                    self.send_batch(&mut shipping).await;
                    if shipping.dropped > 0 {
                        // The last batch went nowhere: one more try to say so.
                        self.send_batch(&mut shipping).await;
                    }
                    return;
                }
            }
        }
    }

    /// Sends the batch, led by a line saying how many lines were dropped before, if any were.
    async fn send_batch(&self, shipping: &mut Shipping) {
        let mut lines = std::mem::take(&mut shipping.batch);
        shipping.bytes = 0;
        let dropped_before = shipping.dropped;
        if dropped_before > 0 {
            lines.insert(0, dropped_marker(dropped_before));
        }
        if lines.is_empty() {
            return;
        }
        let count = lines.len() as u64;
        let first = shipping.sent;
        shipping.sent += count;
        let lost = self.send_lines(lines, first).await;
        if lost == 0 {
            shipping.dropped = 0;
        } else {
            // The marker, if it was lost with them, is said again with the next batch.
            shipping.dropped = if dropped_before > 0 {
                dropped_before + lost - 1
            } else {
                lost
            };
        }
    }

    /// Sends `lines`, numbered from `first`; a batch the daemon finds too large (413) is split
    /// in two and each half sent. Returns how many lines could not be delivered.
    async fn send_lines(&self, lines: Vec<wire::LogLineIn>, first: u64) -> u64 {
        let mut pending = vec![(first, lines)];
        let mut lost = 0u64;
        while let Some((offset, lines)) = pending.pop() {
            let request = wire::LogsRequest {
                lines,
                offset: Some(offset),
            };
            let error = match self.call(self.client.send_logs(&request)).await {
                Ok(()) => continue,
                Err(error) => error,
            };
            let mut lines = request.lines;
            if error.is_conflict() {
                // 409: the daemon has ended the node and takes no more of its output (a batch
                // resent after a lost answer was counted before the node ended).
                tracing::warn!(node_id = %self.node_id(), lines = lines.len(), %error, "the daemon takes no more output of this node");
                return 0;
            }
            if error.is_too_large() && lines.len() > 1 {
                let second = lines.split_off(lines.len() / 2);
                let second_offset = offset + lines.len() as u64;
                // The first half goes first: the stack pops the last pushed.
                pending.push((second_offset, second));
                pending.push((offset, lines));
                continue;
            }
            tracing::warn!(
                node_id = %self.node_id(),
                lines = lines.len(),
                error = %error.report(),
                "could not send output lines to the daemon; the node's log will say so"
            );
            lost += lines.len() as u64;
        }
        lost
    }
}

/// The line that tells the node's log that `count` lines were lost on the way.
fn dropped_marker(count: u64) -> wire::LogLineIn {
    wire::LogLineIn {
        stream: Stream::Stderr.name().to_string(),
        line: format!(
            "[taskfly agent: {count} output line(s) could not be sent to the daemon and are missing here]"
        ),
        timestamp: Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
        line_no: None,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Reads one output stream to its end, sending each line to the shipper. Stops early when the
/// script's group has been gone for [`OUTPUT_DRAIN_TIMEOUT`] (a process outside the group still
/// holds the pipe). Returns the last non-empty line.
pub(super) async fn pump_lines<R: AsyncRead + Unpin>(
    reader: Option<R>,
    stream: Stream,
    sender: mpsc::Sender<wire::LogLineIn>,
    group_gone: &CancellationToken,
) -> Option<String> {
    let mut reader = reader?;
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut lines = Vec::new();
    let mut last = None;
    let mut buffer = vec![0u8; 16 * 1024];
    let drain_deadline = async {
        group_gone.cancelled().await;
        tokio::time::sleep(OUTPUT_DRAIN_TIMEOUT).await;
    };
    tokio::pin!(drain_deadline);
    loop {
        let read = tokio::select! {
            read = reader.read(&mut buffer) => read,
            () = &mut drain_deadline => {
                tracing::warn!(
                    stream = stream.name(),
                    "a process outside the script's group keeps its output open; no longer reading it"
                );
                break;
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => splitter.push(&buffer[..n], &mut lines),
            Err(e) => {
                tracing::warn!(stream = stream.name(), error = %e, "cannot read the script's output");
                break;
            }
        }
        if !forward(&sender, stream, &mut lines, &mut last).await {
            return last;
        }
    }
    splitter.finish(&mut lines);
    forward(&sender, stream, &mut lines, &mut last).await;
    last
}

/// Sends `lines` to the shipper; false if it is gone.
async fn forward(
    sender: &mpsc::Sender<wire::LogLineIn>,
    stream: Stream,
    lines: &mut Vec<String>,
    last: &mut Option<String>,
) -> bool {
    let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    for line in lines.drain(..) {
        if !line.trim().is_empty() {
            *last = Some(line.clone());
        }
        let line = wire::LogLineIn {
            stream: stream.name().to_string(),
            line,
            timestamp: Some(timestamp.clone()),
            line_no: None,
        };
        if sender.send(line).await.is_err() {
            return false;
        }
    }
    true
}

/// Cuts a byte stream into lines: strips `\n` and `\r\n`, decodes lossy UTF-8, and splits a line
/// longer than `max` bytes into pieces of at most `max` bytes (at a character boundary when the
/// line is valid UTF-8), so nothing is lost and no line is unbounded.
struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    fn new(max: usize) -> LineSplitter {
        LineSplitter {
            pending: Vec::new(),
            max: max.max(4),
        }
    }

    /// Adds `data`, appending every line it completes to `out`.
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(at) = data.iter().position(|byte| *byte == b'\n') {
            self.pending.extend_from_slice(&data[..at]);
            if self.pending.last() == Some(&b'\r') {
                self.pending.pop();
            }
            self.split_long(0, out);
            out.push(String::from_utf8_lossy(&self.pending).into_owned());
            self.pending.clear();
            data = &data[at + 1..];
        }
        self.pending.extend_from_slice(data);
        // One byte more is kept back: it may be the `\r` of a `\r\n` still to come.
        self.split_long(1, out);
    }

    /// Ends the stream: a last line without a newline is still a line.
    fn finish(&mut self, out: &mut Vec<String>) {
        if self.pending.is_empty() {
            return;
        }
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        self.split_long(0, out);
        out.push(String::from_utf8_lossy(&self.pending).into_owned());
        self.pending.clear();
    }

    fn split_long(&mut self, keep_back: usize, out: &mut Vec<String>) {
        while self.pending.len() > self.max + keep_back {
            let at = char_boundary_before(&self.pending, self.max);
            out.push(String::from_utf8_lossy(&self.pending[..at]).into_owned());
            self.pending.drain(..at);
        }
    }
}

/// The largest index `<= max` (and at least `max - 3`) that does not fall inside a UTF-8
/// character of `bytes`; `max` itself if there is none. `bytes` is longer than `max`.
fn char_boundary_before(bytes: &[u8], max: usize) -> usize {
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|at| *at > 0 && bytes[*at] & 0xC0 != 0x80)
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn lines_are_split_stripped_and_capped() {
        assert_eq!(
            lines(&[b"one\ntw", b"o\r\n", b"\nthree"], 64),
            ["one", "two", "", "three"]
        );
        assert_eq!(lines(&[b"a\r", b"\nb\n"], 64), ["a", "b"]);
        assert_eq!(lines(&[b"bad \xff byte\n"], 64), ["bad \u{fffd} byte"]);
        assert_eq!(lines(&[b""], 64), Vec::<String>::new());
        // A long line is cut into pieces of at most `max` bytes; nothing is lost.
        assert_eq!(lines(&[b"abcdefghij", b"k\n"], 4), ["abcd", "efgh", "ijk"]);
        // A piece never cuts a multi-byte character in two.
        let text = "ééééé\n";
        let pieces = lines(&[text.as_bytes()], 5);
        assert_eq!(pieces, ["éé", "éé", "é"]);
        // A line of exactly `max` bytes whose `\r\n` arrives later stays one line.
        assert_eq!(lines(&[b"abcd\r", b"\n"], 4), ["abcd"]);
        // The real cap.
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let pieces = lines(&[&long, b"\n"], MAX_LINE_BYTES);
        assert_eq!(
            pieces.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
        );
    }
}
