//! The cost of the accounting (incidents, straggler rates, progress samples): the heartbeat
//! path's latency and throughput, and the recorder's commit rate, with it off
//! (`serve --no-accounting`) and on, side by side in one run, each on a fresh server.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;

use super::scale::credentials;
use super::{Client, Figures, Server, insert_percentiles};

/// Ranks of the heartbeat job (`sleep` processes; the bench beats on their behalf).
const RANKS: usize = 8;

/// What one server did: heartbeat latencies (ms), heartbeats/s, log lines/s.
struct Run {
    latencies: Vec<f64>,
    heartbeats_per_s: f64,
    lines_per_s: f64,
}

/// Off and on alternate for two rounds (off, on, off, on), so neither has the warmer
/// machine; each mode keeps its better round.
pub async fn run(dir: &Path, quick: bool, figures: &mut Figures) -> anyhow::Result<()> {
    let mut best: [Option<Run>; 2] = [None, None];
    for round in 0..2 {
        for (m, mode) in MODES.iter().enumerate() {
            let flags: &[&str] = if m == 0 { &["--no-accounting"] } else { &[] };
            let dir = dir.join(format!("accounting-{mode}-{round}"));
            let r = measure(&dir, flags, quick).await?;
            best[m] = Some(match best[m].take() {
                None => r,
                Some(b) => {
                    let p50 = |x: &Run| super::percentile(&x.latencies, 50.0);
                    Run {
                        heartbeats_per_s: b.heartbeats_per_s.max(r.heartbeats_per_s),
                        lines_per_s: b.lines_per_s.max(r.lines_per_s),
                        latencies: if p50(&b) <= p50(&r) {
                            b.latencies
                        } else {
                            r.latencies
                        },
                    }
                }
            });
        }
    }
    for (mode, b) in MODES.iter().zip(best) {
        let b = b.expect("two rounds");
        insert_percentiles(
            figures,
            &format!("accounting_{mode}_heartbeat"),
            &b.latencies,
        );
        figures.insert(
            format!("accounting_{mode}_heartbeats_per_s"),
            b.heartbeats_per_s,
        );
        figures.insert(format!("accounting_{mode}_log_lines_per_s"), b.lines_per_s);
    }
    Ok(())
}

/// Without the accounting (`serve --no-accounting`), and with it.
const MODES: [&str; 2] = ["off", "on"];

async fn measure(dir: &Path, flags: &[&str], quick: bool) -> anyhow::Result<Run> {
    let beats = if quick { 400 } else { 4000 };
    let seconds = if quick { 2 } else { 5 };
    let lines: u64 = if quick { 20_000 } else { 200_000 };
    {
        let server = Server::start_with(dir, "127.0.0.1:0", None, flags)?;
        let client = Client::new(&server.url, None);
        let job = client
            .post(
                "/jobs",
                &json!({"world_size": RANKS, "command": ["sleep", "100000"],
                        "heartbeat_timeout_s": 60}),
            )
            .await?;
        let id = job["job_id"].as_str().unwrap_or_default().to_string();
        let pids: Vec<u32> = client
            .poll(|| async {
                let s = client.get(&format!("/jobs/{id}/summary")).await?;
                let pids = super::running_pids(&s);
                Ok((pids.len() == RANKS).then_some(pids))
            })
            .await?;
        let creds: Vec<(String, String)> = pids.into_iter().filter_map(credentials).collect();
        let ranks = creds.len();
        let creds = &creds;
        let http = reqwest::Client::new();
        let beat = |i: usize| {
            let (url, token) = &creds[i % ranks];
            let step = i / ranks;
            // Rank 0 steps at half speed: the straggler check has real work.
            let step = if i.is_multiple_of(ranks) {
                step / 2
            } else {
                step
            };
            http.post(url)
                .bearer_auth(token)
                .json(&json!({"step": step, "metrics": {"loss": 1.0 / (step as f64 + 1.0)}}))
                .send()
        };
        // Latency: one heartbeat at a time.
        let mut latencies = Vec::with_capacity(beats);
        for i in 0..beats {
            let t = Instant::now();
            let res = beat(i).await?;
            anyhow::ensure!(res.status().is_success(), "heartbeat: {}", res.status());
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // Throughput: one client per rank, as fast as the server answers.
        let until = Instant::now() + Duration::from_secs(seconds);
        let counts = join_all((0..ranks).map(|r| {
            let beat = &beat;
            async move {
                let mut n = 0usize;
                let mut i = beats + r;
                while Instant::now() < until {
                    if beat(i).await.is_ok_and(|res| res.status().is_success()) {
                        n += 1;
                    }
                    i += ranks;
                }
                n
            }
        }))
        .await;
        let heartbeats_per_s = counts.iter().sum::<usize>() as f64 / seconds as f64;
        client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
        // The recorder: a job printing `lines` lines as fast as it can, committed.
        let t = Instant::now();
        let job = client
            .post(
                "/jobs",
                &json!({"world_size": 1, "command": ["seq", lines.to_string()],
                        "max_restarts": 0}),
            )
            .await?;
        let id = job["job_id"].as_str().unwrap_or_default().to_string();
        client
            .poll(|| async {
                let j = client.get(&format!("/jobs/{id}")).await?;
                Ok((j["state"] == "succeeded").then_some(()))
            })
            .await?;
        let tail = client
            .get(&format!("/jobs/{id}/logs?tail=1&rank=0"))
            .await?;
        anyhow::ensure!(
            tail["lines"][0]["line"] == lines.to_string().as_str(),
            "the last line is stored: {tail}"
        );
        Ok(Run {
            latencies,
            heartbeats_per_s,
            lines_per_s: lines as f64 / t.elapsed().as_secs_f64(),
        })
    }
}
