//! The API token, limits, allowed roots, and secrets staying secret.

use std::time::Duration;

use serde_json::json;
use trainvisor::config::Settings;
use trainvisor::startup::Application;

use crate::helpers::*;

#[actix_web::test]
async fn the_api_token_guards_everything_but_health_the_page_and_workers() {
    let app = spawn_app_with(|s| s.api_token = Some("s3cret".into())).await;
    assert_json_error(app.get("/jobs").await, 401).await;
    assert_json_error(app.get("/events").await, 401).await;
    assert_eq!(app.get("/health").await.status(), 200);
    assert_eq!(app.get("/").await.status(), 200);
    let authed = |req: reqwest::RequestBuilder| req.bearer_auth("s3cret");
    assert_eq!(
        authed(app.client.get(app.url("/jobs")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Workers heartbeat with their own token, never the API's.
    let script = format!("{}; sleep 300", beat(r#"{"step": 5}"#));
    let res = authed(app.client.post(app.url("/jobs")))
        .json(&json!({"world_size": 1, "command": sh(&script)}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let step = wait_for(Duration::from_secs(20), || async {
        let s = try_json(authed(
            app.client.get(app.url(&format!("/jobs/{id}/summary"))),
        ))
        .await?;
        (s["step"] == 5).then_some(())
    })
    .await;
    assert!(step.is_some(), "the worker's heartbeat was accepted");

    // The page signs in once; the cookie then works for fetches and EventSource alike.
    let res = app.post_json("/session", &json!({"token": "wrong"})).await;
    assert_json_error(res, 401).await;
    let res = app.post_json("/session", &json!({"token": "s3cret"})).await;
    assert_eq!(res.status(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("s3cret"),
        "the cookie must not carry the token"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let res = app
        .client
        .get(app.url("/jobs"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = app
        .client
        .get(app.url("/events"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    authed(app.client.post(app.url(&format!("/jobs/{id}/stop"))))
        .send()
        .await
        .unwrap();
}

#[actix_web::test]
async fn a_public_bind_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::new("0.0.0.0:0", dir.path());
    let err = Application::build(settings).await.err().expect("refused");
    assert!(err.to_string().contains("without an API token"), "{err}");
}

#[actix_web::test]
async fn limits_answer_429_and_change_nothing() {
    let app = spawn_app_with(|s| {
        s.max_jobs = 1;
        s.max_workers = 3;
        s.max_sse_subscribers = 1;
    })
    .await;
    let res = app
        .post_json("/jobs", &json!({"world_size": 4, "command": sh("true")}))
        .await;
    assert_json_error(res, 429).await;
    // A chatty job: a stream that is written to notices its client left at once.
    let chatty = "while true; do echo tick; sleep 0.1; done";
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(chatty)}))
        .await;
    let res = app
        .post_json("/jobs", &json!({"world_size": 1, "command": sh("true")}))
        .await;
    assert_json_error(res, 429).await;
    assert_eq!(app.get_json("/jobs").await.as_array().unwrap().len(), 1);
    let first = app.get(&format!("/jobs/{id}/logs/stream")).await;
    assert_eq!(first.status(), 200);
    assert_json_error(app.get("/events").await, 429).await;
    drop(first);
    let again = wait_for(Duration::from_secs(10), || async {
        (app.get("/events").await.status() == 200).then_some(())
    })
    .await;
    assert!(again.is_some(), "a closed stream frees its slot");
    app.stop(&id).await;
}

#[actix_web::test]
async fn paths_must_stay_inside_the_allowed_roots() {
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_path_buf();
    let app = spawn_app_with(|s| s.allowed_roots = vec![root_path.clone()]).await;
    for bad in [
        "/etc".to_string(),
        format!("{}/../etc", root_path.display()),
        "relative/dir".to_string(),
    ] {
        let res = app
            .post_json(
                "/jobs",
                &json!({"world_size": 1, "command": sh("true"), "dataset": bad}),
            )
            .await;
        let body = assert_json_error(res, 422).await;
        assert!(
            body["message"].as_str().unwrap().contains("allowed root"),
            "{body}"
        );
    }
    let ok = json!({"world_size": 1, "command": sh("true"),
                    "dataset": root_path.join("data"), "checkpoint_dir": root_path.join("ckpt")});
    assert_eq!(app.post_json("/jobs", &ok).await.status(), 201);
}

#[actix_web::test]
async fn worker_tokens_never_appear_in_responses_or_logs() {
    let app = spawn_app().await;
    let file = app.data_dir.path().join("token");
    let script = format!(
        "echo \"$TRAINVISOR_TOKEN\" > {}; {}; echo started",
        file.display(),
        beat("{}")
    );
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(&script)}))
        .await;
    app.wait_finished(&id, Duration::from_secs(20)).await;
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 48);
    for path in ["", "/summary", "/workers", "/restarts", "/logs?tail=1000"] {
        let body = app
            .get(&format!("/jobs/{id}{path}"))
            .await
            .text()
            .await
            .unwrap();
        assert!(!body.contains(&token), "{path} leaks the token");
    }
    let db = std::fs::read(app.data_dir.path().join("trainvisor.db")).unwrap();
    let wal = std::fs::read(app.data_dir.path().join("trainvisor.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "the database holds the token"
        );
    }
}

#[actix_web::test]
async fn log_retention_drops_the_oldest_lines_and_counts_them() {
    let app = spawn_app_with(|s| s.max_log_lines_per_job = 100).await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("seq 1 1000")}))
        .await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    // Trimming runs after the batch that holds the job's end, so read until the two agree:
    // every line (1000 printed, the OMP_NUM_THREADS note and the final system note) is either
    // kept or counted.
    let (lines, dropped) = wait_for(Duration::from_secs(10), || async {
        let dropped = app.job(&id).await["logs_dropped"].as_i64().unwrap_or(0);
        let lines = app.log_lines(&id).await;
        (lines.len() as i64 + dropped == 1002 && dropped > 0).then_some((lines, dropped))
    })
    .await
    .expect("kept + dropped lines account for every line");
    assert!(dropped > 0);
    assert!(lines.len() <= 110, "{} lines kept", lines.len());
    assert!(
        lines.iter().any(|l| l["line"] == "1000"),
        "the newest lines are kept"
    );
    assert!(
        !lines.iter().any(|l| l["line"] == "1"),
        "the oldest are dropped"
    );
}

#[actix_web::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = spawn_app_with(|s| s.api_token = Some("s3cret".into())).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let res = app
            .client
            .get(app.url("/jobs"))
            .header("Authorization", format!("{scheme} s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "scheme {scheme}");
    }
    let res = app
        .client
        .get(app.url("/jobs"))
        .header("Authorization", "Basic s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

/// A token too short to resist guessing is refused on an address other than loopback, and a
/// token given on the command line (visible in `ps`) draws a warning.
#[actix_web::test]
async fn weak_or_visible_tokens_are_called_out() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = trainvisor::config::Settings::new("0.0.0.0:0", data_dir.path());
    settings.api_token = Some("x".into());
    let err = match trainvisor::startup::Application::build(settings).await {
        Ok(_) => panic!("a one-character token was accepted on 0.0.0.0"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("at least 16"), "{err}");

    let data_dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--api-token",
            "a-long-enough-token",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _url = listening_url(&mut server);
    server.kill().unwrap();
    let out = server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--api-token is visible") && stderr.contains("TRAINVISOR_API_TOKEN"),
        "{stderr}"
    );
}

/// A heartbeat to a finished job: its own worker's token learns the job ended (409); any
/// other token learns nothing (401), not even the job's state.
#[actix_web::test]
async fn only_a_jobs_own_token_learns_that_it_ended() {
    let app = spawn_app().await;
    let out = app.data_dir.path().join("token");
    let id = app
        .create_job(json!({"world_size": 1,
            "command": sh(&format!("printf %s \"$TRAINVISOR_TOKEN\" > {}", out.display()))}))
        .await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    let token = std::fs::read_to_string(&out).unwrap();
    let beat = |token: String| {
        app.client
            .post(app.url(&format!("/jobs/{id}/workers/0/heartbeat")))
            .bearer_auth(token)
            .body("{}")
            .send()
    };
    let res = beat("a-token-never-issued".into()).await.unwrap();
    assert_eq!(res.status(), 401);
    let body = res.text().await.unwrap();
    assert!(!body.contains("succeeded"), "{body}");
    let res = beat(token).await.unwrap();
    assert_eq!(res.status(), 409);
    assert!(res.text().await.unwrap().contains("succeeded"));
}

/// The page's session cookie expires (`Max-Age`, and the server checks the time it holds) and
/// is bound to the token: a server with another token refuses it.
#[actix_web::test]
async fn session_cookies_expire_and_die_with_their_token() {
    let app = spawn_app_with(|s| {
        s.api_token = Some("first-token-value".into());
        s.session_ttl = Duration::from_secs(2);
    })
    .await;
    let other = spawn_app_with(|s| s.api_token = Some("second-token-value".into())).await;
    let res = app
        .post_json("/session", &json!({"token": "first-token-value"}))
        .await;
    assert_eq!(res.status(), 200);
    let set = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("Max-Age=2"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = |app: &TestApp| {
        app.client
            .get(app.url("/jobs"))
            .header("Cookie", cookie.clone())
            .send()
    };
    assert_eq!(with_cookie(&app).await.unwrap().status(), 200);
    assert_eq!(with_cookie(&other).await.unwrap().status(), 401);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(with_cookie(&app).await.unwrap().status(), 401, "expired");
}
