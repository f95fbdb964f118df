//! `GET /metrics` (issue 15, item 2), read by a real Prometheus parser (the Python
//! `prometheus_client` OpenMetrics parser, installed in the test venv by tests/run): it
//! parses, its counters move as a kill -9 and a recovery say they should, and no series names
//! a job once it has ended.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// One sample: (name, labels, value).
pub type Sample = (String, serde_json::Map<String, Value>, f64);

/// Scrapes `/metrics` and parses it with `prometheus_client`'s OpenMetrics parser.
pub async fn scrape(app: &TestApp) -> Vec<Sample> {
    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    let kind = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = res.text().await.unwrap();
    let mut child =
        std::process::Command::new(crate::deploy::venv_tool("TRAINVISOR_TEST_PYTHON", "python"))
            .args([
                "-c",
                "import json, sys\n\
                 from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                 out = []\n\
                 for f in text_string_to_metric_families(sys.stdin.read()):\n\
                 \x20   for s in f.samples:\n\
                 \x20       out.append([s.name, s.labels, s.value])\n\
                 print(json.dumps(out))",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the test venv's python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    parsed
}

pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(v))
        })
        .map(|s| s.2)
}

#[actix_web::test]
async fn metrics_parse_move_with_a_recovery_and_forget_ended_jobs() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    assert_eq!(value(&before, "trainvisor_incidents_total", &[]), Some(0.0));
    assert!(value(&before, "trainvisor_process_open_fds", &[]).unwrap() > 0.0);
    assert!(value(&before, "trainvisor_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    // Counted per process (src/storage/s3/retried.rs has the test that moves it).
    assert!(value(&before, "trainvisor_s3_retryable_responses_total", &[]).is_some());

    let data = small_dataset(&app);
    let id = app
        .create_job(json!({"world_size": 2, "dataset": data, "total_steps": 200,
                           "batch_size": 16, "checkpoint_every": 10, "sleep_sec": 0.02,
                           "sync": "none", "restart_scope": "worker",
                           "backoff_initial_ms": 100}))
        .await;
    let pid = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (s["workers"][0]["step"].as_u64().unwrap_or(0) >= 40)
            .then(|| s["workers"][0]["pid"].as_u64())
            .flatten()
    })
    .await
    .expect("rank 0 steps");
    // While it runs, the live job and its ranks have series of their own.
    let live = scrape(&app).await;
    assert!(value(&live, "trainvisor_job_step", &[("job_id", &id)]).unwrap() >= 1.0);
    for rank in ["0", "1"] {
        assert!(
            value(
                &live,
                "trainvisor_rank_heartbeat_age_seconds",
                &[("job_id", &id), ("rank", rank)]
            )
            .is_some(),
            "{live:?}"
        );
        assert_eq!(
            value(
                &live,
                "trainvisor_rank_straggler",
                &[("job_id", &id), ("rank", rank)]
            ),
            Some(0.0),
            "{live:?}"
        );
    }
    kill(pid as u32, libc::SIGKILL);
    let job = app.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");

    let after = scrape(&app).await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels);
    assert_eq!(
        v(
            "trainvisor_restarts_total",
            &[("reason", "signal"), ("scope", "worker")]
        ),
        Some(1.0)
    );
    assert_eq!(v("trainvisor_incidents_total", &[]), Some(1.0));
    for h in ["detection", "replacement", "training_again"] {
        assert_eq!(
            v(&format!("trainvisor_{h}_seconds_count"), &[]),
            Some(1.0),
            "{h}"
        );
    }
    assert!(v("trainvisor_checkpoint_commit_seconds_count", &[]).unwrap() >= 10.0);
    assert!(v("trainvisor_checkpoint_bytes_total", &[]).unwrap() > 0.0);
    assert!(v("trainvisor_recorder_commit_seconds_count", &[]).unwrap() > 0.0);
    assert!(
        v(
            "trainvisor_http_requests_total",
            &[
                ("route", "/jobs/{job_id}/summary"),
                ("method", "GET"),
                ("status", "200")
            ]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        v(
            "trainvisor_http_request_duration_seconds_count",
            &[("route", "/jobs/{job_id}/summary"), ("method", "GET")]
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(v("trainvisor_jobs", &[("state", "succeeded")]), Some(1.0));
    // The ended job has left no series behind; raw paths are never labels.
    assert!(
        !after.iter().any(|(_, l, _)| l.get("job_id").is_some()),
        "{after:?}"
    );
    assert!(
        !after.iter().any(|(_, l, _)| l
            .get("route")
            .and_then(Value::as_str)
            .is_some_and(|r| r.contains(&id))),
        "{after:?}"
    );

    // Every metric the Grafana dashboard in deploy/ queries is one the server exposes.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/trainvisor.json"),
        )
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let mut names: Vec<String> = Vec::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("trainvisor_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            names.push(name);
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    let exposed: Vec<&String> = after.iter().chain(live.iter()).map(|s| &s.0).collect();
    for name in names {
        assert!(
            exposed.iter().any(|n| **n == name),
            "the dashboard queries {name}, which /metrics does not expose"
        );
    }
}
