//! Control-plane scale: 1,000 lightweight workers across jobs, each heartbeating at 1 Hz.
//! The workers are `sleep` processes; the bench heartbeats on their behalf with the URL and
//! token it reads from each one's environment (/proc/PID/environ), so what is measured is the
//! server, not 1,000 HTTP clients' start-up.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;

use super::{Client, Figures, environ, rss_mb};

/// (heartbeat URL, token) of a running worker.
pub(super) fn credentials(pid: u32) -> Option<(String, String)> {
    let mut env = environ(pid).ok()?;
    Some((
        env.remove("TRAINVISOR_HEARTBEAT_URL")?,
        env.remove("TRAINVISOR_TOKEN")?,
    ))
}

/// CPU seconds (user + system) a process has used.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

pub async fn heartbeats(
    client: &Client,
    server_pid: u32,
    workers: usize,
    seconds: u64,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let per_job = 50;
    let mut jobs = Vec::new();
    for _ in 0..workers.div_ceil(per_job) {
        let job = client
            .post(
                "/jobs",
                &json!({"world_size": per_job, "command": ["sleep", "100000"],
                                    "heartbeat_timeout_s": 30}),
            )
            .await?;
        jobs.push(job["job_id"].as_str().unwrap_or_default().to_string());
    }
    let mut creds = Vec::new();
    for id in &jobs {
        let pids = client
            .poll(|| async {
                let s = client.get(&format!("/jobs/{id}/summary")).await?;
                let pids = super::running_pids(&s);
                Ok((pids.len() == per_job).then_some(pids))
            })
            .await?;
        creds.extend(pids.into_iter().filter_map(credentials));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let cpu_before = cpu_seconds(server_pid)?;
    let started = Instant::now();
    let mut sent = 0usize;
    let mut failed = 0usize;
    for second in 0..seconds {
        // Spread each second's heartbeats over the second, in 20 slices.
        for slice in creds.chunks(creds.len().div_ceil(20).max(1)) {
            let results = join_all(slice.iter().map(|(url, token)| {
                http.post(url)
                    .bearer_auth(token)
                    .json(&json!({"step": second}))
                    .send()
            }))
            .await;
            sent += results.len();
            failed += results
                .iter()
                .filter(|r| !matches!(r, Ok(res) if res.status().is_success()))
                .count();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next = Duration::from_secs(second + 1);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server_pid)? - cpu_before;
    figures.insert("scale_workers".into(), creds.len() as f64);
    figures.insert("scale_heartbeats_per_s".into(), sent as f64 / elapsed);
    figures.insert("scale_heartbeats_failed".into(), failed as f64);
    figures.insert("scale_server_cpu_percent".into(), cpu / elapsed * 100.0);
    figures.insert("scale_server_rss_mb".into(), rss_mb(server_pid)?);
    for id in &jobs {
        client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    }
    Ok(())
}
