//! An unchanged PyTorch script, observed by trainvisor's Python hook: the hook's cost per
//! optimizer step (the same loop as a rank with automatic heartbeats off and on, alternating
//! in one run), and how far the incident's steps lost and the goodput are from what the
//! script's own step log says after a kill -9, cold and warm.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Client, Figures, percentile};

const COST: &str = include_str!("observe_cost.py");
/// The plain DDP script the tests run too (tests/api/observe.rs).
pub const DDP: &str = include_str!("../../tests/scripts/ddp_unchanged.py");

/// Per mode: `python` has torch (the peers' venv).
pub async fn run(
    client: &Client,
    python: &Path,
    dir: &Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    hook_cost(client, python, dir, figures).await?;
    for warm in [false, true] {
        kill_error(client, python, dir, warm, figures).await?;
    }
    Ok(())
}

/// Off and on alternate for three rounds; each keeps its best median step time and its best
/// CPU time per step (the process's, the heartbeat thread's included).
async fn hook_cost(
    client: &Client,
    python: &Path,
    dir: &Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let script = dir.join("observe_cost.py");
    std::fs::write(&script, COST)?;
    let steps = 20_000;
    let mut best = [f64::INFINITY; 2];
    let mut cpu = [f64::INFINITY; 2];
    let mut calls_ns = f64::INFINITY;
    for round in 0..3 {
        for (m, auto) in [false, true].into_iter().enumerate() {
            let out = dir.join(format!("cost-{auto}-{round}.json"));
            let id = submit(
                client,
                json!({"world_size": 1, "max_restarts": 0, "auto_heartbeat": auto,
                       "command": [python, &script, &out, steps.to_string()]}),
            )
            .await?;
            wait_state(client, &id, "succeeded").await?;
            let r: Value = serde_json::from_slice(&std::fs::read(&out)?)?;
            if r["hook"] != auto {
                bail!(
                    "the rank's hook was {} with auto_heartbeat {auto}",
                    r["hook"]
                );
            }
            let us: Vec<f64> = r["step_ns"]
                .as_array()
                .context("step_ns")?
                .iter()
                .filter_map(Value::as_f64)
                .map(|ns| ns / 1e3)
                .collect();
            best[m] = best[m].min(percentile(&us, 50.0));
            let cpu_us = r["cpu_ns_per_step"].as_f64().context("cpu_ns_per_step")? / 1e3;
            cpu[m] = cpu[m].min(cpu_us);
            if let Some(ns) = r["hook_calls_ns"].as_f64() {
                calls_ns = calls_ns.min(ns);
            }
        }
    }
    figures.insert("observe_step_off_p50_us".into(), best[0]);
    figures.insert("observe_step_on_p50_us".into(), best[1]);
    figures.insert("observe_hook_cost_p50_us".into(), best[1] - best[0]);
    figures.insert("observe_step_off_cpu_us".into(), cpu[0]);
    figures.insert("observe_step_on_cpu_us".into(), cpu[1]);
    figures.insert("observe_hook_cost_cpu_us".into(), cpu[1] - cpu[0]);
    figures.insert("observe_hook_calls_per_step_ns".into(), calls_ns);
    Ok(())
}

/// A 2-rank DDP job killed (rank 1, SIGKILL) at a moment of the bench's choosing, not at a
/// pause: the incident's steps lost and the job's goodput against the script's own log.
async fn kill_error(
    client: &Client,
    python: &Path,
    dir: &Path,
    warm: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let mode = if warm { "warm" } else { "cold" };
    let script = dir.join("ddp_unchanged.py");
    std::fs::write(&script, DDP)?;
    let log = dir.join(format!("steps-{mode}.jsonl"));
    let mut spec = json!({
        "world_size": 2, "restart_scope": "job", "total_steps": 1000, "backoff_initial_ms": 200,
        "command": [python, "-u", &script, &log],
        "env": {"TOTAL_STEPS": "1000", "CKPT_EVERY": "25", "STEP_SLEEP": "0.05"},
    });
    if warm {
        spec["warm_standby"] = json!(true);
    }
    let id = submit(client, spec).await?;
    // Past step 60 and, warm, once both standbys are ready (importing torch beside two
    // training ranks on 2 cores takes a while: hence the long job).
    let pid = poll_long(|| async {
        let s = client.get(&format!("/jobs/{id}/summary")).await?;
        if s["state"] != "running" && s["state"] != "pending" {
            bail!("the job ended ({}) before the kill", s["state"]);
        }
        let ready = !warm
            || s["workers"]
                .as_array()
                .is_some_and(|w| w.iter().all(|w| w["standby"]["state"] == "ready"));
        Ok((s["step"].as_u64().unwrap_or(0) >= 60 && ready)
            .then(|| s["workers"][1]["pid"].as_u64())
            .flatten())
    })
    .await?;
    // Not on a step boundary: somewhere within the next step.
    tokio::time::sleep(Duration::from_millis(23)).await;
    let killed_at = unix_now();
    // SAFETY: the pid of a rank of this bench's own job.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_state(client, &id, "succeeded").await?;
    let s = client.get(&format!("/jobs/{id}/summary")).await?;
    let incidents = client.get(&format!("/jobs/{id}/incidents")).await?;
    let i = &incidents[0];
    let events = read_log(&log);
    let truth = from_log(
        &events,
        killed_at,
        s["goodput"]["wall_s"].as_f64().unwrap_or(0.0),
    )
    .context("the script's log")?;
    let lost = i["steps_lost"].as_f64().unwrap_or(f64::NAN);
    let goodput = s["goodput"]["goodput"].as_f64().unwrap_or(f64::NAN);
    figures.insert(
        format!("observe_{mode}_steps_lost_log"),
        truth.steps_lost as f64,
    );
    figures.insert(
        format!("observe_{mode}_steps_lost_error"),
        lost - truth.steps_lost as f64,
    );
    figures.insert(format!("observe_{mode}_goodput_log"), truth.goodput);
    figures.insert(
        format!("observe_{mode}_goodput_error"),
        goodput - truth.goodput,
    );
    Ok(())
}

/// What the script's own step log says about one kill.
#[derive(Debug)]
pub struct LogTruth {
    /// The last step logged before the kill, less the step every rank resumed from.
    pub last_step: u64,
    pub resumed_step: u64,
    pub steps_lost: u64,
    /// `wall_s` less the time from the kill to every rank's first step after it, less the
    /// lost steps at the log's mean step time after the restart, over `wall_s`.
    pub goodput: f64,
}

/// From the events of `ddp_unchanged.py` (`{"t", "rank", "event", "step"}`), a kill at
/// `killed_at` (unix seconds) and the job's wall time.
pub fn from_log(events: &[Value], killed_at: f64, wall_s: f64) -> Option<LogTruth> {
    let t = |e: &Value| e["t"].as_f64().unwrap_or(0.0);
    let steps = || events.iter().filter(|e| e["event"] == "step");
    let last_step = steps()
        .filter(|e| t(e) < killed_at)
        .filter_map(|e| e["step"].as_u64())
        .max()?;
    let resumed_step = events
        .iter()
        .filter(|e| e["event"] == "resumed")
        .filter_map(|e| e["step"].as_u64())
        .min()?;
    let ranks: Vec<u64> = steps().filter_map(|e| e["rank"].as_u64()).collect();
    let world = ranks.iter().max()? + 1;
    let mut again = 0.0f64;
    for r in 0..world {
        let first = steps()
            .filter(|e| e["rank"] == r && t(e) > killed_at)
            .map(t)
            .fold(f64::INFINITY, f64::min);
        again = again.max(first);
    }
    let rank0_after: Vec<(u64, f64)> = steps()
        .filter(|e| e["rank"] == 0 && t(e) > killed_at)
        .filter_map(|e| Some((e["step"].as_u64()?, t(e))))
        .collect();
    let (first, last) = (rank0_after.first()?, rank0_after.last()?);
    if last.0 <= first.0 || !again.is_finite() || wall_s <= 0.0 {
        return None;
    }
    let step_s = (last.1 - first.1) / (last.0 - first.0) as f64;
    let steps_lost = last_step.saturating_sub(resumed_step);
    let goodput = (wall_s - (again - killed_at) - steps_lost as f64 * step_s) / wall_s;
    Some(LogTruth {
        last_step,
        resumed_step,
        steps_lost,
        goodput,
    })
}

pub fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn submit(client: &Client, spec: Value) -> anyhow::Result<String> {
    let job = client.post("/jobs", &spec).await?;
    Ok(job["job_id"].as_str().context("job_id")?.to_string())
}

async fn wait_state(client: &Client, id: &str, want: &str) -> anyhow::Result<()> {
    let state = poll_long(|| async {
        let j = client.get(&format!("/jobs/{id}")).await?;
        let state = j["state"].as_str().unwrap_or_default().to_string();
        Ok(matches!(state.as_str(), "succeeded" | "failed" | "stopped").then_some(state))
    })
    .await?;
    if state != want {
        bail!("job {id} ended {state}, not {want}");
    }
    Ok(())
}

/// Polls every 100 ms for up to 10 minutes: torch starting on 2 loaded cores is slow.
async fn poll_long<T, F, Fut>(mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
