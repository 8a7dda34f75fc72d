//! `instance_config.aws`: how to start EC2 instances.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::diagnostics::{describe, Fields, Problems};
use super::values::{scalar_map, string, string_list};
use super::AwsConfig;
#[cfg(feature = "aws")]
use super::CONFIG_FILE_NAME;
#[cfg(feature = "aws")]
use crate::error::Result;
#[cfg(feature = "aws")]
use crate::provider::ProviderSettings;

/// The fields of `instance_config.aws`, in the order the documentation lists them.
pub(super) const AWS_FIELDS: &[&str] = &[
    "region",
    "image_id",
    "ami",
    "instance_type",
    "key_name",
    "security_groups",
    "subnet_id",
    "iam_instance_profile",
    "spot",
    "tags",
    "endpoint_url",
];

/// The typed `instance_config.aws` of `settings`, validated as [`DeploymentConfig`] does;
/// errors name the fields (`instance_config.aws.image_id`).
#[cfg(feature = "aws")]
pub(crate) fn aws_settings(settings: &ProviderSettings) -> Result<AwsConfig> {
    let mut problems = Problems::default();
    let section = Some(settings.section()).filter(|value| !value.is_null());
    let aws = parse_aws(section, &settings.path(), &mut problems);
    match aws {
        Some(aws) => problems.into_result(aws),
        None => Err(problems.into_error(CONFIG_FILE_NAME)),
    }
}

pub(super) fn parse_aws(
    value: Option<&Value>,
    path: &str,
    problems: &mut Problems,
) -> Option<AwsConfig> {
    let Some(value) = value else {
        problems.add(
            path,
            "required when cloud_provider is aws; set at least image_id and instance_type",
        );
        return None;
    };
    let fields = Fields::read(value, path, AWS_FIELDS, problems)?;
    let optional = |name: &str, problems: &mut Problems| {
        fields
            .get(name)
            .and_then(|value| string(value, &fields.path(name), problems))
    };

    let image_id = match (fields.get("image_id"), fields.get("ami")) {
        (Some(_), Some(_)) => {
            problems.add(
                &fields.path("ami"),
                "`ami` is another name for `image_id`; give only one of them",
            );
            None
        }
        (Some(value), None) => string(value, &fields.path("image_id"), problems),
        (None, Some(value)) => string(value, &fields.path("ami"), problems),
        (None, None) => {
            problems.add(
                &fields.path("image_id"),
                "required; the AMI to start, like ami-0abc1234",
            );
            None
        }
    };
    let instance_type = match fields.get("instance_type") {
        Some(value) => string(value, &fields.path("instance_type"), problems),
        None => {
            problems.add(
                &fields.path("instance_type"),
                "required; the instance type, like t3.micro",
            );
            None
        }
    };
    let security_groups = match fields.get("security_groups") {
        None => vec!["default".to_owned()],
        Some(value) => {
            let path = fields.path("security_groups");
            let groups = string_list(value, &path, "security group ids or names", problems);
            if matches!(value, Value::Sequence(items) if items.is_empty()) {
                problems.add(
                    &path,
                    "the list is empty; name at least one group, or leave the field out for [default]",
                );
            }
            groups
        }
    };
    let spot = match fields.get("spot") {
        None => false,
        Some(Value::Bool(spot)) => *spot,
        Some(other) => {
            problems.add(
                &fields.path("spot"),
                format!("expected true or false, got {}", describe(other)),
            );
            false
        }
    };
    let tags = match fields.get("tags") {
        None => BTreeMap::new(),
        Some(value) => scalar_map(value, &fields.path("tags"), false, problems),
    };
    let endpoint_url = optional("endpoint_url", problems);
    if let Some(url) = &endpoint_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.add(
                &fields.path("endpoint_url"),
                format!("expected an http:// or https:// URL, got {url:?}"),
            );
        }
    }

    Some(AwsConfig {
        region: optional("region", problems),
        image_id: image_id?,
        instance_type: instance_type?,
        key_name: optional("key_name", problems),
        security_groups,
        subnet_id: optional("subnet_id", problems),
        iam_instance_profile: optional("iam_instance_profile", problems),
        spot,
        tags,
        endpoint_url,
    })
}
