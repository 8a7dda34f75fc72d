//! What each node gets: its slice of the configuration and its environment variables (SPEC §2).
//!
//! [`MetadataGenerator`] checks a [`NodesConfig`] once (names, placeholders, template order) and
//! then builds any node's configuration in time proportional to what that node receives, so a
//! deployment of 100000 nodes over a list of a million items costs no more than the items
//! themselves. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use crate::config::{closest, NodesConfig, MAX_NODES};
use crate::error::{Error, Result};

/// The placeholders taskfly fills in for every node; no user key may take these names.
const BUILTINS: [&str; 4] = ["node_id", "node_index", "total_nodes", "deployment_id"];

/// The prefix of taskfly's own environment variables, which user keys may not use.
const RESERVED_PREFIX: &str = "TASKFLY_";

/// What a secret's value is shown as.
const MASK: &str = "***";

/// Builds each node's configuration and environment from a deployment's `nodes` section.
///
/// For node `i` of `n`, the configuration is `global_metadata`, then each distributed list's
/// share for node `i`, then `config_template` with its placeholders filled in, a later source
/// overriding an earlier one on the same key; [`MetadataGenerator::node_env`] adds the secrets
/// and taskfly's own variables. Its `Debug` output never shows secret values.
#[derive(Clone)]
pub struct MetadataGenerator {
    total_nodes: u32,
    global_metadata: BTreeMap<String, Value>,
    distributed_lists: BTreeMap<String, Vec<Value>>,
    secrets: BTreeMap<String, String>,
    /// The template keys, each after every other template key its placeholders name.
    templates: Vec<(String, Template)>,
}

impl fmt::Debug for MetadataGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataGenerator")
            .field("total_nodes", &self.total_nodes)
            .field("global_metadata", &self.global_metadata.keys())
            .field("distributed_lists", &self.distributed_lists.keys())
            .field("secrets", &self.secrets.keys())
            .field(
                "templates",
                &self
                    .templates
                    .iter()
                    .map(|(key, _)| key)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl MetadataGenerator {
    /// Checks `nodes` and prepares its templates.
    ///
    /// Fails with an [`is_invalid_config`](Error::is_invalid_config) error listing every
    /// problem (the same ones [`crate::config::DeploymentConfig::from_yaml`] reports for the
    /// `nodes` section), so a hand-built [`NodesConfig`] gets the same checks as a file.
    pub fn new(nodes: &NodesConfig) -> Result<Self> {
        let templates = prepare(nodes).map_err(|problems| {
            let count = problems.len();
            let plural = if count == 1 { "" } else { "s" };
            Error::invalid_config(
                format!("the nodes configuration is invalid ({count} problem{plural})"),
                problems,
            )
        })?;
        Ok(MetadataGenerator {
            total_nodes: nodes.count,
            global_metadata: nodes.global_metadata.clone(),
            distributed_lists: nodes.distributed_lists.clone(),
            secrets: nodes.secrets.clone(),
            templates,
        })
    }

    /// How many nodes the deployment has (`nodes.count`).
    pub fn total_nodes(&self) -> u32 {
        self.total_nodes
    }

    /// The configuration of node `node_index`: `global_metadata`, its share of each distributed
    /// list, and the filled-in `config_template`, without secrets.
    ///
    /// `node_index` is expected to be below [`total_nodes`](Self::total_nodes); a larger one
    /// gets the shares of `node_index % total_nodes` while `{node_index}` shows it as given.
    pub fn node_config(
        &self,
        deployment_id: &str,
        node_id: &str,
        node_index: u32,
    ) -> BTreeMap<String, Value> {
        let mut config = self.global_metadata.clone();
        for (name, list) in &self.distributed_lists {
            config.insert(name.clone(), self.share(list, node_index));
        }
        let builtins = [
            ("node_id", Value::from(node_id)),
            ("node_index", Value::from(node_index)),
            ("total_nodes", Value::from(self.total_nodes)),
            ("deployment_id", Value::from(deployment_id)),
        ];
        for (key, template) in &self.templates {
            let scope = Scope {
                builtins: &builtins,
                config: &config,
            };
            let value = template.fill(&scope);
            config.insert(key.clone(), value);
        }
        config
    }

    /// The environment of node `node_index`: every configuration key upper-cased, the secrets
    /// (marked as such), and `TASKFLY_DEPLOYMENT_ID`, `TASKFLY_NODE_ID`, `TASKFLY_NODE_INDEX`
    /// and `TASKFLY_TOTAL_NODES`, sorted by name.
    pub fn node_env(&self, deployment_id: &str, node_id: &str, node_index: u32) -> NodeEnv {
        let config = self.node_config(deployment_id, node_id, node_index);
        let mut vars: Vec<EnvVar> = config
            .iter()
            .map(|(key, value)| EnvVar {
                name: key.to_ascii_uppercase(),
                value: env_value(value),
                secret: false,
            })
            .collect();
        vars.extend(self.secrets.iter().map(|(key, value)| EnvVar {
            name: key.to_ascii_uppercase(),
            value: value.clone(),
            secret: true,
        }));
        let builtins = [
            ("TASKFLY_DEPLOYMENT_ID", deployment_id.to_owned()),
            ("TASKFLY_NODE_ID", node_id.to_owned()),
            ("TASKFLY_NODE_INDEX", node_index.to_string()),
            ("TASKFLY_TOTAL_NODES", self.total_nodes.to_string()),
        ];
        vars.extend(builtins.into_iter().map(|(name, value)| EnvVar {
            name: name.to_owned(),
            value,
            secret: false,
        }));
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        NodeEnv { vars }
    }

    /// Node `node_index`'s share of a distributed list of `m` items over `n` nodes: the single
    /// item `list[i % m]` when `m <= n`, else the array of every `list[j]` with `j % n == i`.
    /// Costs O(m / n + 1).
    fn share(&self, list: &[Value], node_index: u32) -> Value {
        let nodes = self.total_nodes.max(1) as usize;
        let index = node_index as usize % nodes;
        if list.is_empty() {
            // Validation refuses empty lists; this only keeps the arithmetic total.
            Value::Null
        } else if list.len() <= nodes {
            list[index % list.len()].clone()
        } else {
            Value::Array(list.iter().skip(index).step_by(nodes).cloned().collect())
        }
    }
}

/// One node's environment variables, sorted by name.
///
/// Secret values are kept for the node's process but never shown: [`NodeEnv::redacted`] is the
/// form to print or log, [`NodeEnv::secret_values`] what to mask in log lines, and `Debug`
/// prints `***` for them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEnv {
    vars: Vec<EnvVar>,
}

/// One environment variable of a node.
#[derive(Clone, PartialEq)]
pub struct EnvVar {
    /// The variable's name, like `BUCKET` or `TASKFLY_NODE_ID`.
    pub name: String,
    /// The value, byte for byte as the node's process receives it.
    pub value: String,
    /// Whether the value comes from `nodes.secrets` and must never be shown.
    pub secret: bool,
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = if self.secret {
            MASK
        } else {
            self.value.as_str()
        };
        f.debug_struct("EnvVar")
            .field("name", &self.name)
            .field("value", &value)
            .field("secret", &self.secret)
            .finish()
    }
}

impl NodeEnv {
    /// Every variable, sorted by name, secrets with their real values: for the node's process
    /// only.
    pub fn vars(&self) -> &[EnvVar] {
        &self.vars
    }

    /// The value of variable `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .binary_search_by(|var| var.name.as_str().cmp(name))
            .ok()
            .map(|at| self.vars[at].value.as_str())
    }

    /// Every variable as `(name, value)` with secret values replaced by `***`: the form to
    /// show in output, API responses and logs.
    pub fn redacted(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .map(|var| {
                let value = if var.secret { MASK } else { var.value.as_str() };
                (var.name.clone(), value.to_owned())
            })
            .collect()
    }

    /// The non-empty secret values, longest first and without repeats, so that a log masker
    /// replacing them in this order never leaves part of a longer secret visible.
    pub fn secret_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self
            .vars
            .iter()
            .filter(|var| var.secret && !var.value.is_empty())
            .map(|var| var.value.clone())
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        values
    }
}

/// A configuration value as an environment variable's text: strings byte for byte, numbers in
/// decimal (integers without `.0`), booleans `true`/`false`, null as the empty string, arrays and
/// maps as compact JSON. Placeholders inside longer template strings are filled in the same way.
pub(crate) fn env_value(value: &Value) -> String {
    let mut text = String::new();
    push_text(&mut text, value);
    text
}

fn push_text(out: &mut String, value: &Value) {
    match value {
        Value::Null => {}
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Array(_) | Value::Object(_) => out.push_str(&value.to_string()),
    }
}

/// Every problem of a `nodes` section, each as `"<field path>: <what is wrong>"`; empty when it
/// is valid.
pub(crate) fn check(nodes: &NodesConfig) -> Vec<String> {
    prepare(nodes).err().unwrap_or_default()
}

/// Checks `nodes` and returns its templates in the order to fill them in, or every problem.
fn prepare(nodes: &NodesConfig) -> std::result::Result<Vec<(String, Template)>, Vec<String>> {
    let mut problems = Vec::new();
    if !(1..=MAX_NODES).contains(&nodes.count) {
        problems.push(format!(
            "nodes.count: expected an integer from 1 to {MAX_NODES}, got {}",
            nodes.count
        ));
    }
    for (name, list) in &nodes.distributed_lists {
        if list.is_empty() {
            problems.push(format!(
                "{}.{name}: the list is empty; give it at least one item",
                Source::List.path()
            ));
        }
    }
    check_names(nodes, &mut problems);
    check_nul(nodes, &mut problems);
    let templates = parse_templates(nodes, &mut problems);
    let ordered = order_templates(templates, &mut problems);
    if problems.is_empty() {
        Ok(ordered)
    } else {
        Err(problems)
    }
}

/// The four places a node's keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Global,
    List,
    Template,
    Secret,
}

impl Source {
    fn path(self) -> &'static str {
        match self {
            Source::Global => "nodes.global_metadata",
            Source::List => "nodes.distributed_lists",
            Source::Template => "nodes.config_template",
            Source::Secret => "nodes.secrets",
        }
    }
}

/// Every key of every source, in the order the sources apply.
fn all_keys(nodes: &NodesConfig) -> impl Iterator<Item = (Source, &str)> {
    let global = nodes
        .global_metadata
        .keys()
        .map(|k| (Source::Global, k.as_str()));
    let lists = nodes
        .distributed_lists
        .keys()
        .map(|k| (Source::List, k.as_str()));
    let templates = nodes
        .config_template
        .keys()
        .map(|k| (Source::Template, k.as_str()));
    let secrets = nodes.secrets.keys().map(|k| (Source::Secret, k.as_str()));
    global.chain(lists).chain(templates).chain(secrets)
}

/// Whether `key` upper-cases to `[A-Z_][A-Z0-9_]*`. Only ASCII is accepted, so that no Unicode
/// case mapping can turn an odd key into a valid-looking name.
fn is_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks that every key can become its own environment variable.
fn check_names(nodes: &NodesConfig, problems: &mut Vec<String>) {
    let mut by_env_name: BTreeMap<String, Vec<(Source, &str)>> = BTreeMap::new();
    for (source, key) in all_keys(nodes) {
        let path = format!("{}.{key}", source.path());
        if BUILTINS.contains(&key) {
            problems.push(format!(
                "{path}: {key} is a placeholder taskfly sets for every node; choose another name"
            ));
            continue;
        }
        if !is_env_name(key) {
            problems.push(format!(
                "{path}: {key:?} cannot be an environment variable name; use only letters, \
                 digits and _, not starting with a digit ([A-Z_][A-Z0-9_]* once upper-cased)"
            ));
            continue;
        }
        let env_name = key.to_ascii_uppercase();
        if env_name.starts_with(RESERVED_PREFIX) {
            problems.push(format!(
                "{path}: names starting with {RESERVED_PREFIX} are reserved for taskfly's own \
                 variables; choose another name"
            ));
            continue;
        }
        by_env_name.entry(env_name).or_default().push((source, key));
    }
    for (env_name, owners) in &by_env_name {
        let Some(((first_source, first_key), rest)) = owners.split_first() else {
            continue;
        };
        for (source, key) in rest {
            let path = format!("{}.{key}", source.path());
            let first_path = format!("{}.{first_key}", first_source.path());
            if key != first_key {
                problems.push(format!(
                    "{path}: differs only in case from {first_path}; both would set the \
                     environment variable {env_name}"
                ));
            } else if *source == Source::Secret {
                problems.push(format!(
                    "{path}: also set in {first_path}; a secret cannot share its name with a \
                     key that is not secret"
                ));
            }
        }
    }
}

/// Reports strings that would become an environment variable's value but hold a NUL
/// character, which no process environment can carry.
fn check_nul(nodes: &NodesConfig, problems: &mut Vec<String>) {
    let message = "contains a NUL character, which an environment variable cannot hold";
    let has_nul = |value: &Value| matches!(value, Value::String(s) if s.contains('\0'));
    for (key, value) in &nodes.global_metadata {
        if has_nul(value) {
            problems.push(format!("{}.{key}: {message}", Source::Global.path()));
        }
    }
    for (key, list) in &nodes.distributed_lists {
        for (index, value) in list.iter().enumerate() {
            if has_nul(value) {
                problems.push(format!("{}.{key}[{index}]: {message}", Source::List.path()));
            }
        }
    }
    for (key, value) in &nodes.config_template {
        if has_nul(value) {
            problems.push(format!("{}.{key}: {message}", Source::Template.path()));
        }
    }
    for (key, value) in &nodes.secrets {
        if value.contains('\0') {
            problems.push(format!("{}.{key}: {message}", Source::Secret.path()));
        }
    }
}

/// A `config_template` value, parsed once so that filling it in for a node is a walk, not a
/// parse.
#[derive(Debug, Clone)]
enum Template {
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
enum Piece {
    Text(String),
    Name(String),
}

/// What a template's placeholders may name while one node is filled in.
struct Scope<'a> {
    builtins: &'a [(&'static str, Value)],
    config: &'a BTreeMap<String, Value>,
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
    fn fill(&self, scope: &Scope<'_>) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> BTreeMap<String, Value> {
        match value {
            Value::Object(object) => object.into_iter().collect(),
            other => panic!("expected a JSON object, got {other}"),
        }
    }

    fn nodes(count: u32) -> NodesConfig {
        NodesConfig {
            count,
            ..NodesConfig::default()
        }
    }

    fn with_lists(count: u32, lists: Value) -> NodesConfig {
        let distributed_lists = map(lists)
            .into_iter()
            .map(|(name, list)| match list {
                Value::Array(items) => (name, items),
                other => panic!("expected a list, got {other}"),
            })
            .collect();
        NodesConfig {
            distributed_lists,
            ..nodes(count)
        }
    }

    fn with_template(global: Value, template: Value) -> NodesConfig {
        NodesConfig {
            global_metadata: map(global),
            config_template: map(template),
            ..nodes(2)
        }
    }

    fn generator(nodes: &NodesConfig) -> MetadataGenerator {
        match MetadataGenerator::new(nodes) {
            Ok(generator) => generator,
            Err(err) => panic!("{err}"),
        }
    }

    fn value_of(generator: &MetadataGenerator, node_index: u32, key: &str) -> Value {
        generator
            .node_config("dep-1", &format!("node-{node_index}"), node_index)
            .remove(key)
            .unwrap_or_else(|| panic!("no {key} for node {node_index}"))
    }

    #[test]
    fn a_longer_list_is_shared_out_without_dropping_items() {
        let generator = generator(&with_lists(3, json!({"shard": [0, 1, 2, 3, 4, 5, 6]})));
        assert_eq!(value_of(&generator, 0, "shard"), json!([0, 3, 6]));
        assert_eq!(value_of(&generator, 1, "shard"), json!([1, 4]));
        assert_eq!(value_of(&generator, 2, "shard"), json!([2, 5]));
    }

    #[test]
    fn a_shorter_list_cycles() {
        let generator = generator(&with_lists(5, json!({"zone": ["a", "b"]})));
        let zones: Vec<Value> = (0..5).map(|i| value_of(&generator, i, "zone")).collect();
        assert_eq!(
            zones,
            vec![json!("a"), json!("b"), json!("a"), json!("b"), json!("a")]
        );
    }

    #[test]
    fn a_list_as_long_as_the_nodes_gives_one_item_each() {
        let generator = generator(&with_lists(3, json!({"file": ["x", ["y"], {"z": 1}]})));
        assert_eq!(value_of(&generator, 0, "file"), json!("x"));
        // An item that is itself a list or map is given as it is.
        assert_eq!(value_of(&generator, 1, "file"), json!(["y"]));
        assert_eq!(value_of(&generator, 2, "file"), json!({"z": 1}));
    }

    #[test]
    fn large_deployments_share_lists_exactly() {
        let items: Vec<Value> = (0..250_000).map(Value::from).collect();
        let nodes = NodesConfig {
            distributed_lists: BTreeMap::from([("item".to_owned(), items)]),
            ..nodes(MAX_NODES)
        };
        let generator = generator(&nodes);
        assert_eq!(
            value_of(&generator, 0, "item"),
            json!([0, 100_000, 200_000])
        );
        assert_eq!(
            value_of(&generator, 49_999, "item"),
            json!([49_999, 149_999, 249_999])
        );
        assert_eq!(
            value_of(&generator, 99_999, "item"),
            json!([99_999, 199_999])
        );
        let given: usize = (0..MAX_NODES)
            .step_by(997)
            .map(|i| match value_of(&generator, i, "item") {
                Value::Array(items) => items.len(),
                _ => 0,
            })
            .sum();
        assert!(given > 0);
    }

    #[test]
    fn an_empty_list_is_refused() {
        let err = MetadataGenerator::new(&with_lists(2, json!({"shard": []}))).expect_err("empty");
        assert!(err.is_invalid_config());
        assert_eq!(
            err.details(),
            ["nodes.distributed_lists.shard: the list is empty; give it at least one item"]
        );
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let nodes = NodesConfig {
            global_metadata: map(json!({"a": "global", "b": "global", "c": "global"})),
            distributed_lists: BTreeMap::from([
                ("b".to_owned(), vec![json!("list")]),
                ("c".to_owned(), vec![json!("list")]),
            ]),
            config_template: map(json!({"c": "template"})),
            ..nodes(1)
        };
        let config = generator(&nodes).node_config("d", "n", 0);
        assert_eq!(
            config,
            map(json!({"a": "global", "b": "list", "c": "template"}))
        );
    }

    #[test]
    fn templates_fill_in_built_ins_and_keys() {
        let nodes = NodesConfig {
            global_metadata: map(
                json!({"bucket": "data-bkt", "batch": 500, "ratio": 0.5, "on": true}),
            ),
            distributed_lists: BTreeMap::from([(
                "shard".to_owned(),
                vec![json!("a.csv"), json!("b.csv"), json!("c.csv")],
            )]),
            config_template: map(json!({
                "input": "{shard}",
                "out": "s3://{bucket}/out/{node_index}",
                "who": "{deployment_id}/{node_id} of {total_nodes}",
                "mixed": "{batch}-{ratio}-{on}",
                "index": "{node_index}",
            })),
            ..nodes(2)
        };
        let generator = generator(&nodes);
        let config = generator.node_config("dep-7", "node-b", 1);
        // Two nodes over three shards: node 1 gets the array of shard 1 only.
        assert_eq!(config.get("input"), Some(&json!(["b.csv"])));
        assert_eq!(config.get("out"), Some(&json!("s3://data-bkt/out/1")));
        assert_eq!(config.get("who"), Some(&json!("dep-7/node-b of 2")));
        assert_eq!(config.get("mixed"), Some(&json!("500-0.5-true")));
        // A string that is exactly one placeholder keeps the value's type.
        assert_eq!(config.get("index"), Some(&json!(1)));
    }

    #[test]
    fn an_exact_placeholder_keeps_an_array_and_a_longer_string_gets_json() {
        let nodes = NodesConfig {
            global_metadata: map(json!({"ports": [80, 443], "opts": {"a": 1}, "none": null})),
            config_template: map(json!({
                "same": "{ports}",
                "text": "ports={ports} opts={opts} none=[{none}]",
                "nested": {"list": ["{ports}", "p{node_index}"], "keep": 3, "{ports}": "key"},
            })),
            ..nodes(1)
        };
        let config = generator(&nodes).node_config("d", "n", 0);
        assert_eq!(config.get("same"), Some(&json!([80, 443])));
        assert_eq!(
            config.get("text"),
            Some(&json!("ports=[80,443] opts={\"a\":1} none=[]"))
        );
        // Placeholders are filled in inside arrays and maps, but not in map keys.
        assert_eq!(
            config.get("nested"),
            Some(&json!({"list": [[80, 443], "p0"], "keep": 3, "{ports}": "key"}))
        );
    }

    #[test]
    fn templates_are_filled_in_dependency_order() {
        let generator = generator(&with_template(
            json!({"root": "r"}),
            json!({"a": "a({b})", "b": "b({c})", "c": "c({root},{node_index})"}),
        ));
        assert_eq!(value_of(&generator, 1, "a"), json!("a(b(c(r,1)))"));
        assert_eq!(value_of(&generator, 1, "b"), json!("b(c(r,1))"));
    }

    #[test]
    fn a_template_key_shadows_an_earlier_one_and_can_extend_it() {
        let generator = generator(&with_template(
            json!({"path": "/data", "user": "u"}),
            json!({"path": "{path}/{node_index}", "log": "{path}/log", "user": "{user}{user}"}),
        ));
        // A key naming itself means its earlier value; others see the template's value.
        assert_eq!(value_of(&generator, 1, "path"), json!("/data/1"));
        assert_eq!(value_of(&generator, 1, "log"), json!("/data/1/log"));
        assert_eq!(value_of(&generator, 0, "user"), json!("uu"));
    }

    #[test]
    fn cycles_are_refused() {
        let nodes = with_template(
            json!({}),
            json!({"b": "{a}", "a": "x{b}", "c": "{c}", "d": "{a}", "e": "fine"}),
        );
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.config_template.a: placeholder cycle a -> b -> a",
                "nodes.config_template.c: placeholder cycle c -> c",
            ]
        );
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let nodes = with_template(
            json!({"bucket": "b"}),
            json!({"out": "{bukket}/{bukket}", "deep": ["{zzz}"], "up": "{NODE_INDEX}"}),
        );
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.config_template.deep[0]: unknown placeholder {zzz}; use a key of \
                 global_metadata, distributed_lists or config_template, or one of {node_id}, \
                 {node_index}, {total_nodes}, {deployment_id}",
                "nodes.config_template.out: unknown placeholder {bukket}; did you mean {bucket}?",
                "nodes.config_template.up: unknown placeholder {NODE_INDEX}; did you mean {node_index}?",
            ]
        );
    }

    #[test]
    fn double_braces_are_literal() {
        let generator = generator(&with_template(
            json!({"x": 1}),
            json!({"lit": "{{x}}", "json": "{{\"a\": {x}}}", "lone": "a}b", "open": "{{"}),
        ));
        assert_eq!(value_of(&generator, 0, "lit"), json!("{x}"));
        assert_eq!(value_of(&generator, 0, "json"), json!("{\"a\": 1}"));
        assert_eq!(value_of(&generator, 0, "lone"), json!("a}b"));
        assert_eq!(value_of(&generator, 0, "open"), json!("{"));
    }

    #[test]
    fn malformed_braces_are_refused() {
        let nodes = with_template(
            json!({"x": 1}),
            json!({"a": "ab{x", "b": "{}", "c": "{x{x}}"}),
        );
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.config_template.a: the `{` at byte 2 opens a placeholder that is not \
                 closed; write `{{` for a literal brace",
                "nodes.config_template.b: empty placeholder `{}` at byte 0; write `{{}}` for \
                 literal braces",
                "nodes.config_template.c: the `{` at byte 0 opens a placeholder that is not \
                 closed; write `{{` for a literal brace",
            ]
        );
    }

    #[test]
    fn secrets_cannot_be_used_in_templates() {
        let nodes = NodesConfig {
            secrets: BTreeMap::from([("db_password".to_owned(), "s3cr3t".to_owned())]),
            config_template: map(json!({"dsn": "pg://u:{db_password}@h"})),
            ..nodes(1)
        };
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.config_template.dsn: {db_password} is a secret; secrets cannot be used in \
                 config_template; read the env var DB_PASSWORD instead"
            ]
        );
    }

    #[test]
    fn hostile_values_pass_byte_for_byte() {
        let hostile = [
            "\"double\"",
            "'single'",
            "$(rm -rf /)",
            "`reboot`",
            "line1\nline2",
            "a; b && c | d",
            "héllo wörld ✓ 日本",
            "${HOME} $HOME \\ \\n",
            " spaced ",
            "",
        ];
        let global: serde_json::Map<String, Value> = hostile
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("v{i}"), Value::from(*s)))
            .collect();
        let nodes = NodesConfig {
            global_metadata: global.into_iter().collect(),
            secrets: BTreeMap::from([("pw".to_owned(), "$(cat /etc/shadow)'\"`".to_owned())]),
            config_template: map(json!({"joined": "<{v2}|{v4}|{v6}>"})),
            ..nodes(1)
        };
        let env = generator(&nodes).node_env("d", "n", 0);
        for (i, value) in hostile.iter().enumerate() {
            assert_eq!(env.get(&format!("V{i}")), Some(*value));
        }
        assert_eq!(env.get("PW"), Some("$(cat /etc/shadow)'\"`"));
        assert_eq!(
            env.get("JOINED"),
            Some("<$(rm -rf /)|line1\nline2|héllo wörld ✓ 日本>")
        );
    }

    #[test]
    fn env_values_by_type() {
        let nodes = NodesConfig {
            global_metadata: map(json!({
                "int": 42, "neg": -7, "float": 2.5, "whole": 5.0, "yes": true, "no": false,
                "nothing": null, "list": [1, "two", null], "obj": {"k": "v", "n": [1]},
            })),
            ..nodes(3)
        };
        let env = generator(&nodes).node_env("dep-1", "node-2", 2);
        let expected = [
            ("FLOAT", "2.5"),
            ("INT", "42"),
            ("LIST", "[1,\"two\",null]"),
            ("NEG", "-7"),
            ("NO", "false"),
            ("NOTHING", ""),
            ("OBJ", "{\"k\":\"v\",\"n\":[1]}"),
            ("TASKFLY_DEPLOYMENT_ID", "dep-1"),
            ("TASKFLY_NODE_ID", "node-2"),
            ("TASKFLY_NODE_INDEX", "2"),
            ("TASKFLY_TOTAL_NODES", "3"),
            ("WHOLE", "5.0"),
            ("YES", "true"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        assert_eq!(env.redacted(), expected);
        assert!(env.vars().iter().all(|var| !var.secret));
        assert_eq!(env.get("MISSING"), None);
    }

    #[test]
    fn env_name_rules() {
        let nodes = NodesConfig {
            global_metadata: map(json!({
                "my-key": 1, "9lives": 1, "ünï": 1, "ok_key": 1, "Bucket": 1, "taskfly_mode": 1,
                "node_id": 1,
            })),
            distributed_lists: BTreeMap::from([("bucket".to_owned(), vec![json!(1)])]),
            config_template: map(json!({"OK_KEY": "x"})),
            secrets: BTreeMap::from([
                ("ok_key".to_owned(), "s".to_owned()),
                ("deployment_id".to_owned(), "s".to_owned()),
            ]),
            ..nodes(1)
        };
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.global_metadata.9lives: \"9lives\" cannot be an environment variable \
                 name; use only letters, digits and _, not starting with a digit \
                 ([A-Z_][A-Z0-9_]* once upper-cased)",
                "nodes.global_metadata.my-key: \"my-key\" cannot be an environment variable \
                 name; use only letters, digits and _, not starting with a digit \
                 ([A-Z_][A-Z0-9_]* once upper-cased)",
                "nodes.global_metadata.node_id: node_id is a placeholder taskfly sets for every \
                 node; choose another name",
                "nodes.global_metadata.taskfly_mode: names starting with TASKFLY_ are reserved \
                 for taskfly's own variables; choose another name",
                "nodes.global_metadata.ünï: \"ünï\" cannot be an environment variable name; use \
                 only letters, digits and _, not starting with a digit ([A-Z_][A-Z0-9_]* once \
                 upper-cased)",
                "nodes.secrets.deployment_id: deployment_id is a placeholder taskfly sets for \
                 every node; choose another name",
                "nodes.distributed_lists.bucket: differs only in case from \
                 nodes.global_metadata.Bucket; both would set the environment variable BUCKET",
                "nodes.config_template.OK_KEY: differs only in case from \
                 nodes.global_metadata.ok_key; both would set the environment variable OK_KEY",
                "nodes.secrets.ok_key: also set in nodes.global_metadata.ok_key; a secret cannot \
                 share its name with a key that is not secret",
            ]
        );
    }

    #[test]
    fn nul_characters_are_refused() {
        let nodes = NodesConfig {
            global_metadata: map(json!({"a": "x\u{0}y", "nested": ["x\u{0}"]})),
            secrets: BTreeMap::from([("s".to_owned(), "\u{0}".to_owned())]),
            ..nodes(1)
        };
        assert_eq!(
            check(&nodes),
            vec![
                "nodes.global_metadata.a: contains a NUL character, which an environment \
                 variable cannot hold",
                "nodes.secrets.s: contains a NUL character, which an environment variable cannot \
                 hold",
            ]
        );
    }

    #[test]
    fn count_must_be_in_range() {
        let err = MetadataGenerator::new(&nodes(0)).expect_err("no nodes");
        assert_eq!(
            err.details(),
            ["nodes.count: expected an integer from 1 to 100000, got 0"]
        );
        assert_eq!(
            err.message(),
            "the nodes configuration is invalid (1 problem)"
        );
        assert!(check(&nodes(MAX_NODES + 1)).len() == 1);
        assert!(check(&nodes(MAX_NODES)).is_empty());
    }

    #[test]
    fn secrets_are_marked_and_redacted() {
        let nodes = NodesConfig {
            global_metadata: map(json!({"bucket": "b"})),
            secrets: BTreeMap::from([
                ("db_password".to_owned(), "hunter2".to_owned()),
                ("api_key".to_owned(), "hunter2-long".to_owned()),
                ("same".to_owned(), "hunter2".to_owned()),
                ("empty".to_owned(), String::new()),
            ]),
            ..nodes(1)
        };
        let generator = generator(&nodes);
        let env = generator.node_env("d", "n", 0);
        assert_eq!(env.get("DB_PASSWORD"), Some("hunter2"));
        let secret_names: Vec<&str> = env
            .vars()
            .iter()
            .filter(|var| var.secret)
            .map(|var| var.name.as_str())
            .collect();
        assert_eq!(secret_names, ["API_KEY", "DB_PASSWORD", "EMPTY", "SAME"]);
        let redacted = env.redacted();
        assert!(redacted.contains(&("DB_PASSWORD".to_owned(), "***".to_owned())));
        assert!(redacted.contains(&("BUCKET".to_owned(), "b".to_owned())));
        assert!(redacted.iter().all(|(_, value)| !value.contains("hunter2")));
        assert_eq!(env.secret_values(), ["hunter2-long", "hunter2"]);
        for debug in [
            format!("{env:?}"),
            format!("{generator:?}"),
            format!("{nodes:?}"),
        ] {
            assert!(!debug.contains("hunter2"), "{debug}");
        }
        // Secrets are environment only, never part of the node's configuration.
        assert_eq!(
            generator.node_config("d", "n", 0),
            map(json!({"bucket": "b"}))
        );
    }

    #[test]
    fn env_vars_are_sorted_and_include_the_built_ins() {
        let nodes = NodesConfig {
            global_metadata: map(json!({"zeta": 1, "alpha": 2})),
            ..nodes(4)
        };
        let env = generator(&nodes).node_env("dep", "node-3", 3);
        let names: Vec<&str> = env.vars().iter().map(|var| var.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ALPHA",
                "TASKFLY_DEPLOYMENT_ID",
                "TASKFLY_NODE_ID",
                "TASKFLY_NODE_INDEX",
                "TASKFLY_TOTAL_NODES",
                "ZETA"
            ]
        );
        assert_eq!(env.get("TASKFLY_NODE_INDEX"), Some("3"));
        assert_eq!(env.get("TASKFLY_TOTAL_NODES"), Some("4"));
    }
}
