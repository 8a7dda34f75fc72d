//! The JSON bodies of the HTTP API (`taskfly::wire`), parsed from untrusted bytes.

use std::fmt::Debug;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use taskfly::state::model::{DeploymentStatus, NodeStatus};
use taskfly::wire;

/// What the daemon parses from a node: every node request body.
pub fn check_node_requests(data: &[u8]) {
    round_trip::<wire::RegisterRequest>(data);
    round_trip::<wire::HeartbeatRequest>(data);
    if let Some(status) = round_trip::<wire::StatusRequest>(data) {
        check_status::<NodeStatus>(&status.status);
    }
    round_trip::<wire::LogsRequest>(data);
}

/// What the CLI and the agent parse from a daemon: every response body.
pub fn check_client_responses(data: &[u8]) {
    round_trip::<wire::DeploymentCreated>(data);
    if let Some(view) = round_trip::<wire::DeploymentView>(data) {
        check_view(&view);
    }
    // `GET /deployments`: an array of summaries.
    if let Some(views) = round_trip::<Vec<wire::DeploymentView>>(data) {
        views.iter().for_each(check_view);
    }
    round_trip::<wire::LogsPage>(data);
    round_trip::<wire::Stats>(data);
    round_trip::<wire::CleanupAll>(data);
    round_trip::<wire::ErrorBody>(data);
    round_trip::<wire::RegisterResponse>(data);
    round_trip::<wire::HeartbeatResponse>(data);
    round_trip::<wire::StatusOk>(data);
    round_trip::<wire::DeploymentAction>(data);
}

fn check_view(view: &wire::DeploymentView) {
    assert_eq!(
        view.is_final(),
        view.status.is_final(),
        "is_final() of {:?}",
        view.status
    );
    check_status::<DeploymentStatus>(&view.status);
    for node in &view.nodes {
        check_status::<NodeStatus>(&node.status);
    }
}

/// A state parsed from the wire is written back under the name it was read by (its SPEC name,
/// also what `Display` prints), and that name parses back to it.
fn check_status<S>(status: &S)
where
    S: FromStr + std::fmt::Display + Serialize + PartialEq + Debug,
{
    let name = status.to_string();
    assert_eq!(
        serde_json::to_value(status).expect("a state serializes"),
        serde_json::Value::String(name.clone()),
        "a state's JSON name is not its printed name"
    );
    assert!(
        name.parse::<S>().ok().as_ref() == Some(status),
        "{name:?} does not parse back to {status:?}"
    );
}

/// Parses `data` as a `T`; when that works, serializes it, parses that again and checks that the
/// two values are equal. Returns the value parsed.
fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    let text = serde_json::to_vec(&value).expect("a parsed body serializes");
    let again: T = match serde_json::from_slice(&text) {
        Ok(again) => again,
        Err(err) => panic!(
            "{} does not parse what it serializes ({err}): {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&text)
        ),
    };
    if value != again {
        // serde_json's default float parser (without its `float_roundtrip` feature) can read
        // back a float it wrote itself one unit in the last place off: `-9223372358602442770`
        // reads as -9.223372358602443e18, is written as such, and reads back as
        // -9.223372358602445e18. That is serde_json's documented trade-off, not taskfly's, so
        // floats may differ by a few units in the last place; everything else must be equal.
        let (first, second) = (to_json(&value), to_json(&again));
        assert!(
            nearly_equal(&first, &second),
            "{} changed in a round trip:\n{first}\n{second}",
            std::any::type_name::<T>()
        );
    }
    Some(value)
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("a parsed body converts to JSON")
}

/// Equal, except that two floats within a few units in the last place count as equal.
fn nearly_equal(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 4.0 * f64::EPSILON
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| nearly_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && nearly_equal(vx, vy))
        }
        _ => a == b,
    }
}
