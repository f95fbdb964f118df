//! Round three of the red team's findings (issue 23): files a rank controls, the admin token in
//! the server's process, bounded heartbeats and listings, strict queries and job ids.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// A rank that points its stacks file at `/dev/zero` and then hangs: the server reads at most
/// its cap (it used to read without end until the OOM killer came), takes the incident and
/// restarts the rank.
#[actix_web::test]
async fn a_stacks_file_symlinked_to_dev_zero_is_not_read() {
    let app = spawn_app().await;
    let script = format!(
        "ln -sf /dev/zero \"$TRAINVISOR_STACKS_FILE\"; {}; sleep 300",
        beat(r#"{"step": 1}"#)
    );
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(&script),
                           "heartbeat_timeout_s": 1.0, "backoff_initial_ms": 0}))
        .await;
    let restarted = wait_for(Duration::from_secs(30), || async {
        let r = app.restarts(&id).await;
        r.iter()
            .any(|r| r["reason"] == "heartbeat_timeout")
            .then_some(())
    })
    .await;
    assert!(restarted.is_some(), "the hung rank was restarted");
    let health = app.get_json("/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(app.stop(&id).await.status(), 200);
}

/// `mkfifo "$TORCHELASTIC_ERROR_FILE"; exit 1`: the exit is seen at once (opening the FIFO used
/// to block a server thread until someone wrote to it), the job fails by its policy, and stop,
/// delete and other jobs go on.
#[actix_web::test]
async fn an_error_file_that_is_a_fifo_wedges_nothing() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 2, "max_restarts": 0,
            "command": sh("if [ \"$RANK\" = 0 ]; then mkfifo \"$TORCHELASTIC_ERROR_FILE\"; exit 1; fi; sleep 300")}))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let res = app
        .client
        .delete(app.url(&format!("/jobs/{id}")))
        .send()
        .await;
    assert_eq!(res.unwrap().status(), 200);

    // The same with a symlink to a file the rank may not show: nothing of it is read.
    let id = app
        .create_job(json!({"world_size": 1, "max_restarts": 0,
            "command": sh("ln -s /etc/hostname \"$TORCHELASTIC_ERROR_FILE\"; exit 1")}))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let incidents = app.get_json(&format!("/jobs/{id}/incidents")).await;
    assert!(
        hostname.trim().is_empty() || !incidents.to_string().contains(hostname.trim()),
        "{incidents}"
    );
}

/// No rank finds the admin token in any process it can read: the server takes it out of its own
/// environment (and `/proc/<server>/environ`) at start.
#[actix_web::test]
async fn no_rank_can_read_the_admin_token() {
    let token = format!("tok-{}-{}", std::process::id(), rand_suffix());
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .env("TRAINVISOR_API_TOKEN", &token)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = listening_url(&mut child);
    let server = ServerProcess(child);
    let client = test_client();
    // A rank runs; every process's environment and command line (this test runs as root, so it
    // reads at least what the rank could) is searched for the token.
    let spec = json!({"world_size": 1, "command": sh("sleep 300")});
    let id = submit_to(&client, &url, Some(&token), &spec).await;
    let running = wait_for(Duration::from_secs(30), || async {
        let s = try_json(
            client
                .get(format!("{url}/jobs/{id}/summary"))
                .bearer_auth(&token),
        )
        .await?;
        (running_pids_in(&s).len() == 1).then_some(())
    })
    .await;
    assert!(running.is_some(), "the rank runs");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        for file in ["environ", "cmdline"] {
            if let Ok(bytes) = std::fs::read(entry.path().join(file))
                && bytes.windows(token.len()).any(|w| w == token.as_bytes())
            {
                found.push(entry.path().join(file));
            }
        }
    }
    assert!(found.is_empty(), "the token is readable in {found:?}");
    // The server still knows it.
    let res = client
        .get(format!("{url}/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(server);
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{n:x}")
}

/// A heartbeat of 512 KiB (two fields of 256 KiB and 500 metrics) is not kept whole: the summary stays small, while the step and the
/// loss still count.
#[actix_web::test]
async fn heartbeat_bodies_are_bounded_in_the_summary() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("sleep 300")}))
        .await;
    // The rank's own token is only in its environment: read it from there.
    let pid = app.running_pids(&id, 1).await[0];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let env: std::collections::HashMap<String, String> = environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let big = "x".repeat(256 * 1024);
    let mut metrics = serde_json::Map::new();
    metrics.insert("loss".into(), json!(0.25));
    for i in 0..500 {
        metrics.insert(format!("m{i}"), json!(i));
    }
    metrics.insert("blob".into(), json!(big));
    let res = app
        .client
        .post(&env["TRAINVISOR_HEARTBEAT_URL"])
        .bearer_auth(&env["TRAINVISOR_TOKEN"])
        .json(&json!({"step": 7, "metrics": metrics, "note": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let summary = app.summary(&id).await;
    assert_eq!(summary["step"], 7, "{}", &summary.to_string()[..200]);
    assert_eq!(summary["loss"], 0.25);
    let size = summary.to_string().len();
    assert!(size < 32 * 1024, "summary of {size} bytes");
    let all = app.get("/jobs/summaries").await.text().await.unwrap();
    assert!(all.len() < 64 * 1024, "summaries of {} bytes", all.len());
    assert_eq!(app.stop(&id).await.status(), 200);
}

/// `/jobs` and `/jobs/summaries` come in pages (`limit`, `offset`), newest first.
#[actix_web::test]
async fn job_listings_are_paginated() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            app.create_job(json!({"world_size": 1, "command": sh("true")}))
                .await,
        );
    }
    for id in &ids {
        app.wait_finished(id, Duration::from_secs(30)).await;
    }
    let page = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_string())
            .collect()
    };
    let first = page(app.get_json("/jobs?limit=2").await);
    let second = page(app.get_json("/jobs?limit=2&offset=2").await);
    let all = page(app.get_json("/jobs").await);
    assert_eq!(all.len(), 5);
    assert_eq!(first, all[..2]);
    assert_eq!(second, all[2..4]);
    let summaries = page(app.get_json("/jobs/summaries?limit=3&offset=1").await);
    assert_eq!(summaries, all[1..4]);
    for bad in [
        "limit=0",
        "limit=-1",
        "limit=100000",
        "offset=-2",
        "limit=x",
        "page=2",
    ] {
        assert_json_error(app.get(&format!("/jobs?{bad}")).await, 400).await;
        assert_json_error(app.get(&format!("/jobs/summaries?{bad}")).await, 400).await;
    }
}

/// Unknown or invalid query parameters are a 400, as the README's table says; a job id is the
/// canonical lower-case UUID and nothing else.
#[actix_web::test]
async fn queries_and_job_ids_follow_the_table() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("true")}))
        .await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    for route in ["incidents", "progress"] {
        assert_eq!(app.get(&format!("/jobs/{id}/{route}")).await.status(), 200);
        for q in ["limit=-1", "x=1"] {
            let res = app.get(&format!("/jobs/{id}/{route}?{q}")).await;
            assert_json_error(res, 400).await;
        }
    }
    let upper = id.to_uppercase();
    let simple = id.replace('-', "");
    for other in [upper, format!("{{{id}}}"), format!("urn:uuid:{id}"), simple] {
        let res = app.get(&format!("/jobs/{other}")).await;
        assert_json_error(res, 404).await;
    }
    assert_eq!(app.get(&format!("/jobs/{id}")).await.status(), 200);
}

/// A copy of a live server's data dir (`cp -a`) started as a second server neither kills the
/// original's ranks (the copy carries the data dir's id, not its key) nor runs its job again.
#[actix_web::test]
async fn a_copied_data_dir_leaves_the_original_alone() {
    let original = tempfile::tempdir().unwrap();
    let (first, url) = start_server_process(original.path());
    let client = test_client();
    let spec = json!({"world_size": 1, "command": sh("sleep 300")});
    let id = submit_to(&client, &url, None, &spec).await;
    let summary_of = |url: String| {
        let client = client.clone();
        let id = id.clone();
        async move {
            try_json(client.get(format!("{url}/jobs/{id}/summary")))
                .await
                .unwrap_or(Value::Null)
        }
    };
    let pid = wait_for(Duration::from_secs(30), || async {
        running_pids_in(&summary_of(url.clone()).await)
            .first()
            .copied()
    })
    .await
    .expect("the original's rank runs");

    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", original.path().display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let (second, copy_url) = start_server_process(copy.path());
    let refused = wait_for(Duration::from_secs(20), || async {
        let job = try_json(client.get(format!("{copy_url}/jobs/{id}"))).await?;
        (job["state"] == "failed").then_some(job)
    })
    .await
    .expect("the copy does not run the job a live server runs");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("another live trainvisor server"),
        "{refused}"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the original's rank was not killed by the copy's server"
    );
    assert_eq!(running_pids_in(&summary_of(url.clone()).await), vec![pid]);
    drop(second);
    drop(first);
}
