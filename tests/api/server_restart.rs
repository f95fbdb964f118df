//! The server itself killed with SIGKILL mid-job, then started again on the same data dir.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn app_at(url: String, data_dir: tempfile::TempDir) -> TestApp {
    TestApp {
        address: url,
        client: test_client(),
        data_dir,
    }
}

#[actix_web::test]
async fn jobs_resume_after_the_server_is_killed_and_nothing_is_left_over() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_path_buf();
    let (mut server, url) = start_server_process(&path);
    let app = app_at(url, data_dir);
    // Attempt 0 runs a grandchild that would outlive its shell; the relaunch finishes.
    let script = r#"echo "rank $RANK attempt $RESTART_COUNT"; if [ "$RESTART_COUNT" = 0 ]; then sleep 300; fi"#;
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(script), "restart_scope": "worker"}))
        .await;
    let old_pids = app.running_pids(&id, 2).await;
    let instance = std::fs::read_to_string(path.join("instance-id")).unwrap();
    let forked = wait_for(Duration::from_secs(10), || async {
        (marked_processes(&instance).len() == 4).then_some(())
    })
    .await;
    assert!(forked.is_some(), "2 shells and 2 sleeps");
    // Lines are durable once committed; a kill -9 may lose what is still in flight, so the
    // test kills only after both ranks' first lines are in the history.
    let committed = wait_for(Duration::from_secs(10), || async {
        let lines = app.log_lines(&id).await;
        ["rank 0 attempt 0", "rank 1 attempt 0"]
            .iter()
            .all(|want| lines.iter().any(|l| l["line"] == *want))
            .then_some(())
    })
    .await;
    assert!(committed.is_some(), "first lines committed before the kill");

    server.kill().unwrap();
    server.wait().unwrap();
    // The shells die with the server (PR_SET_PDEATHSIG)...
    let shells_gone = wait_for(Duration::from_secs(5), || async {
        old_pids
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}/environ")).exists() || !is_running(*p))
            .then_some(())
    })
    .await;
    assert!(shells_gone.is_some(), "worker shells outlived the server");

    // ...and the next server sweeps the grandchildren, then resumes the job.
    let (mut server, url) = start_server_process(&path);
    let app = app_at(url, app.data_dir);
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 2);
    assert!(
        restarts
            .iter()
            .all(|r| r["reason"] == "server_restart" && r["restarted_at"].is_string())
    );
    // Issue 29, point 9: the server's own restarts are in the history, not counted as the
    // job's failures (in the list, the record and the summary).
    assert_eq!(job["restarts"], 0, "{job}");
    assert_eq!(app.summary(&id).await["restarts"], 0);
    let listed = app.get_json("/jobs").await;
    assert_eq!(listed[0]["restarts"], 0, "{listed}");
    let incs = app.incarnations(&id).await;
    assert_eq!(
        incs.len(),
        4,
        "one incarnation per rank and launch, none duplicated"
    );
    for inc in &incs {
        let expected = if inc["attempt"] == 0 {
            "server_restart"
        } else {
            "succeeded"
        };
        assert_eq!(inc["outcome"], expected, "{inc}");
    }
    let lines = app.log_lines(&id).await;
    assert!(
        lines.iter().any(|l| l["line"] == "rank 1 attempt 0"),
        "history from before the kill"
    );
    assert!(lines.iter().any(|l| l["line"] == "rank 1 attempt 1"));
    assert!(
        marked_processes(&instance).is_empty(),
        "worker processes left over"
    );

    // SIGTERM: the server exits cleanly.
    kill(server.id(), libc::SIGTERM);
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[actix_web::test]
async fn sigterm_kills_workers_and_the_next_start_resumes_them() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_path_buf();
    let (server, url) = start_server_process(&path);
    let app = app_at(url, data_dir);
    let script = r#"if [ "$RESTART_COUNT" = 0 ]; then sleep 300; fi; echo done"#;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(script)}))
        .await;
    app.running_pids(&id, 1).await;
    let instance = std::fs::read_to_string(path.join("instance-id")).unwrap();
    kill(server.id(), libc::SIGTERM);
    let mut server = server;
    assert!(server.wait().unwrap().success());
    assert!(
        marked_processes(&instance).is_empty(),
        "workers outlived a graceful shutdown"
    );

    let (mut server, url) = start_server_process(&path);
    let app = app_at(url, app.data_dir);
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(app.restarts(&id).await[0]["reason"], "server_restart");
    kill(server.id(), libc::SIGTERM);
    server.wait().unwrap();
}

#[actix_web::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut server, _url) = start_server_process(data_dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another trainvisor server"));
    server.kill().unwrap();
    server.wait().unwrap();
}

fn is_running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
}

/// SIGTERM to the server gives ranks the kill grace, as a stop does: a rank that traps SIGTERM
/// saves its state and exits, one that ignores it is killed when the grace is over, and every
/// incarnation's end is recorded (as `stopped`) before the server exits.
#[actix_web::test]
async fn sigterm_gives_ranks_their_grace_and_records_their_ends() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_path_buf();
    let (server, url) = start_server_process(&path);
    let app = app_at(url, data_dir);
    let saved = path.join("saved");
    let script = format!(
        r#"if [ "$RESTART_COUNT" != 0 ]; then echo done; exit 0; fi
if [ "$RANK" = 0 ]; then trap 'echo saved > {saved}; exit 0' TERM; else trap '' TERM; fi
while true; do sleep 0.05; done"#,
        saved = saved.display()
    );
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(&script), "restart_scope": "worker"}))
        .await;
    app.running_pids(&id, 2).await;
    let instance = std::fs::read_to_string(path.join("instance-id")).unwrap();
    let sent = std::time::Instant::now();
    kill(server.id(), libc::SIGTERM);
    let mut server = server;
    assert!(server.wait().unwrap().success());
    // start_server_process runs with --kill-grace-ms 300: the rank that ignores SIGTERM is
    // killed then, not after a hang (generous bound for a loaded machine).
    assert!(sent.elapsed() < Duration::from_secs(20));
    assert_eq!(
        std::fs::read_to_string(&saved).unwrap_or_default().trim(),
        "saved",
        "the rank that traps SIGTERM had the time to save"
    );
    assert!(marked_processes(&instance).is_empty());

    let (mut server, url) = start_server_process(&path);
    let app = app_at(url, app.data_dir);
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded");
    let first: Vec<_> = app
        .incarnations(&id)
        .await
        .into_iter()
        .filter(|i| i["attempt"] == 0)
        .collect();
    assert_eq!(first.len(), 2);
    for inc in &first {
        assert_eq!(inc["outcome"], "stopped", "recorded before exiting: {inc}");
    }
    kill(server.id(), libc::SIGTERM);
    server.wait().unwrap();
}
