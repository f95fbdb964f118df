//! The command-line client (`submit`, `jobs`, `status`, `logs`, `stop`, `wait`): a thin layer
//! over the REST API. Readable output by default, `--json` for scripts. Errors from the
//! server are shown as its `{error, message}`.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

mod incidents;
pub mod job_id;
mod logs;
pub mod output;
mod table;

pub use logs::{LogsArgs, logs};
use output::{number, printable, printable_json};

use table::Align::{Left, Right};

pub struct Client {
    http: reqwest::Client,
    base: String,
    pub json: bool,
}

impl Client {
    pub fn new(server: &str, api_token: Option<&str>, json: bool) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = api_token
            && let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Client {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .expect("an HTTP client builds"),
            base: server.trim_end_matches('/').to_string(),
            json,
        }
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach the trainvisor server at {}", self.base))?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("request failed");
            bail!("{message} ({status})");
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Whether the server is on this host (a loopback URL).
    fn is_local(&self) -> bool {
        let rest = self
            .base
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.base);
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Prints `value` as JSON with `--json`, else as `readable` makes it; either way with
    /// the server's text escaped (see `output`).
    fn print(&self, value: &Value, readable: impl FnOnce(&Value) -> String) {
        if self.json {
            let json = serde_json::to_string_pretty(value).unwrap_or_default();
            println!("{}", printable_json(&json));
        } else {
            println!("{}", printable(&readable(value)));
        }
    }
}

/// `trainvisor health`: the server's version if `GET /health` answers ok within `timeout`.
pub async fn health(c: &Client, timeout: Duration) -> anyhow::Result<String> {
    let body = tokio::time::timeout(timeout, c.get("/health"))
        .await
        .map_err(|_| anyhow::anyhow!("{} did not answer /health within {timeout:?}", c.base))??;
    anyhow::ensure!(body["status"] == "ok", "{}/health answered {body}", c.base);
    Ok(body["version"].as_str().unwrap_or("?").to_string())
}

/// What `submit` sends.
#[derive(clap::Args)]
#[group(skip)]
pub struct Submit {
    /// Number of ranks (processes) to run. Default: the server's WORLD_SIZE.
    #[arg(long)]
    pub world_size: Option<u32>,
    /// Steps to train (the spec's total_steps; the built-in trainer stops there, and the ETA
    /// counts to it).
    #[arg(long)]
    pub steps: Option<u64>,
    /// A label shown in `jobs`, `status` and the page.
    #[arg(long)]
    pub name: Option<String>,
    /// Steps between checkpoints (the built-in trainer). Default: the server's CHECKPOINT_EVERY.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// What a failure restarts: `worker` (the failed rank) or `job` (every rank, as torchrun).
    #[arg(long)]
    pub restart_scope: Option<String>,
    /// Restarts allowed per rank before the job fails. Default: the server's MAX_RESTARTS.
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// The ranks' working directory. Default: this shell's directory when the server is on
    /// this host (a loopback URL), else the server's own.
    #[arg(long)]
    pub working_dir: Option<std::path::PathBuf>,
    /// Keep a warm standby beside each rank (a Python command: python script.py …).
    #[arg(long)]
    pub warm_standby: bool,
    /// With --warm-standby: a module each standby imports ahead (repeat for more; default
    /// torch and torch._dynamo).
    #[arg(long)]
    pub preload: Vec<String>,
    /// More spec fields as a JSON object, e.g. '{"lr": 0.05}'.
    #[arg(long)]
    pub spec: Option<String>,
    /// The argv of each rank.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub async fn submit(c: &Client, s: Submit) -> anyhow::Result<()> {
    let mut spec: Value = match &s.spec {
        Some(raw) => serde_json::from_str(raw).context("--spec must be a JSON object")?,
        None => json!({}),
    };
    let obj = spec
        .as_object_mut()
        .context("--spec must be a JSON object")?;
    let mut set = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(v) = s.world_size {
        set("world_size", json!(v));
    }
    if let Some(v) = s.steps {
        set("total_steps", json!(v));
    }
    if let Some(v) = s.name {
        set("name", json!(v));
    }
    if let Some(v) = s.checkpoint_every {
        set("checkpoint_every", json!(v));
    }
    if let Some(v) = s.restart_scope {
        set("restart_scope", json!(v));
    }
    if let Some(v) = s.max_restarts {
        set("max_restarts", json!(v));
    }
    if s.warm_standby {
        set("warm_standby", json!(true));
    }
    if !s.preload.is_empty() {
        set("preload", json!(s.preload));
    }
    if !s.command.is_empty() {
        set("command", json!(s.command));
    }
    // Paths in the command mean what they mean here: on the same host, run where the user is.
    let here = std::env::current_dir().ok();
    let guessed = s.working_dir.is_none() && c.is_local() && !obj.contains_key("working_dir");
    let dir = match s.working_dir {
        Some(d) => Some(here.map(|h| h.join(&d)).unwrap_or(d)),
        None if guessed => here,
        None => None,
    };
    if let Some(dir) = &dir {
        obj.insert("working_dir".into(), json!(dir));
    }
    let job = match c.post("/jobs", &spec).await {
        // A loopback URL can still be another file system (a container's published port):
        // then the ranks run where the server does, as without the guess.
        Err(e) if guessed && e.to_string().starts_with("working_dir:") => {
            eprintln!(
                "note: {} is not a directory on the server; the ranks run in the server's \
                 working directory (--working-dir sets one)",
                printable(&dir.map(|d| d.display().to_string()).unwrap_or_default())
            );
            if let Some(obj) = spec.as_object_mut() {
                obj.remove("working_dir");
            }
            c.post("/jobs", &spec).await?
        }
        res => res?,
    };
    c.print(&job, |j| {
        format!(
            "{}\nsubmitted: {} ranks, {}",
            j["job_id"].as_str().unwrap_or_default(),
            j["world_size"],
            match j["spec"]["command"].as_array() {
                Some(argv) => format!("command {}", Value::Array(argv.clone())),
                None => "the built-in trainer".to_string(),
            }
        )
    });
    Ok(())
}

pub async fn jobs(c: &Client, state: Option<String>) -> anyhow::Result<()> {
    let path = match &state {
        Some(s) => format!("/jobs?state={s}"),
        None => "/jobs".to_string(),
    };
    let jobs = c.get(&path).await?;
    if c.json {
        c.print(&jobs, |_| String::new());
        return Ok(());
    }
    // The summaries carry each job's step; a server too old to serve them leaves PROGRESS "-".
    let summaries = c.get("/jobs/summaries").await.unwrap_or(Value::Null);
    let progress_of = |id: &str| {
        summaries
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["job_id"] == id)
            .map(progress_cell)
            .unwrap_or_else(|| "-".into())
    };
    c.print(&jobs, |jobs| {
        let rows: Vec<Vec<String>> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .map(|j| {
                let id = j["job_id"].as_str().unwrap_or_default();
                vec![
                    id.to_string(),
                    j["state"].as_str().unwrap_or_default().to_string(),
                    fmt_opt(&j["world_size"], 0),
                    progress_of(id),
                    fmt_opt(&j["restarts"], 0),
                    j["created_at"].as_str().unwrap_or_default().to_string(),
                    j["name"].as_str().unwrap_or("").to_string(),
                ]
            })
            .collect();
        table::render(
            &[
                ("JOB", Left),
                ("STATE", Left),
                ("RANKS", Right),
                ("PROGRESS", Right),
                ("RESTARTS", Right),
                ("CREATED", Left),
                ("NAME", Left),
            ],
            &rows,
        )
    });
    Ok(())
}

/// `1200/2000 60%` for a job that knows its total, `step 1200` for one that does not, `-`
/// before any step.
fn progress_cell(s: &Value) -> String {
    match (s["step"].as_u64(), s["total_steps"].as_u64()) {
        (Some(step), Some(total)) if total > 0 => format!(
            "{step}/{total} {}%",
            (step.min(total) as f64 * 100.0 / total as f64).floor()
        ),
        (Some(step), _) => format!("step {step}"),
        _ => "-".into(),
    }
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => number(f, digits),
        Some(_) => v.to_string(),
        None => "-".to_string(),
    }
}

fn describe_summary(s: &Value) -> String {
    let eta = match s["eta_s"].as_f64() {
        Some(eta) => format!("{} s", number(eta, 0)),
        None => "-".to_string(),
    };
    let mut out = format!(
        "job {}  {}\nstate {}{}\nstep {} / {}  steps/s {}  ETA {eta}  loss {}  restarts {}  last checkpoint {}\n",
        s["job_id"].as_str().unwrap_or_default(),
        s["name"].as_str().unwrap_or(""),
        s["state"].as_str().unwrap_or_default(),
        s["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        fmt_opt(&s["step"], 0),
        fmt_opt(&s["total_steps"], 0),
        fmt_opt(&s["steps_per_s"], 1),
        fmt_opt(&s["loss"], 4),
        fmt_opt(&s["restarts"], 0),
        fmt_opt(&s["last_checkpoint_step"], 0),
    );
    if let Some(why) = s["no_step_data"].as_str() {
        out.push_str(why);
        out.push('\n');
    }
    let workers = s["workers"].as_array().cloned().unwrap_or_default();
    // A STANDBY column for jobs with warm standbys.
    let standbys = workers
        .iter()
        .any(|w| w["standby"].is_object() || w["warm_start"] == true);
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let mut state = w["state"].as_str().unwrap_or_default().to_string();
            if w["straggler"] == true {
                state.push_str(" (straggler)");
            }
            if w["warm_start"] == true {
                state.push_str(" (warm)");
            }
            let mut row = vec![
                fmt_opt(&w["rank"], 0),
                state,
                fmt_opt(&w["pid"], 0),
                fmt_opt(&w["attempt"], 0),
                fmt_opt(&w["step"], 0),
                fmt_opt(&w["steps_per_s"], 1),
                w["heartbeat_age_s"]
                    .as_f64()
                    .map(|a| format!("{}s ago", number(a, 1)))
                    .unwrap_or("-".into()),
            ];
            if standbys {
                let sb = &w["standby"];
                row.push(match (sb["state"].as_str(), sb["pid"].as_u64()) {
                    (Some(state), Some(pid)) => format!("{state} {pid}"),
                    _ => "-".into(),
                });
            }
            row
        })
        .collect();
    let mut columns = vec![
        ("RANK", Right),
        ("STATE", Left),
        ("PID", Right),
        ("ATTEMPT", Right),
        ("STEP", Right),
        ("STEPS/S", Right),
        ("HEARTBEAT", Right),
    ];
    if standbys {
        columns.push(("STANDBY", Left));
    }
    out.push_str(&table::render(&columns, &rows));
    if let Some(off) = s["standby_off"].as_str() {
        out.push_str(off);
        out.push('\n');
    }
    out
}

pub async fn status(c: &Client, job: &str) -> anyhow::Result<()> {
    let job = &job_id::resolve(c, job).await?;
    let s = c.get(&format!("/jobs/{job}/summary")).await?;
    if c.json {
        c.print(&s, describe_summary);
        return Ok(());
    }
    let all = c.get(&format!("/jobs/{job}/incidents")).await?;
    let all = all.as_array().cloned().unwrap_or_default();
    let mut text = describe_summary(&s);
    if let Some(line) = incidents::describe_goodput(&s["goodput"]) {
        text.push('\n');
        text.push_str(&line);
    }
    if let Some(line) = incidents::describe_notice(&s["last_notice"]) {
        text.push('\n');
        text.push_str(&line);
    }
    if !all.is_empty() {
        text.push_str("\nincidents:\n");
        text.push_str(&incidents::describe_incidents(&all));
    }
    println!("{}", printable(&text));
    Ok(())
}

pub async fn stop(c: &Client, job: &str) -> anyhow::Result<()> {
    let job = &job_id::resolve(c, job).await?;
    let j = c.post(&format!("/jobs/{job}/stop"), &json!({})).await?;
    c.print(&j, |j| {
        format!(
            "{} {}",
            j["job_id"].as_str().unwrap_or_default(),
            j["state"].as_str().unwrap_or_default()
        )
    });
    Ok(())
}

/// Shows a progress bar until the job ends; the exit code is the job's outcome.
pub async fn wait(c: &Client, job: &str) -> anyhow::Result<i32> {
    let job = &job_id::resolve(c, job).await?;
    let tty = !c.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = String::new();
    // Not on a terminal (a pipe, a file, CI logs): one line per change of state or restart
    // count, and one every PIPE_EVERY while nothing changes, each with its time.
    let mut last_change: Option<(String, u64)> = None;
    let mut last_print = std::time::Instant::now();
    loop {
        let s = c.get(&format!("/jobs/{job}/summary")).await?;
        let state = s["state"].as_str().unwrap_or_default().to_string();
        if !c.json {
            let line = printable(&progress_line(&s));
            if tty {
                if line != last_line {
                    eprint!("\r\x1b[2K{line}");
                    last_line = line;
                }
            } else {
                let change = (state.clone(), s["restarts"].as_u64().unwrap_or(0));
                if last_change.as_ref() != Some(&change) || last_print.elapsed() >= PIPE_EVERY {
                    eprintln!("{} {line}", chrono::Utc::now().format("%H:%M:%S"));
                    last_change = Some(change);
                    last_print = std::time::Instant::now();
                }
            }
        }
        if matches!(state.as_str(), "succeeded" | "failed" | "stopped") {
            if tty {
                eprintln!();
            }
            c.print(&s, |s| {
                format!(
                    "job {} {}{}",
                    s["job_id"].as_str().unwrap_or_default(),
                    state,
                    s["reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )
            });
            return Ok(match state.as_str() {
                "succeeded" => 0,
                "failed" => 1,
                _ => 2,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often `wait` writes a line to a pipe or file while nothing changes.
const PIPE_EVERY: Duration = Duration::from_secs(10);

fn progress_line(s: &Value) -> String {
    let step = s["step"].as_u64();
    let total = s["total_steps"].as_u64();
    let bar = match (step, total) {
        (Some(step), Some(total)) if total > 0 => {
            let width = 30;
            let done = ((step.min(total) as f64 / total as f64) * width as f64) as usize;
            format!(
                "[{}{}] {step}/{total}",
                "#".repeat(done),
                "-".repeat(width - done)
            )
        }
        (Some(step), _) => format!("step {step}"),
        _ => "no step reported yet".to_string(),
    };
    format!(
        "{} {bar}  {} steps/s  ETA {}  restarts {}",
        s["state"].as_str().unwrap_or_default(),
        fmt_opt(&s["steps_per_s"], 1),
        s["eta_s"]
            .as_f64()
            .map(|e| format!("{e:.0}s"))
            .unwrap_or("-".into()),
        s["restarts"]
    )
}
