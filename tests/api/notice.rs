//! Save on notice (issue 24): with checkpoints only every 5,000 steps, a stop, a checkpoint
//! request, SIGUSR1 to a rank and the server's own SIGTERM each save the step reached, so
//! nothing is lost; a rank that ignores the request costs the grace and no more.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// The built-in trainer, checkpointing only every 5,000 steps, running long enough.
fn rare_checkpoints(app: &TestApp, world: u32, extra: Value) -> Value {
    let mut spec = json!({"world_size": world, "dataset": small_dataset(app),
                          "total_steps": 1_000_000, "batch_size": 8, "checkpoint_every": 5000,
                          "sleep_sec": 0.002, "seed": 5, "backoff_initial_ms": 0});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

async fn wait_step(app: &TestApp, id: &str, at_least: u64) {
    wait_for(Duration::from_secs(60), || async {
        let s = app.summary(id).await;
        (s["step"].as_u64().unwrap_or(0) >= at_least).then_some(())
    })
    .await
    .expect("the job trains");
}

async fn committed_steps(app: &TestApp, id: &str) -> Vec<u64> {
    let list = app.get_json(&format!("/jobs/{id}/checkpoints")).await;
    list.as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["step"].as_u64())
        .collect()
}

/// The index follows a commit (the manifest, the truth, is written first): `step` is the
/// only checkpoint of the job once the index has it.
async fn assert_only_checkpoint(app: &TestApp, id: &str, step: u64) {
    let indexed = wait_for(Duration::from_secs(10), || async {
        (committed_steps(app, id).await == vec![step]).then_some(())
    })
    .await;
    assert!(indexed.is_some(), "{:?}", committed_steps(app, id).await);
}

/// Waits until ranks `0..ranks` of the built-in trainer say they resumed from `step`.
async fn wait_resumed(app: &TestApp, id: &str, ranks: u32, step: u64) {
    let resumed = wait_for(Duration::from_secs(30), || async {
        let texts = app.log_texts(id).await;
        (0..ranks)
            .all(|r| {
                let want = format!("rank {r}: resumed from step {step} ");
                texts.iter().any(|t| t.contains(&want))
            })
            .then_some(())
    })
    .await;
    assert!(resumed.is_some(), "{:?}", app.log_texts(id).await);
}

/// Every rank's last reported step, from the summary.
fn rank_steps(summary: &Value) -> Vec<u64> {
    summary["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["step"].as_u64().unwrap_or(0))
        .collect()
}

#[actix_web::test]
async fn a_stop_saves_the_step_reached_and_loses_nothing() {
    let app = spawn_app().await;
    let id = app.create_job(rare_checkpoints(&app, 2, json!({}))).await;
    wait_step(&app, &id, 20).await;
    let res = app.stop(&id).await;
    assert_eq!(res.status(), 200);
    let summary = app.summary(&id).await;
    assert_eq!(summary["state"], "stopped", "{summary}");
    let notice = &summary["last_notice"];
    assert_eq!(notice["cause"], "stop", "{summary}");
    assert_eq!(notice["outcome"], "saved", "{summary}");
    assert_eq!(notice["steps_lost"], 0, "{summary}");
    let saved = notice["saved_at_step"].as_u64().unwrap();
    assert!((20..5000).contains(&saved), "{notice}");
    // The step the ranks reached is the one saved: every rank held there.
    assert_eq!(notice["reached_step"], saved, "{notice}");
    assert!(
        rank_steps(&summary).iter().all(|s| *s <= saved),
        "{summary}"
    );
    assert_eq!(committed_steps(&app, &id).await, vec![saved]);
    assert_eq!(summary["last_checkpoint_step"], saved);
    // What the next incarnation resumes from: the saved step, every part valid.
    let dir = app.data_dir.path().join("checkpoints").join(&id);
    let store = trainvisor::storage::BlobStore::open(dir.to_str().unwrap()).unwrap();
    for rank in 0..2 {
        let (resume, _) = trainvisor::checkpoint::find_resume(&store, rank, 2)
            .await
            .unwrap();
        assert_eq!(resume.expect("a checkpoint").manifest.step, saved);
    }
    let out = crate::cli::cli(&app, &["status", &id]).await;
    let want = format!("notice (stop): saved at step {saved} in ");
    assert!(out.stdout.contains(&want), "{}", out.stdout);
    assert!(out.stdout.contains(", 0 steps lost"), "{}", out.stdout);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"trainvisor_notices_total{cause="stop",outcome="saved"} 1"#),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_stop_with_save_false_ends_the_ranks_without_a_save() {
    let app = spawn_app().await;
    let id = app.create_job(rare_checkpoints(&app, 2, json!({}))).await;
    wait_step(&app, &id, 10).await;
    let res = app
        .post_json(&format!("/jobs/{id}/stop"), &json!({"save": false}))
        .await;
    assert_eq!(res.status(), 200);
    let summary = app.summary(&id).await;
    assert_eq!(summary["state"], "stopped");
    assert!(summary["last_notice"].is_null(), "{summary}");
    assert!(committed_steps(&app, &id).await.is_empty());
    let res = app
        .post_json(&format!("/jobs/{id}/stop"), &json!({"save": "yes"}))
        .await;
    assert_json_error(res, 400).await;
}

/// Independent ranks (the step comes from the heartbeats) and synchronous ones (from the
/// all-reduce): the ranks go on training after the save.
#[actix_web::test]
async fn a_checkpoint_request_saves_now_and_training_goes_on() {
    let app = spawn_app().await;
    for extra in [
        json!({"sync": "none", "restart_scope": "worker"}),
        json!({"world_size": 4}),
    ] {
        let id = app
            .create_job(rare_checkpoints(&app, 2, extra.clone()))
            .await;
        wait_step(&app, &id, 10).await;
        let res = app
            .post_json(&format!("/jobs/{id}/checkpoint"), &json!({}))
            .await;
        assert_eq!(res.status(), 200);
        let report: Value = res.json().await.unwrap();
        assert_eq!(report["cause"], "checkpoint", "{extra}: {report}");
        assert_eq!(
            report["outcome"],
            "saved",
            "{extra}: {report}: {:?}",
            app.log_texts(&id).await
        );
        let saved = report["saved_at_step"].as_u64().unwrap();
        assert!(saved > 10 && saved < 5000, "{report}");
        assert_only_checkpoint(&app, &id, saved).await;
        // Still running, and past the saved step.
        wait_step(&app, &id, saved + 5).await;
        assert_eq!(app.summary(&id).await["state"], "running");
        app.post_json(&format!("/jobs/{id}/stop"), &json!({"save": false}))
            .await;
        let res = app
            .post_json(&format!("/jobs/{id}/checkpoint"), &json!({}))
            .await;
        assert_json_error(res, 409).await;
    }
}

/// Rank 0 heartbeats a step, says it saves on notice and ignores the request; rank 1 never
/// heartbeats and gets
/// SIGUSR1 (`save_signal`), which it traps and prints. The stop waits out the grace, then
/// ends both.
#[actix_web::test]
async fn a_rank_that_ignores_the_request_costs_only_the_grace() {
    let app = spawn_app().await;
    let script = format!(
        r#"trap 'echo "rank $RANK got USR1"' USR1
           if [ "$RANK" = 0 ]; then {}; fi
           echo "rank $RANK up"
           while true; do sleep 0.05; done"#,
        beat(r#"{"step": 7, "saves_on_notice": true}"#)
    );
    let id = app
        .create_job(
            json!({"world_size": 2, "command": sh(&script), "save_grace_s": 1, "save_signal": true,
                           "restart_scope": "worker", "heartbeat_timeout_s": 120}),
        )
        .await;
    wait_for(Duration::from_secs(20), || async {
        let texts = app.log_texts(&id).await;
        let up = texts.iter().filter(|t| t.ends_with(" up")).count() == 2;
        let beat = app.summary(&id).await["workers"][0]["step"] == 7;
        (up && beat).then_some(())
    })
    .await
    .expect("both ranks up, rank 0 heartbeating");
    assert_eq!(app.stop(&id).await.status(), 200);
    let summary = app.summary(&id).await;
    assert_eq!(summary["state"], "stopped");
    let notice = &summary["last_notice"];
    assert_eq!(notice["outcome"], "timed_out", "{summary}");
    assert!(notice["saved_at_step"].is_null(), "{notice}");
    assert_eq!(notice["steps_lost"], 7, "{notice}");
    assert!(notice["wait_ms"].as_f64().unwrap() >= 1000.0, "{notice}");
    let texts = app.log_texts(&id).await;
    assert!(
        texts.iter().any(|t| t.contains("rank 1 got USR1")),
        "{texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.contains("rank 0 got USR1")),
        "a heartbeating rank reads the request in its answer: {texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("save on notice (stop) timed_out")),
        "{texts:?}"
    );
}

/// SIGUSR1 to one rank (what Slurm's `--signal` sends before a preemption or the time limit):
/// the whole job saves the step reached and holds there.
#[actix_web::test]
async fn sigusr1_to_one_rank_saves_the_whole_job() {
    let app = spawn_app().await;
    let id = app
        .create_job(rare_checkpoints(&app, 2, json!({"save_grace_s": 600})))
        .await;
    wait_step(&app, &id, 10).await;
    let pids = app.running_pids(&id, 2).await;
    kill(pids[1], libc::SIGUSR1);
    let notice = wait_for(Duration::from_secs(30), || async {
        let s = app.summary(&id).await;
        (s["last_notice"]["outcome"] == "saved").then(|| s["last_notice"].clone())
    })
    .await
    .expect("a save on the signal");
    assert_eq!(notice["cause"], "signal", "{notice}");
    assert_eq!(notice["steps_lost"], 0, "{notice}");
    let saved = notice["saved_at_step"].as_u64().unwrap();
    assert_only_checkpoint(&app, &id, saved).await;
    // Held at the saved step (until the preemption, or the grace's end).
    let held = wait_for(Duration::from_secs(10), || async {
        let s = app.summary(&id).await;
        (rank_steps(&s) == vec![saved, saved]).then_some(())
    })
    .await;
    assert!(held.is_some(), "{}", app.summary(&id).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let summary = app.summary(&id).await;
    assert_eq!(rank_steps(&summary), vec![saved, saved], "{summary}");
    assert_eq!(summary["state"], "running");
    // A kill -9 now (the preemption) loses nothing: the group resumes at the saved step.
    kill(pids[0], libc::SIGKILL);
    wait_resumed(&app, &id, 1, saved).await;
    app.post_json(&format!("/jobs/{id}/stop"), &json!({"save": false}))
        .await;
}

/// The server's own SIGTERM (`docker stop`, a Kubernetes eviction): the ranks save before they
/// are stopped, and the next server resumes the job at the step reached.
#[actix_web::test]
async fn the_servers_sigterm_saves_and_the_next_server_resumes_at_the_step_reached() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_path_buf();
    let (mut server, url) = start_server_process(&path);
    let app = TestApp {
        address: url,
        client: test_client(),
        data_dir,
    };
    let id = app.create_job(rare_checkpoints(&app, 2, json!({}))).await;
    wait_step(&app, &id, 20).await;
    kill(server.id(), libc::SIGTERM);
    assert!(server.wait().unwrap().success());
    let (_next, url) = start_server_process(&path);
    let app = TestApp {
        address: url,
        client: test_client(),
        data_dir: app.data_dir,
    };
    let texts = app.log_texts(&id).await;
    let saved: u64 = texts
        .iter()
        .find_map(|t| {
            let rest = t.strip_prefix("saved on notice (server_shutdown) at step ")?;
            assert!(t.ends_with(": 0 steps lost"), "{t}");
            rest.split(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no save on the SIGTERM: {texts:?}"));
    assert!((20..5000).contains(&saved));
    wait_resumed(&app, &id, 2, saved).await;
    app.post_json(&format!("/jobs/{id}/stop"), &json!({"save": false}))
        .await;
}

/// The Python helper honours the request too: `train_plain.py` (independent ranks, step from
/// the heartbeats; and `--sync`, step from the server's all-reduce) saves the step reached on
/// a stop.
#[actix_web::test]
async fn a_python_job_saves_on_stop_in_both_modes() {
    use crate::python::{make_dataset, train_plain};
    let app = spawn_app().await;
    let dataset = make_dataset(app.data_dir.path());
    for (args, scope) in [(&[][..], "worker"), (&["--sync"][..], "job")] {
        let id = app
            .create_job(
                json!({"world_size": 2, "command": train_plain(args), "dataset": dataset,
                               "total_steps": 100_000, "batch_size": 8, "checkpoint_every": 5000,
                               "sleep_sec": 0.01, "restart_scope": scope}),
            )
            .await;
        wait_step(&app, &id, 5).await;
        assert_eq!(app.stop(&id).await.status(), 200);
        let summary = app.summary(&id).await;
        let notice = &summary["last_notice"];
        assert_eq!(notice["outcome"], "saved", "{args:?}: {summary}");
        assert_eq!(notice["steps_lost"], 0, "{args:?}: {notice}");
        let saved = notice["saved_at_step"].as_u64().unwrap();
        assert_eq!(notice["reached_step"], saved, "{args:?}: {notice}");
        assert_eq!(committed_steps(&app, &id).await, vec![saved], "{args:?}");
    }
}

/// kill -9 of one rank of a synchronous built-in trainer job: the survivors save the last step
/// every rank completed (the dead rank's part written by the lowest survivor) before the group
/// restarts, so at most the step in flight is redone, and the final model is bit-identical to
/// a failure-free run's.
#[actix_web::test]
async fn kill_9_of_one_rank_loses_at_most_one_step_and_the_model_is_identical() {
    let app = spawn_app().await;
    let spec = json!({"world_size": 2, "dataset": small_dataset(&app), "total_steps": 300,
                      "batch_size": 16, "checkpoint_every": 5000, "lr": 0.2, "seed": 3,
                      "backoff_initial_ms": 0, "sleep_sec": 0.005});
    let reference = run_to_end(&app, spec.clone()).await;
    let (_, expected) = model_of(&app, &reference).await;
    let id = app.create_job(spec).await;
    wait_step(&app, &id, 50).await;
    let pids = app.running_pids(&id, 2).await;
    kill(pids[1], libc::SIGKILL);
    let job = app.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let summary = app.summary(&id).await;
    let notice = &summary["last_notice"];
    assert_eq!(notice["cause"], "rank_died", "{summary}");
    assert_eq!(notice["outcome"], "saved", "{notice}");
    let saved = notice["saved_at_step"].as_u64().unwrap();
    assert!((50..300).contains(&saved), "{notice}");
    wait_resumed(&app, &id, 2, saved).await;
    let redone = summary["goodput"]["steps_redone"].as_u64().unwrap();
    assert!(redone <= 1, "{summary}");
    assert_eq!(model_of(&app, &id).await.1, expected, "the model differs");
}

/// A save that cannot be written (the checkpoint disk is full) costs the grace and nothing
/// more: the stop goes on, and the job's resume point stays its last committed checkpoint.
#[actix_web::test]
async fn a_save_that_cannot_be_written_falls_back_to_the_last_checkpoint() {
    let app = spawn_app().await;
    let disk = Tmpfs::mount("512k");
    let spec = rare_checkpoints(
        &app,
        2,
        json!({"checkpoint_dir": disk.path(), "checkpoint_every": 10, "save_grace_s": 2}),
    );
    let id = app.create_job(spec).await;
    wait_for(Duration::from_secs(60), || async {
        (!committed_steps(&app, &id).await.is_empty()).then_some(())
    })
    .await
    .expect("a regular checkpoint first");
    let _ballast = disk.fill();
    wait_step(
        &app,
        &id,
        app.summary(&id).await["step"].as_u64().unwrap() + 15,
    )
    .await;
    assert_eq!(app.stop(&id).await.status(), 200);
    let summary = app.summary(&id).await;
    assert_eq!(summary["state"], "stopped", "{summary}");
    let notice = &summary["last_notice"];
    assert_eq!(notice["outcome"], "timed_out", "{notice}");
    let last = summary["last_checkpoint_step"].as_u64().unwrap();
    assert_eq!(notice["saved_at_step"], last, "{summary}");
    let reached = notice["reached_step"].as_u64().unwrap();
    assert_eq!(notice["steps_lost"], reached - last, "{notice}");
    assert!(reached > last, "{notice}");
}
