//! Fault campaigns, bounded and on loopback. Each prints its figures (`cargo test campaign --
//! --nocapture` shows them). Sizes can be raised with CAMPAIGN_JOBS / CAMPAIGN_SERVER_KILLS.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trainvisor::trainer::data::{DatasetParams, make_dataset};
use trainvisor::trainer::rng::SplitMix64;

use crate::helpers::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dataset(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("campaign-data");
    let params = DatasetParams {
        shards: 4,
        rows_per_shard: 300,
        features: 6,
        classes: 3,
        seed: 11,
        label_noise: 0.02,
        test_rows: 100,
    };
    make_dataset(&out, &params).unwrap();
    out
}

fn trainer_spec(data: &Path, sync: bool) -> Value {
    let mode = if sync {
        json!({"sync": "allreduce", "restart_scope": "job"})
    } else {
        json!({"sync": "none", "restart_scope": "worker"})
    };
    let mut spec = json!({"world_size": 2, "dataset": data, "total_steps": 300, "batch_size": 8,
                          "checkpoint_every": 5, "sleep_sec": 0.004, "backoff_initial_ms": 0,
                          "max_restarts": 1000});
    for (k, v) in mode.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[actix_web::test]
async fn campaign_trainer_jobs_survive_random_worker_kills_with_exact_models() {
    let app = spawn_app().await;
    let data = dataset(app.data_dir.path());
    let started = Instant::now();
    let mut reference = HashMap::new();
    for sync in [true, false] {
        let id = app.create_job(trainer_spec(&data, sync)).await;
        assert_eq!(
            app.wait_finished(&id, Duration::from_secs(120)).await["state"],
            "succeeded"
        );
        reference.insert(sync, model_sha(&app, &id).await);
    }
    let n = env_usize("CAMPAIGN_JOBS", 20);
    let mut jobs = Vec::new();
    for i in 0..n {
        let sync = i % 2 == 0;
        jobs.push((app.create_job(trainer_spec(&data, sync)).await, sync));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000;
    let mut rng = SplitMix64::new(seed);
    let mut kills = 0;
    let mut live: Vec<usize> = (0..n).collect();
    while kills < 2 * n && !live.is_empty() {
        tokio::time::sleep(Duration::from_millis(20 + rng.below(60))).await;
        let pick = rng.below(live.len() as u64) as usize;
        let s = app.summary(&jobs[live[pick]].0).await;
        match s["state"].as_str() {
            Some("succeeded" | "failed" | "stopped") => {
                live.swap_remove(pick);
                continue;
            }
            Some("running") => {}
            _ => continue,
        }
        let pids = running_pids_in(&s);
        if !pids.is_empty() {
            kill(pids[rng.below(pids.len() as u64) as usize], libc::SIGKILL);
            kills += 1;
        }
    }
    let mut restarts = 0;
    for (id, sync) in &jobs {
        let job = app.wait_finished(id, Duration::from_secs(300)).await;
        assert_eq!(job["state"], "succeeded", "{job} (seed {seed})");
        restarts += job["restarts"].as_u64().unwrap();
        for r in app.restarts(id).await {
            if r["reason"] != "signal" {
                println!("campaign (a): job {id} restart not caused by a kill: {r}");
            }
        }
        let sha = model_sha(&app, id).await;
        assert_eq!(
            &sha, &reference[sync],
            "job {id} (sync {sync}) ended with a different model (seed {seed})"
        );
    }
    println!(
        "campaign (a): {n} trainer jobs, {kills} kill -9 of workers, {restarts} restarts, all succeeded with exact models, {:.1} s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}

async fn get(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

#[actix_web::test]
async fn campaign_server_killed_repeatedly_mid_job_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let data_dir = dir.path().join("server");
    let client = test_client();
    let (mut server, mut url) = start_server_process(&data_dir);
    let instance = std::fs::read_to_string(data_dir.join("instance-id")).unwrap();
    // A reference model, without failures.
    let mut slow = trainer_spec(&data, true);
    slow["sleep_sec"] = json!(0.02);
    let reference: Value = client
        .post(format!("{url}/jobs"))
        .json(&slow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reference_id = reference["job_id"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(120), || async {
        get(&client, format!("{url}/jobs/{reference_id}")).await["finished_at"]
            .is_string()
            .then_some(())
    })
    .await
    .expect("reference finished");
    let expected = served_model(&client, &url, &reference_id).await.1;

    let mut ids = Vec::new();
    for _ in 0..3 {
        let job: Value = client
            .post(format!("{url}/jobs"))
            .json(&slow)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(job["job_id"].as_str().unwrap().to_string());
    }
    let kills = env_usize("CAMPAIGN_SERVER_KILLS", 10);
    let started = Instant::now();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.kill().unwrap();
        server.wait().unwrap();
        (server, url) = start_server_process(&data_dir);
    }
    for id in &ids {
        let job = wait_for(Duration::from_secs(180), || async {
            let j = get(&client, format!("{url}/jobs/{id}")).await;
            j["finished_at"].is_string().then_some(j)
        })
        .await
        .expect("job finished");
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(
            served_model(&client, &url, id).await.1,
            expected,
            "job {id}: model differs after server kills"
        );
        let incs = get(&client, format!("{url}/jobs/{id}/workers")).await;
        let incs = incs.as_array().unwrap();
        assert!(
            incs.iter().all(|i| i["ended_at"].is_string()),
            "an incarnation was left open"
        );
        let mut seen = std::collections::HashSet::new();
        for i in incs {
            assert!(
                seen.insert((i["rank"].as_u64(), i["attempt"].as_u64())),
                "duplicated incarnation"
            );
        }
    }
    let restarts: usize = {
        let mut n = 0;
        for id in &ids {
            n += get(&client, format!("{url}/jobs/{id}/restarts"))
                .await
                .as_array()
                .unwrap()
                .len();
        }
        n
    };
    let leftovers = marked_processes(&instance).len();
    assert_eq!(leftovers, 0, "worker processes left over");
    println!(
        "campaign (b): {kills} kill -9 of the server mid-job, 3 jobs succeeded with exact models, {restarts} restarts recorded, \
         no open or duplicated incarnations, {leftovers} leftover processes, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    kill(server.id(), libc::SIGTERM);
    server.wait().unwrap();
}

#[actix_web::test]
async fn campaign_an_external_reader_holding_a_transaction_does_not_stall_the_server() {
    let app = spawn_app().await;
    let db = app.data_dir.path().join("trainvisor.db");
    // python3's sqlite3 module: the same library an operator's sqlite3 shell uses.
    let script = format!(
        "import sqlite3, sys, time\nc = sqlite3.connect({db:?}, isolation_level=None)\nc.execute('BEGIN')\nc.execute('SELECT COUNT(*) FROM logs').fetchone()\nprint('holding', flush=True)\ntime.sleep(4)\nc.execute('COMMIT')\n",
        db = db.display().to_string()
    );
    let mut reader = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = tokio::io::BufReader::new(reader.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "holding");
    let started = Instant::now();
    let id = app
        .create_job(json!({"world_size": 2, "command": sh("seq 1 2000; echo done")}))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(job["state"], "succeeded");
    // 2 × 2001 printed lines, the OMP_NUM_THREADS note and the final system note.
    assert_eq!(app.log_lines(&id).await.len(), 4004);
    let still_holding = reader.try_wait().unwrap().is_none();
    assert!(
        still_holding,
        "the reader let go too early for this to mean anything"
    );
    println!(
        "campaign (e): a job wrote 4,003 log lines and finished in {:.0} ms while an external reader held a transaction",
        took.as_secs_f64() * 1e3
    );
    reader.wait().await.unwrap();
}

#[actix_web::test]
async fn campaign_a_full_disk_fails_checkpoints_cleanly_and_training_recovers() {
    let app = spawn_app().await;
    let data = dataset(app.data_dir.path());
    let mut spec = trainer_spec(&data, true);
    spec["total_steps"] = json!(400);
    spec["sleep_sec"] = json!(0.01);
    let reference = app.create_job(spec.clone()).await;
    assert_eq!(
        app.wait_finished(&reference, Duration::from_secs(120))
            .await["state"],
        "succeeded"
    );
    let expected = model_sha(&app, &reference).await;

    let mounted = Tmpfs::mount("256k");
    let disk = mounted.path();
    spec["checkpoint_dir"] = json!(disk);
    let id = app.create_job(spec).await;
    let store = trainvisor::storage::BlobStore::open(disk.join(&id).to_str().unwrap()).unwrap();
    wait_for(Duration::from_secs(60), || async {
        let c = app.get_json(&format!("/jobs/{id}/checkpoints")).await;
        (c.as_array().unwrap().len() >= 2).then_some(())
    })
    .await
    .expect("checkpoints before the disk fills");
    let ballast = mounted.fill();
    let full_since = Instant::now();
    let error = wait_for(Duration::from_secs(30), || async {
        app.log_lines(&id).await.into_iter().find(|l| {
            let line = l["line"].as_str().unwrap_or("");
            line.contains("checkpoint of step") && line.contains("No space left on device")
        })
    })
    .await
    .expect("a clear error in the job's log");
    let latest_during = trainvisor::checkpoint::find_resume(&store, 0, 2)
        .await
        .unwrap()
        .0
        .expect("a valid checkpoint");
    let summary = app.summary(&id).await;
    assert_eq!(
        summary["state"], "running",
        "a full disk does not stop training"
    );
    std::fs::remove_file(&ballast).unwrap();
    let job = app.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(model_sha(&app, &id).await, expected, "the model is exact");
    println!(
        "campaign (d): disk full for {:.1} s; error logged: {:?}; newest valid checkpoint meanwhile: step {}; job finished with the exact model",
        full_since.elapsed().as_secs_f64(),
        error["line"],
        latest_during.manifest.step
    );
}
