//! An unchanged PyTorch script is observed (issue 27): a plain DDP (gloo) script with real
//! torch, cold and warm, shows steps, steps/s and loss in the summary through trainvisor's
//! Python hook; a kill -9 is an incident that closes with the steps lost the script's own
//! log says, and the goodput agrees with that log. A script that reports nothing gets an
//! incident that closes once its replacement stays up, with steps lost unknown and an
//! estimated goodput, and a summary that says why it has no step data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use trainvisor::bench::observe::{from_log, read_log, unix_now};

use crate::browser::{open_page, with_page};
use crate::deploy::venv_tool;
use crate::helpers::*;

const TOTAL: u64 = 120;
const EVERY: u64 = 25;
const PAUSE_AT: u64 = 60;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/ddp_unchanged.py")
}

/// The test venv's python, which `tests/run` gives torch.
fn torch_python() -> PathBuf {
    let python = venv_tool("TRAINVISOR_TEST_PYTHON", "python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import torch: tests/run installs it",
        python.display()
    );
    python
}

fn ddp_job(log: &Path, warm: bool) -> Value {
    let mut spec = json!({
        "world_size": 2,
        "command": [torch_python(), "-u", script(), log],
        "restart_scope": "job",
        "total_steps": TOTAL,
        "backoff_initial_ms": 200,
        "env": {"TOTAL_STEPS": TOTAL.to_string(), "CKPT_EVERY": EVERY.to_string(),
                "STEP_SLEEP": "0.05", "PAUSE_AT": PAUSE_AT.to_string(), "PAUSE_S": "30"},
    });
    if warm {
        spec["warm_standby"] = json!(true);
    }
    spec
}

async fn observe_a_kill(warm: bool) {
    let app = spawn_app().await;
    let log = app.data_dir.path().join("steps.jsonl");
    let id = app.create_job(ddp_job(&log, warm)).await;

    // Steps, steps/s and loss in the summary, from the script's optimizer steps alone.
    let s = wait_for(Duration::from_secs(300), || async {
        let s = app.summary(&id).await;
        (s["steps_per_s"].as_f64().is_some_and(|r| r > 0.0) && s["loss"].is_number()).then_some(s)
    })
    .await
    .expect("the summary shows steps/s and loss");
    assert!(s["step"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["no_step_data"].is_null(), "{s}");
    assert!(s["eta_s"].is_number(), "total_steps drives the ETA: {s}");

    // Both ranks stand still after step PAUSE_AT (the script's choreography, in its first
    // run only): the heartbeats have caught up with it when rank 1 is killed (warm: once
    // both standbys have imported torch).
    let pid = wait_for(Duration::from_secs(120), || async {
        let s = app.summary(&id).await;
        let all_there = (0..2).all(|r| {
            let w = &s["workers"][r];
            w["step"].as_u64() == Some(PAUSE_AT) && (!warm || w["standby"]["state"] == "ready")
        });
        all_there.then(|| s["workers"][1]["pid"].as_u64()).flatten()
    })
    .await
    .expect("both ranks report the pause step");
    let killed_at = unix_now();
    kill(pid as u32, libc::SIGKILL);

    let end = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    let s = app.summary(&id).await;
    assert_eq!(s["step"].as_u64(), Some(TOTAL), "{s}");
    let incidents = app.get_json(&format!("/jobs/{id}/incidents")).await;
    let [i] = incidents.as_array().unwrap().as_slice() else {
        panic!("one incident: {incidents}");
    };
    assert_eq!(i["end"], "recovered", "{i}");

    // The script's own log: the last step before the kill, where every rank resumed, and
    // the goodput it implies (bench::observe::from_log, which the bench's figures use too).
    let events = read_log(&log);
    let resumed: Vec<&Value> = events.iter().filter(|e| e["event"] == "resumed").collect();
    assert_eq!(resumed.len(), 2, "each rank resumed once: {resumed:?}");
    let g = &s["goodput"];
    let truth = from_log(&events, killed_at, g["wall_s"].as_f64().unwrap()).unwrap();
    assert_eq!(
        (truth.last_step, truth.resumed_step),
        (PAUSE_AT, 50),
        "{truth:?}"
    );
    assert_eq!(i["last_step"].as_u64(), Some(truth.last_step), "{i}");
    assert_eq!(i["resumed_step"].as_u64(), Some(truth.resumed_step), "{i}");
    assert_eq!(i["steps_lost"].as_u64(), Some(truth.steps_lost), "{i}");
    let served = g["goodput"].as_f64().unwrap();
    assert!(!g["estimate"].as_bool().unwrap(), "{g}");
    assert!(
        (served - truth.goodput).abs() <= 0.03,
        "goodput {served:.3} served, {:.3} from the script's log ({g})",
        truth.goodput
    );
    if warm {
        assert!(
            s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["warm_start"] == true),
            "both ranks were warm standbys: {s}"
        );
    }
}

#[actix_web::test]
async fn an_unchanged_ddp_script_is_observed_cold() {
    observe_a_kill(false).await;
}

#[actix_web::test]
async fn an_unchanged_ddp_script_is_observed_warm() {
    observe_a_kill(true).await;
}

/// The script's own heartbeats win over the automatic ones, and `"auto_heartbeat": false`
/// leaves a torch script unobserved (and the summary says so).
#[actix_web::test]
async fn own_heartbeats_win_and_auto_heartbeat_false_turns_it_off() {
    let app = spawn_app().await;
    let python = torch_python();
    // Steps by the hook would read 1..=40; the script reports 1000 + its step.
    let program = r#"
import json, os, time, urllib.request
import torch
m = torch.nn.Linear(4, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
for i in range(40):
    m(torch.randn(2, 4)).sum().backward(); opt.step(); time.sleep(0.05)
    if os.environ.get("OWN") and i % 5 == 4:
        urllib.request.urlopen(urllib.request.Request(
            os.environ["TRAINVISOR_HEARTBEAT_URL"], data=json.dumps({"step": 1001 + i}).encode(),
            headers={"Authorization": "Bearer " + os.environ["TRAINVISOR_TOKEN"]}))
"#;
    let own = app
        .create_job(json!({"world_size": 1, "command": [python, "-c", program],
                           "env": {"OWN": "1"}}))
        .await;
    let off = app
        .create_job(json!({"world_size": 1, "command": [python, "-c", program],
                           "auto_heartbeat": false}))
        .await;
    for id in [&own, &off] {
        let end = app.wait_finished(id, Duration::from_secs(300)).await;
        assert_eq!(end["state"], "succeeded", "{end}");
    }
    let s = app.summary(&own).await;
    assert_eq!(
        s["step"].as_u64(),
        Some(1040),
        "the script's own count: {s}"
    );
    let s = app.summary(&off).await;
    assert!(s["step"].is_null(), "{s}");
    let why = s["no_step_data"].as_str().unwrap();
    assert!(why.contains("automatic heartbeats are off"), "{why}");
}

/// A script that reports nothing: its incident ends once the replacement has stayed up 10 s
/// (not when the job ends), steps lost are unknown (null, not 0), the goodput says it is an
/// estimate, and the summary, `trainvisor status` and the page say why there is no step data.
#[actix_web::test]
async fn a_script_that_reports_nothing_gets_an_honest_incident() {
    let app = spawn_app().await;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh("sleep 60"),
                           "backoff_initial_ms": 100}))
        .await;
    let pid = app.running_pids(&id, 1).await[0];
    kill(pid, libc::SIGKILL);
    let i = wait_for(Duration::from_secs(60), || async {
        let all = app.get_json(&format!("/jobs/{id}/incidents")).await;
        let i = all.get(0)?.clone();
        (i["end"] != "open").then_some(i)
    })
    .await
    .expect("the incident ends while the job runs");
    assert_eq!(i["end"], "recovered", "{i}");
    assert!(i["steps_lost"].is_null(), "{i}");
    let lost = i["seconds_lost"].as_f64().unwrap();
    assert!(lost >= 10.0, "{i}");
    let s = app.summary(&id).await;
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["goodput"]["estimate"], true, "{s}");
    assert!(s["goodput"]["redo_s"].is_null(), "{s}");
    // Said once the job has run 20 s without a step.
    let s = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        s["no_step_data"].is_string().then_some(s)
    })
    .await
    .expect("the summary says there is no step data");
    assert_eq!(s["state"], "running", "{s}");
    let why = s["no_step_data"].as_str().unwrap();
    assert!(
        why.starts_with("no step data: this script sends no heartbeats"),
        "{why}"
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["status", &id])
        .env("TRAINVISOR_SERVER", &app.address)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no step data: this script sends no heartbeats"),
        "{text}"
    );
    assert!(text.contains("lost unknown steps"), "{text}");
    assert!(text.contains("goodput ≤ "), "{text}");

    // The page: the sentence above the charts, charts that say "no step data" instead of
    // "no data yet", the incident's unknown steps and the estimated goodput.
    with_page(&app, "no-step-data", async |page, app| {
        open_page(page, &format!("{}/#/jobs/{id}", app.address)).await;
        page.wait(
            "the page says there is no step data, why, and how to get it",
            "const p = document.querySelector('[data-testid=no-step-data]');
             const c = document.querySelector('[data-testid=chart-rate]');
             const i = document.querySelector('[data-testid=incidents] li');
             const g = document.querySelector('[data-testid=goodput]');
             return p && !p.hidden && p.textContent.includes('this script sends no heartbeats')
               && p.textContent.includes('imports torch')
               && c.textContent.includes('no step data')
               && i && i.textContent.includes('lost unknown steps')
               && g.textContent.includes('≤') && g.textContent.includes('an estimate');",
        )
        .await;
    })
    .await;
    app.stop(&id).await;
}
