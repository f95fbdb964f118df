//! A full data disk (issue 17, item 1): the data dir on a 20 MB tmpfs, a 12 MB filler, a job
//! that prints far more than fits. The server must say it is degraded, refuse new jobs with 503,
//! keep every state change queued (no process without its row), and catch up by itself once
//! space is freed; after a restart nothing finished runs again. Mounting needs root (CI is).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, Tmpfs, listening_url, sh, test_client, wait_for};

struct Server {
    child: std::process::Child,
    app: TestApp,
}

fn start(data_dir: &Path) -> Server {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--kill-grace-ms", "300"])
        .args(["--low-disk-mb", "16", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let address = listening_url(&mut child);
    Server {
        child,
        app: TestApp {
            address,
            client: test_client(),
            data_dir: tempfile::tempdir().unwrap(),
        },
    }
}

impl Server {
    /// SIGTERM, then wait for the process to exit.
    fn stop(mut self) {
        crate::helpers::kill(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids the ranks wrote into `marks` (one empty file per process, named by its pid).
fn marked_pids(marks: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(marks)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn alive(pid: u64) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

async fn health(app: &TestApp) -> Value {
    app.get_json("/health").await
}

#[actix_web::test]
async fn campaign_a_full_data_dir_degrades_refuses_new_jobs_and_catches_up_by_itself() {
    let disk = Tmpfs::mount("20m");
    let data_dir = disk.path().join("data");
    let marks = tempfile::tempdir().unwrap();
    let server = start(&data_dir);
    let app = &server.app;

    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![7u8; 12 << 20]).unwrap();
    // 2 ranks × 40,000 lines of 200 bytes: far more than the ~8 MB left.
    let script = format!(
        "touch {}/$$; exec python3 -c \"l='x'*200\nfor i in range(40000): print(l)\"",
        marks.path().display()
    );
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(&script)}))
        .await;
    let submitted = std::time::Instant::now();

    let degraded = wait_for(Duration::from_secs(60), || async {
        let h = health(app).await;
        (h["status"] == "degraded").then_some(h)
    })
    .await
    .expect("/health says degraded while the disk is full");
    let degraded_after_s = submitted.elapsed().as_secs_f64();
    let reason = degraded["degraded"]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("full") || reason.contains("I/O"),
        "the storage error is named: {degraded}"
    );
    // The watermark (16 MB here) is measured every 5 s.
    wait_for(Duration::from_secs(15), || async {
        (health(app).await["disk_low"] == true).then_some(())
    })
    .await
    .expect("/health says disk_low under the watermark");

    // New work is refused, with the reason, while nothing can be recorded.
    let res = app
        .post_json(
            "/jobs",
            &json!({"world_size": 1, "command": sh("echo refused")}),
        )
        .await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "5");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "storage_unavailable", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(&reason),
        "{body}"
    );
    assert_eq!(app.get("/ready").await.status(), 503);

    // The ranks finish while the disk is still full; their ends cannot be recorded yet.
    wait_for(Duration::from_secs(60), || async {
        let pids = marked_pids(marks.path());
        (pids.len() == 2 && !pids.iter().any(|p| alive(*p))).then_some(())
    })
    .await
    .expect("both ranks ran and exited");

    // Space comes back: everything queued is written, in order, without a restart.
    let h = health(app).await;
    assert_eq!(
        h["status"], "degraded",
        "still degraded while the disk is full: {h}"
    );
    let pending = h["pending_writes"].as_u64().unwrap();
    let full_for_s = submitted.elapsed().as_secs_f64() - degraded_after_s;
    std::fs::remove_file(&filler).unwrap();
    let freed = std::time::Instant::now();
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    let caught_up_ms = freed.elapsed().as_secs_f64() * 1e3;
    assert_eq!(job["state"], "succeeded", "{job}");
    // Ok again, and the queue drains (writes keep coming: wait for a moment it is empty).
    let h = wait_for(Duration::from_secs(30), || async {
        let h = health(app).await;
        (h["status"] == "ok" && h["pending_writes"] == 0).then_some(h)
    })
    .await
    .expect("/health is ok again with nothing pending");
    assert!(h["logs_dropped"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(app.get("/ready").await.status(), 200);
    assert!(job["logs_dropped"].as_i64().unwrap() > 0, "{job}");
    assert!(
        app.log_lines(&id)
            .await
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains("were dropped while")),
        "the job's log says lines were dropped"
    );

    // Every process that ran has its row, ended with its true exit.
    let rows = app.incarnations(&id).await;
    let recorded: BTreeSet<u64> = rows.iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(recorded, marked_pids(marks.path()), "{rows:?}");
    for r in &rows {
        assert_eq!(r["exit_code"], 0, "{r}");
        assert!(r["ended_at"].is_string(), "{r}");
    }

    // New work is taken again, and its lines are stored.
    let after = app
        .create_job(json!({"world_size": 1, "command": sh("echo after-the-disk-was-full")}))
        .await;
    assert_eq!(
        app.wait_finished(&after, Duration::from_secs(30)).await["state"],
        "succeeded"
    );
    assert!(
        app.log_lines(&after)
            .await
            .iter()
            .any(|l| l["line"] == "after-the-disk-was-full")
    );

    println!(
        "campaign (f): /health said degraded {degraded_after_s:.2} s after the job started; for \
         the next {full_for_s:.1} s POST /jobs \
         got 503 storage_unavailable and /ready 503; {pending} state writes were still waiting at the end; \
         {} log lines dropped and counted; {caught_up_ms:.0} ms after the filler was removed the \
         job was recorded succeeded with both incarnations, no restart needed",
        job["logs_dropped"]
    );

    // A restart runs nothing again: both jobs are recorded finished.
    server.stop();
    let server = start(&data_dir);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for job in [&id, &after] {
        assert_eq!(server.app.job(job).await["state"], "succeeded");
    }
    assert_eq!(server.app.incarnations(&id).await.len(), 2);
    assert_eq!(marked_pids(marks.path()).len(), 2, "no rank ran again");
}

/// Directories under `dir` named like a checkpoint step.
fn step_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name().to_string_lossy().starts_with("step-") {
                    found.push(e.path());
                }
                todo.push(e.path());
            }
        }
    }
    found
}

/// Issue 17, items 5 and 6: with the checkpoint disk full, failed checkpoints leave no empty
/// step directories, a restart with no committed checkpoint says it retrains from step 0, and
/// the final model's write error names the file.
#[actix_web::test]
async fn a_full_checkpoint_disk_leaves_no_empty_steps_and_names_the_file() {
    let disk = Tmpfs::mount("1m");
    let checkpoints = disk.path().join("ckpt");
    std::fs::create_dir(&checkpoints).unwrap();
    disk.fill();
    let app = crate::helpers::spawn_app().await;
    let dataset = crate::helpers::small_dataset(&app);
    let id = app
        .create_job(json!({
            "world_size": 2, "dataset": dataset, "checkpoint_dir": checkpoints,
            "checkpoint_every": 5, "total_steps": 40, "max_restarts": 1,
        }))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let lines = app.log_texts(&id).await;
    let dir = checkpoints.display().to_string();
    assert!(
        lines.iter().any(|l| l.contains("writing the final model")
            && l.contains(&dir)
            && l.contains("model.bin")
            && l.contains("No space left on device")),
        "the final model's path is named: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("no committed checkpoint yet") && l.contains("from step 0")),
        "the restart says it retrains from step 0: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("checkpoint of step 5 failed")),
        "{lines:#?}"
    );
    assert_eq!(step_dirs(&checkpoints), Vec::<PathBuf>::new());
}

/// A server that boots on a full data dir (its predecessor was killed with a job running) comes
/// up degraded instead of exiting: `/health` answers, `/ready` is 503, and the job resumes by
/// itself once space is back (issue 23, item 4).
#[actix_web::test]
async fn a_server_boots_degraded_on_a_full_disk_and_resumes_when_space_returns() {
    let disk = Tmpfs::mount("20m");
    let data_dir = disk.path().join("data");
    let marks = tempfile::tempdir().unwrap();
    let server = start(&data_dir);
    let script = format!("touch {}/$$; sleep 300", marks.path().display());
    let id = server
        .app
        .create_job(json!({"world_size": 1, "command": sh(&script)}))
        .await;
    wait_for(Duration::from_secs(30), || async {
        (marked_pids(marks.path()).len() == 1).then_some(())
    })
    .await
    .expect("the rank started");
    drop(server); // SIGKILL: the job is left running in the history.
    wait_for(Duration::from_secs(10), || async {
        (!marked_pids(marks.path()).iter().any(|p| alive(*p))).then_some(())
    })
    .await
    .expect("the rank died with its server");

    let ballast = disk.fill();
    let server = start(&data_dir);
    let app = &server.app;
    let degraded = wait_for(Duration::from_secs(30), || async {
        let h = health(app).await;
        (h["status"] == "degraded").then_some(h)
    })
    .await
    .expect("/health answers, degraded, on a full disk");
    assert!(degraded["degraded"]["reason"].is_string(), "{degraded}");
    assert_eq!(app.get("/ready").await.status(), 503);
    assert_eq!(marked_pids(marks.path()).len(), 1, "no rank before its row");

    std::fs::remove_file(ballast).unwrap();
    let resumed = wait_for(Duration::from_secs(60), || async {
        let pids = marked_pids(marks.path());
        (pids.len() == 2 && pids.iter().any(|p| alive(*p))).then_some(())
    })
    .await;
    assert!(resumed.is_some(), "the job resumed once space returned");
    assert_eq!(app.get("/ready").await.status(), 200);
    let restarts = app.restarts(&id).await;
    assert!(
        restarts.iter().any(|r| r["reason"] == "server_restart"),
        "{restarts:?}"
    );
    server.stop();
}
