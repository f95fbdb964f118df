//! What the CLI prints for a new user (issue 29, points 1, 2 and 4; issue 23, point 10): short
//! job ids, a missing script refused at the door, timestamps and progress, a closed pipe, and
//! a rank's terminal escapes shown as text, never obeyed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::cli;
use crate::helpers::*;

/// A rank that paints its output red, clears the screen, retitles the terminal, and dies.
const HOSTILE: &str = r#"printf 'step \033[31mred\033[0m\n'; printf 'boom \033[2J\033]0;owned\007\302\233H\n' >&2; exit 3"#;

#[actix_web::test]
async fn a_ranks_terminal_escapes_are_printed_escaped() {
    let app = spawn_app().await;
    let id = app
        .create_job(
            json!({"world_size": 1, "command": sh(HOSTILE), "max_restarts": 0,
                           "name": "hostile"}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    for args in [
        vec!["status", id.as_str()],
        vec!["status", id.as_str(), "--json"],
        vec!["logs", id.as_str()],
        vec!["logs", id.as_str(), "--json"],
        vec!["wait", id.as_str()],
        vec!["jobs"],
    ] {
        let out = cli(&app, &args).await;
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !all.chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{args:?} printed a control character: {all:?}"
        );
        if args[0] != "jobs" {
            assert!(
                all.contains("\\x1b[2J") || all.contains("\\u001b[2J"),
                "{args:?}: the escape is shown as text: {all}"
            );
        }
    }
    // The JSON is still the same value.
    let out = cli(&app, &["logs", &id, "--json"]).await;
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["line"] == "boom \u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}H"),
        "{lines:?}"
    );
}

#[actix_web::test]
async fn logs_are_stamped_and_jobs_show_progress() {
    let app = spawn_app().await;
    let script = format!("echo first; {}; echo second", beat(r#"{"step": 5}"#));
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(&script), "total_steps": 10}))
        .await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    let out = cli(&app, &["logs", &id]).await;
    let line = out.stdout.lines().find(|l| l.ends_with("first")).unwrap();
    let (ts, rest) = line.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "a timestamp first: {line}"
    );
    assert_eq!(rest, "[0] first");
    let out = cli(&app, &["logs", &id, "--no-timestamps"]).await;
    assert!(
        out.stdout.lines().any(|l| l == "[0] first"),
        "{}",
        out.stdout
    );

    let out = cli(&app, &["jobs"]).await;
    let header = out.stdout.lines().next().unwrap();
    assert!(header.contains("PROGRESS"), "{}", out.stdout);
    assert!(out.stdout.contains("5/10 50%"), "{}", out.stdout);
}

#[actix_web::test]
async fn any_unique_start_of_an_id_names_its_job() {
    let app = spawn_app().await;
    // 17 jobs: by the pigeonhole, two ids share their first hex digit.
    let mut ids = Vec::new();
    for _ in 0..17 {
        ids.push(
            app.create_job(json!({"world_size": 1, "command": ["true"]}))
                .await,
        );
    }
    let id = &ids[0];
    let out = cli(&app, &["status", &id[..8]]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(&format!("job {id}")),
        "{}",
        out.stdout
    );
    let out = cli(&app, &["wait", &id[..8].to_uppercase()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = cli(&app, &["logs", &id[..6], "--tail", "1"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    let first = |i: &String| i.chars().next().unwrap();
    let shared = ids
        .iter()
        .map(first)
        .find(|c| ids.iter().filter(|i| first(i) == *c).count() >= 2)
        .unwrap();
    let out = cli(&app, &["status", &shared.to_string()]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("is ambiguous") && out.stderr.contains("type more of the id"),
        "{}",
        out.stderr
    );
    let out = cli(&app, &["stop", "not-an-id"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("a UUID or the start of one"),
        "{}",
        out.stderr
    );
}

/// `trainvisor status JOB | head -3` with `head` gone: no panic, no backtrace.
#[actix_web::test]
async fn a_closed_pipe_ends_the_command_quietly() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 1, "command": ["true"]}))
        .await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // Spawned, not `output()`: tokio's `output()` would replace stdout with its own pipe.
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["status", &id])
        .env("TRAINVISOR_SERVER", &app.address)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "a panic's exit code");
}

/// `submit -- python3 train.py` without a `train.py` is refused at once (422), not 201 and a
/// crash loop; with the script there it is accepted.
#[actix_web::test]
async fn a_missing_python_script_is_refused_at_the_door() {
    let app = spawn_app().await;
    let here = tempfile::tempdir().unwrap();
    let submit = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .args(["submit", "--world-size", "1", "--", "python3", "train.py"])
            .env("TRAINVISOR_SERVER", &app.address)
            .current_dir(here.path())
            .output()
    };
    let out = submit().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("command: the script train.py is not a file in") && stderr.contains("422"),
        "{stderr}"
    );
    assert_eq!(
        app.get_json("/jobs").await,
        json!([]),
        "nothing was created"
    );
    std::fs::write(here.path().join("train.py"), "print('trained')\n").unwrap();
    let out = submit().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
