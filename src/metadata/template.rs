//! `config_template`: parsing its values once, ordering its keys so that each comes after the
//! keys its placeholders name, and filling them in for one node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::Value;

use super::{push_text, Source, BUILTINS};
use crate::config::{closest, NodesConfig};

/// A `config_template` value, parsed once so that filling it in for a node is a walk, not a
/// parse.
#[derive(Debug, Clone)]
pub(super) enum Template {
    /// A value with no placeholder anywhere in it, copied as it is.
    Literal(Value),
    /// A string that is exactly one `{name}`: the named value as it is, whatever its type.
    Whole(String),
    /// A string of text and placeholders, each value inserted as text.
    Text(Vec<Piece>),
    /// An array with a placeholder somewhere inside.
    Array(Vec<Template>),
    /// A map with a placeholder somewhere inside; its keys are copied as they are.
    Object(Vec<(String, Template)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Piece {
    Text(String),
    Name(String),
}

/// What a template's placeholders may name while one node is filled in.
pub(super) struct Scope<'a> {
    pub(super) builtins: &'a [(&'static str, Value)],
    pub(super) config: &'a BTreeMap<String, Value>,
}

impl<'a> Scope<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.builtins
            .iter()
            .find(|(builtin, _)| *builtin == name)
            .map(|(_, value)| value)
            .or_else(|| self.config.get(name))
    }
}

impl Template {
    /// The value of a template known to be a literal.
    fn into_literal(self) -> Value {
        match self {
            Template::Literal(value) => value,
            _ => Value::Null,
        }
    }

    /// The value for one node. Every name was checked when the template was parsed, so a
    /// missing one (which cannot happen) is filled in as null.
    pub(super) fn fill(&self, scope: &Scope<'_>) -> Value {
        match self {
            Template::Literal(value) => value.clone(),
            Template::Whole(name) => scope.get(name).cloned().unwrap_or(Value::Null),
            Template::Text(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => out.push_str(text),
                        Piece::Name(name) => {
                            if let Some(value) = scope.get(name) {
                                push_text(&mut out, value);
                            }
                        }
                    }
                }
                Value::String(out)
            }
            Template::Array(items) => Value::Array(items.iter().map(|t| t.fill(scope)).collect()),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(key, template)| (key.clone(), template.fill(scope)))
                    .collect(),
            ),
        }
    }
}

/// Parses every template value and orders the keys so that each comes after the keys its
/// placeholders name, adding every problem found to `problems`.
pub(super) fn parse_and_order(
    nodes: &NodesConfig,
    problems: &mut Vec<String>,
) -> Vec<(String, Template)> {
    let templates = parse_templates(nodes, problems);
    order_templates(templates, problems)
}

/// One parsed template key and the other template keys it names.
struct ParsedTemplate {
    template: Template,
    depends_on: BTreeSet<String>,
}

/// Parses every template value, reporting malformed braces and names that cannot be filled in.
fn parse_templates(
    nodes: &NodesConfig,
    problems: &mut Vec<String>,
) -> BTreeMap<String, ParsedTemplate> {
    let mut parsed = BTreeMap::new();
    for (key, value) in &nodes.config_template {
        let mut parser = TemplateParser {
            nodes,
            key,
            depends_on: BTreeSet::new(),
            reported: HashSet::new(),
            problems,
        };
        let path = format!("{}.{key}", Source::Template.path());
        let template = parser.parse(value, &path);
        let depends_on = parser.depends_on;
        parsed.insert(
            key.clone(),
            ParsedTemplate {
                template,
                depends_on,
            },
        );
    }
    parsed
}

/// Parses the value of one template key.
struct TemplateParser<'a> {
    nodes: &'a NodesConfig,
    key: &'a str,
    depends_on: BTreeSet<String>,
    /// `(path, name)` pairs already reported, so a name used twice in a string is reported once.
    reported: HashSet<(String, String)>,
    problems: &'a mut Vec<String>,
}

impl TemplateParser<'_> {
    fn parse(&mut self, value: &Value, path: &str) -> Template {
        match value {
            Value::String(s) => match split_placeholders(s) {
                Ok(pieces) => {
                    for piece in &pieces {
                        if let Piece::Name(name) = piece {
                            self.check_name(name, path);
                        }
                    }
                    match pieces.as_slice() {
                        [Piece::Name(name)] => Template::Whole(name.clone()),
                        _ if pieces.iter().all(|p| matches!(p, Piece::Text(_))) => {
                            let text: String = pieces
                                .into_iter()
                                .filter_map(|p| match p {
                                    Piece::Text(text) => Some(text),
                                    Piece::Name(_) => None,
                                })
                                .collect();
                            Template::Literal(Value::String(text))
                        }
                        _ => Template::Text(pieces),
                    }
                }
                Err(message) => {
                    self.problems.push(format!("{path}: {message}"));
                    Template::Literal(Value::Null)
                }
            },
            Value::Array(items) => {
                let items: Vec<Template> = items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| self.parse(item, &format!("{path}[{index}]")))
                    .collect();
                if items.iter().all(|t| matches!(t, Template::Literal(_))) {
                    Template::Literal(Value::Array(
                        items.into_iter().map(Template::into_literal).collect(),
                    ))
                } else {
                    Template::Array(items)
                }
            }
            Value::Object(map) => {
                let fields: Vec<(String, Template)> = map
                    .iter()
                    .map(|(key, item)| (key.clone(), self.parse(item, &format!("{path}.{key}"))))
                    .collect();
                if fields
                    .iter()
                    .all(|(_, t)| matches!(t, Template::Literal(_)))
                {
                    Template::Literal(Value::Object(
                        fields
                            .into_iter()
                            .map(|(key, t)| (key, t.into_literal()))
                            .collect(),
                    ))
                } else {
                    Template::Object(fields)
                }
            }
            other => Template::Literal(other.clone()),
        }
    }

    /// Checks that placeholder `name`, found at `path`, can be filled in, and records the
    /// template keys it depends on.
    fn check_name(&mut self, name: &str, path: &str) {
        let nodes = self.nodes;
        let in_base =
            nodes.global_metadata.contains_key(name) || nodes.distributed_lists.contains_key(name);
        if BUILTINS.contains(&name) {
            return;
        }
        if nodes.config_template.contains_key(name) {
            // A key naming itself means the value of the same key from global_metadata or
            // distributed_lists, when there is one; otherwise it is a cycle of one.
            if name != self.key || !in_base {
                self.depends_on.insert(name.to_owned());
            }
            return;
        }
        if in_base {
            return;
        }
        if !self.reported.insert((path.to_owned(), name.to_owned())) {
            return;
        }
        if nodes.secrets.contains_key(name) {
            self.problems.push(format!(
                "{path}: {{{name}}} is a secret; secrets cannot be used in config_template; read \
                 the env var {} instead",
                name.to_ascii_uppercase()
            ));
            return;
        }
        let known = BUILTINS
            .iter()
            .copied()
            .chain(nodes.global_metadata.keys().map(String::as_str))
            .chain(nodes.distributed_lists.keys().map(String::as_str))
            .chain(nodes.config_template.keys().map(String::as_str));
        let hint = match closest(name, known) {
            Some(meant) => format!("did you mean {{{meant}}}?"),
            None => format!(
                "use a key of global_metadata, distributed_lists or config_template, or one of \
                 {{{}}}",
                BUILTINS.join("}, {")
            ),
        };
        self.problems
            .push(format!("{path}: unknown placeholder {{{name}}}; {hint}"));
    }
}

/// Whether the template `value` (a string, or strings inside arrays and maps) has a `{name}`
/// placeholder: how a template key builds on the value of the same key from `global_metadata`
/// or `distributed_lists`.
pub(super) fn names(value: &Value, name: &str) -> bool {
    match value {
        Value::String(s) => split_placeholders(s).is_ok_and(|pieces| {
            pieces
                .iter()
                .any(|piece| matches!(piece, Piece::Name(n) if n == name))
        }),
        Value::Array(items) => items.iter().any(|item| names(item, name)),
        Value::Object(fields) => fields.values().any(|field| names(field, name)),
        _ => false,
    }
}

/// Splits a template string into text and `{name}` placeholders; `{{` and `}}` stand for
/// literal braces, and a lone `}` is taken literally too.
fn split_placeholders(s: &str) -> std::result::Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().is_some_and(|&(_, next)| next == '{') => {
                chars.next();
                text.push('{');
            }
            '{' => {
                let start = at + 1;
                let end = loop {
                    match chars.next() {
                        Some((end, '}')) => break end,
                        Some((_, '{')) | None => {
                            return Err(format!(
                                "the `{{` at byte {at} opens a placeholder that is not closed; \
                                 write `{{{{` for a literal brace"
                            ))
                        }
                        Some(_) => {}
                    }
                };
                let name = &s[start..end];
                if name.is_empty() {
                    return Err(format!(
                        "empty placeholder `{{}}` at byte {at}; write `{{{{}}}}` for literal braces"
                    ));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Name(name.to_owned()));
            }
            '}' if chars.peek().is_some_and(|&(_, next)| next == '}') => {
                chars.next();
                text.push('}');
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Orders the templates so that each comes after the template keys it names, reporting each
/// cycle once, as `a -> b -> a` starting from its first key in name order.
fn order_templates(
    mut parsed: BTreeMap<String, ParsedTemplate>,
    problems: &mut Vec<String>,
) -> Vec<(String, Template)> {
    let mut waiting_on: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, template) in &parsed {
        waiting_on.insert(key, template.depends_on.len());
        for dependency in &template.depends_on {
            dependents.entry(dependency).or_default().push(key);
        }
    }
    let mut ready: Vec<&str> = waiting_on
        .iter()
        .filter(|(_, waiting)| **waiting == 0)
        .map(|(key, _)| *key)
        .collect();
    ready.reverse();
    let mut order: Vec<String> = Vec::with_capacity(parsed.len());
    while let Some(key) = ready.pop() {
        order.push(key.to_owned());
        for dependent in dependents.get(key).into_iter().flatten() {
            if let Some(waiting) = waiting_on.get_mut(dependent) {
                *waiting -= 1;
                if *waiting == 0 {
                    ready.push(dependent);
                }
            }
        }
    }

    if order.len() < parsed.len() {
        let placed: HashSet<&str> = order.iter().map(String::as_str).collect();
        let stuck: BTreeSet<&str> = parsed
            .keys()
            .map(String::as_str)
            .filter(|key| !placed.contains(key))
            .collect();
        report_cycles(&parsed, &stuck, problems);
    }

    order
        .into_iter()
        .filter_map(|key| {
            let template = parsed.remove(&key)?.template;
            Some((key, template))
        })
        .collect()
}

/// Finds and reports the cycles among `stuck`, the template keys that could not be ordered.
/// Each of them names another stuck key, so following those names from any of them must come
/// back to a key already on the trail.
fn report_cycles(
    parsed: &BTreeMap<String, ParsedTemplate>,
    stuck: &BTreeSet<&str>,
    problems: &mut Vec<String>,
) {
    let mut explored: HashSet<&str> = HashSet::new();
    for &start in stuck {
        let mut trail: Vec<&str> = Vec::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        let mut current = start;
        loop {
            if let Some(&at) = position.get(current) {
                report_cycle(&trail[at..], problems);
                break;
            }
            if !explored.insert(current) {
                break;
            }
            position.insert(current, trail.len());
            trail.push(current);
            let next = parsed.get(current).and_then(|template| {
                template
                    .depends_on
                    .iter()
                    .map(String::as_str)
                    .find(|key| stuck.contains(key))
            });
            match next {
                Some(next) => current = next,
                None => break,
            }
        }
    }
}

fn report_cycle(cycle: &[&str], problems: &mut Vec<String>) {
    let Some(first) = cycle
        .iter()
        .enumerate()
        .min_by_key(|(_, key)| **key)
        .map(|(at, _)| at)
    else {
        return;
    };
    let mut names: Vec<&str> = cycle[first..]
        .iter()
        .chain(&cycle[..first])
        .copied()
        .collect();
    names.push(cycle[first]);
    problems.push(format!(
        "{}.{}: placeholder cycle {}",
        Source::Template.path(),
        cycle[first],
        names.join(" -> ")
    ));
}
