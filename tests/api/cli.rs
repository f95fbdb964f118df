//! The command-line client against a real server. The binary runs as a child process while
//! the test's runtime keeps serving (hence tokio's async process API).

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn cli(app: &TestApp, args: &[&str]) -> Out {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .args(args)
            .env("TRAINVISOR_SERVER", &app.address)
            .output(),
    )
    .await
    .expect("the CLI finished")
    .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[actix_web::test]
async fn submit_jobs_status_logs_and_wait() {
    let app = spawn_app().await;
    let script = r#"for i in 1 2 3; do echo "hello $i from $RANK"; sleep 0.2; done"#;
    let out = cli(
        &app,
        &[
            "submit",
            "--world-size",
            "2",
            "--name",
            "cli-job",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.lines().next().unwrap().trim().to_string();
    assert_eq!(id.len(), 36, "{}", out.stdout);

    let jobs = cli(&app, &["jobs"]).await;
    assert!(
        jobs.stdout.contains(&id) && jobs.stdout.contains("cli-job"),
        "{}",
        jobs.stdout
    );

    // logs -f follows until the job ends.
    let follow = cli(&app, &["logs", &id, "-f", "--rank", "1"]).await;
    assert_eq!(follow.code, 0, "{}", follow.stderr);
    for i in 1..=3 {
        assert!(
            follow.stdout.contains(&format!("[1] hello {i} from 1")),
            "{}",
            follow.stdout
        );
    }
    assert!(!follow.stdout.contains("from 0"), "--rank filters");

    let wait = cli(&app, &["wait", &id]).await;
    assert_eq!(wait.code, 0, "{}", wait.stderr);
    assert!(wait.stdout.contains("succeeded"), "{}", wait.stdout);

    let status = cli(&app, &["status", &id, "--json"]).await;
    let summary: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(summary["state"], "succeeded");
    let readable = cli(&app, &["status", &id]).await;
    assert!(
        readable.stdout.contains("RANK") && readable.stdout.contains("succeeded"),
        "{}",
        readable.stdout
    );

    let logs = cli(&app, &["logs", &id, "--tail", "2", "--json"]).await;
    assert_eq!(logs.stdout.lines().count(), 2, "{}", logs.stdout);
}

#[actix_web::test]
async fn wait_shows_progress_and_exits_with_the_outcome() {
    let app = spawn_app().await;
    let script = r#"for s in 1 2 3 4; do
        curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $s}" "$TRAINVISOR_HEARTBEAT_URL"
        sleep 0.3
    done; exit 4"#;
    let out = cli(
        &app,
        &[
            "submit",
            "--world-size",
            "1",
            "--steps",
            "4",
            "--max-restarts",
            "0",
            "--json",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job: Value = serde_json::from_str(&out.stdout).unwrap();
    let id = job["job_id"].as_str().unwrap();
    let wait = cli(&app, &["wait", id]).await;
    assert_eq!(wait.code, 1, "a failed job exits 1: {}", wait.stderr);
    assert!(
        wait.stderr.contains("/4"),
        "progress shows step/total: {}",
        wait.stderr
    );
    assert!(wait.stdout.contains("failed"), "{}", wait.stdout);

    let long = cli(&app, &["submit", "--world-size", "1", "--", "sleep", "300"]).await;
    let id = long.stdout.lines().next().unwrap().trim().to_string();
    app.running_pids(&id, 1).await;
    let stop = cli(&app, &["stop", &id]).await;
    assert!(stop.stdout.contains("stopped"), "{}", stop.stdout);
    assert_eq!(cli(&app, &["wait", &id]).await.code, 2);
}

#[actix_web::test]
async fn errors_are_explained() {
    let app = spawn_app().await;
    let out = cli(&app, &["status", "00000000-0000-0000-0000-000000000000"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no job with id"), "{}", out.stderr);
    let out = cli(&app, &["submit", "--world-size", "0"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("world_size"), "{}", out.stderr);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["jobs", "--server", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// `trainvisor status` of a job whose rank recorded its exception names that exception.
#[actix_web::test]
async fn status_names_the_root_cause() {
    let app = spawn_app().await;
    let id = app.create_job(crate::python::recording_job()).await;
    app.wait_finished(&id, Duration::from_secs(60)).await;
    let out = cli(&app, &["status", &id]).await;
    assert!(
        out.stdout.contains("ValueError: shard 7 is corrupt"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}
