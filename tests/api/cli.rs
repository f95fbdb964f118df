//! The command-line client against a real server. The binary runs as a child process while
//! the test's runtime keeps serving (hence tokio's async process API).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn cli(app: &TestApp, args: &[&str]) -> Out {
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

    // Tables line up whatever the values' lengths: a job of 12 ranks with a long name beside
    // the short one; every header's column starts where its cells do.
    let wide = app
        .create_job(
            json!({"world_size": 12, "name": "a-much-longer-job-name-than-the-first",
                           "command": sh("true"), "restart_scope": "worker"}),
        )
        .await;
    app.wait_finished(&wide, Duration::from_secs(30)).await;
    let jobs = cli(&app, &["jobs"]).await;
    assert_columns_line_up(
        &jobs.stdout,
        &["STATE", "RANKS", "RESTARTS", "CREATED", "NAME"],
    );
    let status = cli(&app, &["status", &wide]).await;
    let table: String = status
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("RANK"))
        .take_while(|l| !l.is_empty() && !l.starts_with("goodput"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(table.lines().count(), 13, "{}", status.stdout);
    assert_columns_line_up(&table, &["STATE", "PID", "ATTEMPT", "STEP", "HEARTBEAT"]);
    assert!(!status.stdout.contains("ETA - s"), "{}", status.stdout);
}

/// Each named column's cells start (left-aligned) or end (right-aligned: the header is
/// right-aligned too) at the header's position on every line.
fn assert_columns_line_up(text: &str, headers: &[&str]) {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[0];
    for h in headers {
        let start = header.find(h).unwrap_or_else(|| panic!("{h} in {header}"));
        let end = start + h.len();
        for line in &lines[1..] {
            let chars: Vec<char> = line.chars().collect();
            let at = |i: usize| chars.get(i).copied().unwrap_or(' ');
            // Left-aligned: a cell starts at `start` (blank before it); right-aligned: one
            // ends at `end` (blank after it).
            let left = at(start) != ' ' && (start == 0 || at(start - 1) == ' ');
            let right = at(end - 1) != ' ' && at(end) == ' ';
            assert!(left || right, "column {h} misaligned in:\n{text}");
        }
    }
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
    // On a pipe: one line per change of state (or restart count), not two a second.
    let lines: Vec<&str> = wait.stderr.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() <= 3,
        "pending/running/failed at most: {}",
        wait.stderr
    );
    let states: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    let mut unique = states.clone();
    unique.dedup();
    assert_eq!(unique, states, "each line is a new state: {}", wait.stderr);
    assert!(!wait.stderr.contains("\x1b"), "no terminal codes on a pipe");

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

/// A port already taken is explained with the flag that picks another (issue 14, item 3).
#[actix_web::test]
async fn a_port_in_use_names_the_flag_to_change_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .args(["serve", "--bind", &addr, "--data-dir"])
            .arg(dir.path())
            .output(),
    )
    .await
    .expect("the server gave up")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another server is on that port") && stderr.contains("--bind"),
        "{stderr}"
    );
}

/// A rank's working directory (issue 14, item 4): the job's `working_dir`, which the CLI sets
/// to the caller's directory when the server is on this host; a missing or relative one is
/// refused with a 422 naming the field.
#[actix_web::test]
async fn ranks_run_in_the_working_dir_the_cli_sends() {
    let app = spawn_app().await;
    let here = tempfile::tempdir().unwrap();
    std::fs::write(here.path().join("train.sh"), "echo trained in $(pwd)\n").unwrap();
    // `sh train.sh` resolves against the directory the user typed the command in.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args([
            "submit",
            "--world-size",
            "1",
            "--json",
            "--",
            "sh",
            "train.sh",
        ])
        .env("TRAINVISOR_SERVER", &app.address)
        .current_dir(here.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = job["job_id"].as_str().unwrap();
    let dir = here.path().to_str().unwrap();
    assert_eq!(job["spec"]["working_dir"], dir);
    let done = app.wait_finished(id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let lines = app.log_texts(id).await;
    assert!(
        lines.iter().any(|l| l == &format!("trained in {dir}")),
        "{lines:?}"
    );

    for (working_dir, message) in [
        (
            "/no/such/dir",
            "working_dir: /no/such/dir is not a directory on the server",
        ),
        ("relative/dir", "working_dir must be an absolute path"),
    ] {
        let res = app
            .post_json(
                "/jobs",
                &json!({"world_size": 1, "command": ["true"], "working_dir": working_dir}),
            )
            .await;
        let body = assert_json_error(res, 422).await;
        assert!(
            body["message"].as_str().unwrap().starts_with(message),
            "{body}"
        );
    }
}

/// The server's console (issue 14, item 7): one line per job event (submitted, running, rank
/// failed with its cause, restarted, finished), no colour codes when stderr is not a
/// terminal, and one JSON object per line with `--log-format json`.
#[actix_web::test]
async fn the_server_console_tells_the_jobs_story_plainly_or_as_json() {
    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--log-format",
                format,
                "--data-dir",
            ])
            .arg(dir.path())
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let address = listening_url(&mut child);
        let mut server = ServerProcess(child);
        let app = TestApp {
            address,
            client: test_client(),
            data_dir: tempfile::tempdir().unwrap(),
        };
        let id = app
            .create_job(json!({"world_size": 1, "backoff_initial_ms": 0,
                               "command": sh(r#"[ "$RESTART_COUNT" = 0 ] && exit 3; exit 0"#)}))
            .await;
        app.wait_finished(&id, Duration::from_secs(30)).await;
        server.kill().unwrap();
        let out = server.wait_with_output_taken();
        assert!(!out.contains('\x1b'), "no colour codes on a pipe: {out}");
        let mine: Vec<&str> = out.lines().filter(|l| l.contains(&id)).collect();
        let events: Vec<String> = if format == "json" {
            mine.iter()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                    assert_eq!(v["job_id"], id.as_str(), "{v}");
                    v["event"].as_str().unwrap().to_string()
                })
                .collect()
        } else {
            mine.iter()
                .map(|l| {
                    let at = l.find("event=").unwrap_or_else(|| panic!("{l}")) + 6;
                    l[at..]
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .trim_matches('"')
                        .to_string()
                })
                .collect()
        };
        assert_eq!(
            events,
            [
                "submitted",
                "running",
                "rank_failed",
                "restarted",
                "succeeded"
            ],
            "{format}: {out}"
        );
        let failed = mine.iter().find(|l| l.contains("rank_failed")).unwrap();
        assert!(
            failed.contains("exit_code") && failed.contains("exited with code 3"),
            "{failed}"
        );
    }
}
