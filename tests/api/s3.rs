//! Checkpoints and datasets in object storage, against two real S3 servers started on loopback
//! by the test: s3s-fs (checks SigV4 and conditional writes) and Garage (a production server
//! that ignores conditional writes). On each: a full training job with the dataset and the
//! checkpoints in the bucket, exact resume after kill -9, the server stopped in the middle of
//! checkpoints and started again, wrong credentials, and the checkpoint API against a listing
//! of the bucket. Plus, on s3s-fs: on-demand shard fetching with the ETag-keyed cache, and
//! secrets that never leave the workers' environment.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use trainvisor::checkpoint;
use trainvisor::storage::BlobStore;
use trainvisor::trainer::data::{DatasetParams, make_dataset, upload_dir};
use trainvisor::trainer::rng::SplitMix64;

use crate::helpers::s3_server::{Kind, S3Server};
use crate::helpers::*;

/// 4 shards × 400 rows, 8 features, 3 classes (the trainer tests' dataset).
fn params() -> DatasetParams {
    DatasetParams {
        shards: 4,
        rows_per_shard: 400,
        features: 8,
        classes: 3,
        seed: 7,
        label_noise: 0.02,
        test_rows: 100,
    }
}

/// The dataset on local disk and in the bucket under `prefix`.
async fn dataset(app: &TestApp, server: &S3Server, prefix: &str) -> PathBuf {
    let dir = app.data_dir.path().join("local-data");
    if !dir.join("shard-00000.jsonl").exists() {
        make_dataset(&dir, &params()).unwrap();
    }
    upload_dir(&dir, &server.store(prefix)).await.unwrap();
    dir
}

fn spec(dataset: &str, checkpoints: &str, extra: Value) -> Value {
    let mut spec = json!({"world_size": 2, "dataset": dataset, "checkpoint_dir": checkpoints,
                          "total_steps": 120, "batch_size": 16, "checkpoint_every": 5,
                          "lr": 0.2, "seed": 3, "backoff_initial_ms": 0});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

/// The checkpoint API and the bucket agree: the live (unpruned) steps the API lists are
/// exactly the steps with a manifest in the bucket, and LATEST names the newest.
async fn assert_api_matches_bucket(app: &TestApp, server: &S3Server, prefix: &str, id: &str) {
    let job_prefix = format!("{}/{id}", prefix.trim_end_matches('/'));
    let keys = server.keys(&job_prefix).await;
    let in_bucket: BTreeSet<u64> = keys
        .iter()
        .filter_map(|k| {
            let rest = k.strip_prefix(&format!("{job_prefix}/"))?;
            let (dir, file) = rest.split_once('/')?;
            (file == checkpoint::MANIFEST)
                .then(|| checkpoint::parse_step_dir(dir))
                .flatten()
        })
        .collect();
    let api = app.get_json(&format!("/jobs/{id}/checkpoints")).await;
    let in_api: BTreeSet<u64> = api
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(in_api, in_bucket, "API {api} vs bucket {keys:?}");
    assert!(!in_bucket.is_empty());
    let steps_in_bucket: BTreeSet<&str> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(&format!("{job_prefix}/"))?.split_once('/'))
        .map(|(dir, _)| dir)
        .collect();
    assert!(
        steps_in_bucket.len() <= 3 + 1,
        "retention keeps 3 committed steps (plus at most one in flight): {steps_in_bucket:?}"
    );
    let latest = server
        .store(&job_prefix)
        .get(checkpoint::LATEST)
        .await
        .unwrap()
        .expect("LATEST in the bucket");
    assert_eq!(
        checkpoint::parse_step_dir(String::from_utf8_lossy(&latest).trim()),
        in_bucket.last().copied(),
        "LATEST names the newest committed step"
    );
    for c in api.as_array().unwrap() {
        let location = c["location"].as_str().unwrap_or_default();
        assert!(
            location.starts_with(&format!("s3://{}/{job_prefix}/step-", server.bucket)),
            "{c}"
        );
    }
}

/// A local failure-free run of the same spec: the reference model.
async fn reference_hash(app: &TestApp, local_data: &Path, extra: Value) -> String {
    let local = spec(
        local_data.to_str().unwrap(),
        app.data_dir.path().join("local-ckpt").to_str().unwrap(),
        extra,
    );
    let id = run_to_end(app, local).await;
    model_sha(app, &id).await
}

async fn app_for(server: &S3Server) -> TestApp {
    let config = server.config();
    spawn_app_with(move |s| s.s3 = config).await
}

async fn full_job_and_exact_resume(kind: Kind) {
    let server = S3Server::start(kind).await;
    let app = app_for(&server).await;
    let local_data = dataset(&app, &server, "data/small").await;
    let reference = reference_hash(&app, &local_data, json!({})).await;

    // Failure-free, everything in the bucket.
    let id = run_to_end(
        &app,
        spec(&server.url("data/small"), &server.url("ckpt"), json!({})),
    )
    .await;
    assert_eq!(
        model_sha(&app, &id).await,
        reference,
        "{kind:?}: S3 run differs"
    );
    assert!(
        server
            .keys(&format!("ckpt/{id}"))
            .await
            .contains(&format!("ckpt/{id}/{}", checkpoint::FINAL_MODEL)),
        "the final model is in the bucket"
    );
    assert_api_matches_bucket(&app, &server, "ckpt", &id).await;

    // kill -9 of random ranks at random moments; LATEST valid after each kill.
    let slow = json!({"sleep_sec": 0.01});
    let reference_slow = reference_hash(&app, &local_data, slow.clone()).await;
    let id = app
        .create_job(spec(&server.url("data/small"), &server.url("ckpt"), slow))
        .await;
    let store = server.store(&format!("ckpt/{id}"));
    let mut rng = SplitMix64::new(11);
    let mut kills = 0;
    while kills < 3 {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
        let summary = app.summary(&id).await;
        if summary["state"] != "running" {
            break;
        }
        let pids = running_pids_in(&summary);
        if pids.len() < 2 {
            continue;
        }
        kill(pids[rng.below(2) as usize], libc::SIGKILL);
        kills += 1;
        assert_latest_valid(&store, 2).await;
    }
    let job = app.wait_finished(&id, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(kills > 0, "no kill landed");
    assert_eq!(app.restarts(&id).await.len(), kills);
    assert_latest_valid(&store, 2).await;
    assert_eq!(
        model_sha(&app, &id).await,
        reference_slow,
        "{kind:?}: resume after kill -9 is not exact"
    );
    assert_api_matches_bucket(&app, &server, "ckpt", &id).await;
}

#[actix_web::test]
async fn s3s_full_job_and_exact_resume_after_kill() {
    full_job_and_exact_resume(Kind::S3sFs).await;
}

#[actix_web::test]
async fn garage_full_job_and_exact_resume_after_kill() {
    full_job_and_exact_resume(Kind::Garage).await;
}

/// The S3 server is killed while checkpoints are being written, stays down long enough for
/// the retries to give up, and comes back: the failed checkpoint is a clear line in the job's
/// log, LATEST never names a broken step, and the job finishes with the exact model.
async fn outage_in_the_middle_of_checkpoints(kind: Kind) {
    let mut server = S3Server::start(kind).await;
    let app = app_for(&server).await;
    let local_data = dataset(&app, &server, "data/small").await;
    let extra = json!({"sleep_sec": 0.01, "total_steps": 300, "max_restarts": 1000,
                       "backoff_initial_ms": 200, "backoff_max_ms": 1000});
    let reference = reference_hash(&app, &local_data, extra.clone()).await;
    let id = app
        .create_job(spec(&server.url("data/small"), &server.url("ckpt"), extra))
        .await;
    let checkpoints = format!("/jobs/{id}/checkpoints");
    wait_for(Duration::from_secs(60), || async {
        let c = app.get_json(&checkpoints).await;
        (c.as_array().unwrap().len() >= 2).then_some(())
    })
    .await
    .expect("checkpoints committed before the outage");

    server.stop();
    let failed = wait_for(Duration::from_secs(60), || async {
        app.log_lines(&id).await.into_iter().find(|l| {
            let text = l["line"].as_str().unwrap_or_default();
            text.contains("checkpoint of step") && text.contains("failed")
        })
    })
    .await
    .expect("a failed checkpoint is reported in the job's log");
    let line = failed["line"].as_str().unwrap();
    assert!(line.contains("127.0.0.1"), "the line says where: {line}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start_again().await;

    let job = app.wait_finished(&id, Duration::from_secs(240)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let store = server.store(&format!("ckpt/{id}"));
    assert_latest_valid(&store, 2).await;
    assert_api_matches_bucket(&app, &server, "ckpt", &id).await;
    assert_eq!(
        model_sha(&app, &id).await,
        reference,
        "{kind:?}: the run through an outage is not exact"
    );
}

#[actix_web::test]
async fn s3s_outage_in_the_middle_of_checkpoints() {
    outage_in_the_middle_of_checkpoints(Kind::S3sFs).await;
}

#[actix_web::test]
async fn garage_outage_in_the_middle_of_checkpoints() {
    outage_in_the_middle_of_checkpoints(Kind::Garage).await;
}

/// Wrong credentials are refused at submission with a 422 that says so (and nothing is
/// created); the message does not echo the secret.
async fn wrong_credentials_are_refused(kind: Kind) {
    let server = S3Server::start(kind).await;
    let wrong_secret = match kind {
        Kind::Garage => "0".repeat(64),
        Kind::S3sFs => "not-the-secret".to_string(),
    };
    let mut config = server.config();
    config.secret_key = Some(wrong_secret.clone());
    let app = spawn_app_with(move |s| s.s3 = config).await;
    for (dataset, checkpoints) in [
        (
            server.url("data"),
            app.data_dir.path().join("c").display().to_string(),
        ),
        (
            app.data_dir.path().join("d").display().to_string(),
            server.url("ckpt"),
        ),
    ] {
        let res = app
            .post_json("/jobs", &spec(&dataset, &checkpoints, json!({})))
            .await;
        let body = assert_json_error(res, 422).await;
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("refused the credentials") && message.contains(&server.bucket),
            "{kind:?}: {message}"
        );
        assert!(!message.contains(&wrong_secret));
    }
    assert!(app.get_json("/jobs").await.as_array().unwrap().is_empty());
}

#[actix_web::test]
async fn s3s_wrong_credentials_are_refused() {
    wrong_credentials_are_refused(Kind::S3sFs).await;
}

#[actix_web::test]
async fn garage_wrong_credentials_are_refused() {
    wrong_credentials_are_refused(Kind::Garage).await;
}

/// Cache directories (one per object) and the files in them.
fn cache_listing(app: &TestApp) -> Vec<(String, Vec<String>)> {
    let root = app.data_dir.path().join("cache").join("datasets");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|f| f.file_name().into_string().unwrap())
            .collect();
        files.sort();
        out.push((dir.file_name().into_string().unwrap(), files));
    }
    out.sort();
    out
}

fn log_text(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["line"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Shards are fetched when the stream reaches them (a short job touches one shard of four),
/// cached by ETag and reused by the next job; a changed object is fetched again.
#[actix_web::test]
async fn s3_shards_are_fetched_on_demand_and_cached_by_etag() {
    let server = S3Server::start(Kind::S3sFs).await;
    let app = app_for(&server).await;
    dataset(&app, &server, "data/small").await;
    let short = |app: &TestApp| {
        spec(
            &server.url("data/small"),
            app.data_dir.path().join("ckpt").to_str().unwrap(),
            json!({"world_size": 1, "total_steps": 10}),
        )
    };
    let first = run_to_end(&app, short(&app)).await;
    let lines = log_text(&app.log_lines(&first).await);
    let fetched: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("fetched from"))
        .collect();
    assert_eq!(
        fetched.len(),
        1,
        "only the first shard is needed: {lines:?}"
    );
    assert!(fetched[0].contains("shard-00000.jsonl"));
    let cache = cache_listing(&app);
    assert_eq!(cache.len(), 1, "{cache:?}");
    let cached_file = app
        .data_dir
        .path()
        .join("cache/datasets")
        .join(&cache[0].0)
        .join(&cache[0].1[0]);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cached_file).unwrap());

    // Another job reuses the cached copy.
    let second = run_to_end(&app, short(&app)).await;
    let lines = log_text(&app.log_lines(&second).await);
    assert!(
        !lines.iter().any(|l| l.contains("fetched from")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("shard-00000.jsonl from the cache"))
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cached_file).unwrap()),
        inode
    );
    assert_eq!(
        model_sha(&app, &first).await,
        model_sha(&app, &second).await
    );

    // The object changes: a new ETag, fetched again, the stale copy dropped.
    let other = app.data_dir.path().join("other-data");
    make_dataset(
        &other,
        &DatasetParams {
            seed: 8,
            ..params()
        },
    )
    .unwrap();
    server
        .store("data/small")
        .put(
            "shard-00000.jsonl",
            std::fs::read(other.join("shard-00000.jsonl")).unwrap(),
        )
        .await
        .unwrap();
    let third = run_to_end(&app, short(&app)).await;
    let lines = log_text(&app.log_lines(&third).await);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("shard-00000.jsonl fetched from")),
        "{lines:?}"
    );
    let cache_after = cache_listing(&app);
    assert_eq!(cache_after.len(), 1);
    assert_eq!(cache_after[0].1.len(), 1, "the stale copy is gone");
    assert_ne!(cache_after[0].1, cache[0].1, "named by the new ETag");
    assert_ne!(model_sha(&app, &third).await, model_sha(&app, &first).await);
}

/// The secret key reaches workers through their environment only: never on a command line,
/// in a log line or in an API response.
#[actix_web::test]
async fn s3_secrets_stay_in_the_environment() {
    let server = S3Server::start(Kind::S3sFs).await;
    let app = app_for(&server).await;
    dataset(&app, &server, "data/small").await;
    let secret = server.secret_key.clone();
    let id = app
        .create_job(spec(
            &server.url("data/small"),
            &server.url("ckpt"),
            json!({"sleep_sec": 0.01, "total_steps": 150}),
        ))
        .await;
    let pids = app.running_pids(&id, 2).await;
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&secret),
            "secret on the command line of {pid}"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            environ
                .split(|&b| b == 0)
                .any(|v| v == format!("S3_SECRET_KEY={secret}").as_bytes()),
            "the worker gets the secret through its environment"
        );
    }
    let job = app.wait_finished(&id, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    for path in [
        "/jobs".to_string(),
        "/jobs/summaries".to_string(),
        format!("/jobs/{id}"),
        format!("/jobs/{id}/summary"),
        format!("/jobs/{id}/workers"),
        format!("/jobs/{id}/restarts"),
        format!("/jobs/{id}/checkpoints?all=true"),
        format!("/jobs/{id}/logs?tail=100000"),
        "/metrics".to_string(),
        "/".to_string(),
    ] {
        let body = app.get(&path).await.text().await.unwrap();
        assert!(
            !body.contains(&secret),
            "secret in the response of GET {path}"
        );
    }
    let lines = log_text(&app.log_lines(&id).await);
    assert!(lines.len() > 2);
    assert!(!lines.iter().any(|l| l.contains(&secret)));
    // A job that tries to pass credentials itself is refused (the spec is echoed by the API).
    let res = app
        .post_json(
            "/jobs",
            &json!({"world_size": 1, "env": {"S3_SECRET_KEY": "x"}}),
        )
        .await;
    assert_json_error(res, 422).await;
}

/// A server started without S3 credentials refuses `s3://` locations up front, and a
/// malformed bucket name is refused whatever the configuration.
#[actix_web::test]
async fn s3_locations_need_server_credentials_and_a_valid_bucket() {
    let app = spawn_app().await;
    let res = app
        .post_json(
            "/jobs",
            &json!({"world_size": 1, "dataset": "s3://some-bucket/data"}),
        )
        .await;
    let body = assert_json_error(res, 422).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no S3 credentials"),
        "{body}"
    );
    for bad in ["s3://", "s3://Upper/x", "s3://ab/x", "s3://bucket/a/../b"] {
        let res = app
            .post_json("/jobs", &json!({"world_size": 1, "checkpoint_dir": bad}))
            .await;
        assert_json_error(res, 422).await;
    }
    assert!(app.get_json("/jobs").await.as_array().unwrap().is_empty());
}

/// A part above the multipart threshold goes up as a multipart upload (its ETag says how many
/// chunks) and reads back byte for byte.
#[actix_web::test]
async fn s3s_large_parts_go_up_as_multipart() {
    let server = S3Server::start(Kind::S3sFs).await;
    let store = server.store("big");
    let size = trainvisor::storage::s3::MULTIPART_THRESHOLD + 3 * (1 << 20);
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    store
        .put("step-0000000001/rank-00000.part", data.clone())
        .await
        .unwrap();
    let BlobStore::S3(s3) = &store else {
        unreachable!()
    };
    let etag = s3
        .head_etag(&s3.path("step-0000000001/rank-00000.part"))
        .await
        .unwrap()
        .unwrap();
    let chunks = size.div_ceil(trainvisor::storage::s3::MULTIPART_CHUNK);
    assert!(
        etag.trim_matches('"').ends_with(&format!("-{chunks}")),
        "not a multipart ETag: {etag}"
    );
    let back = store
        .get("step-0000000001/rank-00000.part")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "multipart upload reads back different bytes");
}
