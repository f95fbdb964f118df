//! Save on notice: checkpoint requests and a stop of a 4-rank built-in trainer job whose
//! regular checkpoints never come, timed by the server's own report of each save (request →
//! commit), with 64 KiB parts (synchronous, the step fixed by the all-reduce) and 16 MiB parts
//! (independent ranks, the step from the heartbeats); and what the job writes between notices.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::{Client, Figures, insert_percentiles};
use crate::trainer::data::{DatasetParams, make_dataset};

/// Far beyond any run: the only checkpoints are the ones asked for.
const NEVER: u64 = 1 << 40;

pub async fn run(
    client: &Client,
    dir: &Path,
    quick: bool,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    // features × classes × 8 bytes: 256 × 32 is 64 KiB, 2048 × 1024 is 16 MiB.
    for (label, features, classes, sync) in
        [("64k", 256, 32, "allreduce"), ("16m", 2048, 1024, "none")]
    {
        let dataset = dir.join(format!("notice-{label}"));
        let params = DatasetParams {
            shards: 4,
            rows_per_shard: 40,
            features,
            classes,
            test_rows: 10,
            ..DatasetParams::default()
        };
        make_dataset(&dataset, &params)?;
        let job = client
            .post(
                "/jobs",
                &json!({"world_size": 4, "dataset": dataset, "total_steps": NEVER,
                        "checkpoint_every": NEVER, "batch_size": 4, "sync": sync,
                        "restart_scope": "job"}),
            )
            .await?;
        let id = job["job_id"].as_str().unwrap_or_default().to_string();
        client
            .poll(|| async {
                let s = client.get(&format!("/jobs/{id}/summary")).await?;
                Ok((s["step"].as_u64().unwrap_or(0) >= 5).then_some(()))
            })
            .await?;
        // Nothing is written between notices: the job has trained for a while, no checkpoint.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let idle = client.get(&format!("/jobs/{id}/checkpoints")).await?;
        figures.insert(
            format!("notice_{label}_checkpoints_before_any_notice"),
            idle.as_array().map_or(0, Vec::len) as f64,
        );
        let rounds = if quick { 3 } else { 20 };
        let mut waits = Vec::new();
        for _ in 0..rounds {
            let report = client
                .post(&format!("/jobs/{id}/checkpoint"), &json!({}))
                .await?;
            if report["outcome"] != "saved" {
                anyhow::bail!("a checkpoint request was not saved: {report}");
            }
            waits.push(report["wait_ms"].as_f64().unwrap_or(f64::NAN));
        }
        insert_percentiles(figures, &format!("notice_checkpoint_w4_{label}"), &waits);
        let sent = Instant::now();
        client.post(&format!("/jobs/{id}/stop"), &json!({})).await?;
        figures.insert(
            format!("notice_stop_w4_{label}_total_ms"),
            sent.elapsed().as_secs_f64() * 1e3,
        );
        let s = client.get(&format!("/jobs/{id}/summary")).await?;
        let n = &s["last_notice"];
        if n["outcome"] != "saved" {
            anyhow::bail!("the stop's save did not commit: {n}");
        }
        figures.insert(
            format!("notice_stop_w4_{label}_save_ms"),
            n["wait_ms"].as_f64().unwrap_or(f64::NAN),
        );
        figures.insert(
            format!("notice_stop_w4_{label}_steps_lost"),
            n["steps_lost"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
