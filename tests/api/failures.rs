//! Failure detection and the restart policy.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn killed_worker_is_restarted_and_the_job_succeeds() {
    let app = spawn_app().await;
    // Attempt 0 of every rank waits to be killed; later attempts finish at once.
    let script = r#"if [ "$RESTART_COUNT" = 0 ]; then exec sleep 300; fi; echo "rank $RANK back""#;
    let id = app
        .create_job(
            json!({"world_size": 2, "command": sh(script), "backoff_initial_ms": 0,
                           "restart_scope": "worker"}),
        )
        .await;
    let pids = app.running_pids(&id, 2).await;
    kill(pids[1], libc::SIGKILL);
    // Rank 1 restarts and finishes; rank 0 is untouched until we kill it too.
    let restarted = wait_for(Duration::from_secs(20), || async {
        let r = app.restarts(&id).await;
        (!r.is_empty() && r[0]["restarted_at"].is_string()).then_some(r)
    })
    .await
    .expect("a restart is recorded");
    let r = &restarted[0];
    assert_eq!(r["rank"], 1);
    assert_eq!(r["reason"], "signal");
    assert_eq!(r["signal"], 9);
    assert_eq!(r["scope"], "worker");
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["backoff_ms"], 0);
    assert!(r["detail"].as_str().unwrap().contains("SIGKILL"));
    let summary = app.summary(&id).await;
    assert_eq!(
        summary["workers"][0]["pid"], pids[0],
        "rank 0 must not be restarted"
    );

    kill(pids[0], libc::SIGKILL);
    let job = app.wait_finished(&id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["restarts"], 2);
    let incs = app.incarnations(&id).await;
    assert_eq!(incs.len(), 4);
    let first = incs
        .iter()
        .find(|i| i["rank"] == 1 && i["attempt"] == 0)
        .unwrap();
    assert_eq!(first["signal"], 9);
    assert_eq!(first["outcome"], "signal");
}

#[actix_web::test]
async fn silent_worker_is_killed_for_heartbeat_timeout() {
    let app = spawn_app().await;
    // Attempt 0 heartbeats once and then hangs; attempt 1 succeeds.
    let script = format!(
        r#"if [ "$RESTART_COUNT" = 0 ]; then {}; sleep 300; fi; echo recovered"#,
        beat(r#"{"step": 1}"#)
    );
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh(&script), "heartbeat_timeout_s": 0.5,
                           "backoff_initial_ms": 0}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1);
    assert_eq!(restarts[0]["reason"], "heartbeat_timeout");
    let incs = app.incarnations(&id).await;
    assert_eq!(incs[0]["outcome"], "heartbeat_timeout");
    // The hung group got SIGTERM first (sh dies of it).
    assert_eq!(incs[0]["signal"], libc::SIGTERM);
    let lines = app.log_lines(&id).await;
    assert!(
        lines.iter().any(|l| l["stream"] == "system"
            && l["line"].as_str().unwrap().contains("sent no heartbeat"))
    );
}

#[actix_web::test]
async fn a_worker_that_never_heartbeats_is_not_timed_out() {
    let app = spawn_app().await;
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh("sleep 1.5"), "heartbeat_timeout_s": 0.2}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded");
    assert!(app.restarts(&id).await.is_empty());
}

#[actix_web::test]
async fn exhausted_restart_budget_fails_the_job_with_the_cause() {
    let app = spawn_app().await;
    let script = r#"echo "boom from rank $RANK attempt $RESTART_COUNT"; [ "$RANK" = 1 ] && exit 3; sleep 300"#;
    let id = app
        .create_job(
            json!({"world_size": 2, "command": sh(script), "max_restarts": 2,
                           "backoff_initial_ms": 1, "restart_scope": "worker"}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("rank 1"), "{reason}");
    assert!(reason.contains("exit_code"), "{reason}");
    assert!(reason.contains("exited with code 3"), "{reason}");
    assert!(reason.contains("boom from rank 1 attempt 2"), "{reason}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 2);
    // Backoff grows exponentially: 1 ms, then 2 ms.
    assert_eq!(restarts[0]["backoff_ms"], 1);
    assert_eq!(restarts[1]["backoff_ms"], 2);
    assert!(
        restarts
            .iter()
            .all(|r| r["reason"] == "exit_code" && r["exit_code"] == 3)
    );
    // Rank 0 was stopped when the job failed.
    let incs = app.incarnations(&id).await;
    let rank0 = incs.iter().find(|i| i["rank"] == 0).unwrap();
    assert_eq!(rank0["outcome"], "stopped");
    assert!(group_gone(rank0["pid"].as_u64().unwrap() as u32).await);
}

#[actix_web::test]
async fn job_scope_restarts_every_rank_on_a_fresh_master_port() {
    let app = spawn_app().await;
    let script = r#"
        if [ "$RESTART_COUNT" = 0 ]; then
            if [ "$RANK" = 1 ]; then sleep 0.5; exit 1; fi
            sleep 300
        fi
        echo "rank $RANK restarted on $MASTER_PORT""#;
    let id = app
        .create_job(
            json!({"world_size": 3, "command": sh(script), "restart_scope": "job",
                           "backoff_initial_ms": 0}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1);
    assert_eq!(restarts[0]["scope"], "job");
    assert_eq!(restarts[0]["rank"], 1);
    assert_eq!(restarts[0]["reason"], "exit_code");
    let incs = app.incarnations(&id).await;
    assert_eq!(incs.len(), 6, "every rank ran twice");
    let port_of = |attempt: u64| -> Vec<u64> {
        incs.iter()
            .filter(|i| i["attempt"] == attempt)
            .map(|i| i["master_port"].as_u64().unwrap())
            .collect()
    };
    let (first, second) = (port_of(0), port_of(1));
    assert_eq!(first.len(), 3);
    assert_eq!(second.len(), 3);
    assert!(first.iter().all(|p| *p == first[0]), "one port per launch");
    assert!(second.iter().all(|p| *p == second[0]));
    assert_ne!(
        first[0], second[0],
        "the relaunch must get a fresh MASTER_PORT"
    );
    for inc in incs.iter().filter(|i| i["attempt"] == 0 && i["rank"] != 1) {
        assert_eq!(inc["outcome"], "stopped");
    }
}

#[actix_web::test]
async fn heartbeat_tokens_are_checked_per_incarnation() {
    let app = spawn_app().await;
    let token_dir = app.data_dir.path().join("tokens");
    std::fs::create_dir_all(&token_dir).unwrap();
    let script = format!(
        r#"echo "$TRAINVISOR_TOKEN" > {dir}/$RESTART_COUNT; if [ "$RESTART_COUNT" = 0 ]; then exit 1; fi; sleep 300"#,
        dir = token_dir.display()
    );
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(&script), "backoff_initial_ms": 0}))
        .await;
    app.running_pids(&id, 1).await;
    let current = wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(token_dir.join("1"))
            .ok()
            .filter(|t| t.ends_with('\n'))
    })
    .await
    .unwrap();
    let stale = std::fs::read_to_string(token_dir.join("0")).unwrap();
    let url = app.url(&format!("/jobs/{id}/workers/0/heartbeat"));
    let send = |token: Option<String>| {
        let mut req = app.client.post(&url).json(&json!({"step": 3}));
        if let Some(t) = token {
            req = req.bearer_auth(t.trim());
        }
        req.send()
    };
    assert_eq!(send(Some(current.clone())).await.unwrap().status(), 200);
    assert_json_error(send(Some(stale)).await.unwrap(), 409).await;
    assert_json_error(send(Some("forged".into())).await.unwrap(), 401).await;
    assert_json_error(send(None).await.unwrap(), 401).await;
    let other_rank = app.url(&format!("/jobs/{id}/workers/5/heartbeat"));
    let res = app
        .client
        .post(other_rank)
        .bearer_auth(current.trim())
        .send()
        .await
        .unwrap();
    assert_json_error(res, 404).await;
    app.stop(&id).await;
    // After the job ended every token is stale.
    assert_json_error(send(Some(current)).await.unwrap(), 409).await;
}

#[actix_web::test]
async fn a_command_that_cannot_start_is_a_spawn_error() {
    let app = spawn_app().await;
    // Executable, so it passes the check at the door, but its interpreter does not exist:
    // exec fails in the child.
    let trainer = app.data_dir.path().join("trainer.sh");
    std::fs::write(&trainer, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(
        &trainer,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let id = app
        .create_job(
            json!({"world_size": 1, "command": [trainer], "max_restarts": 1,
                           "backoff_initial_ms": 0}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "failed");
    assert!(
        job["reason"].as_str().unwrap().contains("spawn_error"),
        "{job}"
    );
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts[0]["reason"], "spawn_error");
    let incs = app.incarnations(&id).await;
    assert_eq!(incs.len(), 2);
    assert!(incs[0]["pid"].is_null());
    assert_eq!(incs[0]["outcome"], "spawn_error");
}

/// A rank's state carries its time: the summary says since when, and while it waits out its
/// backoff, until when.
#[actix_web::test]
async fn a_rank_in_backoff_says_until_when() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("exit 3"),
                           "backoff_initial_ms": 4000, "max_restarts": 1}))
        .await;
    let worker = wait_for(Duration::from_secs(20), || async {
        let s = app.summary(&id).await;
        let w = s["workers"][0].clone();
        (w["state"] == "backoff").then_some(w)
    })
    .await
    .expect("the rank waits out its backoff");
    let at = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(worker[k].as_str().unwrap_or_else(|| panic!("{k}")))
            .unwrap()
    };
    let wait = at("backoff_until") - at("state_since");
    assert_eq!(wait.num_milliseconds(), 4000, "{worker}");
    app.stop(&id).await;
    let summary = app.summary(&id).await;
    assert!(summary["workers"][0]["state_since"].is_string());
    assert!(summary["workers"][0]["backoff_until"].is_null());
}

/// The backoff grows while a rank keeps failing fast, and starts over after a stable run
/// (`backoff_reset_s`), as Kubernetes' crash-loop backoff does; the budget counts every
/// restart either way.
#[actix_web::test]
async fn the_backoff_starts_over_after_a_stable_run() {
    let app = spawn_app().await;
    // Attempts 0 and 1 fail at once; attempt 2 runs 1.5 s, then fails; attempt 3 succeeds.
    let script =
        r#"case "$RESTART_COUNT" in 0|1) exit 1;; 2) sleep 1.5; exit 1;; *) exit 0;; esac"#;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(script),
                           "backoff_initial_ms": 100, "backoff_multiplier": 4.0,
                           "backoff_reset_s": 1.0, "max_restarts": 5,
                           "crash_loop_after": 0}))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let backoffs: Vec<u64> = app
        .restarts(&id)
        .await
        .iter()
        .map(|r| r["backoff_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(
        backoffs,
        vec![100, 400, 100],
        "fast failures grow it, a stable run resets it"
    );
}

/// What is knowable at submission is refused at the door, with a 422 that names the field,
/// and nothing is created: a program that is not there, a dataset without shards for the
/// built-in trainer, a checkpoint dir the server cannot write.
#[actix_web::test]
async fn what_can_never_start_is_refused_at_the_door() {
    let app = spawn_app().await;
    let empty = app.data_dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let file = app.data_dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for (spec, field) in [
        (
            json!({"world_size": 1, "command": ["no-such-program-anywhere"]}),
            "command",
        ),
        (
            json!({"world_size": 1, "command": ["/nonexistent/trainer"]}),
            "command",
        ),
        (
            json!({"world_size": 1, "dataset": "/no/such/dataset"}),
            "dataset",
        ),
        (json!({"world_size": 1, "dataset": empty}), "dataset"),
        (
            json!({"world_size": 1, "checkpoint_dir": file.join("ckpt")}),
            "checkpoint_dir",
        ),
    ] {
        let res = app.post_json("/jobs", &spec).await;
        let err = assert_json_error(res, 422).await;
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}:")),
            "{spec}: {err}"
        );
    }
    let jobs = app.get_json("/jobs").await;
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(0),
        "nothing was created: {jobs}"
    );
    // A command on the PATH, and a dataset the user's own command reads, are fine.
    app.create_job(json!({"world_size": 1, "command": ["true"], "dataset": "/no/such/dataset"}))
        .await;
}

/// The failure policy: an exit code that fails the job at once, one that is ignored (restarted
/// without counting), and the built-in trainer's configuration errors, which no restart fixes.
#[actix_web::test]
async fn the_failure_policy_fails_ignores_or_counts() {
    let app = spawn_app().await;
    let policy = json!([{"exit_codes": [4, 5], "action": "fail_job"},
                        {"exit_codes": [7], "action": "ignore"}]);
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh("exit 5"), "max_restarts": 10,
                           "backoff_initial_ms": 0, "failure_policy": policy}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("failure_policy: exit code 5 matches failure_policy rule 1"),
        "{reason}"
    );
    assert!(app.restarts(&id).await.is_empty(), "no restart was tried");

    // Exit 7 three times, then success, with no budget at all: ignored failures cost nothing.
    let script = r#"[ "$RESTART_COUNT" -lt 3 ] && exit 7; exit 0"#;
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh(script), "max_restarts": 0,
                           "backoff_initial_ms": 0, "failure_policy": policy}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(app.restarts(&id).await.len(), 3);

    // The built-in trainer with more ranks than shards is refused at the door, naming both
    // (the configuration-error exit code that fails a job at once is checked in
    // domain::failure_policy's tests).
    let data = small_dataset(&app);
    let res = app
        .post_json("/jobs", &json!({"world_size": 5, "dataset": data}))
        .await;
    let body = assert_json_error(res, 422).await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("dataset: world_size 5 is more than the 4 shard files"),
        "{message}"
    );
    // The demo dataset (made on first use) has 8.
    let res = app.post_json("/jobs", &json!({"world_size": 9})).await;
    let body = assert_json_error(res, 422).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("world_size 9 is more than the 8 shard files"),
        "{body}"
    );

    // Malformed rules are refused.
    for bad in [
        json!([{"action": "fail_job"}]),
        json!([{"exit_codes": [1], "signals": [9], "action": "count"}]),
        json!([{"exit_codes": [0], "action": "count"}]),
        json!([{"exit_codes": [1], "action": "retry"}]),
    ] {
        let res = app
            .post_json("/jobs", &json!({"world_size": 1, "failure_policy": bad}))
            .await;
        assert!(res.status().is_client_error(), "{bad}");
    }
}

/// A rank that fails the same way again and again without progress is a crash loop: the job
/// ends as such after `crash_loop_after` failures instead of spending its whole budget.
#[actix_web::test]
async fn a_crash_loop_ends_the_job_early() {
    let app = spawn_app().await;
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh("echo 'No such file: data.csv' >&2; exit 2"),
                           "max_restarts": 50, "backoff_initial_ms": 0}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("crash_loop: rank 0 failed 3 times"),
        "{reason}"
    );
    assert!(
        reason.contains("No such file: data.csv"),
        "the repeated message: {reason}"
    );
    assert_eq!(
        app.restarts(&id).await.len(),
        2,
        "the third failure ended it"
    );
}

/// Progress between failures is not a crash loop: a rank that gets further each time (a new
/// step in its heartbeats) before failing the same way keeps its restarts.
#[actix_web::test]
async fn progress_between_failures_is_not_a_crash_loop() {
    let app = spawn_app().await;
    let script = r#"curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $((RESTART_COUNT * 10))}" "$TRAINVISOR_HEARTBEAT_URL"
[ "$RESTART_COUNT" -ge 4 ] && exit 0
echo 'lost the connection' >&2; exit 2"#;
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh(script), "max_restarts": 10,
                           "backoff_initial_ms": 0}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(app.restarts(&id).await.len(), 4);
}
