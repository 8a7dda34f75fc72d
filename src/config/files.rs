//! `application_files`, and the rule every path written in `taskfly.yml` follows: it stays
//! inside the folder it is relative to.

use std::path::Path;

use serde_yaml::Value;

use super::diagnostics::{describe, item, Problems};
use super::values::string;

pub(super) fn parse_application_files(
    value: Option<&Value>,
    problems: &mut Problems,
) -> Vec<String> {
    let path = "application_files";
    let Some(value) = value else {
        problems.add(
            path,
            "required; list at least the script named by remote_script_to_run",
        );
        return Vec::new();
    };
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!(
                "expected a list of files, globs or directories (like [setup.sh, data/]), got {}",
                describe(value)
            ),
        );
        return Vec::new();
    };
    if items.is_empty() {
        problems.add(
            path,
            "the list is empty; list at least the script named by remote_script_to_run",
        );
    }
    let mut files = Vec::with_capacity(items.len());
    for (index, value) in items.iter().enumerate() {
        let path = item(path, index);
        let Some(file) = string(value, &path, problems) else {
            continue;
        };
        if leaves_folder(&file) {
            problems.add(
                &path,
                format!("{file:?} must be relative to taskfly.yml and stay inside its folder"),
            );
        }
        files.push(file);
    }
    files
}

/// Whether a path written in `taskfly.yml` could point outside the folder it is relative to:
/// absolute (including a Windows drive or a home directory `~`) or with a `..` component.
pub(super) fn leaves_folder(path: &str) -> bool {
    let bytes = path.as_bytes();
    let has_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    path.starts_with(['/', '\\', '~'])
        || has_drive
        || Path::new(path).is_absolute()
        || path.split(['/', '\\']).any(|part| part == "..")
}
