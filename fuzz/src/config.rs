//! `taskfly.yml` → [`DeploymentConfig`] → [`MetadataGenerator`] → each node's environment.

use std::collections::BTreeMap;

use serde_json::Value as JsonValue;
use serde_yaml::Value as YamlValue;
use taskfly::config::{CloudProvider, NodesConfig};
use taskfly::metadata::NodeEnv;
use taskfly::{DeploymentConfig, MetadataGenerator};

/// The longest input tried. A `taskfly.yml` is a few kilobytes; longer inputs only slow the
/// fuzzer down without reaching new code.
pub const MAX_INPUT: usize = 64 * 1024;

/// The deployment id the nodes are built for.
const DEPLOYMENT_ID: &str = "dep-fuzz";

/// The environment variables taskfly sets for every node.
const BUILTINS: [&str; 4] = [
    "TASKFLY_DEPLOYMENT_ID",
    "TASKFLY_NODE_ID",
    "TASKFLY_NODE_INDEX",
    "TASKFLY_TOTAL_NODES",
];

/// Parses `text` as a `taskfly.yml` and checks everything that follows from it:
///
/// - a refused file gives an invalid-config error with at least one detail;
/// - an accepted file holds the invariants [`DeploymentConfig`] documents, and its `nodes`
///   section is accepted by [`MetadataGenerator::new`] too (both run the same checks);
/// - for the first, the middle and the last node, the environment holds the rules of SPEC §2
///   (see [`check_env`]);
/// - neither the result nor any message depends on the values of `nodes.secrets`
///   (see [`check_secrets_do_not_show`]).
pub fn check(text: &str) {
    if text.len() > MAX_INPUT {
        return;
    }
    let parsed = DeploymentConfig::from_yaml(text);
    match &parsed {
        Err(err) => {
            assert!(
                err.is_invalid_config(),
                "from_yaml failed with an error that is not invalid-config: {err:?}"
            );
            assert!(
                !err.details().is_empty(),
                "an invalid config without details: {err:?}"
            );
        }
        Ok(config) => {
            check_config(config);
            check_nodes(&config.nodes);
        }
    }
    check_secrets_do_not_show(text);
}

/// The invariants the fields of a [`DeploymentConfig`] document.
fn check_config(config: &DeploymentConfig) {
    assert_eq!(
        config.aws.is_some(),
        config.cloud_provider == CloudProvider::Aws,
        "aws settings must be present exactly when the provider is aws"
    );
    assert!(
        !config.application_files.is_empty(),
        "application_files is empty"
    );
    for file in &config.application_files {
        assert!(!file.trim().is_empty(), "an empty application file");
        assert!(
            !leaves_folder(file),
            "application file {file:?} leaves the project folder"
        );
    }
    let script = &config.remote_script_to_run;
    assert!(!script.trim().is_empty(), "an empty remote_script_to_run");
    assert!(
        !leaves_folder(script),
        "remote_script_to_run {script:?} leaves the bundle"
    );
    if let Some(name) = &config.bundle_name {
        assert!(
            !name.contains(['/', '\\']) && name != "." && name != "..",
            "bundle_name {name:?} is not a plain file name"
        );
    }
    if !config.local.hosts.is_empty() {
        assert!(config.local.ssh_user.is_some(), "hosts without ssh_user");
    }
    assert!(config.local.ssh_port >= 1, "ssh_port 0");
    if let Some(aws) = &config.aws {
        assert!(!aws.image_id.trim().is_empty(), "an empty image_id");
        assert!(
            !aws.instance_type.trim().is_empty(),
            "an empty instance_type"
        );
        assert!(!aws.security_groups.is_empty(), "no security group");
        if let Some(url) = &aws.endpoint_url {
            assert!(url.starts_with("http://") || url.starts_with("https://"));
        }
    }
    let nodes = &config.nodes;
    assert!(
        (1..=100_000).contains(&nodes.count),
        "nodes.count {}",
        nodes.count
    );
    assert!(nodes.retries <= 100, "nodes.retries {}", nodes.retries);
    assert!(nodes.timeout.is_none_or(|t| !t.is_zero()), "a zero timeout");
    for list in nodes.distributed_lists.values() {
        assert!(!list.is_empty(), "an empty distributed list");
    }
}

/// What `config.rs` means by a path that leaves its folder (its `leaves_folder` is private).
fn leaves_folder(path: &str) -> bool {
    let bytes = path.as_bytes();
    let has_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    path.starts_with(['/', '\\', '~'])
        || has_drive
        || path.split(['/', '\\']).any(|part| part == "..")
}

/// Builds the generator and checks the first, middle and last node.
fn check_nodes(nodes: &NodesConfig) {
    let generator = match MetadataGenerator::new(nodes) {
        Ok(generator) => generator,
        Err(err) => panic!("from_yaml accepted a nodes section MetadataGenerator refuses: {err:?}"),
    };
    let total = generator.total_nodes();
    assert_eq!(total, nodes.count);
    assert!(total >= 1);

    // The same nodes with every secret value changed: nothing shown may change with them.
    let mut other_nodes = nodes.clone();
    for (index, value) in other_nodes.secrets.values_mut().enumerate() {
        *value = format!("{value}~other-secret-{index}");
    }
    let other = match MetadataGenerator::new(&other_nodes) {
        Ok(other) => other,
        Err(err) => panic!("changing only secret values made the nodes invalid: {err:?}"),
    };
    assert_eq!(
        format!("{generator:?}"),
        format!("{other:?}"),
        "Debug shows a secret"
    );
    assert_eq!(
        format!("{nodes:?}"),
        format!("{other_nodes:?}"),
        "Debug shows a secret"
    );

    let mut indexes = vec![0, total / 2, total - 1];
    indexes.dedup();
    for index in indexes {
        let node_id = format!("{DEPLOYMENT_ID}-{index}");
        let config = generator.node_config(DEPLOYMENT_ID, &node_id, index);
        check_node_config(nodes, &config, index);
        let env = generator.node_env(DEPLOYMENT_ID, &node_id, index);
        check_env(nodes, &config, &env, &node_id, index);

        let other_env = other.node_env(DEPLOYMENT_ID, &node_id, index);
        assert_eq!(
            env.redacted(),
            other_env.redacted(),
            "redacted() shows a secret"
        );
        assert_eq!(
            format!("{env:?}"),
            format!("{other_env:?}"),
            "Debug shows a secret"
        );
    }
}

/// SPEC §2's order of sources: each key of `global_metadata` and each list's share, unless a
/// later source sets the same key.
fn check_node_config(nodes: &NodesConfig, config: &BTreeMap<String, JsonValue>, index: u32) {
    let n = nodes.count as usize;
    let i = index as usize;
    for (key, list) in &nodes.distributed_lists {
        if nodes.config_template.contains_key(key) {
            continue;
        }
        let m = list.len();
        let expected = if m <= n {
            list[i % m].clone()
        } else {
            JsonValue::Array(list.iter().skip(i).step_by(n).cloned().collect())
        };
        assert_eq!(
            config.get(key),
            Some(&expected),
            "node {i}'s share of list {key:?}"
        );
    }
    for (key, value) in &nodes.global_metadata {
        if nodes.distributed_lists.contains_key(key) || nodes.config_template.contains_key(key) {
            continue;
        }
        assert_eq!(
            config.get(key),
            Some(value),
            "global_metadata {key:?} on node {i}"
        );
    }
    for key in nodes.config_template.keys() {
        assert!(
            config.contains_key(key),
            "template key {key:?} missing on node {i}"
        );
    }
    assert_eq!(
        config.len(),
        nodes
            .global_metadata
            .keys()
            .chain(nodes.distributed_lists.keys())
            .chain(nodes.config_template.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        "node {i}'s configuration has keys no source set"
    );
}

/// SPEC §2's rules for a node's environment.
fn check_env(
    nodes: &NodesConfig,
    config: &BTreeMap<String, JsonValue>,
    env: &NodeEnv,
    node_id: &str,
    index: u32,
) {
    let vars = env.vars();
    for pair in vars.windows(2) {
        assert!(
            pair[0].name < pair[1].name,
            "variables not sorted or repeated: {:?} then {:?}",
            pair[0].name,
            pair[1].name
        );
    }
    for var in vars {
        assert!(
            is_env_name(&var.name),
            "invalid variable name {:?}",
            var.name
        );
        assert!(
            !var.value.contains('\0'),
            "variable {} holds a NUL",
            var.name
        );
        assert_eq!(
            env.get(&var.name),
            Some(var.value.as_str()),
            "get({:?})",
            var.name
        );
    }
    assert_eq!(
        vars.len(),
        config.len() + nodes.secrets.len() + BUILTINS.len(),
        "two keys became the same variable, or one was lost"
    );
    let expected_builtins = [
        DEPLOYMENT_ID.to_owned(),
        node_id.to_owned(),
        index.to_string(),
        nodes.count.to_string(),
    ];
    for (name, expected) in BUILTINS.iter().zip(&expected_builtins) {
        assert_eq!(env.get(name), Some(expected.as_str()), "{name}");
    }
    for (key, value) in &nodes.secrets {
        let name = key.to_ascii_uppercase();
        let var = vars
            .iter()
            .find(|var| var.name == name)
            .unwrap_or_else(|| panic!("secret {key:?} has no variable"));
        assert!(var.secret, "secret {key:?} not marked secret");
        assert_eq!(&var.value, value, "secret {key:?} changed on its way");
    }
    assert_eq!(
        vars.iter().filter(|var| var.secret).count(),
        nodes.secrets.len(),
        "a variable that is not a secret is marked secret"
    );

    // redacted(): the same variables, secrets masked, everything else as it is.
    let redacted = env.redacted();
    assert_eq!(redacted.len(), vars.len());
    for ((name, shown), var) in redacted.iter().zip(vars) {
        assert_eq!(name, &var.name);
        if var.secret {
            assert_eq!(shown, "***", "redacted() shows secret {name}");
        } else {
            assert_eq!(shown, &var.value);
        }
    }

    // secret_values(): the non-empty secret values, longest first, without repeats.
    let values = env.secret_values();
    for pair in values.windows(2) {
        assert!(
            pair[0].len() >= pair[1].len(),
            "secret_values() not longest first"
        );
        assert_ne!(pair[0], pair[1], "secret_values() repeats a value");
    }
    let mut expected: Vec<&String> = nodes.secrets.values().filter(|v| !v.is_empty()).collect();
    expected.sort();
    expected.dedup();
    let mut got: Vec<&String> = values.iter().collect();
    got.sort();
    assert_eq!(got, expected, "secret_values()");
}

/// SPEC §2: `[A-Z_][A-Z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_uppercase() || first == b'_')
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Parses two copies of `text` that differ only in the string values of `nodes.secrets` and
/// checks that both give the same answer: the same error message and details, or configs whose
/// `Debug` output is the same. A secret value that reached a message would make them differ.
fn check_secrets_do_not_show(text: &str) {
    let Ok(mut root) = serde_yaml::from_str::<YamlValue>(text) else {
        return;
    };
    if root.apply_merge().is_err() {
        return;
    }
    let Some(secrets) = root
        .get("nodes")
        .and_then(|nodes| nodes.get("secrets"))
        .and_then(YamlValue::as_mapping)
    else {
        return;
    };
    // NUL is the one character a secret may not hold, so only strings without one are swapped,
    // for strings without one.
    let swappable = |value: &YamlValue| matches!(value, YamlValue::String(s) if !s.contains('\0'));
    if !secrets.values().any(swappable) {
        return;
    }
    let with_secrets = |marker: &str| -> Option<String> {
        let mut copy = root.clone();
        let secrets = copy
            .get_mut("nodes")?
            .get_mut("secrets")?
            .as_mapping_mut()?;
        for (index, value) in secrets.values_mut().enumerate() {
            if swappable(value) {
                *value = YamlValue::String(format!("{marker}-{index}"));
            }
        }
        serde_yaml::to_string(&copy).ok()
    };
    let (Some(first), Some(second)) = (with_secrets("hunter2-aaaa"), with_secrets("hunter2-bbbb"))
    else {
        return;
    };
    match (
        DeploymentConfig::from_yaml(&first),
        DeploymentConfig::from_yaml(&second),
    ) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "Debug shows a secret"),
        (Err(a), Err(b)) => {
            assert_eq!(a.message(), b.message(), "an error message depends on a secret");
            assert_eq!(a.details(), b.details(), "an error detail depends on a secret");
        }
        (a, b) => panic!(
            "changing only secret values changed the outcome:\n{first}\n=> {a:?}\n\n{second}\n=> {b:?}"
        ),
    }
}
