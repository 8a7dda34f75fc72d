//! What each node gets: its slice of the configuration and its environment variables (SPEC §2).
//!
//! [`MetadataGenerator`] checks a [`NodesConfig`] once (names, placeholders, template order) and
//! then builds any node's configuration in time proportional to what that node receives, so a
//! deployment of 100000 nodes over a list of a million items costs no more than the items
//! themselves. Nothing here does I/O.

mod template;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::config::{NodesConfig, MAX_NODES};
use crate::error::{Error, Result};

use self::template::{Scope, Template};

/// The placeholders taskfly fills in for every node; no user key may take these names.
const BUILTINS: [&str; 4] = ["node_id", "node_index", "total_nodes", "deployment_id"];

/// The prefix of taskfly's own environment variables, which user keys may not use.
const RESERVED_PREFIX: &str = "TASKFLY_";

/// Environment variables the node's system, shell or dynamic loader reads: a metadata key
/// becoming one of them (`path: /x` sets `PATH`) would break the script in ways that are hard
/// to trace, so such keys are refused (SPEC §2). Compared with the upper-cased key.
const RESERVED_NAMES: [&str; 23] = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "PWD",
    "OLDPWD",
    "IFS",
    "TMPDIR",
    "TZ",
    "LANG",
    "LANGUAGE",
    "TERM",
    "HOSTNAME",
    "MAIL",
    "ENV",
    "BASH_ENV",
    "CDPATH",
    "SHLVL",
    "PS1",
    "PS2",
    "PS4",
    "GLIBC_TUNABLES",
];

/// Prefixes of variables read by the C library's locale and loader, bash's exported functions
/// and the Rust agent's log filter, refused like [`RESERVED_NAMES`].
const RESERVED_PREFIXES: [&str; 4] = ["LC_", "LD_", "BASH_FUNC_", "RUST_LOG"];

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
    let ordered = template::parse_and_order(nodes, &mut problems);
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
        if RESERVED_NAMES.contains(&env_name.as_str()) {
            problems.push(format!(
                "{path}: would set the node's system variable {env_name}, which its shell and \
                 programs rely on; choose another name"
            ));
            continue;
        }
        if let Some(prefix) = RESERVED_PREFIXES
            .iter()
            .find(|prefix| env_name.starts_with(*prefix))
        {
            problems.push(format!(
                "{path}: would set {env_name}, and variables starting with {prefix} change how \
                 the node's programs run; choose another name"
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
            } else if *source == Source::Template {
                // A template key may build on the same key's value by naming it.
                if !nodes
                    .config_template
                    .get(*key)
                    .is_some_and(|value| template::names(value, key))
                {
                    problems.push(format!(
                        "{path}: also set in {first_path}; define each key in one place (a \
                         template may build on the other value by naming it: \"{{{key}}}…\")"
                    ));
                }
            } else {
                problems.push(format!(
                    "{path}: also set in {first_path}; define each key in one place"
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
