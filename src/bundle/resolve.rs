//! Resolving `application_files`: which project files a client bundle holds.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::CONFIG_FILE;
use crate::{Error, Result};

/// Resolves the `application_files` patterns of `taskfly.yml` against `project_dir`.
///
/// Each pattern is a file, a glob (`*`, `?`, `[...]`, and `**` for any number of directories) or
/// a directory, which is taken recursively. Symbolic links inside the project are followed and
/// bundled as what they point to. The result is every matched regular file as a path relative
/// to `project_dir`, sorted and without duplicates; the top-level `taskfly.yml` is never listed,
/// since [`write_client_bundle`](super::write_client_bundle) adds it on its own.
///
/// # Errors
///
/// An invalid-config error whose details list every problem at once, each starting with
/// `application_files[i]: "<pattern>"`: an absolute pattern, a `..` component, a pattern that
/// matches nothing, a match (or a symbolic link under a matched directory) that resolves outside
/// the project, a broken link, a link loop, or a file that is neither regular nor a directory.
/// An invalid-config error also when `project_dir` has no `taskfly.yml`, and an I/O error when
/// `project_dir` cannot be opened.
pub fn resolve_application_files(project_dir: &Path, patterns: &[String]) -> Result<Vec<PathBuf>> {
    let root = fs::canonicalize(project_dir).map_err(|e| {
        Error::io(
            format!(
                "cannot open the project directory {}",
                project_dir.display()
            ),
            e,
        )
    })?;
    let config_path = project_dir.join(CONFIG_FILE);
    match fs::metadata(&config_path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(Error::invalid_config(
                format!("{} is not a regular file", config_path.display()),
                Vec::new(),
            ))
        }
        Err(e) => {
            return Err(Error::invalid_config(
                format!("cannot read {}", config_path.display()),
                Vec::new(),
            )
            .with_source(e))
        }
    }

    let mut resolver = Resolver {
        root,
        files: BTreeSet::new(),
        problems: Vec::new(),
    };
    for (index, pattern) in patterns.iter().enumerate() {
        let label = format!("application_files[{index}]: {pattern:?}");
        resolver.add_pattern(&label, pattern);
    }
    if !resolver.problems.is_empty() {
        return Err(Error::invalid_config(
            "application_files names files that cannot be bundled",
            resolver.problems,
        ));
    }
    Ok(resolver.files.into_iter().map(PathBuf::from).collect())
}

/// The state of one [`resolve_application_files`] call.
struct Resolver {
    /// The canonical project directory; every bundled file must resolve under it.
    root: PathBuf,
    /// The relative paths found so far, as `/`-separated text (sorted and deduplicated).
    files: BTreeSet<String>,
    /// Every problem found so far, each starting with the pattern's label.
    problems: Vec<String>,
}

impl Resolver {
    /// Resolves one pattern, recording its files or its problems.
    fn add_pattern(&mut self, label: &str, pattern: &str) {
        if pattern.is_empty() {
            self.problems.push(format!("{label} is empty"));
            return;
        }
        let path = Path::new(pattern);
        if path.has_root() || path.is_absolute() {
            self.problems.push(format!(
                "{label} is an absolute path; application files are relative to taskfly.yml"
            ));
            return;
        }
        if path.components().any(|c| c == Component::ParentDir) {
            self.problems.push(format!(
                "{label} has a \"..\" component; application files must be inside the project directory"
            ));
            return;
        }

        // A name that exists as written is taken literally, even if it contains glob characters.
        let literal = self.root.join(path);
        let exists = fs::symlink_metadata(&literal).is_ok();
        if exists || !has_glob_characters(pattern) {
            if exists {
                self.add_match(label, &literal);
            } else {
                self.problems.push(format!("{label} matches no file"));
            }
            return;
        }

        let Some(root_text) = self.root.to_str() else {
            self.problems.push(format!(
                "{label} is a glob, but the project directory's path {} is not UTF-8",
                self.root.display()
            ));
            return;
        };
        let full_pattern = format!("{}/{}", glob::Pattern::escape(root_text), pattern);
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let paths = match glob::glob_with(&full_pattern, options) {
            Ok(paths) => paths,
            Err(e) => {
                self.problems
                    .push(format!("{label} is not a valid glob pattern: {}", e.msg));
                return;
            }
        };
        let mut matched = false;
        for found in paths {
            matched = true;
            match found {
                Ok(found) => self.add_match(label, &found),
                Err(e) => self.problems.push(format!(
                    "{label}: cannot read {}: {}",
                    self.relative_text(e.path()),
                    e.error()
                )),
            }
        }
        if !matched {
            self.problems.push(format!("{label} matches no file"));
        }
    }

    /// Adds one path that a pattern matched: a file, or a directory taken recursively. `path`
    /// is lexically under the root; it must also resolve under it.
    fn add_match(&mut self, label: &str, path: &Path) {
        let Some(relative) = self.relative(label, path) else {
            return;
        };
        let Some(canonical) = self.resolve_inside_root(label, path, &relative, "resolves to")
        else {
            return;
        };
        match fs::metadata(&canonical) {
            Ok(meta) if meta.is_dir() => {
                let mut ancestors = vec![canonical];
                self.walk(label, path, &relative, &mut ancestors);
            }
            Ok(meta) if meta.is_file() => self.add_file(relative),
            Ok(_) => self.problems.push(format!(
                "{label}: {relative} is neither a regular file nor a directory"
            )),
            Err(e) => self
                .problems
                .push(format!("{label}: cannot read {relative}: {e}")),
        }
    }

    /// Adds every file under the directory `dir` (whose relative path is `relative`; empty for
    /// the project root). `ancestors` holds the canonical paths of the directories being walked,
    /// so that a symbolic link back to one of them is reported instead of walked forever.
    fn walk(&mut self, label: &str, dir: &Path, relative: &str, ancestors: &mut Vec<PathBuf>) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.problems.push(format!(
                    "{label}: cannot read the directory {}: {e}",
                    shown_relative(relative)
                ));
                return;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.problems.push(format!(
                        "{label}: cannot read the directory {}: {e}",
                        shown_relative(relative)
                    ));
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                self.problems.push(format!(
                    "{label}: the file name {:?} in {} is not UTF-8",
                    name,
                    shown_relative(relative)
                ));
                continue;
            };
            let child_relative = if relative.is_empty() {
                name.to_owned()
            } else {
                format!("{relative}/{name}")
            };
            let child = entry.path();
            let file_type = match entry.file_type() {
                Ok(file_type) => file_type,
                Err(e) => {
                    self.problems
                        .push(format!("{label}: cannot read {child_relative}: {e}"));
                    continue;
                }
            };

            if file_type.is_dir() {
                let Some(parent) = ancestors.last() else {
                    continue;
                };
                ancestors.push(parent.join(name));
                self.walk(label, &child, &child_relative, ancestors);
                ancestors.pop();
            } else if file_type.is_file() {
                self.add_file(child_relative);
            } else if file_type.is_symlink() {
                self.add_linked(label, &child, child_relative, ancestors);
            } else {
                self.problems.push(format!(
                    "{label}: {child_relative} is neither a regular file, a directory nor a symbolic link"
                ));
            }
        }
    }

    /// Adds what the symbolic link `link`, found while walking a directory, points to: a file's
    /// content, or a directory's files under the link's own path.
    fn add_linked(
        &mut self,
        label: &str,
        link: &Path,
        relative: String,
        ancestors: &mut Vec<PathBuf>,
    ) {
        let Some(canonical) =
            self.resolve_inside_root(label, link, &relative, "is a symbolic link to")
        else {
            return;
        };
        match fs::metadata(&canonical) {
            Ok(meta) if meta.is_dir() => {
                if ancestors.contains(&canonical) {
                    self.problems.push(format!(
                        "{label}: {relative} is a symbolic link to a directory that contains it (a loop)"
                    ));
                    return;
                }
                ancestors.push(canonical);
                self.walk(label, link, &relative, ancestors);
                ancestors.pop();
            }
            Ok(meta) if meta.is_file() => self.add_file(relative),
            Ok(_) => self.problems.push(format!(
                "{label}: {relative} links to something that is neither a regular file nor a directory"
            )),
            Err(e) => self
                .problems
                .push(format!("{label}: cannot read {relative}: {e}")),
        }
    }

    /// The canonical path of `path` (shown as `relative`), or `None` with a problem recorded
    /// when it is a broken symbolic link, cannot be resolved, or resolves outside the root.
    /// `leads_to` words how the path reaches its target in that last problem ("resolves to",
    /// "is a symbolic link to").
    fn resolve_inside_root(
        &mut self,
        label: &str,
        path: &Path,
        relative: &str,
        leads_to: &str,
    ) -> Option<PathBuf> {
        let canonical = match fs::canonicalize(path) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.problems
                    .push(format!("{label}: {relative} is a broken symbolic link"));
                return None;
            }
            Err(e) => {
                self.problems
                    .push(format!("{label}: cannot resolve {relative}: {e}"));
                return None;
            }
        };
        if !canonical.starts_with(&self.root) {
            self.problems.push(format!(
                "{label}: {relative} {leads_to} {}, outside the project directory",
                canonical.display()
            ));
            return None;
        }
        Some(canonical)
    }

    /// Records one file, unless it is the top-level `taskfly.yml`.
    fn add_file(&mut self, relative: String) {
        if relative != CONFIG_FILE {
            self.files.insert(relative);
        }
    }

    /// The `/`-separated path of `path` relative to the root, or `None` (with a problem
    /// recorded) when it is not UTF-8.
    fn relative(&mut self, label: &str, path: &Path) -> Option<String> {
        let stripped = path.strip_prefix(&self.root).unwrap_or(path);
        let mut parts = Vec::new();
        // The pattern was checked to be relative and free of `..`, and glob matches start with
        // the root, so only normal components and meaningless `.` ones can remain.
        for component in stripped.components() {
            let Component::Normal(part) = component else {
                continue;
            };
            let Some(part) = part.to_str() else {
                self.problems
                    .push(format!("{label}: the file name {stripped:?} is not UTF-8"));
                return None;
            };
            parts.push(part);
        }
        Some(parts.join("/"))
    }

    /// A relative path for messages, without failing on non-UTF-8 names.
    fn relative_text(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Whether `pattern` contains a character that makes it a glob.
fn has_glob_characters(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// A relative directory path for messages, naming the root as such.
fn shown_relative(relative: &str) -> &str {
    if relative.is_empty() {
        "the project directory"
    } else {
        relative
    }
}
