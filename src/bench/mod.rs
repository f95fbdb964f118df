//! `trainvisor bench`: end-to-end figures against a real server this command starts (the same
//! binary, as a child process, on a temp data dir). Times come from the server's own history
//! (microsecond timestamps) compared with the moment the bench sent the signal.

mod accounting;
mod api;
mod checkpoint;
mod docker;
mod notice;
pub mod observe;
pub mod peers;
mod recovery;
mod s3;
mod scale;
mod slurm;
mod training;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub struct BenchArgs {
    pub quick: bool,
    pub out: PathBuf,
    /// Run only these scenarios (`SCENARIOS`); all when empty.
    pub only: Vec<String>,
    /// Leave out Ray Train and torchrun.
    pub no_peers: bool,
    pub peers: peers::PeersArgs,
}

/// The scenarios, in the order they run (names for `--only`).
pub const SCENARIOS: &[&str] = &[
    "recovery",
    "hang",
    "api",
    "sse",
    "scale",
    "accounting",
    "training",
    "checkpoint",
    "notice",
    "slurm",
    "docker",
    "peers",
    "observe",
    "s3",
];

/// Figures by name, e.g. `restart_worker_scope_p50_ms`. A figure that could not be measured
/// (a peer that never recovered) is NaN here and `null` in the JSON, with a note saying why.
pub type Figures = BTreeMap<String, f64>;
/// What a figure alone cannot say, by name: why a peer was skipped or timed out, versions.
pub type Notes = BTreeMap<String, String>;

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    for name in &args.only {
        if !SCENARIOS.contains(&name.as_str()) {
            bail!(
                "no scenario {name:?}; the scenarios are {}",
                SCENARIOS.join(", ")
            );
        }
    }
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|n| n == name);
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut figures = Figures::new();
        let mut notes = Notes::new();
        // The load when the run started: figures from a busy machine are noisy.
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        notes.insert(
            "load_average_at_start".into(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        let dir = tempfile_dir()?;
        let server = Server::start(&dir, "127.0.0.1:0", None)?;
        figures.insert(
            "server_startup_ms".into(),
            server.startup.as_secs_f64() * 1e3,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        figures.insert("idle_rss_mb".into(), rss_mb(server.child.id())?);
        let client = Client::new(&server.url, None);
        let kills = if args.quick { 10 } else { 50 };
        if want("recovery") {
            eprintln!("bench: kill -9, worker scope ({kills} kills)");
            recovery::worker_scope(&client, kills, &mut figures)
                .await
                .context("worker-scope recovery")?;
            for w in [4, 8] {
                eprintln!("bench: kill -9, job scope, W={w}");
                recovery::job_scope(&client, w, kills / 2, &mut figures)
                    .await
                    .context("job-scope recovery")?;
            }
        }
        if want("hang") {
            eprintln!("bench: hang detection");
            recovery::hang(&client, if args.quick { 5 } else { 20 }, &mut figures)
                .await
                .context("hang detection")?;
        }
        if want("api") {
            eprintln!("bench: API requests");
            api::requests(&client, &server.url, args.quick, &mut figures)
                .await
                .context("API load")?;
        }
        if want("sse") {
            // The smoke run (--quick, a debug build in CI) leaves out the 1,000-subscriber
            // case: same code, minutes of catch-up reads on a loaded debug server.
            let counts: &[usize] = if args.quick { &[100] } else { &[100, 1000] };
            for &subscribers in counts {
                eprintln!("bench: SSE fan-out to {subscribers} subscribers");
                let seconds = if args.quick || subscribers > 100 {
                    1
                } else {
                    3
                };
                api::fanout(
                    &client,
                    &server.url,
                    subscribers,
                    seconds,
                    server.child.id(),
                    &mut figures,
                )
                .await
                .context("SSE fan-out")?;
            }
        }
        if want("scale") {
            let workers = if args.quick { 200 } else { 1000 };
            eprintln!("bench: {workers} workers heartbeating at 1 Hz");
            scale::heartbeats(
                &client,
                server.child.id(),
                workers,
                if args.quick { 3 } else { 10 },
                &mut figures,
            )
            .await
            .context("control-plane scale")?;
        }
        if want("accounting") {
            eprintln!("bench: the cost of the accounting (incidents, stragglers, samples)");
            accounting::run(&dir, args.quick, &mut figures)
                .await
                .context("accounting cost")?;
        }
        if want("training") {
            eprintln!("bench: training and checkpoints");
            training::run(&client, &dir, args.quick, &mut figures)
                .await
                .context("training")?;
        }
        if want("checkpoint") {
            eprintln!("bench: checkpoints of 4 × 64 KiB and 4 × 16 MiB parts");
            checkpoint::run(&client, &dir, args.quick, &mut figures)
                .await
                .context("checkpoint parts")?;
        }
        if want("notice") {
            eprintln!("bench: save on notice, 4 ranks, 64 KiB and 16 MiB parts");
            notice::run(&client, &dir, args.quick, &mut figures)
                .await
                .context("save on notice")?;
        }
        if want("slurm") {
            let kills = if args.quick { 10 } else { 30 };
            eprintln!("bench: Slurm relaunch ({kills} kills)");
            slurm::relaunch(&client, &dir, kills, &mut figures)
                .await
                .context("Slurm relaunch")?;
        }
        if want("docker") {
            let kills = if args.quick { 5 } else { 30 };
            eprintln!("bench: container rank kill -9 → replacement ({kills} kills)");
            docker::recovery(&dir, kills, &mut figures, &mut notes)
                .await
                .context("Docker recovery")?;
        }
        if want("peers") {
            let skip = if args.quick {
                Some("skipped: --quick")
            } else if args.no_peers {
                Some("skipped: --no-peers")
            } else {
                None
            };
            match skip {
                Some(why) => {
                    eprintln!("bench: peers (Ray Train, torchrun) {why}");
                    notes.insert("peers".into(), why.into());
                }
                None => {
                    eprintln!(
                        "bench: peers: the same DDP workload under trainvisor, torchrun, Ray Train"
                    );
                    peers::run(
                        &client,
                        server.child.id(),
                        &args.peers,
                        &mut figures,
                        &mut notes,
                    )
                    .await
                    .context("peers")?;
                }
            }
        }
        if want("observe") {
            if args.quick {
                eprintln!("bench: an unchanged torch script observed: skipped: --quick");
                notes.insert("observe".into(), "skipped: --quick".into());
            } else {
                eprintln!("bench: an unchanged torch script observed (hook cost, kill -9 errors)");
                let python = peers::prepare(&args.peers.dir).context("the torch venv")?;
                observe::run(&client, &python, &dir.join("observe"), &mut figures)
                    .await
                    .context("observe")?;
            }
        }
        if want("s3") {
            eprintln!("bench: checkpoint upload to S3 (s3s-fs on loopback)");
            s3::run(args.quick, &mut figures)
                .await
                .context("S3 checkpoints")?;
        }
        figures.insert("server_rss_after_mb".into(), rss_mb(server.child.id())?);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        notes.insert(
            "bench_wall_s".into(),
            format!("{:.0}", started.elapsed().as_secs_f64()),
        );
        report(&args, &figures, &notes)
    })
}

fn report(args: &BenchArgs, figures: &Figures, notes: &Notes) -> anyhow::Result<()> {
    let machine = machine();
    // serde_json writes a NaN figure as null.
    let doc = json!({ "figures": figures, "notes": notes, "machine": machine,
                      "quick": args.quick, "only": args.only, "at": crate::store::now() });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("| figure | value |\n|---|---|");
    for (k, v) in figures {
        if v.is_finite() {
            println!("| `{k}` | {v:.2} |");
        } else {
            println!("| `{k}` | — |");
        }
    }
    for (k, v) in notes {
        println!("| `{k}` | {v} |");
    }
    println!("\nmachine: {machine}\nwritten to {}", args.out.display());
    Ok(())
}

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gb": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel.trim(),
    })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trainvisor-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The environment of a process, from /proc/PID/environ.
pub fn environ(pid: u32) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter_map(|var| {
            let var = String::from_utf8_lossy(var);
            let (k, v) = var.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// Resident set size of a process, in MiB.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// The server under test: this binary's `serve`, on port 0.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
    startup: Duration,
}

impl Server {
    /// The server on `bind`, with `token` as its API token, on `<dir>/data`.
    pub(crate) fn start(dir: &Path, bind: &str, token: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with(dir, bind, token, &[])
    }

    /// As [`Server::start`], with more `serve` flags.
    pub(crate) fn start_with(
        dir: &Path,
        bind: &str,
        token: Option<&str>,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(dir, bind, token, flags, Stdio::inherit())
    }

    /// A server on a free loopback port whose log (stderr) goes to `log`, not to this
    /// terminal (what `validate` starts).
    pub(crate) fn start_logging_to(dir: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        Self::spawn(dir, "127.0.0.1:0", None, &[], Stdio::from(log))
    }

    fn spawn(
        dir: &Path,
        bind: &str,
        token: Option<&str>,
        flags: &[&str],
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "serve",
            "--bind",
            bind,
            "--kill-grace-ms",
            "200",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .args(flags)
        .env("RUST_LOG", "warn")
        .env_remove("TRAINVISOR_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(stderr);
        if let Some(token) = token {
            cmd.env("TRAINVISOR_API_TOKEN", token);
        }
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let startup = t0.elapsed();
        let Some(url) = line.trim().strip_prefix("trainvisor listening on ") else {
            bail!("server did not start: {line:?}");
        };
        Ok(Server {
            // A server on every address is reached on loopback.
            url: url.replace("0.0.0.0", "127.0.0.1"),
            child,
            startup,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A small JSON client for the bench scenarios.
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub(crate) fn new(base: &str, token: Option<&str>) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Client {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .expect("an HTTP client"),
            base: base.to_string(),
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let res = self.http.get(format!("{}{path}", self.base)).send().await?;
        if !res.status().is_success() {
            bail!("GET {path}: {}", res.status());
        }
        Ok(res.json().await?)
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("POST {path}: {} {}", res.status(), res.text().await?);
        }
        Ok(res.json().await?)
    }

    /// GET `path`: its status and the value of `header`.
    pub async fn head_header(
        &self,
        path: &str,
        header: &str,
    ) -> anyhow::Result<(u16, Option<String>)> {
        let res = self.http.get(format!("{}{path}", self.base)).send().await?;
        let value = res
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((res.status().as_u16(), value))
    }

    /// GET `path` as text, until the body holds `needle`, ends, or `timeout` passes.
    pub async fn text_until(
        &self,
        path: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        use futures_util::StreamExt;
        let res = self.http.get(format!("{}{path}", self.base)).send().await?;
        if !res.status().is_success() {
            bail!("GET {path}: {}", res.status());
        }
        let mut body = res.bytes_stream();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk?));
            if text.contains(needle) {
                break;
            }
        }
        Ok(text)
    }

    /// Polls `check` every millisecond until it yields a value (or 120 s pass: a bound for a
    /// stuck scenario on a loaded machine, not a measurement).
    pub async fn poll<T, F, Fut>(&self, mut check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(v) = check().await? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("timed out");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The pids of a summary's ranks that have a process.
pub fn running_pids(summary: &Value) -> Vec<u32> {
    summary["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

/// p-th percentile (0–100) of a sample, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Milliseconds between two RFC 3339 timestamps.
pub fn ms_between(from: &str, to: &str) -> anyhow::Result<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(from)?;
    let b = chrono::DateTime::parse_from_rfc3339(to)?;
    Ok((b - a).num_microseconds().context("overflow")? as f64 / 1000.0)
}

pub fn insert_percentiles(figures: &mut Figures, name: &str, values: &[f64]) {
    figures.insert(format!("{name}_p50_ms"), percentile(values, 50.0));
    figures.insert(format!("{name}_p99_ms"), percentile(values, 99.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
