//! Relaunch of a failed rank through Slurm: kill -9 of a rank's process inside its job step,
//! then the time from the server's detection (the srun client's exit) to the replacement
//! step running (its first heartbeat reaching the server). Runs only when a Slurm cluster is
//! reachable: `SLURM_CONF` set (e.g. `tests/slurm-cluster up DIR` prints one), with its
//! nodes on this machine so the bench can find the rank's process to kill.

use std::path::Path;

use serde_json::json;

use super::{Client, Figures, insert_percentiles, ms_between};
use crate::store::now;

const BEAT_THEN_WAIT: &str = r#"curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d '{"step": 1}' "$TRAINVISOR_HEARTBEAT_URL"; exec sleep 100000"#;

pub async fn relaunch(
    client: &Client,
    dir: &Path,
    kills: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    if std::env::var_os("SLURM_CONF").is_none() {
        eprintln!(
            "bench: Slurm relaunch skipped: SLURM_CONF is not set (start a cluster with tests/slurm-cluster up DIR)"
        );
        return Ok(());
    }
    let instance = std::fs::read_to_string(dir.join("data").join("instance-id"))?;
    let marker = format!("TRAINVISOR_INSTANCE={}", instance.trim());
    let job = client
        .post(
            "/jobs",
            &json!({"world_size": 1, "launcher": "slurm", "command": ["sh", "-c", BEAT_THEN_WAIT],
                    "restart_scope": "worker", "backoff_initial_ms": 0, "max_restarts": 100000,
                    "heartbeat_timeout_s": 3600, "exclude_after_failures": 0}),
        )
        .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    let (mut detect, mut relaunch, mut spawn) = (vec![], vec![], vec![]);
    for attempt in 0..kills as u64 {
        let srun = ready(client, &id, attempt).await?;
        // The heartbeat comes from curl; the shell then execs sleep.
        let pid = client
            .poll(|| async { Ok(step_process(&marker, srun)) })
            .await
            .map_err(|_| anyhow::anyhow!("no process of the step on this machine"))?;
        let killed_at = now();
        // SAFETY: killing the rank's process, which this bench's server launched.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        ready(client, &id, attempt + 1).await?;
        let restarts = client.get(&format!("/jobs/{id}/restarts")).await?;
        let r = restarts
            .as_array()
            .and_then(|a| a.last())
            .cloned()
            .unwrap_or_default();
        let summary = client.get(&format!("/jobs/{id}/summary")).await?;
        let w = &summary["workers"][0];
        let detected = r["detected_at"].as_str().unwrap_or_default();
        detect.push(ms_between(&killed_at, detected)?);
        spawn.push(ms_between(
            detected,
            w["started_at"].as_str().unwrap_or_default(),
        )?);
        relaunch.push(ms_between(
            detected,
            w["last_heartbeat_at"].as_str().unwrap_or_default(),
        )?);
    }
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    insert_percentiles(figures, "slurm_detect", &detect);
    insert_percentiles(figures, "slurm_srun_spawn", &spawn);
    insert_percentiles(figures, "slurm_relaunch", &relaunch);
    figures.insert("slurm_kills".into(), kills as f64);
    Ok(())
}

/// The srun pid once incarnation `attempt` runs and has heartbeated.
async fn ready(client: &Client, id: &str, attempt: u64) -> anyhow::Result<u32> {
    client
        .poll(|| async {
            let s = client.get(&format!("/jobs/{id}/summary")).await?;
            let w = &s["workers"][0];
            // A heartbeat of this incarnation, not one left from the previous.
            let ok = w["state"] == "running"
                && w["attempt"] == attempt
                && w["step"] == 1
                && w["started_at"].is_string()
                && w["started_at"].as_str() <= w["last_heartbeat_at"].as_str();
            Ok(ok.then(|| w["pid"].as_u64().unwrap_or(0) as u32))
        })
        .await
}

/// The rank's own process: carries the marker, is not the srun client.
fn step_process(marker: &str, srun: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let marked = env.split(|&b| b == 0).any(|v| v == marker.as_bytes());
        (marked && pid != srun && comm.trim() == "sleep").then_some(pid)
    })
}
