//! Peers, side by side: the same 4-rank workload (torch DDP over gloo, `peers/ddp_loop.py`)
//! and the same kill -9 of rank 1, under trainvisor, torchrun (`--standalone
//! --nproc-per-node 4 --max-restarts 3`) and Ray Train (`DataParallelTrainer`,
//! `FailureConfig(max_failures=3)`, `peers/ray_train.py`), in the same run on the same machine.
//!
//! Each rank appends a JSON line per event to one file (`init` before `init_process_group`,
//! `step` after each optimizer step, with its pid and rank), so the three are timed the same
//! way: launch → every rank's first step; kill -9 → every rank of the restarted group (new
//! pids) has stepped. Control-plane memory is the RSS (and PSS) of everything the runner started
//! except the 4 rank processes: trainvisor's server; torchrun's agent; Ray's driver, GCS,
//! raylet, dashboard, controller and helper actors.
//!
//! The tools live in a venv the bench makes (and reuses) under `--peers-dir`, installed from
//! PyPI with pip; when that fails, or with `--no-peers` / `--quick`, the bench prints why and
//! goes on without them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;

use super::{Client, Figures, Notes, percentile};

mod events;
mod launch;
mod standby;

use events::Events;
use launch::{Launch, spawn};

pub const RAY: &str = "ray[train]==2.60.0";
pub const TORCH: &str = "torch==2.15.0";
const DDP_LOOP: &str = include_str!("peers/ddp_loop.py");
const RAY_TRAIN: &str = include_str!("peers/ray_train.py");
const WORLD: usize = 4;
/// Python, torch and (for Ray) a local cluster starting on 2 loaded cores: minutes, not seconds.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(600);
/// Ray recovered within 125 s at a load average of 20 on 2 cores; a group that has not
/// stepped after this long is recorded as hung.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);

pub struct PeersArgs {
    pub dir: PathBuf,
    pub trials: usize,
}

/// `$XDG_CACHE_HOME/trainvisor/bench-peers`, else `~/.cache/trainvisor/bench-peers`.
pub fn default_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("trainvisor").join("bench-peers")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Makes (or reuses) the venv with Ray Train and torch. Err is the reason to skip the peers.
pub(super) fn prepare(dir: &Path) -> anyhow::Result<PathBuf> {
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    let marker = venv.join(".trainvisor-bench");
    let wanted = format!("{RAY} {TORCH}\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    std::fs::create_dir_all(dir)?;
    if !python.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 not found (it makes the venv)")?;
        if !status.success() {
            bail!("`python3 -m venv {}` failed ({status})", venv.display());
        }
    }
    let log = dir.join("pip.log");
    eprintln!(
        "bench: installing {RAY} and {TORCH} from PyPI into {} (several GB; minutes); log: {}",
        venv.display(),
        log.display()
    );
    let t = Instant::now();
    let status = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--progress-bar", "off", RAY, TORCH])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .status()?;
    if !status.success() {
        let tail = last_line_matching(&log, |l| l.contains("ERROR") || l.contains("rror"))
            .unwrap_or_else(|| format!("pip {status}"));
        bail!(
            "pip install failed (is PyPI reachable?): {tail}; log: {}",
            log.display()
        );
    }
    eprintln!("bench: installed in {:.0} s", t.elapsed().as_secs_f64());
    std::fs::write(&marker, wanted)?;
    Ok(python)
}

fn last_line_matching(path: &Path, keep: impl Fn(&str) -> bool) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| keep(l))
        .map(|l| l.trim().chars().take(240).collect())
}

#[derive(Clone, Copy, PartialEq)]
enum Runner {
    Trainvisor,
    /// trainvisor with `warm_standby` (preload torch): the kill comes once every rank's
    /// standby is ready.
    TrainvisorWarm,
    Torchrun,
    Ray,
}

impl Runner {
    fn name(self) -> &'static str {
        match self {
            Runner::Trainvisor => "trainvisor",
            Runner::TrainvisorWarm => "trainvisor_warm",
            Runner::Torchrun => "torchrun",
            Runner::Ray => "ray",
        }
    }
}

struct Trial {
    launch_s: Option<f64>,
    recovery_s: Option<f64>,
    rss_mb: f64,
    pss_mb: f64,
    processes: String,
    outcome: String,
    /// Warm standby only: launch → every standby ready, and one standby's memory (MiB).
    standbys_ready_s: Option<f64>,
    standby_rss_mb: f64,
    standby_uss_mb: f64,
}

struct Workdir {
    scripts: PathBuf,
    python: PathBuf,
    runs: PathBuf,
}

/// Launch, first step, memory, kill -9 of rank 1, the restarted group's first step.
async fn trial(
    client: &Client,
    w: &Workdir,
    runner: Runner,
    n: usize,
    server_pid: u32,
) -> anyhow::Result<Trial> {
    let events_path = w.runs.join(format!("{}-{n}.events.jsonl", runner.name()));
    let log = w.runs.join(format!("{}-{n}.log", runner.name()));
    for stale in [
        events_path.clone(),
        PathBuf::from(format!("{}.stop", events_path.display())),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    let mut events = Events::new(events_path.clone());
    let t0 = unix_now();
    let mut launch = match runner {
        Runner::Trainvisor | Runner::TrainvisorWarm => {
            let mut spec = json!({"world_size": WORLD,
                    "command": [w.python, w.scripts.join("ddp_loop.py"), events_path],
                    "restart_scope": "job", "backoff_initial_ms": 0, "max_restarts": 3});
            if runner == Runner::TrainvisorWarm {
                // The default preload: torch and torch._dynamo.
                spec["warm_standby"] = json!(true);
            }
            let job = client.post("/jobs", &spec).await?;
            Launch::Job(job["job_id"].as_str().unwrap_or_default().to_string())
        }
        _ => spawn(w, runner, &events_path, &log)?,
    };
    let mut result = Trial {
        launch_s: None,
        recovery_s: None,
        rss_mb: f64::NAN,
        pss_mb: f64::NAN,
        processes: String::new(),
        outcome: String::new(),
        standbys_ready_s: None,
        standby_rss_mb: f64::NAN,
        standby_uss_mb: f64::NAN,
    };
    // Launch → every rank's first step.
    let started = Instant::now();
    let none = HashSet::new();
    let first = loop {
        events.refresh();
        if let Some(t) = events.group_stepped(t0, &none) {
            break Some(t);
        }
        if let Some(why) = launch.ended(client).await {
            result.outcome = format!("ended before every rank stepped: {why}");
            break None;
        }
        if started.elapsed() > LAUNCH_TIMEOUT {
            result.outcome = format!("no step from every rank within {LAUNCH_TIMEOUT:?}");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let Some(first) = first else {
        launch.finish(client, &events_path, Duration::ZERO).await;
        return Ok(result);
    };
    result.launch_s = Some(first - t0);
    // The group at work for a moment, then its control plane's memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    events.refresh();
    let ranks = events.pids();
    (result.rss_mb, result.pss_mb, result.processes) = launch.control(server_pid, &ranks);
    if let (Runner::TrainvisorWarm, Launch::Job(id)) = (runner, &launch) {
        match standby::ready(client, id, WORLD, LAUNCH_TIMEOUT).await {
            Ok(pids) => {
                result.standbys_ready_s = Some(unix_now() - t0);
                let rss: Vec<f64> = pids.iter().filter_map(|p| super::rss_mb(*p).ok()).collect();
                let uss: Vec<f64> = pids.iter().filter_map(|p| standby::uss_mb(*p)).collect();
                result.standby_rss_mb = median(&rss);
                result.standby_uss_mb = median(&uss);
            }
            Err(e) => {
                result.outcome = format!("the standbys never were all ready: {e:#}");
                launch.finish(client, &events_path, Duration::ZERO).await;
                return Ok(result);
            }
        }
    }
    // kill -9 of rank 1.
    let victim = events.rank_pid(1).context("rank 1 never stepped")?;
    let killed_at = unix_now();
    // SAFETY: a rank process of the launch this bench started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let started = Instant::now();
    loop {
        events.refresh();
        if let Some(t) = events.group_stepped(killed_at, &ranks) {
            result.recovery_s = Some(t - killed_at);
            result.outcome = "recovered".into();
            break;
        }
        let ended = launch.ended(client).await;
        if ended.is_some() || started.elapsed() > RECOVERY_TIMEOUT {
            let [procs, inits, ready, stepped] = events.after(killed_at, &ranks);
            let how = match ended {
                Some(why) => why,
                None => {
                    let stuck = stack_dumps(&events, killed_at, &ranks, &log).await;
                    format!("still running after {RECOVERY_TIMEOUT:?}{stuck}")
                }
            };
            let last_error = last_error(&log)
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            result.outcome = format!(
                "no restarted group stepped: {procs} new rank processes ({} launches of the \
                 group), {inits} entered init_process_group, {ready} left it, {stepped} \
                 stepped; {how}{last_error}",
                procs.div_ceil(WORLD)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A group that trains sees the stop file within a step; a hung one never will.
    let patience = Duration::from_secs(if result.recovery_s.is_some() { 60 } else { 0 });
    launch.finish(client, &events_path, patience).await;
    Ok(result)
}

/// The most telling error line of a launcher's log: a Python exception if there is one.
fn last_error(log: &Path) -> Option<String> {
    last_line_matching(log, |l| {
        l.contains("Error:") && !l.contains("Traceback") && !l.contains("rror: [Errno")
    })
    .or_else(|| last_line_matching(log, |l| l.contains("error") || l.contains("failed")))
}

/// Asks the rank processes of the restarted group that never stepped for their Python stacks
/// (ddp_loop.py dumps them on SIGUSR1 into the launcher's log); says where they are.
async fn stack_dumps(events: &Events, since: f64, old: &HashSet<u32>, log: &Path) -> String {
    let stepped: HashSet<u32> = events
        .all
        .iter()
        .filter(|e| e.phase == "step")
        .map(|e| e.pid)
        .collect();
    let stuck: HashSet<u32> = events
        .all
        .iter()
        .filter(|e| e.t > since && !old.contains(&e.pid) && !stepped.contains(&e.pid))
        .map(|e| e.pid)
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    if stuck.is_empty() {
        return String::new();
    }
    let before = std::fs::read_to_string(log).map(|l| l.len()).unwrap_or(0);
    for pid in &stuck {
        // SAFETY: a rank process of the launch this bench started; SIGUSR1 only prints.
        unsafe {
            libc::kill(*pid as i32, libc::SIGUSR1);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    if !log.exists() {
        // A trainvisor job: its ranks' stderr, stacks included, is in the job's log.
        return format!(
            ", {} live rank processes never stepped; their Python stacks (SIGUSR1) are in \
             the job's log",
            stuck.len()
        );
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let dumps = text.get(before..).unwrap_or_default();
    let inside = dumps.matches("in init_process_group").count();
    format!(
        ", {} live rank processes never stepped; their Python stacks (SIGUSR1, in the \
         launcher's log): {inside} inside init_process_group",
        stuck.len()
    )
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

pub async fn run(
    client: &Client,
    server_pid: u32,
    args: &PeersArgs,
    figures: &mut Figures,
    notes: &mut Notes,
) -> anyhow::Result<()> {
    let python = match prepare(&args.dir) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("skipped: {e:#}");
            eprintln!("bench: peers {why}");
            notes.insert("peers".into(), why);
            return Ok(());
        }
    };
    let versions = Command::new(&python)
        .args([
            "-c",
            "import platform, ray, torch; print('python', platform.python_version(), \
             '· ray', ray.__version__, '· torch', torch.__version__)",
        ])
        .output()
        .context("the venv's python")?;
    let versions = String::from_utf8_lossy(&versions.stdout).trim().to_string();
    notes.insert("peer_versions".into(), versions);
    let w = Workdir {
        scripts: args.dir.join("scripts"),
        runs: args.dir.join("runs"),
        python,
    };
    std::fs::create_dir_all(&w.scripts)?;
    std::fs::create_dir_all(&w.runs)?;
    std::fs::write(w.scripts.join("ddp_loop.py"), DDP_LOOP)?;
    std::fs::write(w.scripts.join("ray_train.py"), RAY_TRAIN)?;
    notes.insert(
        "peer_reproduce".into(),
        format!(
            "trainvisor bench --only peers --peers-dir {dir}  (or by hand: cd {s} && \
             ../venv/bin/torchrun --standalone --nproc-per-node 4 --max-restarts 3 ddp_loop.py \
             /tmp/ev.jsonl; PYTHONPATH=. ../venv/bin/python ray_train.py /tmp/ev.jsonl \
             /tmp/ray-storage; then kill -9 the pid of rank 1 from /tmp/ev.jsonl)",
            dir = args.dir.display(),
            s = w.scripts.display()
        ),
    );
    let mut recovery: HashMap<&str, f64> = HashMap::new();
    let mut launch: HashMap<&str, f64> = HashMap::new();
    let mut rss: HashMap<&str, f64> = HashMap::new();
    let (mut standby_ready, mut standby_rss, mut standby_uss) = (vec![], vec![], vec![]);
    for runner in [
        Runner::Trainvisor,
        Runner::TrainvisorWarm,
        Runner::Torchrun,
        Runner::Ray,
    ] {
        let name = runner.name();
        let (mut launches, mut recoveries, mut rsss, mut psss, mut outcomes) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut processes = String::new();
        for n in 0..args.trials {
            eprintln!(
                "bench: peers: {name}, trial {} of {}: launch, kill -9 of rank 1",
                n + 1,
                args.trials
            );
            let t = trial(client, &w, runner, n, server_pid).await?;
            eprintln!(
                "bench: peers: {name}: launch → first step {}, kill -9 → restarted group's \
                 first step {} ({})",
                fmt_s(t.launch_s),
                fmt_s(t.recovery_s),
                t.outcome
            );
            launches.extend(t.launch_s);
            recoveries.extend(t.recovery_s);
            standby_ready.extend(t.standbys_ready_s);
            if t.standby_rss_mb.is_finite() {
                standby_rss.push(t.standby_rss_mb);
                standby_uss.push(t.standby_uss_mb);
            }
            if t.rss_mb.is_finite() {
                rsss.push(t.rss_mb);
                psss.push(t.pss_mb);
                if processes.is_empty() {
                    processes = t.processes;
                }
            }
            outcomes.push(format!("trial {}: {}", n + 1, t.outcome));
        }
        let fig = |k: &str| format!("peer_{name}_{k}");
        figures.insert(fig("trials"), args.trials as f64);
        figures.insert(fig("recovered_trials"), recoveries.len() as f64);
        figures.insert(fig("recovery_s"), median(&recoveries));
        figures.insert(fig("recovery_min_s"), min(&recoveries));
        figures.insert(fig("recovery_max_s"), max(&recoveries));
        figures.insert(fig("launch_to_first_step_s"), median(&launches));
        figures.insert(fig("control_rss_mb"), median(&rsss));
        figures.insert(fig("control_pss_mb"), median(&psss));
        notes.insert(fig("note"), outcomes.join(" | "));
        notes.insert(fig("control_processes"), processes);
        recovery.insert(name, median(&recoveries));
        launch.insert(name, median(&launches));
        rss.insert(name, median(&rsss));
    }
    figures.insert(
        "standby_launch_to_all_ready_s".into(),
        median(&standby_ready),
    );
    figures.insert("standby_rss_mb".into(), median(&standby_rss));
    figures.insert("standby_uss_mb".into(), median(&standby_uss));
    figures.insert(
        "ratio_cold_vs_warm_recovery".into(),
        recovery["trainvisor"] / recovery["trainvisor_warm"],
    );
    // The other shape, measured rather than assumed: a fork server's children.
    match standby::fork_server_memory(&w.python, WORLD) {
        Ok((uss, pss, parent_rss, threads)) => {
            figures.insert("fork_server_child_uss_mb".into(), uss);
            figures.insert("fork_server_child_pss_mb".into(), pss);
            figures.insert("fork_server_parent_rss_mb".into(), parent_rss);
            figures.insert("torch_import_threads".into(), threads);
        }
        Err(e) => {
            notes.insert("fork_server".into(), format!("not measured: {e:#}"));
        }
    }
    for peer in ["torchrun", "ray"] {
        figures.insert(
            format!("ratio_{peer}_vs_trainvisor_recovery"),
            recovery[peer] / recovery["trainvisor"],
        );
        figures.insert(
            format!("ratio_{peer}_vs_trainvisor_launch"),
            launch[peer] / launch["trainvisor"],
        );
        figures.insert(
            format!("ratio_{peer}_vs_trainvisor_control_rss"),
            rss[peer] / rss["trainvisor"],
        );
    }
    Ok(())
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::min).unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |s| format!("{s:.1} s"))
}
