//! `outputs`: the files each node sends back once its script has ended (SPEC §1).

use serde_yaml::Value;

use super::diagnostics::{describe, item, Problems};
use super::files::leaves_folder;
use super::values::string;

/// The most `outputs` patterns a deployment may list.
const MAX_OUTPUT_PATTERNS: usize = 100;

/// Reads `outputs`: an optional list of files, globs or folders, relative to the node's bundle
/// folder and never outside it. Absent means the nodes send nothing back.
pub(super) fn parse_outputs(value: Option<&Value>, problems: &mut Problems) -> Vec<String> {
    let path = "outputs";
    let Some(value) = value else {
        return Vec::new();
    };
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!(
                "expected a list of files, globs or folders (like [results/*.csv, out/]), got {}",
                describe(value)
            ),
        );
        return Vec::new();
    };
    if items.len() > MAX_OUTPUT_PATTERNS {
        problems.add(
            path,
            format!(
                "{} patterns are more than {MAX_OUTPUT_PATTERNS}; name a folder or use a glob",
                items.len()
            ),
        );
    }
    let mut patterns = Vec::with_capacity(items.len());
    for (index, value) in items.iter().enumerate() {
        let path = item(path, index);
        let Some(pattern) = string(value, &path, problems) else {
            continue;
        };
        if leaves_folder(&pattern) {
            problems.add(
                &path,
                format!(
                    "{pattern:?} must be relative to the node's bundle folder and stay inside it \
                     (no leading `/` or `~`, no `..`)"
                ),
            );
        } else if pattern.contains(['\n', '\r', '\0']) {
            problems.add(
                &path,
                format!("{pattern:?} holds a line break or NUL; write one pattern per item"),
            );
        } else if let Err(e) = glob::Pattern::new(&pattern) {
            problems.add(
                &path,
                format!("{pattern:?} is not a valid glob pattern: {}", e.msg),
            );
        }
        patterns.push(pattern);
    }
    patterns
}
