//! schemathesis (property-based API fuzzing from the OpenAPI document) against the real
//! server binary: a bounded number of generated cases, every check it has (see
//! tests/api/schemathesis.toml for the one exception), and 0 failures.
//!
//! The server runs with an API token, `--max-world-size 2`, `--max-jobs 2`, `--max-workers 4`,
//! and the temp dir as its data dir and only allowed root. Random jobs run real processes, so
//! the server gets an environment with nothing but `PATH` set to an empty directory: a random
//! `command` names no program it can find (the default command, the built-in trainer, is
//! started by absolute path and stops on the missing default dataset), and random paths cannot
//! leave the temp dir. The server and its ranks run at the lowest CPU priority (nice 19).
//!
//! `tests/run` installs schemathesis in a venv and sets TRAINVISOR_SCHEMATHESIS; without it
//! this test fails and says so.

use crate::helpers::listening_url;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "schemathesis-api-token";

/// Generated cases per operation and phase.
const MAX_EXAMPLES: &str = "20";

#[test]
fn schemathesis_finds_no_failure() {
    let st = std::env::var("TRAINVISOR_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "TRAINVISOR_SCHEMATHESIS is not set: run the tests with tests/run, which installs \
             schemathesis in a venv, or set it to a schemathesis executable (pip install \
             schemathesis==4.32.5)"
        )
    });
    assert!(
        std::path::Path::new(&st).is_file(),
        "TRAINVISOR_SCHEMATHESIS={st} is not a file: run tests/run to install schemathesis"
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("data");
    let empty_bin = tmp.path().join("empty-bin");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&empty_bin).unwrap();
    let server_log = std::fs::File::create(tmp.path().join("server.log")).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_trainvisor"));
    // SAFETY: nice() is async-signal-safe. The random jobs' ranks inherit the lowest
    // priority, so they cannot starve the tests that run beside this one.
    unsafe {
        server.pre_exec(|| {
            libc::nice(19);
            Ok(())
        });
    }
    let mut server = server
        .env_clear()
        .env("PATH", &empty_bin)
        // A job that names no dataset gets one that does not exist: its trainer ranks stop
        // at once instead of training for the whole run.
        .env("DATASET_DIR", root.join("no-dataset"))
        .env("RUST_LOG", "error")
        .current_dir(&root)
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--api-token",
            TOKEN,
            "--max-world-size",
            "2",
            "--max-jobs",
            "2",
            "--max-workers",
            "4",
            "--kill-grace-ms",
            "200",
            "--data-dir",
        ])
        .arg(&root)
        .arg("--allowed-root")
        .arg(&root)
        .stdout(Stdio::piped())
        .stderr(server_log)
        .spawn()
        .expect("server starts");
    let url = listening_url(&mut server);

    let seed = std::env::var("TRAINVISOR_SCHEMATHESIS_SEED").unwrap_or_else(|_| "7".into());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/schemathesis.toml");
    let out_path = tmp.path().join("schemathesis.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut run = Command::new(&st)
        .current_dir(tmp.path()) // its .hypothesis cache stays in the temp dir
        .env("NO_COLOR", "1")
        .args(["--no-color", "--config-file", config, "run"])
        .arg(format!("{url}/openapi.json"))
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            &seed,
            "--workers",
            "2",
        ])
        .args(["--request-timeout", "30", "--max-failures", "20"])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("schemathesis starts");
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let server_alive = server.try_wait().unwrap().is_none();
    // SIGTERM: the server stops its jobs' process groups and exits.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let server_gone = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        server.try_wait().unwrap().is_some()
    });
    if !server_gone {
        let _ = server.kill();
        let _ = server.wait();
    }
    let server_errors = std::fs::read_to_string(tmp.path().join("server.log")).unwrap_or_default();
    let cases = output
        .lines()
        .skip_while(|l| !l.starts_with("Test cases:"))
        .nth(1)
        .unwrap_or("(no summary)")
        .trim()
        .to_string();
    println!("schemathesis (seed {seed}, max examples {MAX_EXAMPLES}): {cases}");
    let status = status.unwrap_or_else(|| panic!("schemathesis ran over 15 minutes:\n{output}"));
    assert!(
        status.success(),
        "schemathesis failed ({status}):\n{output}\n--- server log ---\n{server_errors}"
    );
    assert!(
        server_alive,
        "the server died during the run:\n{server_errors}"
    );
    assert!(
        server_gone,
        "the server did not exit within 30 s of SIGTERM"
    );
    assert!(
        !server_errors.contains("panicked"),
        "the server panicked:\n{server_errors}"
    );
    assert!(
        cases.contains("generated") && !cases.starts_with("0 "),
        "schemathesis ran no case:\n{output}"
    );
}

/// The served document matches the routes the server answers: every documented operation
/// reaches its handler (never the "no such route" fallback, never a 405), and every other
/// method on a documented path is a 405 whose `Allow` lists exactly the documented methods.
#[actix_web::test]
async fn the_document_matches_the_routes_served() {
    let app = crate::helpers::spawn_app().await;
    let doc = app.get_json("/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let job_id = uuid::Uuid::new_v4().to_string();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = app.url(
            &path
                .replace("{job_id}", &job_id)
                .replace("{rank}", "0")
                .replace("{file}", "app.js"),
        );
        let documented: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
            if path.ends_with("/stream") || path == "/events" {
                continue; // streams: covered by the log and event tests
            }
            let res = app
                .client
                .request(method.parse().unwrap(), &url)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let allow = res
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap().to_string());
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            if documented.contains(&method.to_string()) {
                assert_ne!(status, 405, "{method} {path} is documented but not served");
                assert_ne!(
                    body["message"], "no such route",
                    "{method} {path} is documented but not served"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is served but not documented");
                let mut allowed: Vec<String> = allow
                    .unwrap_or_default()
                    .split(", ")
                    .map(str::to_string)
                    .collect();
                allowed.sort();
                let mut expected = documented.clone();
                expected.sort();
                assert_eq!(allowed, expected, "Allow of {path}");
                assert_eq!(body["error"], "method_not_allowed");
            }
        }
    }
}

/// With an API token the document stays open, like `/health`, and says how to authenticate.
#[actix_web::test]
async fn the_document_is_open_with_an_api_token() {
    let app = crate::helpers::spawn_app_with(|s| s.api_token = Some("t0ken".into())).await;
    let res = app.get("/openapi.json").await;
    assert_eq!(res.status(), 200);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["api_token"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/openapi.json"]["get"]["security"],
        serde_json::json!([{}])
    );
    crate::helpers::assert_json_error(app.get("/jobs").await, 401).await;
}
