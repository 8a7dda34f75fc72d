//! Collecting the problems of a `taskfly.yml` with the path of the field each concerns: the
//! problem list, the checked reading of a mapping's fields, the suggestion of the field probably
//! meant, and how values and YAML syntax errors are described in messages.

use std::fmt;

use serde_yaml::Value;

use super::tree::is_huge_integer;
use super::CONFIG_FILE_NAME;

/// How an integer too large for 64 bits is described (never with its digits).
pub(super) const HUGE_INTEGER: &str =
    "an integer too large for 64 bits (quote it to pass it on as text)";
use crate::error::{Error, Result};

/// Every problem found so far, each formatted as `"<field path>: <what is wrong>"`.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<String>);

impl Problems {
    pub(super) fn add(&mut self, path: &str, what: impl fmt::Display) {
        self.0.push(format!("{path}: {what}"));
    }

    /// `value` if no problem was found, else the error naming them all.
    pub(super) fn into_result<T>(self, value: T) -> Result<T> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error(CONFIG_FILE_NAME))
        }
    }

    /// The error for an invalid file; `file` is how the message names it.
    pub(super) fn into_error(self, file: &str) -> Error {
        let mut details = self.0;
        if details.is_empty() {
            // Every path that refuses a file records why, so this is only a safety net.
            details.push(format!(
                "{CONFIG_FILE_NAME}: could not be read as a deployment"
            ));
        }
        let count = details.len();
        let plural = if count == 1 { "" } else { "s" };
        Error::invalid_config(
            format!("{file} is invalid ({count} problem{plural})"),
            details,
        )
    }
}

/// The path of field `name` inside the field at `path` (the top level when `path` is empty).
pub(super) fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The path of item `index` of the list at `path`.
pub(super) fn item(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// The fields of one YAML mapping, read with their names checked against the known ones.
pub(super) struct Fields<'a> {
    path: String,
    entries: Vec<(&'a str, &'a Value)>,
}

impl<'a> Fields<'a> {
    /// Reads `value` as a mapping whose field names must be among `known`, reporting every
    /// unknown one. An empty value (`field:` with nothing after it) has no fields. Returns
    /// `None`, after reporting it, when `value` is not a mapping.
    pub(super) fn read(
        value: &'a Value,
        path: &str,
        known: &[&str],
        problems: &mut Problems,
    ) -> Option<Fields<'a>> {
        let label = if path.is_empty() {
            CONFIG_FILE_NAME
        } else {
            path
        };
        let map = match value {
            Value::Null => {
                return Some(Fields {
                    path: path.to_owned(),
                    entries: Vec::new(),
                })
            }
            Value::Mapping(map) => map,
            other => {
                problems.add(
                    label,
                    format!(
                        "expected a mapping with the fields {}, got {}",
                        known.join(", "),
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let mut entries = Vec::new();
        for (key, value) in map {
            let Some(name) = key.as_str() else {
                problems.add(
                    label,
                    format!("field names must be strings, got {}", describe(key)),
                );
                continue;
            };
            if known.contains(&name) {
                entries.push((name, value));
            } else {
                problems.add(&child(path, name), unknown_field(name, known));
            }
        }
        Some(Fields {
            path: path.to_owned(),
            entries,
        })
    }

    /// The value of field `name`, or `None` when it is absent or empty.
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(field, _)| *field == name)
            .map(|(_, value)| *value)
            // serde_yaml sees through tags, so the marked huge integer would pass for null.
            .filter(|value| !value.is_null() || is_huge_integer(value))
    }

    /// The path of field `name`.
    pub(super) fn path(&self, name: &str) -> String {
        child(&self.path, name)
    }
}

/// The message for an unknown field, naming the closest known one or else all of them.
fn unknown_field(name: &str, known: &[&str]) -> String {
    match closest(name, known.iter().copied()) {
        Some(meant) => format!("unknown field; did you mean `{meant}`?"),
        None => format!("unknown field; valid fields are {}", known.join(", ")),
    }
}

/// The candidate `name` was most likely meant to be, if one is close enough: within one edit
/// for short names and two for longer ones, ignoring case and `-` versus `_`.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Beyond this length a name is not a typo of a field, and comparing it would only cost time.
    const LONGEST_COMPARED: usize = 64;
    if name.chars().count() > LONGEST_COMPARED {
        return None;
    }
    let wanted = normalize(name);
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let distance = edit_distance(&wanted, &normalize(candidate));
            let allowed = (candidate.chars().count() / 3).clamp(1, 2);
            (distance <= allowed).then_some((distance, candidate))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

pub(super) fn normalize(name: &str) -> Vec<char> {
    name.chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// The optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters (`cuont` is one edit from `count`).
pub(super) fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut before_previous: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut current = vec![0; b.len() + 1];
        current[0] = i;
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut distance = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                distance = distance.min(before_previous[j - 2] + 1);
            }
            current[j] = distance;
        }
        before_previous = std::mem::replace(&mut previous, current);
    }
    previous[b.len()]
}

/// A short description of a YAML value for a message: scalars as written (strings quoted and
/// cut short), collections by their kind.
pub(super) fn describe(value: &Value) -> String {
    // Long strings are cut so that one bad value cannot flood the report.
    const LONGEST_SHOWN: usize = 40;
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut shown: String = s.chars().take(LONGEST_SHOWN).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("{shown:?}")
        }
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(_) if is_huge_integer(value) => HUGE_INTEGER.to_owned(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// Like [`describe`] but without the value itself, for secrets.
pub(super) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) if is_huge_integer(value) => HUGE_INTEGER,
        Value::Tagged(_) => "a tagged value",
    }
}

/// A YAML syntax error as a message with its line and column.
///
/// serde_yaml quotes the value it could not read between backticks (`invalid type: integer
/// \`…\` as u128`); that value may be a secret, so every quoted value is left out.
pub(super) fn yaml_error(err: &serde_yaml::Error) -> String {
    let full = err.to_string();
    let mut message = String::with_capacity(full.len());
    let mut rest = full.as_str();
    while let Some(open) = rest.find('`') {
        let Some(close) = rest[open + 1..].find('`') else {
            break;
        };
        message.push_str(rest[..open].trim_end_matches(' '));
        rest = &rest[open + 1 + close + 1..];
    }
    message.push_str(rest);
    match err.location() {
        Some(location) if !message.contains("line ") => format!(
            "invalid YAML at line {}, column {}: {message}",
            location.line(),
            location.column()
        ),
        _ => format!("invalid YAML: {message}"),
    }
}
