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

#[cfg(test)]
mod tests {
    use crate::config::DeploymentConfig;

    fn yml(outputs: &str) -> String {
        format!(
            "cloud_provider: local\napplication_files: [setup.sh]\nnodes: {{count: 1}}\noutputs: {outputs}\n"
        )
    }

    #[test]
    fn outputs_are_relative_globs_files_or_folders() {
        let config = DeploymentConfig::from_yaml(&yml("[results/*.csv, summary.json, out/]"))
            .expect("valid");
        assert_eq!(config.outputs, ["results/*.csv", "summary.json", "out/"]);
        let none = DeploymentConfig::from_yaml(
            "cloud_provider: local\napplication_files: [setup.sh]\nnodes: {count: 1}\n",
        )
        .expect("valid");
        assert!(none.outputs.is_empty());
    }

    #[test]
    fn outputs_leaving_the_folder_or_malformed_are_refused_with_their_index() {
        let error = DeploymentConfig::from_yaml(&yml(
            "[ok.txt, /etc/passwd, ../up, \"a\\nb\", \"[x\", 3, ~/home]",
        ))
        .expect_err("refused");
        let details = error.details().join("\n");
        for expected in [
            "outputs[1]: \"/etc/passwd\" must be relative",
            "outputs[2]: \"../up\" must be relative",
            "outputs[3]: \"a\\nb\" holds a line break",
            "outputs[4]: \"[x\" is not a valid glob pattern",
            "outputs[5]:",
            "outputs[6]: \"~/home\" must be relative",
        ] {
            assert!(details.contains(expected), "{expected} in {details}");
        }
        assert!(!details.contains("outputs[0]"), "{details}");
        let error = DeploymentConfig::from_yaml(&yml("results/")).expect_err("not a list");
        assert!(
            error.details()[0].starts_with("outputs: expected a list"),
            "{error:?}"
        );
    }
}
