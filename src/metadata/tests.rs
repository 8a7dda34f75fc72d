//! Node configurations and environments, templates, and the problems `check` reports.

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
fn a_key_set_in_two_places_is_refused_naming_both() {
    let twice = NodesConfig {
        global_metadata: map(json!({"a": "global", "b": "global", "c": "global"})),
        distributed_lists: BTreeMap::from([
            ("b".to_owned(), vec![json!("list")]),
            ("d".to_owned(), vec![json!("list")]),
        ]),
        config_template: map(json!({"c": "template", "d": "{d}-{node_index}"})),
        ..nodes(1)
    };
    assert_eq!(
        check(&twice),
        vec![
            "nodes.distributed_lists.b: also set in nodes.global_metadata.b; define each key \
             in one place",
            "nodes.config_template.c: also set in nodes.global_metadata.c; define each key in \
             one place (a template may build on the other value by naming it: \"{c}…\")",
        ]
    );
    // A template naming its own key builds on the earlier value: not a second definition.
    let building = NodesConfig {
        global_metadata: map(json!({"a": "global"})),
        distributed_lists: BTreeMap::from([("d".to_owned(), vec![json!("list")])]),
        config_template: map(json!({"d": ["{d}", {"at": "{node_index}"}]})),
        ..nodes(1)
    };
    let config = generator(&building).node_config("dep", "n", 0);
    assert_eq!(
        config,
        map(json!({"a": "global", "d": ["list", {"at": 0}]}))
    );
}

#[test]
fn keys_that_would_set_the_nodes_system_variables_are_refused() {
    let nodes = NodesConfig {
        global_metadata: map(
            json!({"path": "/x", "Home": "/h", "lc_all": "C", "ld_preload": "x", "paths": 1}),
        ),
        secrets: BTreeMap::from([("IFS".to_owned(), "s".to_owned())]),
        config_template: map(json!({"rust_log": "debug", "tmpdir": "/t"})),
        ..nodes(1)
    };
    assert_eq!(
        check(&nodes),
        vec![
            "nodes.global_metadata.Home: would set the node's system variable HOME, which its \
             shell and programs rely on; choose another name",
            "nodes.global_metadata.lc_all: would set LC_ALL, and variables starting with LC_ \
             change how the node's programs run; choose another name",
            "nodes.global_metadata.ld_preload: would set LD_PRELOAD, and variables starting \
             with LD_ change how the node's programs run; choose another name",
            "nodes.global_metadata.path: would set the node's system variable PATH, which its \
             shell and programs rely on; choose another name",
            "nodes.config_template.rust_log: would set RUST_LOG, and variables starting with \
             RUST_LOG change how the node's programs run; choose another name",
            "nodes.config_template.tmpdir: would set the node's system variable TMPDIR, which \
             its shell and programs rely on; choose another name",
            "nodes.secrets.IFS: would set the node's system variable IFS, which its shell and \
             programs rely on; choose another name",
        ]
    );
}

#[test]
fn templates_fill_in_built_ins_and_keys() {
    let nodes = NodesConfig {
        global_metadata: map(json!({"bucket": "data-bkt", "batch": 500, "ratio": 0.5, "on": true})),
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
        json!({"dir": "/data", "owner": "u"}),
        json!({"dir": "{dir}/{node_index}", "log": "{dir}/log", "owner": "{owner}{owner}"}),
    ));
    // A key naming itself means its earlier value; others see the template's value.
    assert_eq!(value_of(&generator, 1, "dir"), json!("/data/1"));
    assert_eq!(value_of(&generator, 1, "log"), json!("/data/1/log"));
    assert_eq!(value_of(&generator, 0, "owner"), json!("uu"));
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
