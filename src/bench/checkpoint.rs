//! The checkpoint plane with parts of a given size: 4 ranks × 64 KiB and × 16 MiB.
//!
//! The job's ranks are `sleep` processes; the bench plays each rank with the credentials in its
//! environment and does exactly what the built-in trainer does per checkpoint: sha256 of the
//! part, `BlobStore::put` into `CHECKPOINT_DIR` (temp file, fsync, rename, directory fsync), then
//! `POST …/workers/{rank}/checkpoint` through the trainer's own client. The 4 ranks write at
//! the same time. Measured: the server's commit latency (last part registered → manifest
//! durable and LATEST moved, from the `checkpoints` history), write to commit (the parts'
//! writes start → commit recorded), and the parts' write throughput next to a raw write +
//! fsync of the same sizes, 4 at a time, on the same disk in the same run.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use futures_util::future::join_all;
use serde_json::json;

use super::{Client, Figures, environ, insert_percentiles, ms_between, percentile};
use crate::checkpoint::{self, PartInfo};
use crate::storage::BlobStore;
use crate::store::now;
use crate::trainer::client::WorkerClient;

const WORLD: u32 = 4;

/// What the bench needs to act as one rank.
struct Rank {
    rank: u32,
    client: WorkerClient,
    store: BlobStore,
}

async fn ranks(client: &Client, id: &str) -> anyhow::Result<Vec<Rank>> {
    let pids: Vec<(u32, u32)> = client
        .poll(|| async {
            let s = client.get(&format!("/jobs/{id}/summary")).await?;
            let ws = s["workers"].as_array().cloned().unwrap_or_default();
            let pids: Vec<(u32, u32)> = ws
                .iter()
                .filter(|w| w["state"] == "running")
                .filter_map(|w| Some((w["rank"].as_u64()? as u32, w["pid"].as_u64()? as u32)))
                .collect();
            Ok((pids.len() == WORLD as usize).then_some(pids))
        })
        .await?;
    let mut out = Vec::new();
    for (rank, pid) in pids {
        let env = environ(pid)?;
        let var = |k: &str| {
            env.get(k)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("rank {rank} has no {k}"))
        };
        out.push(Rank {
            rank,
            client: WorkerClient::new(
                &var("TRAINVISOR_SERVER_URL")?,
                &var("JOB_ID")?,
                rank,
                &var("TRAINVISOR_TOKEN")?,
            ),
            store: BlobStore::open(&var("CHECKPOINT_DIR")?)?,
        });
    }
    Ok(out)
}

/// One rank's part of `step` and what the rank reports about it. Every part differs (step and
/// rank in the first bytes), as a real model's would.
fn part(r: &Rank, step: u64, template: &[u8]) -> (Vec<u8>, PartInfo) {
    let mut data = template.to_vec();
    data[..16].copy_from_slice(&[step.to_le_bytes(), u64::from(r.rank).to_le_bytes()].concat());
    let info = PartInfo {
        rank: r.rank,
        name: checkpoint::part_name(r.rank),
        bytes: data.len() as u64,
        sha256: checkpoint::sha256_hex(&data),
        shard_idx: Some(0),
        line_idx: Some(step),
        metrics: None,
    };
    (data, info)
}

/// The durable write and the registration; returns the seconds the write took.
async fn save(r: &Rank, step: u64, data: Vec<u8>, info: PartInfo) -> anyhow::Result<f64> {
    let t = Instant::now();
    r.store
        .put(&checkpoint::part_key(step, r.rank), data)
        .await?;
    let write_s = t.elapsed().as_secs_f64();
    r.client.register_part(step, &info).await?;
    Ok(write_s)
}

/// `steps` checkpoints of 4 parts of `bytes` each. Figures are named `checkpoint_*_{label}`;
/// returns the parts' median aggregate write throughput (MB/s).
async fn scenario(
    client: &Client,
    label: &str,
    bytes: usize,
    steps: u64,
    figures: &mut Figures,
) -> anyhow::Result<f64> {
    let job = client
        .post(
            "/jobs",
            &json!({"world_size": WORLD, "command": ["sleep", "100000"], "keep_last": 2,
                    "restart_scope": "worker"}),
        )
        .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    let ranks = ranks(client, &id).await?;
    let template: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let (mut step_ms, mut part_mb_s) = (vec![], vec![]);
    for step in 1..=steps {
        // Hashing is CPU work each rank does in its own process; the bench has one thread,
        // so it hashes first and times the 4 durable writes, which run at the same time.
        let parts: Vec<_> = ranks.iter().map(|r| part(r, step, &template)).collect();
        let started = now();
        let writes = join_all(
            ranks
                .iter()
                .zip(parts)
                .map(|(r, (data, info))| save(r, step, data, info)),
        )
        .await;
        let mut longest = 0f64;
        for w in writes {
            longest = longest.max(w?);
        }
        // Aggregate: 4 parts written at the same time, MB (10^6 bytes) per second.
        part_mb_s.push(WORLD as f64 * bytes as f64 / 1e6 / longest);
        // Wait for the commit so the next step's writes do not overlap it.
        let committed = client
            .poll(|| async {
                let rows = client
                    .get(&format!("/jobs/{id}/checkpoints?all=true"))
                    .await?;
                Ok(rows
                    .as_array()
                    .and_then(|a| a.iter().find(|c| c["step"] == step).cloned()))
            })
            .await?;
        step_ms.push(ms_between(
            &started,
            committed["committed_at"].as_str().unwrap_or_default(),
        )?);
    }
    let rows = client
        .get(&format!("/jobs/{id}/checkpoints?all=true"))
        .await?;
    let commit_ms: Vec<f64> = rows
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["commit_ms"].as_f64()).collect())
        .unwrap_or_default();
    client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
    if commit_ms.len() as u64 != steps {
        anyhow::bail!("{} of {steps} checkpoints committed", commit_ms.len());
    }
    insert_percentiles(figures, &format!("checkpoint_commit_{label}"), &commit_ms);
    insert_percentiles(
        figures,
        &format!("checkpoint_write_to_commit_{label}"),
        &step_ms,
    );
    figures.insert(format!("checkpoint_steps_{label}"), steps as f64);
    Ok(percentile(&part_mb_s, 50.0))
}

/// The disk's own throughput for the same shape: 4 files of `bytes` written at the same time,
/// each `write` + `fsync` (no rename, no directory fsync). Returns aggregate MB/s per round.
fn raw_fsync(dir: &Path, bytes: usize, rounds: usize) -> anyhow::Result<Vec<f64>> {
    std::fs::create_dir_all(dir)?;
    let data = vec![7u8; bytes];
    let mut out = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..WORLD)
                .map(|r| {
                    let (data, path) = (&data, dir.join(format!("raw-{r}-{}", round % 2)));
                    s.spawn(move || -> std::io::Result<()> {
                        let mut f = std::fs::File::create(path)?;
                        f.write_all(data)?;
                        f.sync_all()
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("a writer thread"))
        })?;
        out.push(WORLD as f64 * bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(out)
}

pub async fn run(
    client: &Client,
    dir: &Path,
    quick: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let (small, large) = if quick { (5, 3) } else { (50, 20) };
    scenario(client, "64kib", 64 * 1024, small, figures).await?;
    let parts = scenario(client, "16mib", 16 << 20, large, figures).await?;
    // Large-part throughput next to the disk's raw write + fsync of the same shape.
    let raw = percentile(
        &raw_fsync(&dir.join("raw-16mib"), 16 << 20, large as usize)?,
        50.0,
    );
    figures.insert("checkpoint_part_mb_per_s".into(), parts);
    figures.insert("raw_fsync_mb_per_s".into(), raw);
    figures.insert("ratio_checkpoint_part_vs_raw_fsync".into(), parts / raw);
    Ok(())
}
