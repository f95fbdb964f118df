//! A launch of the peers' workload under one runner, and its control plane: trainvisor's job
//! through the API, or torchrun's and Ray's launcher as a process group of this bench, with the
//! processes it started (found by a marker in their environment) and their memory.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::super::Client;
use super::{Runner, Workdir};

/// A running launch of the workload.
pub(super) enum Launch {
    Job(String),
    Process { child: Child, marker: String },
}

/// Processes whose environment holds `TRAINVISOR_BENCH_PEER=<marker>`: everything a launcher
/// started, however deep (Ray's daemons start their own sessions).
fn marked(marker: &str) -> Vec<u32> {
    let needle = format!("TRAINVISOR_BENCH_PEER={marker}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

/// (RSS, PSS) of a process in MiB.
fn memory_mb(pid: u32) -> Option<(f64, f64)> {
    let rss = super::super::rss_mb(pid).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let pss_kb: f64 = rollup
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())?;
    Some((rss, pss_kb / 1024.0))
}

fn process_name(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // `python …/ray/dashboard/dashboard.py` or `python3 …/bin/torchrun …` say more than
    // `python`: the first argument that is neither the interpreter nor an option.
    let base = |a: &String| a.rsplit('/').next().unwrap_or_default().to_string();
    let pick = args
        .iter()
        .take(4)
        .find(|a| !a.starts_with('-') && !base(a).starts_with("python"))
        .or(args.first())
        .cloned()
        .unwrap_or_default();
    pick.rsplit('/').next().unwrap_or_default().to_string()
}

pub(super) fn spawn(
    w: &Workdir,
    runner: Runner,
    events: &Path,
    log: &Path,
) -> anyhow::Result<Launch> {
    let marker = uuid::Uuid::new_v4().to_string();
    let bin = w.python.parent().context("venv bin")?;
    let mut cmd = match runner {
        Runner::Torchrun => {
            let mut c = Command::new(bin.join("torchrun"));
            c.args([
                "--standalone",
                "--nproc-per-node",
                "4",
                "--max-restarts",
                "3",
                "ddp_loop.py",
            ])
            .arg(events);
            c
        }
        Runner::Ray => {
            let mut c = Command::new(&w.python);
            c.arg("ray_train.py")
                .arg(events)
                .arg(w.runs.join("ray-storage"))
                .env("PYTHONPATH", &w.scripts);
            c
        }
        Runner::Trainvisor | Runner::TrainvisorWarm => {
            bail!("a trainvisor job is created through the API")
        }
    };
    let out = std::fs::File::create(log)?;
    let child = cmd
        .current_dir(&w.scripts)
        .env("TRAINVISOR_BENCH_PEER", &marker)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", runner.name()))?;
    Ok(Launch::Process { child, marker })
}

impl Launch {
    /// Why the launch is over, if it is.
    pub(super) async fn ended(&mut self, client: &Client) -> Option<String> {
        match self {
            Launch::Job(id) => {
                let job = client.get(&format!("/jobs/{id}")).await.ok()?;
                job["finished_at"]
                    .is_string()
                    .then(|| format!("job {}: {}", job["state"], job["reason"]))
            }
            Launch::Process { child, .. } => match child.try_wait() {
                Ok(Some(status)) => Some(format!("launcher exited ({status})")),
                _ => None,
            },
        }
    }

    /// The control plane's processes (rank processes excluded) and their memory.
    pub(super) fn control(&self, server_pid: u32, ranks: &HashSet<u32>) -> (f64, f64, String) {
        let pids = match self {
            Launch::Job(_) => vec![server_pid],
            Launch::Process { marker, .. } => marked(marker)
                .into_iter()
                .filter(|p| !ranks.contains(p))
                .collect(),
        };
        let mut by_name: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        let (mut rss, mut pss) = (0.0, 0.0);
        for pid in pids {
            if let Some((r, p)) = memory_mb(pid) {
                rss += r;
                pss += p;
                let entry = by_name.entry(process_name(pid)).or_default();
                entry.0 += 1;
                entry.1 += r;
            }
        }
        let mut list: Vec<(String, (usize, f64))> = by_name.into_iter().collect();
        list.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let processes = list
            .iter()
            .map(|(name, (n, r))| {
                if *n > 1 {
                    format!("{name} ×{n} {r:.0} MB")
                } else {
                    format!("{name} {r:.0} MB")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        (rss, pss, processes)
    }

    /// Asks the ranks to finish (the stop file) and waits for the launcher up to `patience`,
    /// then makes sure nothing is left.
    pub(super) async fn finish(self, client: &Client, events: &Path, patience: Duration) {
        let _ = std::fs::write(format!("{}.stop", events.display()), b"");
        match self {
            Launch::Job(id) => {
                let deadline = Instant::now() + patience;
                while Instant::now() < deadline {
                    match client.get(&format!("/jobs/{id}")).await {
                        Ok(j) if j["finished_at"].is_string() => return,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                let _ = client.post(&format!("/jobs/{id}/stop"), &json!({})).await;
            }
            Launch::Process { mut child, marker } => {
                let deadline = Instant::now() + patience;
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Whatever is left: the launcher's group, then every marked process.
                // SAFETY: signalling processes this bench started.
                unsafe {
                    libc::kill(-(child.id() as i32), libc::SIGKILL);
                }
                let _ = child.wait();
                for _ in 0..3 {
                    let left = marked(&marker);
                    if left.is_empty() {
                        break;
                    }
                    for pid in left {
                        // SAFETY: as above, found by the marker only this launch carries.
                        unsafe {
                            libc::kill(pid as i32, libc::SIGKILL);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
