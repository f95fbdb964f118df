//! `trainvisor validate` (the binary) against a server it starts, a running server, and
//! installations that are broken: it passes the first two and fails the others clearly.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

async fn validate(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .arg("validate")
            .args(args)
            .env_remove("TRAINVISOR_SERVER")
            .env_remove("TRAINVISOR_API_TOKEN")
            .output(),
    )
    .await
    .expect("validate finished")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn checks(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[actix_web::test]
async fn validate_passes_on_a_server_it_starts_and_on_a_running_one() {
    let (code, stdout, stderr) = validate(&[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("(started for this check)"), "{stdout}");
    for check in [
        "server answers /health",
        "kill -9 of rank 1 restarted from checkpoint",
        "final model equals the failure-free run",
        "SSE log stream delivers lines",
        "history recorded",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with("ok") && l.contains(check)),
            "{check}: {stdout}"
        );
    }
    assert!(stdout.contains("8 passed, 0 failed"), "{stdout}");
    // Issue 29, point 5: the server it started logs to a file, not into the report.
    assert!(
        !stderr.contains("WARN"),
        "a stray server log line: {stderr}"
    );

    let app = spawn_app().await;
    let (code, stdout, stderr) = validate(&["--server", &app.address, "--json"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["started_here"], false);
    assert!(
        checks(&report).iter().all(|(_, result)| result == "ok"),
        "{report}"
    );
    // It ran real jobs on that server, and removed them when they passed (issue 29, point 5).
    assert_eq!(
        report["cleanup"], "its 2 jobs were deleted from the server",
        "{report}"
    );
    let jobs = app.get_json("/jobs").await;
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "the check's jobs are left: {jobs}"
    );
}

#[actix_web::test]
async fn validate_fails_clearly_on_a_broken_installation() {
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, stdout, _) = validate(&["--server", &format!("http://127.0.0.1:{port}")]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("FAILED") && l.contains("server answers /health")),
        "{stdout}"
    );
    // A server whose checkpoint dir cannot be written: the job is refused and the check says
    // why.
    let app = spawn_app_with(|s| {
        let file = s.data_dir.join("not-a-dir");
        std::fs::create_dir_all(&s.data_dir).unwrap();
        std::fs::write(&file, "x").unwrap();
        s.job_defaults.checkpoint_dir = file.join("checkpoints");
    })
    .await;
    let (code, stdout, _) = validate(&["--server", &app.address, "--json"]).await;
    assert_eq!(code, 1, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["failed"].as_u64().unwrap() >= 1, "{report}");
    let failed = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["result"] == "failed")
        .unwrap();
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("checkpoint_dir"),
        "{failed}"
    );
}
