//! Readers of one YAML value each (a string, a list, an integer, a duration, a mapping), which
//! report what is wrong with the value's field path and return a stand-in or nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as JsonValue;
use serde_yaml::Value;

use super::diagnostics::{child, describe, item, kind_of, Problems, HUGE_INTEGER};
use super::duration::parse_duration;
use super::tree::is_huge_integer;

/// A non-empty string.
pub(super) fn string(value: &Value, path: &str, problems: &mut Problems) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::String(_) => {
            problems.add(path, "must not be empty");
            None
        }
        other => {
            problems.add(path, format!("expected a string, got {}", describe(other)));
            None
        }
    }
}

/// A list of non-empty strings; `what` says what they are, for the message.
pub(super) fn string_list(
    value: &Value,
    path: &str,
    what: &str,
    problems: &mut Problems,
) -> Vec<String> {
    let Value::Sequence(items) = value else {
        problems.add(
            path,
            format!("expected a list of {what}, got {}", describe(value)),
        );
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(index, value)| string(value, &item(path, index), problems))
        .collect()
}

/// A whole number from `min` to `max`.
pub(super) fn integer(
    value: &Value,
    path: &str,
    min: u32,
    max: u32,
    problems: &mut Problems,
) -> Option<u32> {
    let number = value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (min..=max).contains(n));
    if number.is_none() {
        problems.add(
            path,
            format!(
                "expected an integer from {min} to {max}, got {}",
                describe(value)
            ),
        );
    }
    number
}

/// A duration: a humantime string (`30m`, `90s`, `1h 30m`) or a whole number of seconds.
pub(super) fn duration(value: &Value, path: &str, problems: &mut Problems) -> Option<Duration> {
    let expected = "expected a duration like 30m, 90s or 1h 30m, or a whole number of seconds";
    // A number written bare and the same number as text mean the same, as on the command line.
    let parsed = match value {
        Value::String(s) => {
            parse_duration(s).map_err(|_| format!("{expected}, got {}", describe(value)))
        }
        Value::Number(n) => {
            parse_duration(&n.to_string()).map_err(|_| format!("{expected}, got {n}"))
        }
        other => Err(format!("{expected}, got {}", describe(other))),
    };
    match parsed {
        Ok(duration) if duration.is_zero() => {
            problems.add(
                path,
                "must be longer than zero; leave it out for no timeout",
            );
            None
        }
        Ok(duration) => Some(duration),
        Err(message) => {
            problems.add(path, message);
            None
        }
    }
}

/// The string key of a mapping entry, reporting any other kind of key.
fn key_name<'a>(key: &'a Value, path: &str, problems: &mut Problems) -> Option<&'a str> {
    let name = key.as_str();
    if name.is_none() {
        problems.add(
            path,
            format!("names must be strings, got {}", describe(key)),
        );
    }
    name
}

/// A mapping of names to any values (`global_metadata`, `config_template`).
pub(super) fn json_map(
    value: &Value,
    path: &str,
    problems: &mut Problems,
) -> BTreeMap<String, JsonValue> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to values, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        if let Some(name) = key_name(key, path, problems) {
            out.insert(
                name.to_owned(),
                to_json(value, &child(path, name), problems),
            );
        }
    }
    out
}

/// A mapping of names to scalars, each turned into a string (`secrets`, `tags`). With `secret`,
/// messages never show a value.
pub(super) fn scalar_map(
    value: &Value,
    path: &str,
    secret: bool,
    problems: &mut Problems,
) -> BTreeMap<String, String> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to strings, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let Some(name) = key_name(key, path, problems) else {
            continue;
        };
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                let got = if secret {
                    kind_of(other).to_owned()
                } else {
                    describe(other)
                };
                problems.add(
                    &child(path, name),
                    format!("expected a string, number or boolean, got {got}"),
                );
                // A stand-in keeps the name for the later checks of names.
                String::new()
            }
        };
        out.insert(name.to_owned(), text);
    }
    out
}

/// `distributed_lists`: a mapping of names to lists of values.
pub(super) fn list_map(
    value: &Value,
    path: &str,
    problems: &mut Problems,
) -> BTreeMap<String, Vec<JsonValue>> {
    let Value::Mapping(map) = value else {
        problems.add(
            path,
            format!(
                "expected a mapping of names to lists, got {}",
                describe(value)
            ),
        );
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let Some(name) = key_name(key, path, problems) else {
            continue;
        };
        let path = child(path, name);
        let list = match value {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(index, value)| to_json(value, &item(&path, index), problems))
                .collect(),
            other => {
                problems.add(
                    &path,
                    format!("expected a list of items, got {}", describe(other)),
                );
                // A one-item stand-in, so that the list is not also reported as empty.
                vec![JsonValue::Null]
            }
        };
        out.insert(name.to_owned(), list);
    }
    out
}

/// Converts a YAML value into JSON, reporting what JSON cannot hold (tags, non-string keys,
/// NaN and infinities). Whole-numbered floats stay floats, as YAML wrote them.
fn to_json(value: &Value, path: &str, problems: &mut Problems) -> JsonValue {
    match value {
        Value::Null => JsonValue::Null,
        Value::Bool(b) => JsonValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JsonValue::from(i)
            } else if let Some(u) = n.as_u64() {
                JsonValue::from(u)
            } else {
                let float = n.as_f64().and_then(serde_json::Number::from_f64);
                match float {
                    Some(float) => JsonValue::Number(float),
                    None => {
                        problems.add(path, format!("expected a finite number, got {n}"));
                        JsonValue::Null
                    }
                }
            }
        }
        Value::String(s) => JsonValue::String(s.clone()),
        Value::Sequence(items) => JsonValue::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, value)| to_json(value, &item(path, index), problems))
                .collect(),
        ),
        Value::Mapping(map) => {
            let mut object = serde_json::Map::new();
            for (key, value) in map {
                match key.as_str() {
                    Some(name) => {
                        object.insert(
                            name.to_owned(),
                            to_json(value, &child(path, name), problems),
                        );
                    }
                    None => problems.add(
                        path,
                        format!("mapping keys must be strings, got {}", describe(key)),
                    ),
                }
            }
            JsonValue::Object(object)
        }
        Value::Tagged(_) if is_huge_integer(value) => {
            problems.add(
                path,
                format!("expected a value a node can get, got {HUGE_INTEGER}"),
            );
            JsonValue::Null
        }
        Value::Tagged(tagged) => {
            problems.add(
                path,
                format!(
                    "YAML tags like {} are not supported; remove the tag",
                    tagged.tag
                ),
            );
            JsonValue::Null
        }
    }
}
