//! Recovery scenarios: kill -9 → detection → replacement, and hang detection.

use serde_json::{Value, json};

use super::{Client, Figures, insert_percentiles, ms_between};
use crate::store::now;

/// The kill scenarios' workers heartbeat once and then sleep: on a loaded machine a round can
/// outlast the default 10 s timeout, and a hang restart in the middle would be a second restart.
const NO_HANG: f64 = 3600.0;

/// A worker that heartbeats once (so the first heartbeat of each incarnation is measurable)
/// and then waits to be killed. Its step is its incarnation number + 1, so a heartbeat tells
/// which incarnation sent it (`started_at` is stamped when the server handles the spawn, which
/// on a loaded machine can be after the new process's first heartbeat).
const BEAT_THEN_WAIT: &str = r#"curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $((RESTART_COUNT + 1))}" "$TRAINVISOR_HEARTBEAT_URL"; exec sleep 100000"#;

async fn create(client: &Client, spec: Value) -> anyhow::Result<String> {
    let job = client.post("/jobs", &spec).await?;
    Ok(job["job_id"].as_str().unwrap_or_default().to_string())
}

/// Pids of every rank once all are running and have heartbeated in incarnation `attempt`.
async fn ready(client: &Client, id: &str, world: usize, attempt: u64) -> anyhow::Result<Vec<u32>> {
    let found = client
        .poll(|| async {
            let s = client.get(&format!("/jobs/{id}/summary")).await?;
            let workers = s["workers"].as_array().cloned().unwrap_or_default();
            let ok = workers.len() == world
                && workers.iter().all(|w| {
                    w["state"] == "running"
                        && w["attempt"] == attempt
                        && w["step"] == attempt + 1
                        && w["pid"].is_number()
                });
            Ok(ok.then(|| {
                workers
                    .iter()
                    .filter_map(|w| w["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            }))
        })
        .await;
    if found.is_err() {
        // Say what the ranks were doing instead.
        let s = client.get(&format!("/jobs/{id}/summary")).await?;
        let ranks: Vec<String> = s["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|w| {
                format!(
                    "rank {} {} attempt {} step {} started {} beat {}",
                    w["rank"],
                    w["state"],
                    w["attempt"],
                    w["step"],
                    w["started_at"],
                    w["last_heartbeat_at"]
                )
            })
            .collect();
        anyhow::bail!(
            "job {id}: not every rank running and heartbeating in attempt {attempt}: {}",
            ranks.join("; ")
        );
    }
    found
}

/// The newest restart row of a job.
async fn last_restart(client: &Client, id: &str) -> anyhow::Result<Value> {
    let restarts = client.get(&format!("/jobs/{id}/restarts")).await?;
    Ok(restarts
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default())
}

fn kill9(pid: u32) -> String {
    let at = now();
    // SAFETY: killing a worker process we launched.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    at
}

/// kill -9 of one rank, worker scope, zero backoff: detection and replacement latency.
pub async fn worker_scope(
    client: &Client,
    kills: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let spec = json!({"world_size": 1, "command": ["sh", "-c", BEAT_THEN_WAIT]});
    kill_and_replace(client, spec, kills, "worker_scope", figures).await
}

/// kill -9 of the one rank of a job made from `spec` (worker scope, zero backoff), `kills`
/// times: figures `detect_<name>`, `restart_<name>` (replacement running),
/// `first_heartbeat_<name>` and `kills_<name>`. The rank must heartbeat once with step
/// `RESTART_COUNT + 1`, then wait.
pub async fn kill_and_replace(
    client: &Client,
    mut spec: Value,
    kills: usize,
    name: &str,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    for (k, v) in [
        ("restart_scope", json!("worker")),
        ("backoff_initial_ms", json!(0)),
        ("max_restarts", json!(100000)),
        ("heartbeat_timeout_s", json!(NO_HANG)),
    ] {
        spec[k] = v;
    }
    let id = create(client, spec).await?;
    let (mut detect, mut spawn, mut beat) = (vec![], vec![], vec![]);
    for attempt in 0..kills as u64 {
        let pids = ready(client, &id, 1, attempt).await?;
        let killed_at = kill9(pids[0]);
        ready(client, &id, 1, attempt + 1).await?;
        let r = last_restart(client, &id).await?;
        let summary = client.get(&format!("/jobs/{id}/summary")).await?;
        let w = &summary["workers"][0];
        detect.push(ms_between(
            &killed_at,
            r["detected_at"].as_str().unwrap_or_default(),
        )?);
        spawn.push(ms_between(
            &killed_at,
            w["started_at"].as_str().unwrap_or_default(),
        )?);
        beat.push(ms_between(
            &killed_at,
            w["last_heartbeat_at"].as_str().unwrap_or_default(),
        )?);
    }
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    insert_percentiles(figures, &format!("detect_{name}"), &detect);
    insert_percentiles(figures, &format!("restart_{name}"), &spawn);
    insert_percentiles(figures, &format!("first_heartbeat_{name}"), &beat);
    figures.insert(format!("kills_{name}"), kills as f64);
    Ok(())
}

/// kill -9 of one rank, job scope: every rank stopped and relaunched.
pub async fn job_scope(
    client: &Client,
    world: usize,
    kills: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let id = create(
        client,
        json!({"world_size": world, "command": ["sh", "-c", BEAT_THEN_WAIT],
        "restart_scope": "job", "backoff_initial_ms": 0, "max_restarts": 100000,
        "heartbeat_timeout_s": NO_HANG}),
    )
    .await?;
    let (mut detect, mut all_up, mut all_beat) = (vec![], vec![], vec![]);
    for attempt in 0..kills as u64 {
        let pids = ready(client, &id, world, attempt).await?;
        let killed_at = kill9(pids[attempt as usize % world]);
        ready(client, &id, world, attempt + 1).await?;
        let r = last_restart(client, &id).await?;
        let summary = client.get(&format!("/jobs/{id}/summary")).await?;
        let workers = summary["workers"].as_array().cloned().unwrap_or_default();
        let latest = |key: &str| {
            workers
                .iter()
                .filter_map(|w| w[key].as_str().map(str::to_string))
                .max()
                .unwrap_or_default()
        };
        detect.push(ms_between(
            &killed_at,
            r["detected_at"].as_str().unwrap_or_default(),
        )?);
        all_up.push(ms_between(&killed_at, &latest("started_at"))?);
        all_beat.push(ms_between(&killed_at, &latest("last_heartbeat_at"))?);
    }
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    insert_percentiles(figures, &format!("detect_job_scope_w{world}"), &detect);
    insert_percentiles(figures, &format!("restart_job_scope_w{world}"), &all_up);
    insert_percentiles(
        figures,
        &format!("first_heartbeat_job_scope_w{world}"),
        &all_beat,
    );
    Ok(())
}

/// A rank that heartbeats once and hangs: how long after `heartbeat_timeout_s` it is detected.
pub async fn hang(client: &Client, hangs: usize, figures: &mut Figures) -> anyhow::Result<()> {
    let timeout_s = 0.5;
    let id = create(
        client,
        json!({"world_size": 1, "command": ["sh", "-c", BEAT_THEN_WAIT],
        "heartbeat_timeout_s": timeout_s, "backoff_initial_ms": 0, "max_restarts": 100000}),
    )
    .await?;
    let mut overshoot = vec![];
    for attempt in 0..hangs as u64 {
        ready(client, &id, 1, attempt).await?;
        let summary = client.get(&format!("/jobs/{id}/summary")).await?;
        let last_beat = summary["workers"][0]["last_heartbeat_at"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = client
            .poll(|| async {
                let restarts = client.get(&format!("/jobs/{id}/restarts")).await?;
                Ok(restarts
                    .as_array()
                    .and_then(|a| a.get(attempt as usize))
                    .cloned())
            })
            .await?;
        let detected = ms_between(&last_beat, r["detected_at"].as_str().unwrap_or_default())?;
        overshoot.push(detected - timeout_s * 1e3);
    }
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    figures.insert("hang_timeout_ms".into(), timeout_s * 1e3);
    insert_percentiles(figures, "hang_detect_over_timeout", &overshoot);
    Ok(())
}
