//! Helpers for jobs of the built-in trainer: run one to its end, fetch its final model (checked
//! against the sha256 the server sends with it), and check that `LATEST` names a valid step.

use std::time::Duration;

use serde_json::Value;
use trainvisor::checkpoint::{self, find_resume};
use trainvisor::storage::BlobStore;

use super::TestApp;

/// Creates a job from `spec` and waits until it has succeeded; returns its id.
pub async fn run_to_end(app: &TestApp, spec: Value) -> String {
    let id = app.create_job(spec).await;
    let job = app.wait_finished(&id, Duration::from_secs(240)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    id
}

/// The final model of job `id` and its sha256, from `GET /jobs/{id}/model` on `base`.
pub async fn served_model(client: &reqwest::Client, base: &str, id: &str) -> (Vec<u8>, String) {
    let res = client
        .get(format!("{base}/jobs/{id}/model"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "no model for {id}");
    let sha = res.headers()["x-model-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let bytes = res.bytes().await.unwrap().to_vec();
    assert_eq!(checkpoint::sha256_hex(&bytes), sha, "the model of {id}");
    (bytes, sha)
}

/// The final model of job `id` on `app`, and its sha256.
pub async fn model_of(app: &TestApp, id: &str) -> (Vec<u8>, String) {
    served_model(&app.client, &app.address, id).await
}

/// The sha256 of job `id`'s final model on `app`.
pub async fn model_sha(app: &TestApp, id: &str) -> String {
    model_of(app, id).await.1
}

/// `LATEST` in `store` (when there is one) names a step whose manifest and every part verify.
pub async fn assert_latest_valid(store: &BlobStore, world: u32) {
    let Some(latest) = store.get(checkpoint::LATEST).await.unwrap() else {
        return;
    };
    let name = String::from_utf8(latest).unwrap();
    let step = checkpoint::parse_step_dir(name.trim()).expect("LATEST names a step");
    let (resume, rejected) = find_resume(store, 0, world).await.unwrap();
    let resume = resume.expect("a valid checkpoint exists");
    // Training goes on meanwhile, so a newer step may have been committed since LATEST was read.
    assert!(
        resume.manifest.step >= step,
        "LATEST is ahead of every valid step"
    );
    assert!(
        !rejected.iter().any(|r| r.step == step),
        "LATEST points at an invalid step: {rejected:?}"
    );
}
