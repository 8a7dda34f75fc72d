use super::*;

fn deployment(total: u32, retries: u32) -> Deployment {
    let now = SystemTime::UNIX_EPOCH;
    Deployment {
        id: "dep-1".into(),
        status: DeploymentStatus::Provisioning,
        cloud_provider: "local".into(),
        total_nodes: total,
        retries,
        nodes_completed: 0,
        nodes_failed: 0,
        nodes_terminated: 0,
        created_at: now,
        updated_at: now,
        completed_at: None,
        error_message: None,
        rerun_of: None,
        cleaned_at: None,
    }
}

fn status(s: NodeStatus) -> NodeUpdate {
    NodeUpdate::Status {
        status: s,
        exit_code: None,
        message: None,
    }
}

fn run_to(d: &mut Deployment, n: &mut Node, last: NodeStatus) {
    let now = SystemTime::UNIX_EPOCH;
    apply_node_update(d, n, status(NodeStatus::Provisioning), now).unwrap();
    apply_node_update(
        d,
        n,
        NodeUpdate::Provisioned {
            instance: InstanceRef {
                id: "i-1".into(),
                locator: String::new(),
            },
            ip_address: None,
            attempt: 1,
        },
        now,
    )
    .unwrap();
    apply_node_update(d, n, status(NodeStatus::RunningScript), now).unwrap();
    apply_node_update(d, n, status(last), now).unwrap();
}

#[test]
fn names_round_trip() {
    for s in NodeStatus::ALL {
        assert_eq!(s.as_str().parse::<NodeStatus>().unwrap(), *s);
    }
    for s in DeploymentStatus::ALL {
        assert_eq!(s.as_str().parse::<DeploymentStatus>().unwrap(), *s);
    }
    assert!("done".parse::<NodeStatus>().unwrap_err().is_invalid_input());
}

#[test]
fn final_node_never_regresses() {
    let mut d = deployment(2, 0);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    run_to(&mut d, &mut n, NodeStatus::Completed);
    // Completed again is a repeated report: a no-op success (a_repeated_state_is_a_no_op_success).
    for to in NodeStatus::ALL
        .iter()
        .filter(|to| **to != NodeStatus::Completed)
    {
        let before = (d.clone(), n.clone());
        let err = apply_node_update(&mut d, &mut n, status(*to), SystemTime::now()).unwrap_err();
        assert!(err.is_invalid_transition(), "{to}: {err}");
        assert_eq!(
            (d.clone(), n.clone()),
            before,
            "refused update changed nothing"
        );
    }
}

#[test]
fn completion_is_decided_by_counters() {
    let mut d = deployment(2, 0);
    let mut a = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let mut b = Node::new("dep-1", 1, SystemTime::UNIX_EPOCH);
    run_to(&mut d, &mut a, NodeStatus::Completed);
    assert_eq!(d.status, DeploymentStatus::Running);
    run_to(&mut d, &mut b, NodeStatus::Completed);
    assert_eq!(d.status, DeploymentStatus::Completed);
    assert_eq!(d.nodes_completed, 2);
    assert!(d.completed_at.is_some());
}

#[test]
fn one_failure_fails_the_deployment() {
    let mut d = deployment(2, 0);
    let mut a = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let mut b = Node::new("dep-1", 1, SystemTime::UNIX_EPOCH);
    run_to(&mut d, &mut a, NodeStatus::Failed);
    run_to(&mut d, &mut b, NodeStatus::Completed);
    assert_eq!(d.status, DeploymentStatus::Failed);
    assert_eq!((d.nodes_completed, d.nodes_failed), (1, 1));
}

#[test]
fn a_failed_node_with_retries_left_is_not_final() {
    let mut d = deployment(1, 1);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    run_to(&mut d, &mut n, NodeStatus::Failed);
    assert_eq!(d.nodes_failed, 0);
    assert_eq!(d.status, DeploymentStatus::Running);
    apply_node_update(&mut d, &mut n, NodeUpdate::Retry, SystemTime::now()).unwrap();
    assert_eq!((n.status, n.attempt), (NodeStatus::Provisioning, 2));
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::Provisioned {
            instance: InstanceRef {
                id: "i-2".into(),
                locator: String::new(),
            },
            ip_address: None,
            attempt: 2,
        },
        SystemTime::now(),
    )
    .unwrap();
    apply_node_update(
        &mut d,
        &mut n,
        status(NodeStatus::Failed),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(d.nodes_failed, 1);
    assert_eq!(d.status, DeploymentStatus::Failed);
    let err = apply_node_update(&mut d, &mut n, NodeUpdate::Retry, SystemTime::now());
    assert!(err.unwrap_err().is_invalid_transition(), "no retry left");
}

#[test]
fn an_instance_recorded_after_registration_keeps_the_node_state() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::ProvisionToken { hash: [1; 32] },
        now,
    )
    .unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), now).unwrap();
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::Registered {
            auth_token_hash: [2; 32],
        },
        now,
    )
    .unwrap();
    assert_eq!(d.status, DeploymentStatus::Running);
    let provisioned = NodeUpdate::Provisioned {
        instance: InstanceRef {
            id: "i-9".into(),
            locator: String::new(),
        },
        ip_address: None,
        attempt: 1,
    };
    apply_node_update(&mut d, &mut n, provisioned, now).unwrap();
    assert_eq!(
        (n.status, n.instance_id.as_deref()),
        (NodeStatus::Registering, Some("i-9"))
    );
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), now).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Completed), now).unwrap();
    assert_eq!(d.nodes_completed, 1);
}

#[test]
fn an_instance_answered_after_its_node_ended_is_recorded_and_the_end_kept() {
    // A Slurm task can run to its end while its submission is still being watched.
    for end in [NodeStatus::Completed, NodeStatus::Failed] {
        let mut d = deployment(1, 0);
        let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
        let now = SystemTime::UNIX_EPOCH;
        apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), now).unwrap();
        apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), now).unwrap();
        apply_node_update(&mut d, &mut n, status(end), now).unwrap();
        let before = d.clone();
        let applied = apply_node_update(&mut d, &mut n, provisioned(), now).unwrap();
        assert_eq!(
            (applied.previous, applied.node.status),
            (end, end),
            "the end stays"
        );
        assert_eq!(n.instance_id.as_deref(), Some("i-1"));
        assert_eq!(applied.deployment_changed, None);
        assert_eq!(
            (d.nodes_completed, d.nodes_failed, d.status),
            (before.nodes_completed, before.nodes_failed, before.status)
        );
    }
}

#[test]
fn an_instance_of_an_earlier_attempt_is_refused() {
    let mut d = deployment(1, 1);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), now).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Failed), now).unwrap();
    apply_node_update(&mut d, &mut n, NodeUpdate::Retry, now).unwrap();
    assert_eq!((n.status, n.attempt), (NodeStatus::Provisioning, 2));
    let late = apply_node_update(&mut d, &mut n, provisioned(), now);
    assert!(late.unwrap_err().is_invalid_transition());
    assert_eq!(
        (n.status, n.instance_id.as_deref()),
        (NodeStatus::Provisioning, None)
    );
}

#[test]
fn provision_token_works_once() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::ProvisionToken { hash: [1; 32] },
        now,
    )
    .unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), now).unwrap();
    let registered = NodeUpdate::Registered {
        auth_token_hash: [2; 32],
    };
    apply_node_update(&mut d, &mut n, registered.clone(), now).unwrap();
    assert_eq!(n.provision_token_hash, None);
    assert!(apply_node_update(&mut d, &mut n, registered, now)
        .unwrap_err()
        .is_invalid_transition());
}

#[test]
fn terminate_request_ends_terminated() {
    let mut d = deployment(1, 0);
    d.status = DeploymentStatus::Running;
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    apply_deployment_status(&mut d, DeploymentStatus::Terminating, None, now).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Terminating), now).unwrap();
    let applied = apply_node_update(&mut d, &mut n, status(NodeStatus::Terminated), now).unwrap();
    assert_eq!(
        applied.deployment_changed,
        Some(DeploymentStatus::Terminated)
    );
    assert!(
        apply_deployment_status(&mut d, DeploymentStatus::Running, None, now)
            .unwrap_err()
            .is_invalid_transition()
    );
}

#[test]
fn a_node_failing_while_it_is_terminated_ends_terminated_keeping_its_exit_code() {
    let mut d = deployment(2, 0);
    d.status = DeploymentStatus::Running;
    let now = SystemTime::UNIX_EPOCH;
    let mut n = Node::new("dep-1", 0, now);
    run_to(&mut d, &mut n, NodeStatus::RunningScript);
    apply_deployment_status(&mut d, DeploymentStatus::Terminating, None, now).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Terminating), now).unwrap();
    // The agent saw its script killed by the stop and says so.
    let applied = apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::Status {
            status: NodeStatus::Failed,
            exit_code: Some(143),
            message: Some("script exited with code 143".into()),
        },
        now,
    )
    .unwrap();
    assert_eq!(applied.node.status, NodeStatus::Terminated);
    assert_eq!(applied.node.exit_code, Some(143));
    assert_eq!(
        (d.nodes_failed, d.nodes_terminated),
        (0, 1),
        "counted as terminated"
    );
    // The engine's own mark that follows changes nothing.
    let again = apply_node_update(&mut d, &mut n, status(NodeStatus::Terminated), now).unwrap();
    assert_eq!(again.node.status, NodeStatus::Terminated);
    assert_eq!(d.nodes_terminated, 1);
    // A node not being terminated still fails.
    let mut other = Node::new("dep-1", 1, now);
    run_to(&mut d, &mut other, NodeStatus::Failed);
    assert_eq!(other.status, NodeStatus::Failed);
}

#[test]
fn a_repeated_state_is_a_no_op_success() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    run_to(&mut d, &mut n, NodeStatus::RunningScript);
    let before = (d.clone(), n.clone());
    let later = now + std::time::Duration::from_secs(5);
    let applied =
        apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), later).unwrap();
    assert_eq!(applied.previous, NodeStatus::RunningScript);
    assert_eq!(applied.deployment_changed, None);
    assert_eq!((d.clone(), n.clone()), before, "nothing changes");
    let completed = NodeUpdate::Status {
        status: NodeStatus::Completed,
        exit_code: Some(0),
        message: None,
    };
    apply_node_update(&mut d, &mut n, completed.clone(), now).unwrap();
    assert_eq!(d.nodes_completed, 1);
    // A resent final report succeeds and counts nothing twice; going back still conflicts.
    apply_node_update(&mut d, &mut n, completed, now).unwrap();
    assert_eq!(
        (d.nodes_completed, d.status),
        (1, DeploymentStatus::Completed)
    );
    assert!(
        apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), now)
            .unwrap_err()
            .is_conflict()
    );
}

#[test]
fn a_registration_with_a_nonce_can_be_resent_by_its_agent_only() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let now = SystemTime::UNIX_EPOCH;
    let token_hash = crate::auth::hash_token("token");
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::ProvisionToken { hash: token_hash },
        now,
    )
    .unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), now).unwrap();
    let key = crate::auth::registration_key("token", "nonce-1");
    assert_ne!(key, crate::auth::registration_key("token", "nonce-2"));
    apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::RegisteredWithNonce {
            auth_token_hash: [2; 32],
            resend_key: key,
        },
        now,
    )
    .unwrap();
    // The token alone no longer finds the node; the key does.
    assert_eq!(
        (n.status, n.provision_token_hash),
        (NodeStatus::Registering, Some(key))
    );
    let resent = |key| NodeUpdate::RegistrationResent {
        resend_key: key,
        auth_token_hash: [3; 32],
    };
    let other = crate::auth::registration_key("token", "nonce-2");
    assert!(apply_node_update(&mut d, &mut n, resent(other), now)
        .unwrap_err()
        .is_conflict());
    apply_node_update(&mut d, &mut n, resent(key), now).unwrap();
    assert_eq!(
        (n.status, n.auth_token_hash),
        (NodeStatus::Registering, Some([3; 32]))
    );
    // A plain registration of a registered node is a second use of the token: refused.
    let plain = NodeUpdate::Registered {
        auth_token_hash: [4; 32],
    };
    assert!(apply_node_update(&mut d, &mut n, plain, now)
        .unwrap_err()
        .is_conflict());
    // Once the node has ended, a resend is refused.
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), now).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Completed), now).unwrap();
    assert!(apply_node_update(&mut d, &mut n, resent(key), now)
        .unwrap_err()
        .is_conflict());
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn provisioned() -> NodeUpdate {
    NodeUpdate::Provisioned {
        instance: InstanceRef {
            id: "i-1".into(),
            locator: String::new(),
        },
        ip_address: None,
        attempt: 1,
    }
}

#[test]
fn each_phase_start_is_recorded_once_on_its_transition() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    assert_eq!(n.times, PhaseTimes::default());
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    apply_node_update(&mut d, &mut n, provisioned(), at(3)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Registering), at(4)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::DownloadingAssets), at(6)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), at(7)).unwrap();
    // A repeated report changes no time.
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), at(8)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Completed), at(17)).unwrap();
    assert_eq!(
        n.times,
        PhaseTimes {
            provisioning_at: Some(at(1)),
            booting_at: Some(at(3)),
            downloading_at: Some(at(6)),
            started_at: Some(at(7)),
            finished_at: Some(at(17)),
        }
    );
    assert_eq!(
        n.times.durations(at(100)),
        PhaseDurations {
            provisioning: Some(Duration::from_secs(2)),
            booting: Some(Duration::from_secs(3)),
            downloading: Some(Duration::from_secs(1)),
            running: Some(Duration::from_secs(10)),
        },
        "a finished node's phases do not grow with the clock"
    );
}

#[test]
fn a_registration_before_the_instance_is_recorded_starts_booting() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Registering), at(2)).unwrap();
    apply_node_update(&mut d, &mut n, provisioned(), at(3)).unwrap();
    assert_eq!(n.times.booting_at, Some(at(2)));
}

#[test]
fn a_skipped_phase_has_no_time_and_the_one_before_lasts_until_the_next() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    apply_node_update(&mut d, &mut n, provisioned(), at(2)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), at(5)).unwrap();
    let running = n.times.durations(at(9));
    assert_eq!(running.booting, Some(Duration::from_secs(3)));
    assert_eq!(running.downloading, None);
    assert_eq!(
        running.running,
        Some(Duration::from_secs(4)),
        "the current phase lasts until now"
    );
    assert_eq!(n.times.finished_at, None);
}

#[test]
fn a_failure_before_the_script_ends_the_phase_it_was_in() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Failed), at(4)).unwrap();
    assert_eq!(n.times.finished_at, Some(at(4)));
    let durations = n.times.durations(at(50));
    assert_eq!(durations.provisioning, Some(Duration::from_secs(3)));
    assert_eq!((durations.booting, durations.running), (None, None));
}

#[test]
fn a_retry_starts_the_times_afresh() {
    let mut d = deployment(1, 1);
    let mut n = Node::new("dep-1", 0, at(0));
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    apply_node_update(&mut d, &mut n, provisioned(), at(2)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), at(3)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Failed), at(4)).unwrap();
    apply_node_update(&mut d, &mut n, NodeUpdate::Retry, at(10)).unwrap();
    assert_eq!(
        n.times,
        PhaseTimes {
            provisioning_at: Some(at(10)),
            ..PhaseTimes::default()
        }
    );
}

#[test]
fn a_terminated_node_finishes_and_a_clock_going_back_gives_zero() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(5)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::Terminating), at(6)).unwrap();
    assert_eq!(n.times.finished_at, None, "terminating is not final");
    apply_node_update(&mut d, &mut n, status(NodeStatus::Terminated), at(3)).unwrap();
    assert_eq!(n.times.finished_at, Some(at(3)));
    assert_eq!(n.times.durations(at(9)).provisioning, Some(Duration::ZERO));
}

#[test]
fn ended_durations_leave_out_the_phase_the_node_is_in() {
    let mut d = deployment(1, 0);
    let mut n = Node::new("dep-1", 0, at(0));
    assert_eq!(n.times.ended_durations(), PhaseDurations::default());
    apply_node_update(&mut d, &mut n, status(NodeStatus::Provisioning), at(1)).unwrap();
    assert_eq!(n.times.ended_durations(), PhaseDurations::default());
    apply_node_update(&mut d, &mut n, provisioned(), at(2)).unwrap();
    apply_node_update(&mut d, &mut n, status(NodeStatus::RunningScript), at(5)).unwrap();
    assert_eq!(
        n.times.ended_durations(),
        PhaseDurations {
            provisioning: Some(Duration::from_secs(1)),
            booting: Some(Duration::from_secs(3)),
            downloading: None,
            running: None,
        }
    );
    apply_node_update(&mut d, &mut n, status(NodeStatus::Completed), at(9)).unwrap();
    assert_eq!(n.times.ended_durations(), n.times.durations(at(100)));
    assert_eq!(
        n.times.ended_durations().running,
        Some(Duration::from_secs(4))
    );
}

#[test]
fn provisioning_started_arms_the_token_and_leaves_pending_in_one_update() {
    let mut d = deployment(2, 1);
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
    let mut n = Node::new("dep-1", 0, SystemTime::UNIX_EPOCH);
    let applied = apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::ProvisioningStarted { hash: [3; 32] },
        start,
    )
    .unwrap();
    assert_eq!(applied.previous, NodeStatus::Pending);
    assert_eq!(n.status, NodeStatus::Provisioning);
    assert_eq!(n.provision_token_hash, Some([3; 32]));
    assert_eq!(
        n.times.provisioning_at,
        Some(start),
        "the phase starts with it"
    );

    // Retried (or resumed after a restart), a node already provisioning only gets the new
    // token.
    let again = apply_node_update(
        &mut d,
        &mut n,
        NodeUpdate::ProvisioningStarted { hash: [4; 32] },
        start,
    )
    .unwrap();
    assert_eq!(again.previous, NodeStatus::Provisioning);
    assert_eq!(n.status, NodeStatus::Provisioning);
    assert_eq!(n.provision_token_hash, Some([4; 32]));

    // A final node is refused, and left as it was.
    let mut done = Node::new("dep-1", 1, SystemTime::UNIX_EPOCH);
    run_to(&mut d, &mut done, NodeStatus::Completed);
    let before = done.clone();
    let refused = apply_node_update(
        &mut d,
        &mut done,
        NodeUpdate::ProvisioningStarted { hash: [5; 32] },
        start,
    );
    assert!(refused.unwrap_err().is_invalid_transition());
    assert_eq!(done, before);
}
