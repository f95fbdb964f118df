//! Training scenarios: synchronous global steps/s by world size, the seed's checkpoint
//! cycles with 4 workers and CHECKPOINT_EVERY=5, commit latency next to a raw durable write.

use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::{Client, Figures, insert_percentiles, ms_between};
use crate::storage::local::write_durable;
use crate::trainer::data::{DatasetParams, make_dataset};

async fn run_job(client: &Client, spec: Value) -> anyhow::Result<(String, f64)> {
    let job = client.post("/jobs", &spec).await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_string();
    let done = client
        .poll(|| async {
            let j = client.get(&format!("/jobs/{id}")).await?;
            Ok(j["finished_at"].is_string().then_some(j))
        })
        .await?;
    if done["state"] != "succeeded" {
        anyhow::bail!("bench job {id} ended {}: {}", done["state"], done["reason"]);
    }
    let secs = ms_between(
        done["started_at"].as_str().unwrap_or_default(),
        done["finished_at"].as_str().unwrap_or_default(),
    )? / 1e3;
    Ok((id, secs))
}

pub async fn run(
    client: &Client,
    dir: &Path,
    quick: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let dataset = dir.join("dataset");
    let params = DatasetParams {
        shards: 8,
        rows_per_shard: 2_500,
        ..DatasetParams::default()
    };
    make_dataset(&dataset, &params)?;
    let steps = if quick { 100 } else { 3000 };
    for w in [1, 2, 4, 8] {
        let (_, secs) = run_job(
            client,
            json!({"world_size": w, "dataset": dataset, "total_steps": steps,
            "batch_size": 32, "checkpoint_every": 1000}),
        )
        .await?;
        figures.insert(format!("sync_steps_per_s_w{w}"), steps as f64 / secs);
    }
    // The seed's figure: 4 workers, a checkpoint every 5 steps.
    let (id, secs) = run_job(
        client,
        json!({"world_size": 4, "dataset": dataset, "total_steps": steps,
        "batch_size": 32, "checkpoint_every": 5, "keep_last": 3}),
    )
    .await?;
    figures.insert(
        "checkpoint_cycles_per_s_w4_every5".into(),
        (steps / 5) as f64 / secs,
    );
    figures.insert("sync_steps_per_s_w4_every5".into(), steps as f64 / secs);
    let commits = client
        .get(&format!("/jobs/{id}/checkpoints?all=true"))
        .await?;
    let commit_ms: Vec<f64> = commits
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["commit_ms"].as_f64()).collect())
        .unwrap_or_default();
    figures.insert(
        "checkpoints_committed_w4_every5".into(),
        commit_ms.len() as f64,
    );
    insert_percentiles(figures, "checkpoint_commit_w4", &commit_ms);

    // The disk's own cost of one durable small write, measured in the same run.
    let raw_dir = dir.join("raw");
    let data = vec![7u8; 64 * 1024];
    let mut raw = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        write_durable(&raw_dir.join(format!("f{}", i % 2)), &data)?;
        raw.push(t.elapsed().as_secs_f64() * 1e3);
    }
    insert_percentiles(figures, "raw_write_fsync_rename_64k", &raw);
    Ok(())
}
