//! `trainvisor validate`: checks an installation end to end, against a running server or one
//! it starts itself — a small dataset, a 2-rank job, a kill -9 of a rank that must come back
//! from its checkpoint with the exact model of a failure-free run, the SSE log stream and the
//! history — and prints a pass/fail list with timings (exit 0 or 1; `--json`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench::{Client, Server};
use crate::client::output::{printable, printable_json};
use crate::trainer::data::{DatasetParams, make_dataset};

pub struct ValidateArgs {
    /// A running server; none starts one on a temp data dir.
    pub server: Option<String>,
    pub token: Option<String>,
    pub json: bool,
}

#[derive(Serialize)]
struct Check {
    name: String,
    /// `ok`, `failed` or `skipped`.
    result: &'static str,
    ms: f64,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    server: String,
    started_here: bool,
    checks: Vec<Check>,
    passed: usize,
    failed: usize,
    /// Against a running server: what became of the check's jobs.
    cleanup: Option<String>,
}

/// How long one wait may take before its check fails (a loaded machine, not a measurement).
const PATIENCE: Duration = Duration::from_secs(120);

pub fn run(args: ValidateArgs) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(validate(args))
}

async fn validate(args: ValidateArgs) -> anyhow::Result<i32> {
    let dir = std::env::temp_dir().join(format!("trainvisor-validate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let started_here = args.server.is_none();
    // The server started here logs to a file (its warnings, such as the kill's "rank failed;
    // restarting", are expected), shown only when a check fails.
    let server_log = dir.join("server.log");
    let (server, url) = match &args.server {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let server = Server::start_logging_to(&dir, &server_log)?;
            let url = server.url.clone();
            (Some(server), url)
        }
    };
    let client = Client::new(&url, args.token.as_deref());
    // A kill -9 needs the ranks on this host: a server started here, or one on loopback.
    let local = started_here || url.contains("://127.0.0.1") || url.contains("://localhost");
    let mut checks = Vec::new();
    let mut run = Checks {
        client: &client,
        checks: &mut checks,
        print: !args.json,
        jobs: Vec::new(),
    };
    if !args.json {
        println!(
            "trainvisor validate: server {url}{}",
            if started_here {
                " (started for this check)"
            } else {
                ""
            }
        );
    }
    run.all(&dir, local).await;
    let jobs = std::mem::take(&mut run.jobs);
    let failed = checks.iter().filter(|c| c.result == "failed").count();
    // A server of the user's keeps no trace of the check, unless it failed: then its jobs
    // are what to look at.
    let cleanup = match (&server, failed) {
        (Some(_), _) => None,
        (None, 0) => Some(remove_jobs(&client, &jobs).await),
        (None, _) => Some(format!(
            "its jobs are left on the server to look at: {}",
            jobs.join(", ")
        )),
    };
    drop(server);
    if failed > 0
        && started_here
        && let Ok(log) = std::fs::read_to_string(&server_log)
    {
        eprintln!("the server's log:\n{}", printable(&log));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let passed = checks.iter().filter(|c| c.result == "ok").count();
    if args.json {
        let report = Report {
            server: url,
            started_here,
            checks,
            passed,
            failed,
            cleanup,
        };
        println!(
            "{}",
            printable_json(&serde_json::to_string_pretty(&report)?)
        );
    } else {
        if let Some(cleanup) = cleanup {
            println!("{}", printable(&cleanup));
        }
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

struct Checks<'a> {
    client: &'a Client,
    checks: &'a mut Vec<Check>,
    print: bool,
    /// The jobs the check submitted.
    jobs: Vec<String>,
}

/// Deletes the check's jobs (stopping any still running); says what became of them.
async fn remove_jobs(client: &Client, jobs: &[String]) -> String {
    if jobs.is_empty() {
        return "no jobs were left on the server".into();
    }
    match client
        .post("/jobs/purge", &json!({"job_ids": jobs, "force": true}))
        .await
    {
        Ok(_) => format!("its {} jobs were deleted from the server", jobs.len()),
        Err(e) => format!("its jobs could not be deleted ({e:#}): {}", jobs.join(", ")),
    }
}

/// The spec of the check's jobs: synchronous training with frequent checkpoints and a pace
/// slow enough to kill a rank mid-way.
fn job_spec(dataset: &Path) -> Value {
    json!({"world_size": 2, "name": "trainvisor-validate", "dataset": dataset,
           "total_steps": 80, "batch_size": 16, "checkpoint_every": 5, "lr": 0.2, "seed": 3,
           "sleep_sec": 0.02, "backoff_initial_ms": 0, "restart_scope": "job"})
}

impl Checks<'_> {
    fn record(&mut self, name: &str, t0: Instant, result: anyhow::Result<String>) -> bool {
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let (result, detail) = match result {
            Ok(detail) => ("ok", detail),
            Err(e) => ("failed", format!("{e:#}")),
        };
        if self.print {
            let tag = if result == "ok" { "ok    " } else { "FAILED" };
            let extra = if detail.is_empty() {
                String::new()
            } else {
                format!("  ({detail})")
            };
            // A detail may quote the server or a rank: shown escaped, as by every command.
            let extra = printable(&extra);
            println!("  {tag} {name:<46} {ms:>8.0} ms{extra}");
        }
        self.checks.push(Check {
            name: name.to_string(),
            result,
            ms,
            detail,
        });
        result == "ok"
    }

    fn skip(&mut self, name: &str, why: &str) {
        if self.print {
            println!("  skip   {name:<46}             ({why})");
        }
        self.checks.push(Check {
            name: name.to_string(),
            result: "skipped",
            ms: 0.0,
            detail: why.to_string(),
        });
    }

    async fn all(&mut self, dir: &Path, local: bool) {
        let t = Instant::now();
        let health = self.client.get("/health").await.map(|h| {
            format!(
                "version {}",
                h["version"].as_str().unwrap_or("?").trim_matches('"')
            )
        });
        if !self.record("server answers /health", t, health) {
            return;
        }
        let t = Instant::now();
        let dataset = dir.join("dataset");
        let made = make_small_dataset(&dataset);
        if !self.record("small dataset made (4 shards)", t, made) {
            return;
        }
        let t = Instant::now();
        let reference = self.reference(&dataset).await;
        let Some(expected) = self.record_value("failure-free 2-rank job trains", t, reference)
        else {
            return;
        };
        let t = Instant::now();
        let id = match self.client.post("/jobs", &job_spec(&dataset)).await {
            Ok(job) => {
                let id = job["job_id"].as_str().unwrap_or_default().to_string();
                self.jobs.push(id.clone());
                id
            }
            Err(e) => {
                self.record("2-rank job submitted", t, Err(e));
                return;
            }
        };
        let running = self.running_past(&id, 20).await;
        let Some(pids) = self.record_value("2-rank job running past step 20", t, running) else {
            return;
        };
        if local {
            let t = Instant::now();
            let restarted = self.kill_and_resume(&id, &pids).await;
            self.record("kill -9 of rank 1 restarted from checkpoint", t, restarted);
        } else {
            self.skip(
                "kill -9 of rank 1 restarted from checkpoint",
                "the server is not on this host",
            );
        }
        let t = Instant::now();
        let exact = self.same_model(&id, &expected).await;
        self.record("final model equals the failure-free run", t, exact);
        let t = Instant::now();
        let sse = self.sse(&id).await;
        self.record("SSE log stream delivers lines", t, sse);
        let t = Instant::now();
        let history = self.history(&id, local).await;
        self.record("history recorded", t, history);
    }

    fn record_value<T>(
        &mut self,
        name: &str,
        t0: Instant,
        r: anyhow::Result<(T, String)>,
    ) -> Option<T> {
        match r {
            Ok((v, detail)) => {
                self.record(name, t0, Ok(detail));
                Some(v)
            }
            Err(e) => {
                self.record(name, t0, Err(e));
                None
            }
        }
    }

    async fn wait_end(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let job = self.client.get(&format!("/jobs/{id}")).await?;
            if matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "stopped")
            ) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} did not end in {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn model_sha(&self, id: &str) -> anyhow::Result<String> {
        let (status, sha) = self
            .client
            .head_header(&format!("/jobs/{id}/model"), "x-model-sha256")
            .await?;
        if status != 200 {
            bail!("GET /jobs/{id}/model: {status}");
        }
        sha.context("no x-model-sha256 header")
    }

    async fn reference(&mut self, dataset: &Path) -> anyhow::Result<(String, String)> {
        let mut spec = job_spec(dataset);
        spec["sleep_sec"] = json!(0.0);
        let job = self.client.post("/jobs", &spec).await?;
        let id = job["job_id"].as_str().unwrap_or_default().to_string();
        self.jobs.push(id.clone());
        let end = self.wait_end(&id).await?;
        if end["state"] != "succeeded" {
            bail!("job {id} ended {}: {}", end["state"], end["reason"]);
        }
        let sha = self.model_sha(&id).await?;
        Ok((sha.clone(), format!("model {}", &sha[..12.min(sha.len())])))
    }

    async fn running_past(&self, id: &str, step: u64) -> anyhow::Result<(Vec<u32>, String)> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.client.get(&format!("/jobs/{id}/summary")).await?;
            let pids = crate::bench::running_pids(&s);
            if s["step"].as_u64().unwrap_or(0) >= step && pids.len() == 2 {
                return Ok((pids, format!("step {}", s["step"])));
            }
            if s["state"] != "running" && s["state"] != "pending" {
                bail!(
                    "the job ended {} before step {step}: {}",
                    s["state"],
                    s["reason"]
                );
            }
            if Instant::now() > deadline {
                bail!("not running past step {step} in {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill_and_resume(&self, id: &str, pids: &[u32]) -> anyhow::Result<String> {
        let victim = *pids.get(1).context("rank 1 has no pid")?;
        // SAFETY: kill(2) on the pid the server reports for rank 1 of our own job.
        unsafe {
            libc::kill(victim as libc::pid_t, libc::SIGKILL);
        }
        let end = self.wait_end(id).await?;
        if end["state"] != "succeeded" {
            bail!("the job ended {}: {}", end["state"], end["reason"]);
        }
        let restarts = self.client.get(&format!("/jobs/{id}/restarts")).await?;
        let first = restarts
            .as_array()
            .and_then(|r| r.first())
            .context("no restart was recorded")?;
        if first["rank"] != 1 || first["reason"] != "signal" {
            bail!("unexpected restart: {first}");
        }
        let logs = self
            .client
            .get(&format!("/jobs/{id}/logs?tail=100000"))
            .await?;
        let resumed = logs["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["line"].as_str())
            .find(|l| l.contains("resumed from step"))
            .context("no rank said it resumed from a checkpoint")?;
        Ok(resumed.to_string())
    }

    async fn same_model(&self, id: &str, expected: &str) -> anyhow::Result<String> {
        let end = self.wait_end(id).await?;
        if end["state"] != "succeeded" {
            bail!("the job ended {}: {}", end["state"], end["reason"]);
        }
        let sha = self.model_sha(id).await?;
        if sha != expected {
            bail!("model {sha} differs from the failure-free run's {expected}");
        }
        Ok(format!("model {}", &sha[..12.min(sha.len())]))
    }

    async fn sse(&self, id: &str) -> anyhow::Result<String> {
        let body = self
            .client
            .text_until(
                &format!("/jobs/{id}/logs/stream"),
                "data:",
                Duration::from_secs(10),
            )
            .await?;
        let events = body.matches("data:").count();
        if events == 0 {
            bail!("no event in the stream");
        }
        Ok(format!("{events} event(s) read"))
    }

    async fn history(&self, id: &str, killed: bool) -> anyhow::Result<String> {
        let count = |v: Value| v.as_array().map_or(0, Vec::len);
        let incarnations = count(self.client.get(&format!("/jobs/{id}/workers")).await?);
        let restarts = count(self.client.get(&format!("/jobs/{id}/restarts")).await?);
        let checkpoints = count(self.client.get(&format!("/jobs/{id}/checkpoints")).await?);
        let want_inc = if killed { 4 } else { 2 };
        if incarnations < want_inc || (killed && restarts < 1) || checkpoints < 1 {
            bail!(
                "incarnations {incarnations} (want {want_inc}), restarts {restarts}, checkpoints {checkpoints}"
            );
        }
        Ok(format!(
            "{incarnations} incarnations, {restarts} restart(s), {checkpoints} checkpoints"
        ))
    }
}

fn make_small_dataset(dir: &Path) -> anyhow::Result<String> {
    let params = DatasetParams::small();
    make_dataset(dir, &params)?;
    Ok(dir.display().to_string())
}
