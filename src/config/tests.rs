use super::aws::AWS_FIELDS;
use super::diagnostics::{edit_distance, normalize};
use super::nodes::NODES_FIELDS;
use super::*;
use serde_json::json;
use std::time::Duration;

/// A valid local deployment with one node, to which a test appends what it checks.
const MINIMAL: &str = "cloud_provider: local\napplication_files: [setup.sh]\nnodes:\n  count: 1\n";

#[test]
fn local_nodes_may_not_share_one_absolute_remote_dest_dir() {
    let yml = |provider: &str, count: u32, dir: &str| {
        let section = if provider == "aws" {
            "instance_config:\n  aws:\n    image_id: ami-1\n    instance_type: t3.micro\n"
        } else {
            ""
        };
        format!(
                "cloud_provider: {provider}\n{section}application_files: [setup.sh]\nremote_dest_dir: {dir:?}\nnodes:\n  count: {count}\n"
            )
    };
    let found = problems(&yml("local", 3, "/opt/job"));
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("remote_dest_dir: the 3 local nodes")),
        "{found:?}"
    );
    for shared in ["~/job", "~"] {
        assert!(!problems(&yml("local", 2, shared)).is_empty(), "{shared}");
    }
    for (provider, count, dir) in [
        ("local", 2, "job"),
        ("local", 1, "/opt/job"),
        ("aws", 5, "/opt/job"),
    ] {
        DeploymentConfig::from_yaml(&yml(provider, count, dir))
            .unwrap_or_else(|e| panic!("{provider} {count} {dir}: {e:?}"));
    }
}

#[test]
fn remote_dest_dir_with_a_dotdot_step_or_blanks_around_it_is_refused() {
    let yml = |dir: &str| {
        format!("cloud_provider: local\napplication_files: [setup.sh]\nremote_dest_dir: {dir:?}\nnodes:\n  count: 1\n")
    };
    for bad in [
        "/missing/../tmp",
        "../up",
        "job/..",
        " /opt/job",
        "/opt/job ",
    ] {
        let found = problems(&yml(bad));
        assert!(
            found.iter().any(|p| p.starts_with("remote_dest_dir")),
            "{bad:?}: {found:?}"
        );
    }
    for good in ["/opt/job", "~/job", "relative/dir", "/opt/..job"] {
        let config = DeploymentConfig::from_yaml(&yml(good)).expect(good);
        assert_eq!(config.remote_dest_dir.as_deref(), Some(good));
    }
}

fn problems(text: &str) -> Vec<String> {
    match DeploymentConfig::from_yaml(text) {
        Ok(config) => panic!("expected problems, got {config:?}"),
        Err(err) => {
            assert!(err.is_invalid_config(), "{err:?}");
            err.details().to_vec()
        }
    }
}

fn parse(text: &str) -> DeploymentConfig {
    match DeploymentConfig::from_yaml(text) {
        Ok(config) => config,
        Err(err) => panic!("{err}"),
    }
}

#[test]
fn the_spec_example_parses() {
    let text = r#"
cloud_provider: aws
instance_config:
  local:
    hosts: [10.0.0.5, 10.0.0.6]
    ssh_user: ops
  aws:
    region: us-west-2
    image_id: ami-0abc1234
    instance_type: t3.micro
    key_name: my-keypair
    security_groups: [sg-0123]
    subnet_id: subnet-0456
    iam_instance_profile: name
    spot: false
    tags: {team: data, cost_center: 42}
    endpoint_url: http://127.0.0.1:5000
application_files: [setup.sh, "src/**/*.py", data/]
remote_script_to_run: setup.sh
remote_dest_dir: /opt/job
bundle_name: job.tar.gz
nodes:
  count: 5
  timeout: 30m
  retries: 2
  global_metadata: {bucket: data-bkt, batch: 500}
  secrets: {db_password: "s3cr3t", pin: 1234}
  distributed_lists:
    shard: [a.csv, b.csv, c.csv]
  config_template:
    input: "{shard}"
    out: "s3://{bucket}/out/{node_index}"
"#;
    let config = parse(text);
    assert_eq!(config.cloud_provider, CloudProvider::Aws);
    assert_eq!(config.cloud_provider.as_str(), "aws");
    // Only the provider's own entry is read; the local one keeps its defaults.
    assert_eq!(config.local, LocalConfig::default());
    let aws = config.aws.expect("aws settings");
    assert_eq!(aws.region.as_deref(), Some("us-west-2"));
    assert_eq!(aws.image_id, "ami-0abc1234");
    assert_eq!(aws.instance_type, "t3.micro");
    assert_eq!(aws.key_name.as_deref(), Some("my-keypair"));
    assert_eq!(aws.security_groups, vec!["sg-0123"]);
    assert_eq!(aws.subnet_id.as_deref(), Some("subnet-0456"));
    assert_eq!(aws.iam_instance_profile.as_deref(), Some("name"));
    assert!(!aws.spot);
    assert_eq!(aws.tags.get("team").map(String::as_str), Some("data"));
    assert_eq!(aws.tags.get("cost_center").map(String::as_str), Some("42"));
    assert_eq!(aws.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
    assert_eq!(
        config.application_files,
        vec!["setup.sh", "src/**/*.py", "data/"]
    );
    assert_eq!(config.remote_script_to_run, "setup.sh");
    assert_eq!(config.remote_dest_dir.as_deref(), Some("/opt/job"));
    assert_eq!(config.bundle_name.as_deref(), Some("job.tar.gz"));
    let nodes = &config.nodes;
    assert_eq!(nodes.count, 5);
    assert_eq!(nodes.timeout, Some(Duration::from_secs(30 * 60)));
    assert_eq!(nodes.retries, 2);
    assert_eq!(
        nodes.global_metadata.get("bucket"),
        Some(&json!("data-bkt"))
    );
    assert_eq!(nodes.global_metadata.get("batch"), Some(&json!(500)));
    assert_eq!(
        nodes.secrets.get("db_password").map(String::as_str),
        Some("s3cr3t")
    );
    assert_eq!(nodes.secrets.get("pin").map(String::as_str), Some("1234"));
    assert_eq!(
        nodes.distributed_lists.get("shard"),
        Some(&vec![json!("a.csv"), json!("b.csv"), json!("c.csv")])
    );
    assert_eq!(nodes.config_template.get("input"), Some(&json!("{shard}")));
}

#[test]
fn defaults() {
    let config = parse(MINIMAL);
    assert_eq!(config.cloud_provider, CloudProvider::Local);
    assert_eq!(config.local.hosts, Vec::<String>::new());
    assert_eq!(config.local.ssh_port, 22);
    assert_eq!(config.local.agent, LocalAgent::Rust);
    assert_eq!(config.local.ssh_user, None);
    assert_eq!(config.aws, None);
    assert_eq!(config.remote_script_to_run, "setup.sh");
    assert_eq!(config.remote_dest_dir, None);
    assert_eq!(config.bundle_name, None);
    assert_eq!(config.nodes.count, 1);
    assert_eq!(config.nodes.timeout, None);
    assert_eq!(config.nodes.retries, 0);
    assert!(config.nodes.global_metadata.is_empty());
    assert!(config.nodes.secrets.is_empty());

    let aws = parse(
        "cloud_provider: aws\ninstance_config:\n  aws: {image_id: ami-1, instance_type: t3.nano}\n\
             application_files: [setup.sh]\nnodes: {count: 2}\n",
    )
    .aws
    .expect("aws settings");
    assert_eq!(aws.security_groups, vec!["default"]);
    assert!(!aws.spot);
    assert_eq!(aws.region, None);
    assert!(aws.tags.is_empty());
}

#[test]
fn local_settings() {
    let config = parse(
            "cloud_provider: local\ninstance_config:\n  local:\n    hosts: [10.0.0.5, node-b]\n    \
             ssh_user: ops\n    ssh_key_path: ~/.ssh/id_ed25519\n    ssh_port: 2222\n    agent: script\n\
             application_files: [setup.sh]\nnodes: {count: 2}\n",
        );
    assert_eq!(config.local.hosts, vec!["10.0.0.5", "node-b"]);
    assert_eq!(config.local.ssh_user.as_deref(), Some("ops"));
    assert_eq!(
        config.local.ssh_key_path.as_deref(),
        Some("~/.ssh/id_ed25519")
    );
    assert_eq!(config.local.ssh_port, 2222);
    assert_eq!(config.local.agent, LocalAgent::Script);
}

#[test]
fn ssh_user_is_required_with_hosts() {
    let text = "cloud_provider: local\ninstance_config:\n  local: {hosts: [h1]}\n\
                    application_files: [setup.sh]\nnodes: {count: 1}\n";
    assert_eq!(
            problems(text),
            vec!["instance_config.local.ssh_user: required when hosts is set; the user to log in as over SSH"]
        );
}

#[test]
fn ssh_hosts_run_the_shell_bootstrap_unless_the_rust_agent_is_asked_for() {
    let yml = |agent: &str| {
        format!(
                "cloud_provider: local\ninstance_config:\n  local: {{hosts: [h1], ssh_user: ops{agent}}}\n\
                 application_files: [setup.sh]\nnodes: {{count: 1}}\n"
            )
    };
    assert_eq!(parse(&yml("")).local.agent, LocalAgent::Script);
    assert_eq!(
        parse(&yml(", agent: script")).local.agent,
        LocalAgent::Script
    );
    assert_eq!(
        problems(&yml(", agent: rust")),
        vec![
            "instance_config.local.agent: nodes on SSH hosts run the shell bootstrap (they \
                  need only sh, curl, tar and gzip there); remove agent or set it to script"
        ]
    );
}

#[test]
fn ssh_hosts_and_users_that_ssh_would_read_as_options_are_refused() {
    let text = "cloud_provider: local\ninstance_config:\n  local:\n    \
                    hosts: [10.0.0.5, '-oProxyCommand=touch /tmp/x', 'fe80::1', 'a b']\n    \
                    ssh_user: -lroot\napplication_files: [setup.sh]\nnodes: {count: 1}\n";
    assert_eq!(
            problems(text),
            vec![
                "instance_config.local.hosts[1]: \"-oProxyCommand=touch /tmp/x\" is not a host \
                 name or IP address (letters, digits, `.`, `-`, `_` and `:`, not starting with `-`)",
                "instance_config.local.hosts[3]: \"a b\" is not a host name or IP address \
                 (letters, digits, `.`, `-`, `_` and `:`, not starting with `-`)",
                "instance_config.local.ssh_user: \"-lroot\" is not a user name (letters, digits, \
                 `.`, `-` and `_`, not starting with `-`)",
            ]
        );
}

#[test]
fn one_remote_dest_dir_is_refused_for_nodes_sharing_an_ssh_host() {
    let yml = |count: u32| {
        format!(
                "cloud_provider: local\ninstance_config:\n  local: {{hosts: [h1, h2, h1], ssh_user: ops}}\n\
                 application_files: [setup.sh]\nremote_dest_dir: /opt/job\nnodes: {{count: {count}}}\n"
            )
    };
    assert_eq!(parse(&yml(2)).remote_dest_dir.as_deref(), Some("/opt/job"));
    assert_eq!(
        problems(&yml(3)),
        vec![
            "remote_dest_dir: the 3 local nodes would share /opt/job on each of the 2 hosts; \
                  remove it (each node gets a fresh folder) or make it relative (taken from each \
                  node's work directory)"
        ]
    );
}

#[test]
fn unknown_fields_name_the_field_meant() {
    let text = "cloud_provider: aws\ncloud_providr: aws\ninstance_config:\n  aws:\n    \
                    image_id: ami-1\n    instance_typ: t3.micro\n    Instance_Type: t3.micro\n  \
                    locl: {}\napplication_files: [setup.sh]\nnodes:\n  cuont: 3\n  count: 3\n  \
                    zebra: 1\n";
    assert_eq!(
        problems(text),
        vec![
            "cloud_providr: unknown field; did you mean `cloud_provider`?",
            "instance_config.locl: unknown field; did you mean `local`?",
            "instance_config.aws.instance_typ: unknown field; did you mean `instance_type`?",
            "instance_config.aws.Instance_Type: unknown field; did you mean `instance_type`?",
            "instance_config.aws.instance_type: required; the instance type, like t3.micro",
            "nodes.cuont: unknown field; did you mean `count`?",
            "nodes.zebra: unknown field; valid fields are count, timeout, retries, \
                 global_metadata, secrets, distributed_lists, config_template",
        ]
    );
}

#[test]
fn the_entry_of_the_other_provider_is_not_read() {
    let text = format!("{MINIMAL}instance_config:\n  aws: {{anything: [1, 2]}}\n");
    assert_eq!(parse(&text).aws, None);
}

#[test]
fn all_errors_are_reported_at_once() {
    let text = "cloud_provider: Azure\napplication_files: [../secret.txt]\nnodes:\n  \
                    count: five\n  retries: 101\n";
    assert_eq!(
        problems(text),
        vec![
            "cloud_provider: expected local, aws or a provider's name (lowercase letters, \
                 digits, `-` and `_`), got \"Azure\"",
            "application_files[0]: \"../secret.txt\" must be relative to taskfly.yml and \
                 stay inside its folder",
            "nodes.count: expected an integer from 1 to 100000, got \"five\"",
            "nodes.retries: expected an integer from 0 to 100, got 101",
        ]
    );
    let err = DeploymentConfig::from_yaml(text).expect_err("invalid");
    assert_eq!(err.message(), "taskfly.yml is invalid (4 problems)");
}

#[test]
fn structural_and_template_problems_come_together() {
    let text = "cloud_provider: local\napplication_files: [setup.sh]\nnodes:\n  count: 0\n  \
                    config_template:\n    out: \"{bukket}\"\n  global_metadata: {bucket: b}\n";
    assert_eq!(
        problems(text),
        vec![
            "nodes.count: expected an integer from 1 to 100000, got 0",
            "nodes.config_template.out: unknown placeholder {bukket}; did you mean {bucket}?",
        ]
    );
}

#[test]
fn ami_is_an_alias_of_image_id() {
    let base = "cloud_provider: aws\napplication_files: [setup.sh]\nnodes: {count: 1}\n";
    let config = parse(&format!(
        "{base}instance_config:\n  aws: {{ami: ami-0123, instance_type: t3.micro}}\n"
    ));
    assert_eq!(
        config.aws.map(|aws| aws.image_id).as_deref(),
        Some("ami-0123")
    );

    assert_eq!(
            problems(&format!(
                "{base}instance_config:\n  aws: {{ami: ami-1, image_id: ami-2, instance_type: t3.micro}}\n"
            )),
            vec!["instance_config.aws.ami: `ami` is another name for `image_id`; give only one of them"]
        );
}

#[test]
fn aws_required_fields() {
    let base = "cloud_provider: aws\napplication_files: [setup.sh]\nnodes: {count: 1}\n";
    assert_eq!(
        problems(&format!(
            "{base}instance_config:\n  aws: {{region: eu-west-1}}\n"
        )),
        vec![
            "instance_config.aws.image_id: required; the AMI to start, like ami-0abc1234",
            "instance_config.aws.instance_type: required; the instance type, like t3.micro",
        ]
    );
    assert_eq!(
            problems(base),
            vec!["instance_config.aws: required when cloud_provider is aws; set at least image_id and instance_type"]
        );
    assert_eq!(
        problems(&format!(
            "{base}instance_config:\n  aws: {{image_id: a, instance_type: b, spot: yes, \
                 security_groups: [], endpoint_url: localhost:5000}}\n"
        )),
        vec![
            "instance_config.aws.security_groups: the list is empty; name at least one \
                 group, or leave the field out for [default]",
            "instance_config.aws.spot: expected true or false, got \"yes\"",
            "instance_config.aws.endpoint_url: expected an http:// or https:// URL, got \
                 \"localhost:5000\"",
        ]
    );
}

#[test]
fn cloud_provider_is_required_and_checked() {
    let rest = "application_files: [setup.sh]\nnodes: {count: 1}\n";
    assert_eq!(
        problems(rest),
        vec!["cloud_provider: required; set it to local or aws"]
    );
    assert_eq!(
        problems(&format!("cloud_provider: AWS\n{rest}")),
        vec![
            "cloud_provider: expected local, aws or a provider's name (lowercase letters, \
              digits, `-` and `_`), got \"AWS\"; did you mean aws?"
        ]
    );
}

#[test]
fn another_providers_name_is_accepted_and_its_section_handed_over_unread() {
    let text = "cloud_provider: inproc\ninstance_config:\n  inproc: {slots: 3, anything: [1]}\n  \
                aws: {ignored: true}\napplication_files: [setup.sh]\nnodes: {count: 1}\n";
    let config = parse(text);
    assert_eq!(config.cloud_provider, CloudProvider::Other("inproc".into()));
    assert_eq!(config.cloud_provider.as_str(), "inproc");
    let settings = config.provider_settings();
    assert_eq!(settings.name(), "inproc");
    assert_eq!(settings.path(), "instance_config.inproc");
    assert_eq!(settings.section()["slots"], serde_yaml::Value::from(3));
    // The section of a provider not chosen is not read, as for the built-ins.
    assert_eq!(config.aws, None);
    // Only the built-ins' and the chosen provider's sections may appear.
    let stray = "cloud_provider: inproc\ninstance_config:\n  inprc: {}\n\
                 application_files: [setup.sh]\nnodes: {count: 1}\n";
    assert_eq!(
        problems(stray),
        vec!["instance_config.inprc: unknown field; did you mean `inproc`?"]
    );
}

#[test]
fn the_built_in_sections_are_read_again_for_their_provider_with_field_paths() {
    let text = format!("{MINIMAL}instance_config:\n  local: {{hosts: [h1]}}\n");
    let settings = ProviderSettings::new(
        "local",
        serde_yaml::from_str("{hosts: [h1]}").expect("yaml"),
    );
    let error = super::local_settings(&settings).expect_err("no ssh_user");
    assert_eq!(error.details(), problems(&text));
    let config = parse(MINIMAL);
    assert_eq!(
        super::local_settings(&config.provider_settings()).expect("valid"),
        config.local
    );
}

#[test]
fn application_files_stay_inside_the_folder() {
    let head = "cloud_provider: local\nnodes: {count: 1}\n";
    assert_eq!(
        problems(head),
        vec!["application_files: required; list at least the script named by remote_script_to_run"]
    );
    assert_eq!(
            problems(&format!("{head}application_files: []\n")),
            vec!["application_files: the list is empty; list at least the script named by remote_script_to_run"]
        );
    assert_eq!(
            problems(&format!(
                "{head}application_files: [ok.sh, /etc/passwd, a/../../b, 'C:\\x', '', 7, ~/x, a/..b]\n"
            )),
            vec![
                "application_files[1]: \"/etc/passwd\" must be relative to taskfly.yml and stay inside its folder",
                "application_files[2]: \"a/../../b\" must be relative to taskfly.yml and stay inside its folder",
                "application_files[3]: \"C:\\\\x\" must be relative to taskfly.yml and stay inside its folder",
                "application_files[4]: must not be empty",
                "application_files[5]: expected a string, got 7",
                "application_files[6]: \"~/x\" must be relative to taskfly.yml and stay inside its folder",
            ]
        );
    assert_eq!(
            problems(&format!("{head}application_files: setup.sh\n")),
            vec!["application_files: expected a list of files, globs or directories (like [setup.sh, data/]), got \"setup.sh\""]
        );
}

#[test]
fn script_and_bundle_name_rules() {
    assert_eq!(
            problems(&format!("{MINIMAL}remote_script_to_run: ../run.sh\nbundle_name: out/b.tgz\n")),
            vec![
                "remote_script_to_run: \"../run.sh\" must be relative to the bundle's root and stay inside it",
                "bundle_name: \"out/b.tgz\" must be a file name, without folders",
            ]
        );
    let config = parse(&format!("{MINIMAL}remote_script_to_run: bin/run.sh\n"));
    assert_eq!(config.remote_script_to_run, "bin/run.sh");
}

#[test]
fn timeouts() {
    let with = |timeout: &str| {
        format!("cloud_provider: local\napplication_files: [s]\nnodes:\n  count: 1\n  timeout: {timeout}\n")
    };
    assert_eq!(
        parse(&with("90s")).nodes.timeout,
        Some(Duration::from_secs(90))
    );
    assert_eq!(
        parse(&with("1h 30m")).nodes.timeout,
        Some(Duration::from_secs(5400))
    );
    assert_eq!(
        parse(&with("45")).nodes.timeout,
        Some(Duration::from_secs(45))
    );
    assert_eq!(
        problems(&with("0")),
        vec!["nodes.timeout: must be longer than zero; leave it out for no timeout"]
    );
    let bad = problems(&with("soon"));
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0].starts_with(
            "nodes.timeout: expected a duration like 30m, 90s or 1h 30m, or a whole number \
                 of seconds, got \"soon\""
        ),
        "{bad:?}"
    );
    assert_eq!(
            problems(&with("-5")),
            vec!["nodes.timeout: expected a duration like 30m, 90s or 1h 30m, or a whole number of seconds, got -5"]
        );
}

#[test]
fn values_become_json() {
    let text = format!(
            "{MINIMAL}  global_metadata:\n    whole: 5.0\n    int: -3\n    big: 18446744073709551615\n    \
             flag: true\n    nothing: null\n    nested: {{a: [1, x, {{b: 2.5}}]}}\n"
        );
    let metadata = parse(&text).nodes.global_metadata;
    assert_eq!(
        metadata.get("whole").map(ToString::to_string).as_deref(),
        Some("5.0")
    );
    assert_eq!(metadata.get("int"), Some(&json!(-3)));
    assert_eq!(metadata.get("big"), Some(&json!(u64::MAX)));
    assert_eq!(metadata.get("flag"), Some(&json!(true)));
    assert_eq!(metadata.get("nothing"), Some(&json!(null)));
    assert_eq!(
        metadata.get("nested"),
        Some(&json!({"a": [1, "x", {"b": 2.5}]}))
    );
}

#[test]
fn values_json_cannot_hold_are_refused() {
    let text = format!(
        "{MINIMAL}  global_metadata:\n    nan: .nan\n    inf: [-.inf]\n    tagged: !secret x\n    \
             keys: {{1: one}}\n  distributed_lists:\n    shard: a.csv\n"
    );
    assert_eq!(
            problems(&text),
            vec![
                "nodes.global_metadata.nan: expected a finite number, got .nan",
                "nodes.global_metadata.inf[0]: expected a finite number, got -.inf",
                "nodes.global_metadata.tagged: YAML tags like !secret are not supported; remove the tag",
                "nodes.global_metadata.keys: mapping keys must be strings, got 1",
                "nodes.distributed_lists.shard: expected a list of items, got \"a.csv\"",
            ]
        );
}

#[test]
fn unquoted_placeholders_are_flagged() {
    let text = format!(
            "{MINIMAL}  distributed_lists: {{shard: [a]}}\n  config_template:\n    input: {{shard}}\n    \
             many: [\"{{shard}}\", {{shard}}]\n"
        );
    assert_eq!(
        problems(&text),
        vec![
            "nodes.config_template.input: {shard} without quotes is a YAML mapping, not a \
                 placeholder; write \"{shard}\" in quotes",
            "nodes.config_template.many[1]: {shard} without quotes is a YAML mapping, not a \
                 placeholder; write \"{shard}\" in quotes",
        ]
    );
}

#[test]
fn secret_values_never_appear_in_messages() {
    let text =
        format!("{MINIMAL}  secrets:\n    db_password: [hunter2]\n    other: {{k: hunter3}}\n");
    let details = problems(&text);
    assert_eq!(
        details,
        vec![
            "nodes.secrets.db_password: expected a string, number or boolean, got a list",
            "nodes.secrets.other: expected a string, number or boolean, got a mapping",
        ]
    );
    let config = parse(&format!("{MINIMAL}  secrets: {{db_password: hunter2}}\n"));
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("db_password"), "{debug}");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let details = problems("cloud_provider: local\nnodes: [\n");
    assert_eq!(details.len(), 1);
    assert!(
        details[0].starts_with("taskfly.yml: invalid YAML: "),
        "{details:?}"
    );
    assert!(details[0].contains("line 3 column 1"), "{details:?}");

    let details = problems("cloud_provider: local\ncloud_provider: aws\n");
    assert_eq!(details.len(), 1);
    assert!(
        details[0].contains("duplicate entry with key \"cloud_provider\""),
        "{details:?}"
    );
}

#[test]
fn a_huge_integer_is_one_problem_at_its_field_among_the_others() {
    let number = "98765432109876543210987654321";
    let details = problems(&format!(
        "{MINIMAL}  secrets: {{n: {number}}}\n  global_metadata: {{big: -{number}}}\n  retries: {number}\n  cuont: 1\n"
    ));
    assert_eq!(
        details,
        vec![
            "nodes.cuont: unknown field; did you mean `count`?".to_owned(),
            "nodes.retries: expected an integer from 0 to 100, got an integer too large for 64 \
             bits (quote it to pass it on as text)"
                .to_owned(),
            "nodes.global_metadata.big: expected a value a node can get, got an integer too \
             large for 64 bits (quote it to pass it on as text)"
                .to_owned(),
            "nodes.secrets.n: expected a string, number or boolean, got an integer too large \
             for 64 bits (quote it to pass it on as text)"
                .to_owned(),
        ]
    );
    assert!(!details.concat().contains(number), "{details:?}");
    // Quoted, it is text like any other.
    let config = parse(&format!("{MINIMAL}  secrets: {{n: \"{number}\"}}\n"));
    assert_eq!(
        config.nodes.secrets.get("n").map(String::as_str),
        Some(number)
    );
}

#[test]
fn a_bare_number_of_seconds_is_a_duration_as_on_the_command_line() {
    for written in ["90", "\"90\"", "90s", "1m 30s", "\" 90 \""] {
        let config = parse(&format!("{MINIMAL}  timeout: {written}\n"));
        assert_eq!(
            config.nodes.timeout,
            Some(Duration::from_secs(90)),
            "{written}"
        );
        let flag = written.trim_matches('"');
        assert_eq!(
            parse_duration(flag).unwrap(),
            Duration::from_secs(90),
            "{written}"
        );
    }
    for refused in ["1.5", "-3", "soon", "\"\""] {
        let details = problems(&format!("{MINIMAL}  timeout: {refused}\n"));
        assert_eq!(details.len(), 1, "{refused}: {details:?}");
        assert!(
            details[0].starts_with("nodes.timeout: expected a duration"),
            "{details:?}"
        );
        assert!(parse_duration(refused.trim_matches('"'))
            .unwrap_err()
            .is_invalid_input());
    }
}

#[test]
fn empty_and_odd_documents() {
    assert_eq!(
        problems(""),
        vec![
            "cloud_provider: required; set it to local or aws",
            "application_files: required; list at least the script named by remote_script_to_run",
            "nodes: required; set at least nodes.count",
        ]
    );
    assert_eq!(
        problems("just text"),
        vec![
            "taskfly.yml: expected a mapping with the fields cloud_provider, \
                  instance_config, application_files, remote_script_to_run, remote_dest_dir, \
                  bundle_name, nodes, outputs, notify, got \"just text\""
        ]
    );
}

#[test]
fn merge_keys_are_applied() {
    let text = format!(
        "{MINIMAL}  config_template:\n    base: &common {{region: eu, tier: gold}}\n    out:\n      \
             <<: *common\n      name: \"{{base}}\"\n"
    );
    let template = parse(&text).nodes.config_template;
    assert_eq!(
        template.get("out"),
        Some(&json!({"region": "eu", "tier": "gold", "name": "{base}"}))
    );
    assert_eq!(template.get("<<"), None);
}

#[test]
fn suggestions() {
    assert_eq!(
        closest("cuont", NODES_FIELDS.iter().copied()),
        Some("count")
    );
    assert_eq!(
        closest("instance-type", AWS_FIELDS.iter().copied()),
        Some("instance_type")
    );
    assert_eq!(
        closest("imageid", AWS_FIELDS.iter().copied()),
        Some("image_id")
    );
    assert_eq!(closest("xyz", NODES_FIELDS.iter().copied()), None);
    assert_eq!(closest("am", AWS_FIELDS.iter().copied()), Some("ami"));
    assert_eq!(
        edit_distance(&normalize("kitten"), &normalize("sitting")),
        3
    );
    assert_eq!(edit_distance(&normalize("ab"), &normalize("ba")), 1);
    assert_eq!(edit_distance(&normalize(""), &normalize("abc")), 3);
}

#[test]
fn from_dir_reads_the_file_and_names_it() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let missing = DeploymentConfig::from_dir(dir.path()).expect_err("no file yet");
    assert!(missing.is_io(), "{missing:?}");
    let path = dir.path().join(CONFIG_FILE_NAME);
    assert!(
        missing.message().contains(&path.display().to_string()),
        "{missing}"
    );

    std::fs::write(&path, MINIMAL).expect("write taskfly.yml");
    let config = DeploymentConfig::from_dir(dir.path()).expect("valid file");
    assert_eq!(config.nodes.count, 1);

    std::fs::write(&path, "cloud_provider: GCP\n").expect("write taskfly.yml");
    let invalid = DeploymentConfig::from_dir(dir.path()).expect_err("invalid file");
    assert!(invalid.is_invalid_config());
    assert_eq!(
        invalid.message(),
        format!("{} is invalid (3 problems)", path.display())
    );

    std::fs::write(&path, b"cloud_provider: \xff\n").expect("write taskfly.yml");
    let binary = DeploymentConfig::from_dir(dir.path()).expect_err("not UTF-8");
    assert_eq!(
        binary.details(),
        ["taskfly.yml: not valid UTF-8 text; save it as UTF-8"]
    );
}
