//! Slow clients (issue 17, item 2): a flood of connections that send headers and part of a
//! body, against the real binary under a file limit of 256. Each is cut off with 408 by the
//! body deadline; meanwhile `/health` answers, and a job whose rank is killed during the flood
//! gets its replacement spawned (descriptors are kept in reserve) and succeeds.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, kill, listening_url, sh, test_client, wait_for};

/// More than the server's connection cap under this limit (256 less a reserve of 64).
const FLOOD: usize = 300;

/// A connection that sends a request's headers and the start of its body, then nothing.
async fn stall(addr: &str, path: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 4096\r\n\r\n{{\"world_size\": "
    );
    s.write_all(head.as_bytes()).await?;
    Ok(s)
}

/// Reads what the server sends until it closes the connection.
async fn until_closed(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[actix_web::test]
async fn campaign_a_slow_body_flood_is_cut_off_while_health_and_a_job_stay_fine() {
    let data_dir = tempfile::tempdir().unwrap();
    // The whole server runs under a soft and hard limit of 256 open files.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--kill-grace-ms", "300"])
        .args(["--body-timeout-ms", "1500", "--data-dir"])
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = listening_url(&mut child);
    let app = TestApp {
        address: address.clone(),
        client: test_client(),
        data_dir: tempfile::tempdir().unwrap(),
    };
    let host = address.trim_start_matches("http://").to_string();

    let id = app
        .create_job(json!({"world_size": 2, "command": sh("for i in $(seq 1 40); do echo tick $i; sleep 0.25; done")}))
        .await;
    let pids = app.running_pids(&id, 2).await;

    // The flood: job creation, sign-in and worker routes, all stalled mid-body.
    let started = Instant::now();
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let path = match i % 3 {
            0 => "/jobs".to_string(),
            1 => "/session".to_string(),
            _ => format!("/jobs/{id}/workers/0/heartbeat"),
        };
        match stall(&host, &path).await {
            Ok(s) => flood.push(tokio::spawn(until_closed(s))),
            Err(e) => panic!("connection {i} of the flood: {e}"),
        }
    }

    // While the flood is on: /health answers, and a killed rank is replaced.
    let res = app
        .client
        .get(app.url("/health"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("/health answers during the flood");
    assert_eq!(res.status(), 200);
    let health_s = started.elapsed().as_secs_f64();
    kill(pids[1], libc::SIGKILL);

    // Every stalled connection is answered 408 (or, for the worker route without a token,
    // 401 at once) and closed by the server.
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for f in flood {
        let reply = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("the server closed every stalled connection")
            .unwrap();
        let status = reply.split(' ').nth(1).unwrap_or("closed").to_string();
        *answers.entry(status).or_default() += 1;
    }
    let cut_s = started.elapsed().as_secs_f64();
    println!(
        "campaign (g): {FLOOD} connections stalled mid-body under a 256-file limit: /health \
         answered after {health_s:.2} s, every one was answered and closed after {cut_s:.2} s \
         ({answers:?}); a rank killed meanwhile was replaced"
    );
    assert_eq!(
        answers.get("408").copied().unwrap_or(0),
        FLOOD / 3 * 2,
        "every stalled /jobs and /session body gets 408: {answers:?}"
    );
    assert_eq!(
        answers.get("401").copied().unwrap_or(0),
        FLOOD / 3,
        "a worker route without a token is refused before its body: {answers:?}"
    );

    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert!(restarts[0]["restarted_at"].is_string(), "{restarts:?}");
    let lines = app.log_lines(&id).await;
    assert!(
        !lines
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains("spawn failed")),
        "no spawn failed under the flood"
    );

    // A fresh request is served at once afterwards.
    let ok = wait_for(Duration::from_secs(10), || async {
        app.get("/ready").await.status().is_success().then_some(())
    })
    .await;
    assert!(ok.is_some());
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Too many open files"), "{stderr}");
}

/// A connection that sends the first line of a request's head and nothing more: it holds a
/// slot until the server's header deadline (5 s) cuts it.
async fn stall_head(addr: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /health HTTP/1.1\r\n").await?;
    Ok(s)
}

/// Slow clients that fill the connection cap (issue 23, item 5) hold heartbeats back in the
/// kernel's backlog; a healthy rank is then not killed as hung for the server's deafness, and
/// `POST /session` (no token needed) takes no more than 4 KiB.
#[actix_web::test]
async fn a_saturated_listener_kills_no_healthy_rank() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--kill-grace-ms", "300"])
        .args(["--max-connections", "16", "--data-dir"])
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = listening_url(&mut child);
    let _server = crate::helpers::ServerProcess(child);
    let app = TestApp {
        address: address.clone(),
        client: test_client(),
        data_dir: tempfile::tempdir().unwrap(),
    };
    let host = address.trim_start_matches("http://").to_string();

    let big = format!("{{\"token\": \"{}\"}}", "x".repeat(8192));
    let res = app
        .client
        .post(app.url("/session"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    // A rank that beats every 0.2 s, each beat given up after 1 s; its timeout is 1.5 s.
    let beat = crate::helpers::beat(r#"{"step": 1}"#).replace("curl -s", "curl -s -m 1");
    let id = app
        .create_job(json!({"world_size": 1, "heartbeat_timeout_s": 1.5,
                           "command": sh(&format!("while true; do {beat}; sleep 0.2; done"))}))
        .await;
    app.running_pids(&id, 1).await;
    wait_for(Duration::from_secs(20), || async {
        (app.summary(&id).await["step"] == 1).then_some(())
    })
    .await
    .expect("the rank beats");

    // Ten seconds of slow clients, always more than the cap, re-opened as the server cuts them.
    let flood_until = Instant::now() + Duration::from_secs(10);
    let flooder = tokio::spawn(async move {
        let mut open = Vec::new();
        while Instant::now() < flood_until {
            open.retain(|h: &tokio::task::JoinHandle<String>| !h.is_finished());
            while open.len() < 64 {
                match stall_head(&host).await {
                    Ok(s) => open.push(tokio::spawn(until_closed(s))),
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for h in open {
            h.abort();
        }
    });
    flooder.await.unwrap();
    // The rank was silent for most of the flood: the server could not hear it. It is alive and
    // beating again, and it was never restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarts = app.restarts(&id).await;
    assert!(
        restarts.is_empty(),
        "a healthy rank was restarted: {restarts:?}"
    );
    assert_eq!(app.stop(&id).await.status(), 200);
}
