use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::state::model::{Deployment, DeploymentStatus};
use crate::state::MemoryStore;

#[test]
fn signatures_are_hmac_sha256_in_hex() {
    // RFC 4231, test case 2.
    assert_eq!(
        sign("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

fn deployment(id: &str, status: DeploymentStatus, failed: u32) -> Deployment {
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    Deployment {
        id: id.to_owned(),
        status,
        cloud_provider: "local".to_owned(),
        total_nodes: failed + 1,
        retries: 0,
        nodes_completed: 1,
        nodes_failed: failed,
        nodes_terminated: 0,
        created_at: created,
        updated_at: created,
        completed_at: Some(created + Duration::from_millis(90_500)),
        error_message: (failed > 0).then(|| format!("{failed} of {} nodes failed", failed + 1)),
        rerun_of: None,
        cleaned_at: None,
    }
}

#[test]
fn the_body_lists_the_first_hundred_failed_nodes_and_counts_the_rest() {
    let d = deployment("dep-1", DeploymentStatus::Failed, 150);
    let mut nodes: Vec<Node> = (0..151)
        .map(|i| Node::new("dep-1", i, d.created_at))
        .collect();
    for node in &mut nodes[1..] {
        node.status = NodeStatus::Failed;
        node.exit_code = Some(3);
        node.error_message = Some("exit status 3: boom".to_owned());
    }
    nodes[0].status = NodeStatus::Completed;
    let body: serde_json::Value =
        serde_json::from_str(&body(&d, &nodes, "http://d:8080/ui/deployments/dep-1"))
            .expect("json");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["nodes_failed"], 150);
    assert_eq!(body["failed_nodes"].as_array().expect("list").len(), 100);
    assert_eq!(body["failed_nodes"][0]["node_index"], 1);
    assert_eq!(
        body["failed_nodes"][0]["error_message"],
        "exit status 3: boom"
    );
    assert_eq!(body["failed_nodes_omitted"], 50);
    assert_eq!(body["duration_s"], 90.5);
    assert_eq!(body["dashboard_url"], "http://d:8080/ui/deployments/dep-1");
}

/// Answers with the given codes in turn (an error for 0), then 200.
struct Scripted {
    answers: Vec<u16>,
    calls: AtomicU32,
}

#[async_trait]
impl Transport for Scripted {
    async fn post(
        &self,
        _url: &str,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> Result<u16, String> {
        assert!(headers.contains(&(SIGNATURE_HEADER, sign("s3cret", body))));
        let call = self.calls.fetch_add(1, Ordering::SeqCst) as usize;
        match self.answers.get(call).copied().unwrap_or(200) {
            0 => Err("connection refused".to_owned()),
            code => Ok(code),
        }
    }
}

#[tokio::test]
async fn a_notification_is_tried_again_until_delivered_and_stored_each_time() {
    let store = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    store
        .create_deployment(
            deployment("dep-2", DeploymentStatus::Completed, 0),
            Vec::new(),
        )
        .await
        .expect("create");
    let notifier = Arc::new(Notifier::new(store.clone(), Duration::from_millis(5)));
    let body = "{}".to_owned();
    notifier
        .enqueue(WebhookDelivery {
            deployment_id: "dep-2".to_owned(),
            url: "http://127.0.0.1:9/hook".to_owned(),
            signature: Some(sign("s3cret", body.as_bytes())),
            body,
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_error: None,
            created_at: now,
            next_attempt_at: now,
            delivered_at: None,
        })
        .await;
    assert_eq!(
        store.pending_deliveries().await.expect("pending").len(),
        1,
        "stored before the first try"
    );

    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let (notifier, cancel) = (notifier.clone(), cancel.clone());
        async move { notifier.run(cancel).await }
    });
    let transport = Arc::new(Scripted {
        answers: vec![500, 0],
        calls: AtomicU32::new(0),
    });
    notifier.set_transport(transport.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        let stored = store.delivery("dep-2").await.expect("read").expect("kept");
        if stored.status == DeliveryStatus::Delivered {
            break stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(delivered.attempts, 3);
    assert_eq!(delivered.last_error.as_deref(), Some("connection refused"));
    assert!(delivered.delivered_at.is_some());
    assert_eq!(transport.calls.load(Ordering::SeqCst), 3);
    cancel.cancel();
    running.await.expect("notifier");
}
