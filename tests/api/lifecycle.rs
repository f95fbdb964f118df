//! Launch, the worker contract, success, stop, delete and purge.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn health_reports_version() {
    let app = spawn_app().await;
    let body = app.get_json("/health").await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
}

#[actix_web::test]
async fn four_rank_job_gets_the_worker_contract_and_succeeds() {
    let app = spawn_app().await;
    let script = r#"
        echo "env RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE"
        echo "env MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT JOB_ID=$JOB_ID"
        echo "env RESTART_COUNT=$RESTART_COUNT TORCHELASTIC_RESTART_COUNT=$TORCHELASTIC_RESTART_COUNT"
        echo "env CHECKPOINT_DIR=$CHECKPOINT_DIR DATASET_DIR=$DATASET_DIR EXTRA=$EXTRA"
        echo "env URL=$TRAINVISOR_HEARTBEAT_URL TOKEN_LEN=${#TRAINVISOR_TOKEN}"
        echo "proc pid=$$ pgid=$(cut -d' ' -f5 /proc/$$/stat)"
        echo "to stderr" >&2
    "#;
    let id = app
        .create_job(
            json!({"world_size": 4, "command": sh(script), "env": {"EXTRA": "yes"},
                           "dataset": "/data/x"}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());

    let lines = app.log_lines(&id).await;
    for rank in 0..4u64 {
        let of_rank: Vec<String> = lines
            .iter()
            .filter(|l| l["rank"] == rank)
            .map(|l| l["line"].as_str().unwrap().to_string())
            .collect();
        let all = of_rank.join("\n");
        assert!(
            all.contains(&format!(
                "RANK={rank} WORLD_SIZE=4 LOCAL_RANK={rank} LOCAL_WORLD_SIZE=4"
            )),
            "{all}"
        );
        assert!(all.contains("MASTER_ADDR=127.0.0.1 MASTER_PORT="), "{all}");
        assert!(all.contains(&format!("JOB_ID={id}")), "{all}");
        assert!(
            all.contains("RESTART_COUNT=0 TORCHELASTIC_RESTART_COUNT=0"),
            "{all}"
        );
        assert!(
            all.contains(&format!("/{id} DATASET_DIR=/data/x EXTRA=yes")),
            "{all}"
        );
        assert!(
            all.contains(&format!("/jobs/{id}/workers/{rank}/heartbeat TOKEN_LEN=48")),
            "{all}"
        );
        assert!(all.contains("to stderr"), "{all}");
        // Each rank leads its own process group.
        let proc_line = of_rank.iter().find(|l| l.starts_with("proc ")).unwrap();
        let nums: Vec<&str> = proc_line.split(['=', ' ']).collect();
        assert_eq!(nums[2], nums[4], "pid and pgid differ: {proc_line}");
    }
    let stderr = lines.iter().find(|l| l["line"] == "to stderr").unwrap();
    assert_eq!(stderr["stream"], "stderr");

    let incarnations = app.incarnations(&id).await;
    assert_eq!(incarnations.len(), 4);
    for inc in &incarnations {
        assert_eq!(inc["exit_code"], 0);
        assert_eq!(inc["outcome"], "succeeded");
        assert!(inc["pid"].is_u64());
    }
    let summary = app.summary(&id).await;
    assert_eq!(summary["state"], "succeeded");
    assert_eq!(summary["workers"].as_array().unwrap().len(), 4);
}

#[actix_web::test]
async fn heartbeats_show_in_the_summary() {
    let app = spawn_app().await;
    let script = format!(
        "{}; sleep 30",
        beat(r#"{"step": 7, "shard_idx": 1, "line_idx": 40, "metrics": {"loss": 0.5}}"#)
    );
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(&script), "total_steps": 100}))
        .await;
    let summary = wait_for(Duration::from_secs(20), || async {
        let s = app.summary(&id).await;
        let all = s["workers"].as_array()?.iter().all(|w| w["step"] == 7);
        all.then_some(s)
    })
    .await
    .expect("heartbeats arrive");
    assert_eq!(summary["step"], 7);
    assert_eq!(summary["total_steps"], 100);
    assert_eq!(summary["loss"], 0.5);
    let w = &summary["workers"][0];
    assert_eq!(w["heartbeat"]["shard_idx"], 1);
    assert_eq!(w["heartbeat"]["line_idx"], 40);
    assert!(w["last_heartbeat_at"].is_string());
    assert!(w["pid"].is_u64());
    let res = app.stop(&id).await;
    assert_eq!(res.status(), 200);
}

#[actix_web::test]
async fn stop_terminates_every_process_group() {
    let app = spawn_app().await;
    // The sleep is a grandchild: stopping must reach it through the process group.
    let id = app
        .create_job(json!({"world_size": 3, "command": sh("sleep 300; echo never")}))
        .await;
    let pids = app.running_pids(&id, 3).await;
    let res = app.stop(&id).await;
    assert_eq!(res.status(), 200);
    let job: serde_json::Value = res.json().await.unwrap();
    assert_eq!(job["state"], "stopped");
    assert!(job["reason"].as_str().unwrap().contains("stopped"));
    for pid in pids {
        assert!(group_gone(pid).await, "process group {pid} survived stop");
    }
    for inc in app.incarnations(&id).await {
        assert_eq!(inc["outcome"], "stopped");
    }
    // Stopping again is harmless.
    let res = app.stop(&id).await;
    assert_eq!(res.status(), 200);
}

#[actix_web::test]
async fn delete_refuses_running_jobs_unless_forced() {
    let app = spawn_app().await;
    let running = app
        .create_job(json!({"world_size": 1, "command": sh("sleep 300")}))
        .await;
    app.running_pids(&running, 1).await;
    // The job's row says `running` once the recorder has committed the change, a moment
    // after the rank's pid shows in the summary.
    let state = wait_for(Duration::from_secs(10), || async {
        (app.job(&running).await["state"] == "running").then_some(())
    })
    .await;
    assert!(state.is_some(), "the job never showed as running");
    let res = app
        .client
        .delete(app.url(&format!("/jobs/{running}")))
        .send()
        .await
        .unwrap();
    assert_json_error(res, 409).await;
    assert_eq!(app.job(&running).await["state"], "running");

    let res = app
        .client
        .delete(app.url(&format!("/jobs/{running}?force=true")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_json_error(app.get(&format!("/jobs/{running}")).await, 404).await;
    assert_json_error(app.get(&format!("/jobs/{running}/workers")).await, 404).await;

    let done = app
        .create_job(json!({"world_size": 1, "command": sh("echo hi")}))
        .await;
    app.wait_finished(&done, Duration::from_secs(20)).await;
    let res = app
        .client
        .delete(app.url(&format!("/jobs/{done}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_json_error(app.get(&format!("/jobs/{done}/logs")).await, 404).await;
}

#[actix_web::test]
async fn purge_deletes_finished_jobs_or_the_ids_given() {
    let app = spawn_app().await;
    let a = app
        .create_job(json!({"world_size": 1, "command": sh("true")}))
        .await;
    let b = app
        .create_job(json!({"world_size": 1, "command": sh("exit 1"), "max_restarts": 0}))
        .await;
    let running = app
        .create_job(json!({"world_size": 1, "command": sh("sleep 300")}))
        .await;
    app.wait_finished(&a, Duration::from_secs(20)).await;
    assert_eq!(
        app.wait_finished(&b, Duration::from_secs(20)).await["state"],
        "failed"
    );
    app.running_pids(&running, 1).await;

    // A bad id refuses the whole request.
    let res = app
        .post_json("/jobs/purge", &json!({"job_ids": [a, "nope"]}))
        .await;
    assert_json_error(res, 400).await;
    assert_eq!(app.job(&a).await["state"], "succeeded");

    let res = app
        .client
        .post(app.url("/jobs/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let report: serde_json::Value = res.json().await.unwrap();
    let deleted: Vec<&str> = report["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(deleted.len(), 2, "{report}");
    assert!(deleted.contains(&a.as_str()) && deleted.contains(&b.as_str()));
    let jobs = app.get_json("/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);

    let res = app
        .post_json("/jobs/purge", &json!({"job_ids": [running]}))
        .await;
    let report: serde_json::Value = res.json().await.unwrap();
    assert_eq!(report["skipped"][0]["reason"], "running");
    let res = app
        .post_json("/jobs/purge", &json!({"job_ids": [running], "force": true}))
        .await;
    let report: serde_json::Value = res.json().await.unwrap();
    assert_eq!(report["deleted"][0], running.as_str());
    assert!(app.get_json("/jobs").await.as_array().unwrap().is_empty());
}

#[actix_web::test]
async fn lists_and_summaries_cover_every_job() {
    let app = spawn_app().await;
    let a = app
        .create_job(json!({"world_size": 2, "name": "first", "command": sh("true")}))
        .await;
    app.wait_finished(&a, Duration::from_secs(20)).await;
    let jobs = app.get_json("/jobs?state=succeeded").await;
    assert_eq!(jobs[0]["job_id"], a.as_str());
    assert_eq!(jobs[0]["name"], "first");
    assert!(
        app.get_json("/jobs?state=running")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    let summaries = app.get_json("/jobs/summaries").await;
    assert_eq!(summaries[0]["job_id"], a.as_str());
    assert_eq!(summaries[0]["workers"].as_array().unwrap().len(), 2);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("trainvisor_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
}
