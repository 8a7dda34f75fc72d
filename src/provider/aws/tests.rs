use super::*;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The settings of a deployment whose `instance_config.aws` is `image_id: ami-1` plus the
/// `settings` lines.
fn settings(settings: &str) -> ProviderSettings {
    let yaml = format!(
            "cloud_provider: aws\ninstance_config:\n  aws:\n    image_id: ami-1\n{settings}application_files: [setup.sh]\nnodes:\n  count: 1\n"
        );
    let deployment = crate::config::DeploymentConfig::from_yaml(&yaml).expect("valid yaml");
    deployment.provider_settings()
}

fn first_node() -> Owner {
    Owner::Node {
        deployment_id: "d".into(),
        node_id: "d-0".into(),
        node_index: 0,
        attempt: 1,
    }
}

#[test]
fn instances_are_of_one_kind_only_when_every_instance_setting_matches() {
    let provider = AwsProvider::new();
    let kind = |text: &str| {
        provider
            .instance_kind(&settings(text), &first_node())
            .expect("a kind")
    };
    let base = "    instance_type: t3.micro\n";
    assert_eq!(kind(base), kind(base));
    for other in [
        "    instance_type: t3.large\n".to_owned(),
        format!("{base}    region: eu-west-1\n"),
        format!("{base}    spot: true\n"),
        format!("{base}    subnet_id: subnet-1\n    security_groups: [sg-1]\n"),
        format!("{base}    iam_instance_profile: batch\n"),
        format!("{base}    key_name: mine\n"),
        format!("{base}    tags: {{team: other}}\n"),
        format!("{base}    endpoint_url: http://127.0.0.1:5000\n"),
    ] {
        assert_ne!(kind(base), kind(&other), "{other}");
    }
}

#[test]
fn settings_the_provider_cannot_use_are_refused_with_their_path() {
    let provider = AwsProvider::new();
    let missing = ProviderSettings::new(
        "aws",
        serde_yaml::from_str("{image_id: ami-1}").expect("yaml"),
    );
    let error = provider
        .instance_kind(&missing, &first_node())
        .expect_err("no instance type");
    let error = error.downcast::<crate::Error>().expect("a taskfly error");
    assert!(error.is_invalid_config(), "{error}");
    assert_eq!(
        error.details(),
        ["instance_config.aws.instance_type: required; the instance type, like t3.micro"]
    );
}

#[test]
fn a_locator_names_the_region_and_endpoint_and_an_empty_one_none() {
    let location = Location {
        region: Some("eu-west-1".to_owned()),
        endpoint_url: Some("http://127.0.0.1:5000".to_owned()),
    };
    assert_eq!(
        Location::decode(&location.encode()).expect("decodes"),
        Some(location)
    );
    assert_eq!(Location::decode("").expect("empty"), None);
    assert!(Location::decode("not json").is_err());
}

#[test]
fn tags_name_the_instance_its_deployment_and_node_after_the_users_tags() {
    let user = BTreeMap::from([("team".to_owned(), "data".to_owned())]);
    let tags = instance_tags("dep-1", "dep-1-0", None, &user).expect("tags");
    assert_eq!(
        tags,
        vec![
            ("Name".to_owned(), "taskfly-dep-1-0".to_owned()),
            ("team".to_owned(), "data".to_owned()),
            (DEPLOYMENT_TAG.to_owned(), "dep-1".to_owned()),
            (NODE_TAG.to_owned(), "dep-1-0".to_owned()),
        ]
    );
    let tags = instance_tags("dep-1", "dep-1-0", Some("daemon-7"), &user).expect("tags");
    assert_eq!(
        tags.last(),
        Some(&(OWNER_TAG.to_owned(), "daemon-7".to_owned()))
    );
}

#[test]
fn a_users_name_tag_replaces_taskflys_and_its_own_keys_are_refused() {
    let user = BTreeMap::from([("Name".to_owned(), "batch".to_owned())]);
    let tags = instance_tags("dep-1", "dep-1-0", None, &user).expect("tags");
    assert_eq!(tags.iter().filter(|(k, _)| k == "Name").count(), 1);
    assert!(tags.contains(&("Name".to_owned(), "batch".to_owned())));

    let user = BTreeMap::from([(DEPLOYMENT_TAG.to_owned(), "dep-x".to_owned())]);
    let error = instance_tags("dep-1", "dep-1-0", None, &user).expect_err("refused");
    assert!(error.contains(DEPLOYMENT_TAG), "{error}");
    let user = BTreeMap::from([(OWNER_TAG.to_owned(), "someone".to_owned())]);
    assert!(instance_tags("dep-1", "dep-1-0", None, &user).is_err());
}

#[test]
fn security_groups_are_ids_with_a_subnet_and_names_without() {
    assert_eq!(
        security_groups(&strings(&["sg-0123abcd"]), true),
        Ok(SecurityGroups::Ids(strings(&["sg-0123abcd"])))
    );
    assert_eq!(
        security_groups(&strings(&["default"]), true),
        Ok(SecurityGroups::SubnetDefault)
    );
    let error = security_groups(&strings(&["sg-01", "web"]), true).expect_err("name");
    assert!(error.contains("`web`"), "{error}");
    assert_eq!(
        security_groups(&strings(&["default", "web"]), false),
        Ok(SecurityGroups::Names(strings(&["default", "web"])))
    );
    // Ids are accepted without a subnet too, but only when every entry is one.
    assert_eq!(
        security_groups(&strings(&["sg-01", "sg-02"]), false),
        Ok(SecurityGroups::Ids(strings(&["sg-01", "sg-02"])))
    );
    assert_eq!(
        security_groups(&strings(&["sg-01", "web"]), false),
        Ok(SecurityGroups::Names(strings(&["sg-01", "web"])))
    );
    assert!(!is_group_id("sg-"));
    assert!(!is_group_id("sg-xyz"));
    assert!(!is_group_id("default"));
}

#[test]
fn throttling_capacity_and_transient_codes_are_retryable_others_not() {
    for code in [
        "RequestLimitExceeded",
        "Throttling",
        "InsufficientInstanceCapacity",
        "ServiceUnavailable",
        "InternalError",
        "ConnectionError",
    ] {
        assert!(is_retryable(code), "{code}");
    }
    for code in [
        "InvalidAMIID.NotFound",
        "UnauthorizedOperation",
        "InvalidParameterValue",
        "IdempotentParameterMismatch",
        "InvalidConfiguration",
    ] {
        assert!(!is_retryable(code), "{code}");
    }
}

#[test]
fn client_tokens_repeat_per_request_and_differ_between_requests() {
    let token = client_token("dep-1-0", 1, "secret-a");
    assert_eq!(token, client_token("dep-1-0", 1, "secret-a"));
    assert!(token.len() <= 64 && token.is_ascii(), "{token}");
    assert!(token.starts_with("taskfly-"));
    assert!(!token.contains("secret"));
    assert_ne!(token, client_token("dep-1-1", 1, "secret-a"));
    assert_ne!(token, client_token("dep-1-0", 2, "secret-a"));
    assert_ne!(token, client_token("dep-1-0", 1, "secret-b"));
    // The separators keep different splits of the same characters apart.
    assert_ne!(client_token("a1", 1, "x"), client_token("a", 11, "x"));
}

#[test]
fn stopped_instances_count_as_running_and_shutting_down_as_ending() {
    assert_eq!(
        state_from_name(&InstanceStateName::Stopped),
        InstanceState::Running
    );
    assert_eq!(
        state_from_name(&InstanceStateName::Pending),
        InstanceState::Pending
    );
    assert!(is_ending(state_from_name(&InstanceStateName::ShuttingDown)));
    assert!(is_ending(state_from_name(&InstanceStateName::Terminated)));
    assert!(!is_ending(state_from_name(&InstanceStateName::Stopping)));
}

#[test]
fn a_location_shows_its_region_and_endpoint() {
    let location = Location {
        region: Some("eu-west-1".to_owned()),
        endpoint_url: Some("http://127.0.0.1:5000".to_owned()),
    };
    assert_eq!(location.to_string(), "eu-west-1 at http://127.0.0.1:5000");
    assert_eq!(Location::default().to_string(), "default region");
}
