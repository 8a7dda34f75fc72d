//! A large worker bundle served to many nodes at once (`GET /nodes/assets`, SPEC §4.2): the
//! downloads under way share the file's chunks, and each still gets exactly the stored bundle,
//! also when the deployment is cleaned up during the download.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use hyper::Request;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use taskfly::Client;

use crate::support::engine_http::raw_get;
use crate::support::engine_provider::{Provisioned, RecordingProvider};
use crate::support::engine_util::poll_nodes_status;
use crate::support::{local_yml, Project, TestEngine};

/// Bytes of `data.bin`: incompressible, so the worker bundle is about as large, many of the
/// engine's 256 KiB chunks and far above what it keeps in memory for small bundles.
const DATA_BYTES: usize = 4 * 1024 * 1024 + 12_345;

/// A project of `count` local nodes whose bundle holds [`DATA_BYTES`] of incompressible data.
fn large_project(count: u32) -> Project {
    let yml = local_yml(count, "").replace(
        "application_files: [setup.sh]",
        "application_files: [setup.sh, data.bin]",
    );
    let project = Project::new(&yml).script("#!/bin/sh\necho unused\n");
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let data: Vec<u8> = (0..DATA_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(project.path().join("data.bin"), data).expect("write data.bin");
    project
}

/// Deploys `project` on an engine whose provider only records; returns the deployment id, the
/// provision calls and the stored worker bundle's bytes.
async fn deploy(
    engine: &TestEngine,
    provider: &RecordingProvider,
    project: &Project,
    count: usize,
) -> (String, Vec<Provisioned>, Vec<u8>) {
    let id = engine.deploy(project.path()).await;
    let calls = provider.wait_for_provisioned(&id, count).await;
    assert_eq!(calls.len(), count);
    poll_nodes_status(engine, &id, "booting").await;
    let stored = std::fs::read(
        engine
            .data_dir
            .path()
            .join("deployments")
            .join(&id)
            .join("worker.tar.gz"),
    )
    .expect("worker bundle");
    assert!(stored.len() > 4 * 1024 * 1024, "{} bytes", stored.len());
    (id, calls, stored)
}

/// The auth token of the node provisioned by `call`.
async fn register(engine: &TestEngine, call: &Provisioned) -> String {
    Client::new(&engine.url, None)
        .expect("client")
        .register(&call.provision_token)
        .await
        .expect("register")
        .auth_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_nodes_downloading_a_large_bundle_at_once_each_get_it_exactly() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let (_, calls, stored) = deploy(&engine, &provider, &large_project(12), 12).await;

    let mut tokens = Vec::new();
    for call in &calls {
        tokens.push(register(&engine, call).await);
    }
    let downloads = tempfile::tempdir().expect("downloads");
    let tasks: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(index, token)| {
            let (url, file) = (
                engine.url.clone(),
                downloads.path().join(format!("node-{index}.tar.gz")),
            );
            tokio::spawn(async move {
                let written = Client::new(&url, Some(token))
                    .expect("client")
                    .download_assets(&file)
                    .await
                    .expect("download");
                (
                    index,
                    written,
                    std::fs::read(&file).expect("downloaded file"),
                )
            })
        })
        .collect();
    for task in tasks {
        let (index, written, bytes) = task.await.expect("download task");
        assert_eq!(written, stored.len() as u64, "node {index}");
        assert!(bytes == stored, "node {index} got other bytes");
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_under_way_survives_cleanup_and_the_next_one_is_refused() {
    let provider = RecordingProvider::new();
    let engine = TestEngine::start_with(|c| c.provider(provider.as_provider())).await;
    let (id, calls, stored) = deploy(&engine, &provider, &large_project(1), 1).await;
    let token = register(&engine, &calls[0]).await;

    // A download that has its headers and first bytes...
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::get(format!("{}/api/v1/nodes/assets", engine.url))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::new())
        .expect("request");
    let response = http.request(request).await.expect("assets answer");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[CONTENT_LENGTH].to_str().expect("length"),
        stored.len().to_string()
    );
    let mut body = response.into_body();
    let mut received = Vec::new();
    while received.is_empty() {
        let frame = body.frame().await.expect("a frame").expect("body");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }

    // ...while its deployment ends and its files are deleted...
    let client = engine.client();
    client.terminate(&id).await.expect("terminate");
    let view = engine.wait(&id).await.expect("wait");
    assert!(view.is_final(), "{view:#?}");
    client.cleanup(&id).await.expect("cleanup");
    assert!(!engine
        .data_dir
        .path()
        .join("deployments")
        .join(&id)
        .join("worker.tar.gz")
        .exists());

    // ...still gets every byte of the bundle as it was; a new download is refused.
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(received.len(), stored.len());
    assert!(received == stored, "the download under way got other bytes");
    let again = raw_get(&engine.url, "/api/v1/nodes/assets", Some(&token)).await;
    assert_eq!(again.status, 404, "{}", again.text());
    assert!(again.text().contains("cleaned up"), "{}", again.text());
    engine.stop().await;
}
