//! The Python worker helper (`examples/python/trainvisor_worker.py`) and its example trainer
//! (`train_plain.py`) against the real server: checkpoints are committed, the final model is
//! written, and a run with a `kill -9` ends with a model byte-identical to a failure-free run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const SHARDS: usize = 4;
const LINES_PER_SHARD: usize = 300;
const CLASSES: usize = 3;

/// Writes `shard-00000.jsonl` … with deterministic, learnable examples
/// `{"x": [4 floats], "y": class}` and returns the dataset directory.
fn make_dataset(root: &Path) -> PathBuf {
    let dir = root.join("dataset");
    std::fs::create_dir_all(&dir).unwrap();
    // A small LCG, so the data is the same on every machine.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let centers = [
        [1.0, 0.0, -0.5, 0.2],
        [-0.8, 0.9, 0.3, -0.4],
        [0.1, -0.9, 0.8, 0.6],
    ];
    for shard in 0..SHARDS {
        let mut text = String::new();
        for _ in 0..LINES_PER_SHARD {
            let x: Vec<f64> = (0..4).map(|_| next()).collect();
            let score = |c: &[f64; 4]| c.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>();
            let y = (0..CLASSES)
                .max_by(|&a, &b| score(&centers[a]).total_cmp(&score(&centers[b])))
                .unwrap();
            let xs: Vec<String> = x.iter().map(|v| format!("{v:.4}")).collect();
            text.push_str(&format!("{{\"x\": [{}], \"y\": {y}}}\n", xs.join(", ")));
        }
        std::fs::write(dir.join(format!("shard-{shard:05}.jsonl")), text).unwrap();
    }
    dir
}

fn train_plain(extra: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/train_plain.py");
    let mut argv = vec![
        "python3".to_string(),
        script.to_string_lossy().into_owned(),
        "--classes".to_string(),
        CLASSES.to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    json!(argv)
}

/// The checkpoint directory of a job under the default `checkpoint_dir`.
fn checkpoint_dir(app: &TestApp, id: &str) -> PathBuf {
    app.data_dir.path().join("checkpoints").join(id)
}

/// The step `LATEST` names, if it names one.
fn latest_step(dir: &Path) -> Option<u64> {
    let latest = std::fs::read_to_string(dir.join("LATEST")).ok()?;
    latest.trim_end().strip_prefix("step-")?.parse().ok()
}

/// Waits until `LATEST` names a step of at least `step`.
async fn wait_committed(dir: &Path, step: u64) {
    wait_for(Duration::from_secs(60), || async {
        latest_step(dir).filter(|s| *s >= step)
    })
    .await
    .unwrap_or_else(|| panic!("no checkpoint at step >= {step} in {}", dir.display()));
}

async fn log_text(app: &TestApp, id: &str) -> String {
    app.log_lines(id)
        .await
        .iter()
        .map(|l| format!("[{}] {}", l["rank"], l["line"].as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn assert_succeeded(app: &TestApp, id: &str) {
    let job = app.wait_finished(id, Duration::from_secs(120)).await;
    assert_eq!(
        job["state"],
        "succeeded",
        "{job}\n{}",
        log_text(app, id).await
    );
}

fn model_bytes(app: &TestApp, id: &str) -> Vec<u8> {
    let path = checkpoint_dir(app, id).join("model.bin");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[actix_web::test]
async fn python_job_commits_checkpoints_and_writes_the_model() {
    let app = spawn_app().await;
    let dataset = make_dataset(app.data_dir.path());
    let id = app
        .create_job(json!({
            "world_size": 2, "command": train_plain(&[]), "dataset": dataset,
            "total_steps": 30, "batch_size": 8, "checkpoint_every": 5, "lr": 0.5,
        }))
        .await;
    assert_succeeded(&app, &id).await;

    let dir = checkpoint_dir(&app, &id);
    assert_eq!(
        std::fs::read_to_string(dir.join("LATEST")).unwrap(),
        "step-0000000030\n"
    );
    let step_dir = dir.join("step-0000000030");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(step_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], 1, "{manifest}");
    assert_eq!(manifest["job_id"], id.as_str());
    assert_eq!(manifest["step"], 30);
    assert_eq!(manifest["world_size"], 2);
    let parts = manifest["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{manifest}");
    for (rank, part) in parts.iter().enumerate() {
        assert_eq!(part["rank"], rank);
        assert_eq!(part["name"], format!("rank-{rank:05}.part"));
        let bytes = std::fs::read(step_dir.join(part["name"].as_str().unwrap())).unwrap();
        assert_eq!(part["bytes"], bytes.len());
        assert_eq!(part["sha256"], trainvisor::checkpoint::sha256_hex(&bytes));
        // The part holds the rank's cursor, which the manifest repeats.
        let state: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(state["step"], 30);
        assert_eq!(state["rank"], rank);
        assert_eq!(part["shard_idx"], state["cursor"]["shard_idx"]);
        assert_eq!(part["line_idx"], state["cursor"]["line_idx"]);
        assert!(part["metrics"]["loss"].is_f64(), "{part}");
    }
    // 30 steps of 8 lines from rank 0's shards 0 and 2 (300 lines each): shard 0, line 240.
    assert_eq!(parts[0]["shard_idx"], 0);
    assert_eq!(parts[0]["line_idx"], 240);
    assert_eq!(parts[1]["shard_idx"], 1);

    let model = model_bytes(&app, &id);
    let parsed: Value = serde_json::from_slice(&model).unwrap();
    assert_eq!(parsed["steps"], 30);
    assert_eq!(parsed["classes"], CLASSES);
    assert_eq!(parsed["features"], 4);
    let res = app.get(&format!("/jobs/{id}/model")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().as_ref(), model.as_slice());

    let logs = log_text(&app, &id).await;
    assert!(logs.contains("[rank 0] starting fresh"), "{logs}");
    assert!(logs.contains("[rank 0] wrote model.bin"), "{logs}");
}

/// Runs the same job twice at once, once undisturbed and once with `kill -9` of rank
/// `victim` after the checkpoint of step 10 is committed; both must succeed with the same
/// `model.bin`. Returns the crashed job's id.
async fn crash_and_compare(app: &TestApp, spec: Value, victim: usize) -> String {
    let reference = app.create_job(spec.clone()).await;
    let crashed = app.create_job(spec).await;
    let pids = app.running_pids(&crashed, 2).await;
    wait_committed(&checkpoint_dir(app, &crashed), 10).await;
    assert!(
        !checkpoint_dir(app, &crashed).join("model.bin").exists(),
        "the job finished before the kill; make it longer"
    );
    kill(pids[victim], libc::SIGKILL);

    assert_succeeded(app, &reference).await;
    assert_succeeded(app, &crashed).await;
    assert!(app.restarts(&reference).await.is_empty());
    let restarts = app.restarts(&crashed).await;
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0]["rank"], victim);
    assert_eq!(restarts[0]["reason"], "signal");
    assert_eq!(restarts[0]["signal"], 9);

    let (a, b) = (model_bytes(app, &reference), model_bytes(app, &crashed));
    assert!(!a.is_empty());
    assert!(
        a == b,
        "model.bin differs after the crash:\n{}\nvs\n{}\nlogs:\n{}",
        String::from_utf8_lossy(&a),
        String::from_utf8_lossy(&b),
        log_text(app, &crashed).await
    );
    crashed
}

/// Whether the logs say `rank` resumed from a checkpoint after step 0.
fn resumed_from_checkpoint(logs: &str, rank: usize) -> bool {
    let needle = format!("[rank {rank}] resumed from step ");
    logs.lines().any(|l| {
        l.split_once(&needle)
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 10)
    })
}

#[actix_web::test]
async fn independent_ranks_resume_after_kill_9_with_an_identical_model() {
    let app = spawn_app().await;
    let dataset = make_dataset(app.data_dir.path());
    let spec = json!({
        "world_size": 2, "command": train_plain(&[]), "dataset": dataset,
        "total_steps": 80, "batch_size": 8, "checkpoint_every": 5, "lr": 0.5,
        "sleep_sec": 0.05, "restart_scope": "worker", "backoff_initial_ms": 0,
    });
    // Rank 0 writes the model, so killing it exercises the resume that matters.
    let crashed = crash_and_compare(&app, spec, 0).await;
    let restarts = app.restarts(&crashed).await;
    assert_eq!(restarts[0]["scope"], "worker");
    let logs = log_text(&app, &crashed).await;
    assert!(resumed_from_checkpoint(&logs, 0), "{logs}");
    assert!(
        !resumed_from_checkpoint(&logs, 1),
        "rank 1 must not restart: {logs}"
    );
}

#[actix_web::test]
async fn synchronous_ranks_resume_after_kill_9_with_an_identical_model() {
    let app = spawn_app().await;
    let dataset = make_dataset(app.data_dir.path());
    let spec = json!({
        "world_size": 2, "command": train_plain(&["--sync"]), "dataset": dataset,
        "total_steps": 80, "batch_size": 8, "checkpoint_every": 5, "lr": 0.5,
        "sleep_sec": 0.05, "restart_scope": "job", "backoff_initial_ms": 0,
    });
    let crashed = crash_and_compare(&app, spec, 1).await;
    let restarts = app.restarts(&crashed).await;
    assert_eq!(restarts[0]["scope"], "job");
    // Every rank restarted from the same committed step.
    let logs = log_text(&app, &crashed).await;
    assert!(resumed_from_checkpoint(&logs, 0), "{logs}");
    assert!(resumed_from_checkpoint(&logs, 1), "{logs}");
    let resumed_step = |rank: usize| {
        let needle = format!("[rank {rank}] resumed from step ");
        logs.lines()
            .find_map(|l| {
                l.split_once(&needle)
                    .map(|(_, r)| r.split(' ').next().unwrap())
            })
            .unwrap()
            .to_string()
    };
    assert_eq!(resumed_step(0), resumed_step(1), "{logs}");
}

/// torchrun's whole contract reaches a Python rank: what a script or library reads
/// (`GROUP_RANK`, `ROLE_*`, `TORCHELASTIC_*`, the error file's path), with torchrun's values,
/// and `OMP_NUM_THREADS=1` unless the job sets it (which the job's log says once).
#[actix_web::test]
async fn a_python_rank_sees_torchruns_whole_environment() {
    let app = spawn_app().await;
    let script = "import json, os\nprint('ENV ' + json.dumps(dict(os.environ)), flush=True)";
    let id = app
        .create_job(
            json!({"world_size": 2, "command": ["python3", "-c", script],
                           "max_restarts": 3, "env": {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let lines = app.log_lines(&id).await;
    let env_of = |rank: u64| -> Value {
        let line = lines
            .iter()
            .find(|l| l["rank"] == rank && l["line"].as_str().unwrap().starts_with("ENV "))
            .unwrap_or_else(|| panic!("rank {rank} printed its environment"));
        serde_json::from_str(&line["line"].as_str().unwrap()[4..]).unwrap()
    };
    for rank in [0u64, 1] {
        let env = env_of(rank);
        assert_eq!(env["GROUP_RANK"], "0");
        assert_eq!(env["GROUP_WORLD_SIZE"], "1");
        assert_eq!(env["ROLE_NAME"], "default");
        assert_eq!(env["ROLE_RANK"], rank.to_string());
        assert_eq!(env["ROLE_WORLD_SIZE"], "2");
        assert_eq!(env["LOCAL_RANK"], rank.to_string());
        assert_eq!(env["TORCHELASTIC_RUN_ID"], id.as_str());
        assert_eq!(env["TORCHELASTIC_MAX_RESTARTS"], "3");
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "0");
        assert_eq!(
            env["TORCHELASTIC_SIGNALS_TO_HANDLE"],
            "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
        );
        assert_eq!(env["OMP_NUM_THREADS"], "1");
        assert_eq!(
            env["TORCH_NCCL_ASYNC_ERROR_HANDLING"], "3",
            "the job's value wins"
        );
        let error_file = env["TORCHELASTIC_ERROR_FILE"].as_str().unwrap();
        assert!(error_file.ends_with(&format!("rank-{rank}-attempt-0.json")));
        assert!(
            Path::new(error_file).parent().unwrap().is_dir(),
            "@record can write its file"
        );
        assert!(env.get("TORCHELASTIC_USE_AGENT_STORE").is_none());
    }
    let notes = lines
        .iter()
        .filter(|l| l["line"].as_str().unwrap().starts_with("OMP_NUM_THREADS=1"))
        .count();
    assert_eq!(
        notes, 1,
        "the job's log says once that OMP_NUM_THREADS was set"
    );
    // A reserved torchrun name cannot be set by a job.
    let res = app
        .post_json(
            "/jobs",
            &json!({"world_size": 1, "env": {"GROUP_RANK": "5"}}),
        )
        .await;
    let err = assert_json_error(res, 422).await;
    assert!(err["message"].as_str().unwrap().contains("GROUP_RANK"));
}

/// A rank that dies of an exception and records it as torch's `@record` does (stdlib here:
/// the same JSON into `TORCHELASTIC_ERROR_FILE`) gets that exception as the root cause: in the
/// restart's detail with its traceback, in the job's failure reason, and in the job's log.
/// A Python rank that dies of `ValueError: shard 7 is corrupt` and records it in
/// `TORCHELASTIC_ERROR_FILE` as torch's `@record` does (stdlib, same JSON).
pub const RECORDS_ITS_ERROR: &str = r#"
import json, os, sys, time, traceback
def record(fn):
    try:
        fn()
    except Exception as e:
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": {"message": f"{type(e).__name__}: {e}",
                       "extraInfo": {"py_callstack": traceback.format_exc(),
                                     "timestamp": str(int(time.time()))}}}, f)
        raise
def load_shard():
    raise ValueError("shard 7 is corrupt")
def main():
    print("loading", flush=True)
    load_shard()
record(main)
"#;

/// A 1-rank job of `RECORDS_ITS_ERROR` that fails for good after one restart.
pub fn recording_job() -> Value {
    json!({"world_size": 1, "command": ["python3", "-c", RECORDS_ITS_ERROR],
           "max_restarts": 1, "backoff_initial_ms": 0})
}

#[actix_web::test]
async fn the_error_file_is_the_root_cause() {
    let app = spawn_app().await;
    let id = app.create_job(recording_job()).await;
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited with code 1: ValueError: shard 7 is corrupt"),
        "{reason}"
    );
    assert!(reason.contains("in load_shard"), "the traceback: {reason}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1);
    let detail = restarts[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("ValueError: shard 7 is corrupt"),
        "{detail}"
    );
    assert!(
        detail.contains("Traceback (most recent call last)"),
        "{detail}"
    );
    let summary = app.summary(&id).await;
    assert!(
        summary["reason"]
            .as_str()
            .unwrap()
            .contains("ValueError: shard 7 is corrupt")
    );
    let logged = app.log_lines(&id).await.iter().any(|l| {
        l["stream"] == "system"
            && l["line"]
                .as_str()
                .unwrap()
                .contains("ValueError: shard 7 is corrupt")
    });
    assert!(logged, "the job's log names the root cause");
}
