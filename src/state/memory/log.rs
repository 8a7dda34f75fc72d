//! A deployment's log as [`super::MemoryStore`] keeps it: one vector of compact lines in `seq`
//! order for the whole deployment, and a few counters per node.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::state::{dropped_lines_marker, LogLine, LogQuery, LogStream, NewLogLine};

/// One stored line. Its node's id is kept once per node ([`NodeLog::node_id`]), not per line.
#[derive(Debug)]
struct StoredLine {
    seq: u64,
    timestamp: SystemTime,
    line: Box<str>,
    node_index: u32,
    attempt: u32,
    stream: LogStream,
    /// Dropped to keep within the caps; taken out of `lines` at the next compaction.
    removed: bool,
}

/// One node's share of a [`DeploymentLog`].
#[derive(Debug)]
struct NodeLog {
    /// The id its lines came with; `None` when it is `<deployment id>-<index>`, as the
    /// engine names nodes (the id is then not kept at all).
    node_id: Option<Box<str>>,
    /// Its lines stored, its marker not included.
    stored: usize,
    /// The `seq` of the line saying how many of its lines were dropped, older than the others.
    marker: Option<u64>,
    dropped: u64,
    /// No line of its own older than this `seq` is stored, its marker aside: where the search
    /// for its oldest lines starts.
    oldest: u64,
}

impl NodeLog {
    /// Lines stored, its marker included.
    fn stored_with_marker(&self) -> usize {
        self.stored + usize::from(self.marker.is_some())
    }
}

/// A deployment's log: lines in `seq` order, dropped lines marked until compaction, and per
/// node only counters (no list of its lines): 56 bytes per line plus its text, and about
/// 120 bytes per node that wrote (its counters and line-number entries).
#[derive(Debug, Default)]
pub(super) struct DeploymentLog {
    lines: Vec<StoredLine>,
    /// How many of `lines` are marked removed.
    removed: usize,
    nodes: HashMap<u32, NodeLog>,
    last_seq: u64,
    /// Per node index, attempt and stream, the next line number expected; lower ones are
    /// resent duplicates. (Numbers rise within each stream whichever way an agent numbers
    /// them.) A node index stands for one node id in a deployment, as the engine names them.
    next_line_no: HashMap<(u32, u32, LogStream), u64>,
}

/// The index in a node id named `<deployment_id>-<index>`, if it is named so.
pub(super) fn canonical_index(deployment_id: &str, node_id: &str) -> Option<u32> {
    let digits = node_id.strip_prefix(deployment_id)?.strip_prefix('-')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

impl DeploymentLog {
    /// Lines stored, markers included.
    fn len(&self) -> usize {
        self.lines.len() - self.removed
    }

    /// Appends `lines` of deployment `deployment_id` (resent duplicates dropped), then keeps
    /// each node within `node_cap` lines and the whole log within `deployment_cap`; the `seq`
    /// of the last stored line.
    pub(super) fn append(
        &mut self,
        deployment_id: &str,
        lines: Vec<NewLogLine>,
        node_cap: usize,
        deployment_cap: usize,
    ) -> u64 {
        let mut touched = Vec::new();
        for line in lines {
            if let Some(line_no) = line.line_no {
                let next = self
                    .next_line_no
                    .entry((line.node_index, line.attempt, line.stream))
                    .or_insert(0);
                if line_no < *next {
                    continue;
                }
                *next = line_no + 1;
            }
            self.last_seq += 1;
            let node = self.nodes.entry(line.node_index).or_insert_with(|| {
                let canonical = canonical_index(deployment_id, &line.node_id);
                NodeLog {
                    node_id: (canonical != Some(line.node_index))
                        .then(|| line.node_id.clone().into_boxed_str()),
                    stored: 0,
                    marker: None,
                    dropped: 0,
                    oldest: 0,
                }
            });
            node.stored += 1;
            if !touched.contains(&line.node_index) {
                touched.push(line.node_index);
            }
            self.lines.push(StoredLine {
                seq: self.last_seq,
                timestamp: line.timestamp,
                line: line.line.into_boxed_str(),
                node_index: line.node_index,
                attempt: line.attempt,
                stream: line.stream,
                removed: false,
            });
        }
        self.enforce_caps(&touched, node_cap, deployment_cap);
        self.last_seq
    }

    /// The highest line number taken for node `node_index`'s `attempt` and `stream`.
    pub(super) fn last_line_no(
        &self,
        node_index: u32,
        attempt: u32,
        stream: LogStream,
    ) -> Option<u64> {
        self.next_line_no
            .get(&(node_index, attempt, stream))
            .and_then(|next| next.checked_sub(1))
    }

    /// The index of the node whose lines came with `node_id`, when it differs from the
    /// `<deployment id>-<index>` the engine gives.
    pub(super) fn index_of_odd_node_id(&self, node_id: &str) -> Option<u32> {
        self.nodes
            .iter()
            .find(|(_, node)| node.node_id.as_deref() == Some(node_id))
            .map(|(&index, _)| index)
    }

    /// Whether node `index`'s lines came with the id `<deployment id>-<index>`.
    pub(super) fn has_canonical_id(&self, index: u32) -> bool {
        self.nodes
            .get(&index)
            .is_none_or(|node| node.node_id.is_none())
    }

    /// A page of lines, oldest first, as `query` asks.
    pub(super) fn page(&self, deployment_id: &str, query: &LogQuery) -> Vec<LogLine> {
        let first = self.lines.partition_point(|l| l.seq <= query.after);
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for line in self.lines[first..]
            .iter()
            .filter(|l| !l.removed)
            .filter(|l| query.node_index.is_none_or(|i| l.node_index == i))
        {
            if !query.has_room(page.len(), bytes, line.line.len()) {
                break;
            }
            bytes += line.line.len();
            let node_id = match self.nodes.get(&line.node_index) {
                Some(NodeLog {
                    node_id: Some(odd), ..
                }) => odd.to_string(),
                _ => crate::state::model::node_id(deployment_id, line.node_index),
            };
            page.push(LogLine {
                seq: line.seq,
                node_id,
                node_index: line.node_index,
                stream: line.stream,
                line: line.line.to_string(),
                timestamp: line.timestamp,
                attempt: line.attempt,
            });
        }
        page
    }

    /// Gives back the room a growing log reserved: for a deployment that has ended.
    pub(super) fn shrink(&mut self) {
        self.compact();
        self.lines.shrink_to_fit();
        self.nodes.shrink_to_fit();
        self.next_line_no.shrink_to_fit();
    }

    /// Lines held, those removed but not yet taken out included.
    #[cfg(test)]
    pub(super) fn capacity_used(&self) -> usize {
        self.lines.len()
    }

    /// Takes the removed lines out.
    fn compact(&mut self) {
        if self.removed > 0 {
            self.lines.retain(|l| !l.removed);
            self.removed = 0;
        }
    }

    /// The position of the stored line `seq` in `lines`.
    fn position(&self, seq: u64) -> Option<usize> {
        let at = self.lines.partition_point(|l| l.seq < seq);
        (self.lines.get(at)?.seq == seq).then_some(at)
    }

    /// Drop the oldest `count` (at least 1, at most all) lines of node `index`: the newest
    /// of them becomes its marker, the previous marker goes.
    fn drop_oldest(&mut self, index: u32, count: usize) {
        let Some(node) = self.nodes.get(&index) else {
            return;
        };
        let (marker, oldest) = (node.marker, node.oldest);
        let count = count.min(node.stored);
        let mut newest = None;
        let mut taken = 0;
        let mut next_oldest = self.last_seq + 1;
        let start = self.lines.partition_point(|l| l.seq < oldest);
        for (at, line) in self.lines.iter_mut().enumerate().skip(start) {
            if line.node_index != index || line.removed || Some(line.seq) == marker {
                continue;
            }
            if taken == count {
                next_oldest = line.seq;
                break;
            }
            line.removed = true;
            taken += 1;
            newest = Some(at);
        }
        let Some(newest) = newest else {
            return;
        };
        let old_marker = marker.and_then(|seq| self.position(seq));
        if let Some(at) = old_marker {
            self.lines[at].removed = true;
        }
        let Some(node) = self.nodes.get_mut(&index) else {
            return;
        };
        node.stored -= taken;
        node.dropped += taken as u64;
        node.oldest = next_oldest;
        let line = &mut self.lines[newest];
        line.removed = false;
        line.stream = LogStream::Stderr;
        line.line = dropped_lines_marker(index, node.dropped).into_boxed_str();
        node.marker = Some(line.seq);
        // The dropped lines but the one kept as the marker, and the old marker.
        self.removed += taken - 1 + usize::from(old_marker.is_some());
        if self.removed > 64 && self.removed > self.lines.len() / 2 {
            self.compact();
        }
    }

    /// Lines of node `index` to drop so it stores at most `cap` (its marker included).
    fn excess(&self, index: u32, cap: usize) -> usize {
        self.nodes.get(&index).map_or(0, |node| {
            if node.stored_with_marker() > cap {
                node.stored + 1 - cap
            } else {
                0
            }
        })
    }

    /// Keep each node in `touched` within `node_cap` lines and the whole log within
    /// `deployment_cap`, dropping from the node holding the most.
    fn enforce_caps(&mut self, touched: &[u32], node_cap: usize, deployment_cap: usize) {
        for &index in touched {
            let excess = self.excess(index, node_cap);
            if excess > 0 {
                self.drop_oldest(index, excess);
            }
        }
        while self.len() > deployment_cap {
            let Some((&index, node)) = self
                .nodes
                .iter()
                .filter(|(_, node)| node.stored > 0)
                .max_by_key(|(index, node)| {
                    (node.stored_with_marker(), std::cmp::Reverse(**index))
                })
            else {
                break;
            };
            let over = self.len() - deployment_cap;
            let count = over + usize::from(node.marker.is_none());
            self.drop_oldest(index, count);
        }
    }
}
