//! The warm-standby side of the peers scenario: waiting for a job's standbys, their memory,
//! and what a fork server would cost instead (measured, not assumed).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::super::Client;

/// Waits until every rank of job `id` has a ready standby; their pids.
pub async fn ready(
    client: &Client,
    id: &str,
    world: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<u32>> {
    let started = Instant::now();
    loop {
        let s = client.get(&format!("/jobs/{id}/summary")).await?;
        let pids: Vec<u32> = s["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["standby"]["state"] == "ready")
            .filter_map(|w| w["standby"]["pid"].as_u64().map(|p| p as u32))
            .collect();
        if pids.len() == world {
            return Ok(pids);
        }
        if let Some(off) = s["standby_off"].as_str() {
            bail!("{off}");
        }
        if started.elapsed() > timeout {
            bail!("{} of {world} standbys ready after {timeout:?}", pids.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a fork server would hold instead of one standby per rank: a parent that imports the
/// default preload (torch, torch._dynamo) and forks `world` children, measured by the kernel
/// (RSS, PSS, private = USS), with the parent's thread count after the import (fork is only
/// safe while it is 1).
const FORK_PROBE: &str = r#"import json, os, sys, time
def mem(pid):
    out = {}
    for line in open("/proc/%d/smaps_rollup" % pid):
        parts = line.split()
        if parts[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
            out[parts[0][:-1]] = int(parts[1]) / 1024.0
    out["Uss"] = out.pop("Private_Clean") + out.pop("Private_Dirty")
    return out
def threads(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("Threads:"):
            return int(line.split()[1])
for name in sys.argv[2:]:
    __import__(name)
world = int(sys.argv[1])
parent_threads = threads(os.getpid())
kids = []
for _ in range(world):
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
time.sleep(1.0)
print(json.dumps({"parent": mem(os.getpid()), "children": [mem(k) for k in kids],
                  "parent_threads": parent_threads}))
for k in kids:
    os.kill(k, 9)
    os.waitpid(k, 0)
"#;

/// (per-child USS, per-child PSS, parent RSS, parent threads after importing torch), MiB.
pub fn fork_server_memory(python: &Path, world: usize) -> anyhow::Result<(f64, f64, f64, f64)> {
    let out = Command::new(python)
        .args(["-c", FORK_PROBE, &world.to_string()])
        .args(crate::spec::DEFAULT_PRELOAD)
        .output()
        .context("the fork-server probe")?;
    if !out.status.success() {
        bail!(
            "the fork-server probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let kids = v["children"].as_array().context("children")?;
    let mean =
        |k: &str| kids.iter().filter_map(|c| c[k].as_f64()).sum::<f64>() / kids.len().max(1) as f64;
    Ok((
        mean("Uss"),
        mean("Pss"),
        v["parent"]["Rss"].as_f64().unwrap_or(f64::NAN),
        v["parent_threads"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// USS (private memory) of a process, MiB.
pub fn uss_mb(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb = |name: &str| -> f64 {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0)
    };
    Some((kb("Private_Clean:") + kb("Private_Dirty:")) / 1024.0)
}
