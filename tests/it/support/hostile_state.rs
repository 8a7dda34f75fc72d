//! "Nothing changed": everything a refused request could have touched, captured before it and
//! compared after it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use super::engine_provider::RecordingProvider;
use super::TestEngine;

/// One path under the data dir: whether it is a directory, and a file's size and modification
/// time. A directory's own time is left out: a refused upload creates and removes its
/// deployment's folder, which touches `deployments/` without changing what it holds.
type Entry = (bool, u64, Option<SystemTime>);

/// The engine's deployments (every field of every node), every path under its data dir, and
/// what its provider was asked to do.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    deployments: Vec<taskfly::state::model::Deployment>,
    files: BTreeMap<String, Entry>,
    provisioned: usize,
    terminated: Vec<String>,
}

impl Snapshot {
    /// What `engine` (and `provider`, when the engine uses it) holds now.
    pub async fn take(engine: &TestEngine, provider: Option<&RecordingProvider>) -> Snapshot {
        Snapshot {
            deployments: engine.engine.deployments().await.expect("deployments"),
            files: tree(engine.data_dir.path()),
            provisioned: provider.map_or(0, |p| p.provisioned().len()),
            terminated: provider
                .map(RecordingProvider::terminated)
                .unwrap_or_default(),
        }
    }

    /// How many deployments there are.
    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }

    /// Fails the test, saying what differs, unless `engine` holds exactly what it held when
    /// this snapshot was taken.
    #[track_caller]
    pub fn assert_unchanged(&self, now: &Snapshot, what: &str) {
        assert_eq!(
            self.deployments.len(),
            now.deployments.len(),
            "{what}: the number of deployments changed"
        );
        for (before, after) in self.deployments.iter().zip(&now.deployments) {
            assert_eq!(before, after, "{what}: a deployment changed");
        }
        let added: Vec<&String> = now
            .files
            .keys()
            .filter(|k| !self.files.contains_key(*k))
            .collect();
        let removed: Vec<&String> = self
            .files
            .keys()
            .filter(|k| !now.files.contains_key(*k))
            .collect();
        assert!(
            added.is_empty() && removed.is_empty(),
            "{what}: paths under the data dir added {added:?}, removed {removed:?}"
        );
        assert_eq!(self.files, now.files, "{what}: a file changed");
        assert_eq!(
            self.provisioned, now.provisioned,
            "{what}: an instance was provisioned"
        );
        assert_eq!(
            self.terminated, now.terminated,
            "{what}: an instance was terminated"
        );
    }
}

/// Every path under `root` (symbolic links not followed), relative to it.
pub fn tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut found = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let relative = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let is_dir = metadata.is_dir();
            let entry = if is_dir {
                (true, 0, None)
            } else {
                (false, metadata.len(), metadata.modified().ok())
            };
            found.insert(relative, entry);
            if is_dir {
                pending.push(path);
            }
        }
    }
    found
}
