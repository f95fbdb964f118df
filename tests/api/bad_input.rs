//! Bad input gets a 4xx JSON error and changes nothing; nothing makes the server answer 5xx.

use serde_json::json;

use crate::helpers::*;

async fn post_raw(app: &TestApp, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[actix_web::test]
async fn bad_job_specs_are_refused_and_create_nothing() {
    let app = spawn_app().await;
    let cases: Vec<(&str, String, u16)> = vec![
        ("malformed JSON", "{\"world_size\": ".into(), 400),
        ("not an object", "[1, 2]".into(), 400),
        ("empty body", "".into(), 400),
        (
            "unknown field",
            json!({"world_size": 1, "wrold": 2}).to_string(),
            400,
        ),
        ("wrong type", json!({"world_size": "four"}).to_string(), 400),
        (
            "float world size",
            json!({"world_size": 1.5}).to_string(),
            400,
        ),
        (
            "missing world size",
            json!({"command": ["true"]}).to_string(),
            422,
        ),
        ("zero world size", json!({"world_size": 0}).to_string(), 422),
        (
            "negative world size",
            json!({"world_size": -3}).to_string(),
            422,
        ),
        (
            "world size above the maximum",
            json!({"world_size": 1025}).to_string(),
            422,
        ),
        (
            "empty command",
            json!({"world_size": 1, "command": []}).to_string(),
            422,
        ),
        (
            "empty program",
            json!({"world_size": 1, "command": [""]}).to_string(),
            422,
        ),
        (
            "bad env name",
            json!({"world_size": 1, "env": {"A-B": "x"}}).to_string(),
            422,
        ),
        (
            "duplicate keys",
            r#"{"world_size": 1, "world_size": 2}"#.to_string(),
            400,
        ),
        (
            "duplicate keys in a nested object",
            r#"{"world_size": 1, "env": {"A": "1", "A": "2"}}"#.to_string(),
            400,
        ),
        (
            "reserved env name",
            json!({"world_size": 1, "env": {"RANK": "3"}}).to_string(),
            422,
        ),
        (
            // Set for every rank, but missing from the hand-kept reserved list before the
            // worker environment became one table.
            "reserved env name the old list missed",
            json!({"world_size": 1, "env": {"TRAINVISOR_SERVER_URL": "http://x"}}).to_string(),
            422,
        ),
        (
            "bad restart scope",
            json!({"world_size": 1, "restart_scope": "node"}).to_string(),
            400,
        ),
        (
            "negative timeout",
            json!({"world_size": 1, "heartbeat_timeout_s": -1}).to_string(),
            422,
        ),
        (
            "backoff max below initial",
            json!({"world_size": 1, "backoff_initial_ms": 10, "backoff_max_ms": 5}).to_string(),
            422,
        ),
        ("huge number", "{\"world_size\": 1e400}".into(), 400),
    ];
    for (what, body, status) in cases {
        let res = post_raw(&app, "/jobs", body).await;
        assert_eq!(res.status().as_u16(), status, "{what}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "{what}: {v}"
        );
    }
    let huge = vec![b' '; 2 << 20];
    assert_json_error(post_raw(&app, "/jobs", huge).await, 413).await;
    assert!(
        app.get_json("/jobs").await.as_array().unwrap().is_empty(),
        "something was created"
    );
}

#[actix_web::test]
async fn unknown_ids_routes_and_queries_get_json_errors() {
    let app = spawn_app().await;
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/jobs/{unknown}"),
        format!("/jobs/{unknown}/summary"),
        format!("/jobs/{unknown}/workers"),
        format!("/jobs/{unknown}/restarts"),
        format!("/jobs/{unknown}/logs"),
        format!("/jobs/{unknown}/logs/stream"),
        "/jobs/not-a-uuid".to_string(),
        "/jobs/../../etc/passwd".to_string(),
        "/nope".to_string(),
    ] {
        assert_json_error(app.get(&path).await, 404).await;
    }
    let res = app.stop(&unknown.to_string()).await;
    assert_json_error(res, 404).await;
    let res = app
        .client
        .delete(app.url(&format!("/jobs/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_json_error(res, 404).await;
    assert_json_error(app.get("/jobs?state=bogus").await, 400).await;
    assert_json_error(app.get("/jobs?colour=red").await, 400).await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("true")}))
        .await;
    assert_json_error(app.get(&format!("/jobs/{id}/logs?tail=abc")).await, 400).await;
    assert_json_error(app.get(&format!("/jobs/{id}/logs?tail=-1")).await, 400).await;
    let res = app
        .client
        .get(app.url(&format!("/jobs/{id}/logs/stream")))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_json_error(res, 400).await;
    let res = app.client.put(app.url("/jobs")).send().await.unwrap();
    assert_json_error(res, 405).await;
    let res = post_raw(&app, &format!("/jobs/{id}/workers/0/heartbeat"), "{}").await;
    assert_json_error(res, 401).await;
    let res = app
        .client
        .post(app.url(&format!("/jobs/{id}/workers/0/heartbeat")))
        .bearer_auth("x")
        .body("[]")
        .send()
        .await
        .unwrap();
    // The token is checked before the body is read: a token that was never this rank's
    // learns nothing, not even that its body was bad.
    assert_json_error(res, 401).await;
}

#[actix_web::test]
async fn garbage_never_gets_a_server_error() {
    let app = spawn_app().await;
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00],
        b"null".to_vec(),
        b"{\"world_size\": null}".to_vec(),
        b"{\"world_size\": 99999999999999999999999}".to_vec(),
        b"{\"world_size\": 1, \"command\": [\"a\\u0000b\"]}".to_vec(),
        b"{\"world_size\": 1, \"env\": {\"X\": 1}}".to_vec(),
        b"{\"world_size\": 1, \"backoff_multiplier\": 1e308}".to_vec(),
        b"{\"world_size\": 1, \"name\": \""
            .iter()
            .chain([b'x'; 300].iter())
            .chain(b"\"}")
            .copied()
            .collect(),
        "{\"world_size\": 1, \"checkpoint_dir\": \"\"}".into(),
    ];
    for body in bodies {
        for path in ["/jobs", "/jobs/purge"] {
            let res = post_raw(&app, path, body.clone()).await;
            assert!(
                res.status().is_client_error(),
                "{path} {:?}: {}",
                String::from_utf8_lossy(&body),
                res.status()
            );
        }
    }
    assert!(app.get_json("/jobs").await.as_array().unwrap().is_empty());
}

/// Random JSON (seeded, printed) from a grammar close to the real inputs: the job spec, purge,
/// and the worker routes. Every answer must be a 2xx or a JSON 4xx, never a 5xx.
#[actix_web::test]
async fn random_bodies_never_get_a_server_error() {
    use trainvisor::fuzz::{SPEC_FIELDS, random_json};
    use trainvisor::trainer::rng::SplitMix64;
    let app = spawn_app().await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000;
    println!("random bodies with seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let extra = [
        "job_ids", "force", "step", "values", "part", "bytes", "sha256", "token",
    ];
    let keys: Vec<&str> = SPEC_FIELDS.iter().copied().chain(extra).collect();
    let job = app
        .create_job(json!({"world_size": 1, "command": sh("sleep 300")}))
        .await;
    let paths = [
        "/jobs".to_string(),
        "/jobs/purge".to_string(),
        format!("/jobs/{job}/workers/0/heartbeat"),
        format!("/jobs/{job}/workers/0/allreduce"),
        format!("/jobs/{job}/workers/0/checkpoint"),
    ];
    for _ in 0..300 {
        let mut body = serde_json::Map::new();
        for _ in 0..rng.below(6) {
            let key = keys[rng.below(keys.len() as u64) as usize];
            body.insert(key.to_string(), random_json(&mut rng, 0, 3));
        }
        if rng.below(3) > 0 && !body.contains_key("world_size") {
            body.insert("world_size".into(), json!(1 + rng.below(3)));
        }
        // Never run a real program from random input.
        body.insert("command".into(), json!(["/nonexistent/trainer"]));
        let path = &paths[rng.below(paths.len() as u64) as usize];
        let res = app
            .client
            .post(app.url(path))
            .bearer_auth("not-a-worker-token")
            .json(&serde_json::Value::Object(body.clone()))
            .send()
            .await
            .unwrap();
        let status = res.status();
        assert!(
            !status.is_server_error(),
            "{path} {body:?} -> {status} (seed {seed})"
        );
        if status.is_client_error() {
            let v: serde_json::Value = res.json().await.expect("JSON error body");
            assert!(v["error"].is_string(), "{path} {body:?}: {v}");
        }
    }
    app.stop(&job).await;
    // Whatever the random specs created (always with a missing program) stops cleanly.
    for j in app.get_json("/jobs").await.as_array().unwrap() {
        let id = j["job_id"].as_str().unwrap();
        let res = app.stop(id).await;
        assert_eq!(res.status(), 200);
        let state = res.json::<serde_json::Value>().await.unwrap()["state"].clone();
        assert!(state == "stopped" || state == "failed", "{id}: {state}");
    }
}
