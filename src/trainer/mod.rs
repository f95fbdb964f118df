//! The built-in trainer (`trainvisor worker`): softmax regression with SGD over this rank's
//! shards, synchronous data parallelism through the server's all-reduce (or independent
//! ranks), heartbeats in the background, a checkpoint part every `checkpoint_every` steps,
//! and exact resume from the newest valid checkpoint.

pub mod client;
pub mod data;
pub mod model;
pub mod notice;
pub mod rng;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::{self, FINAL_MODEL, PartInfo};
use crate::spec::{JobSpec, SyncMode};
use crate::storage::BlobStore;
use client::WorkerClient;
use data::{Cursor, Dataset, RankStream, Shard};
use model::Model;
use notice::SaveSlot;

/// What a part of the built-in trainer holds besides the model.
#[derive(Debug, Serialize, Deserialize)]
struct PartHeader {
    step: u64,
    cursor: Cursor,
    loss: f64,
}

/// A part: the header as one JSON line, then the model bytes.
fn encode_part(header: &PartHeader, model: &Model) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).expect("header serializes");
    out.push(b'\n');
    out.extend_from_slice(&model.to_bytes());
    out
}

fn decode_part(data: &[u8]) -> anyhow::Result<(PartHeader, Model)> {
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .context("part has no header")?;
    Ok((
        serde_json::from_slice(&data[..nl])?,
        Model::from_bytes(&data[nl + 1..])?,
    ))
}

struct Env {
    rank: u32,
    world_size: u32,
    job_id: String,
    server: String,
    token: String,
    dataset: String,
    checkpoint_dir: String,
    cache_dir: PathBuf,
    spec: JobSpec,
    /// torchrun's `TORCHELASTIC_RESTART_COUNT`: 0 on the first run.
    restart_count: u64,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run me as a trainvisor job"))
}

impl Env {
    fn from_env() -> anyhow::Result<Self> {
        Ok(Env {
            rank: var("RANK")?.parse()?,
            world_size: var("WORLD_SIZE")?.parse()?,
            job_id: var("JOB_ID")?,
            server: var("TRAINVISOR_SERVER_URL")?,
            token: var("TRAINVISOR_TOKEN")?,
            dataset: var("DATASET_DIR")?,
            checkpoint_dir: var("CHECKPOINT_DIR")?,
            cache_dir: std::env::var_os("TRAINVISOR_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| std::env::temp_dir().join("trainvisor-cache")),
            spec: serde_json::from_str(&var("TRAINVISOR_SPEC")?).context("TRAINVISOR_SPEC")?,
            restart_count: std::env::var("TORCHELASTIC_RESTART_COUNT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// What the heartbeat thread reports.
#[derive(Default, Clone)]
struct Progress {
    step: u64,
    /// The last step this incarnation began saving a part of: the server tells a rank that
    /// missed a save request from one that is writing its part.
    saved_step: Option<u64>,
    cursor: Cursor,
    loss: Option<f64>,
}

/// A problem no restart can fix (the dataset, the spec): the worker exits with
/// `failure_policy::EXIT_CONFIG`, which fails the job at once with this message.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

fn config_error(e: anyhow::Error) -> anyhow::Error {
    ConfigError(format!("{e:#}")).into()
}

pub fn run() -> anyhow::Result<()> {
    let env = Env::from_env().map_err(config_error)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(train(env))
}

async fn train(env: Env) -> anyhow::Result<()> {
    let spec = &env.spec;
    let (rank, world) = (env.rank, env.world_size);
    let client = WorkerClient::new(&env.server, &env.job_id, rank, &env.token);
    let store = BlobStore::open(&env.checkpoint_dir)?;
    let dataset = Dataset::open(&env.dataset, &env.cache_dir).map_err(config_error)?;
    let shards = dataset.shards().await.map_err(config_error)?;
    let (features, classes) = dataset.shape(&shards).await.map_err(config_error)?;
    let total_steps = match spec.total_steps {
        Some(n) => n,
        None => one_epoch_steps(&env, &dataset, &shards).await? * spec.epochs.unwrap_or(1),
    };
    let mut stream = RankStream::new(
        shards.clone(),
        rank as usize,
        world as usize,
        &dataset.describe(),
    )
    .map_err(config_error)?;

    let mut model = Model::init(classes, features, spec.seed);
    let mut step = 0u64;
    let (resume, rejected) = checkpoint::find_resume(&store, rank, world).await?;
    for r in &rejected {
        println!("checkpoint step {} skipped: {}", r.step, r.why);
    }
    if let Some(resume) = resume {
        let (header, m) = decode_part(&resume.part)?;
        if m.classes != classes || m.features != features {
            bail!("checkpoint model shape does not match the dataset");
        }
        model = m;
        step = header.step;
        stream.cursor = header.cursor;
        println!(
            "rank {rank}: resumed from step {step} (shard {} line {})",
            header.cursor.shard_idx, header.cursor.line_idx
        );
    } else if env.restart_count > 0 {
        println!(
            "rank {rank}: no committed checkpoint yet (no {}): restart {} retrains from step 0",
            store.describe(checkpoint::LATEST),
            env.restart_count
        );
    } else {
        println!(
            "rank {rank}: starting fresh, {total_steps} steps, {features} features, {classes} classes"
        );
    }

    let progress = Arc::new(Mutex::new(Progress {
        step,
        saved_step: None,
        cursor: stream.cursor,
        loss: None,
    }));
    let saves = SaveSlot::default();
    start_heartbeats(
        client.clone(),
        progress.clone(),
        saves.clone(),
        spec.heartbeat_timeout_s,
        total_steps,
    );

    let sleep = Duration::from_secs_f64(spec.sleep_sec);
    let log_every = log_every(spec.checkpoint_every, spec.sleep_sec);
    if rank == 0 {
        println!("rank 0: {}", describe_pace(spec.sleep_sec));
    }
    // The previous checkpoint's write and registration, running while training goes on.
    let mut saving: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let batch_size = spec.batch_size as usize;
    let mut loss = f64::NAN;
    // The last step this incarnation wrote a part of.
    let mut saved_at = None;
    while step < total_steps {
        let before = stream.cursor;
        stream.prepare(&dataset, batch_size).await?;
        let batch = stream.next_batch(batch_size);
        for ex in &batch {
            if ex.x.len() != features || ex.y >= classes {
                bail!(
                    "a record does not match the dataset shape ({features} features, {classes} classes)"
                );
            }
        }
        let (grad, batch_loss) = model.gradient(&batch);
        let (grad, round_save) = match spec.sync {
            SyncMode::Allreduce if world > 1 => client.allreduce(step + 1, &grad).await?,
            _ => (grad, None),
        };
        // A round answered without a mean was called off (a rank died); a save request in a
        // round that completed is an ordinary one.
        let called_off = round_save.as_ref().filter(|_| grad.is_empty());
        if let Some(request) = called_off {
            // The round was called off: a rank died. Save the step every rank completed (and,
            // as the lowest survivor, the dead ranks' parts), then hold: the group restarts.
            if let Some(part) = saving.take() {
                report_failed_checkpoint(rank, spec.checkpoint_every, part.await?);
            }
            let header = PartHeader {
                step,
                cursor: before,
                loss,
            };
            if saved_at != Some(step) {
                progress.lock().unwrap().saved_step = Some(step);
                saved_at = Some(step);
                report_failed_checkpoint(
                    rank,
                    spec.checkpoint_every,
                    write_part(&store, &client, rank, &header, &model).await,
                );
            }
            if notice::writes_for_the_dead(rank, world, &request.for_ranks) {
                for &dead in &request.for_ranks {
                    let written = async {
                        let cursor = notice::cursor_of(
                            &store, &dataset, &shards, dead, world, step, batch_size,
                        )
                        .await?;
                        let header = PartHeader { step, cursor, loss };
                        write_part(&store, &client, dead, &header, &model).await
                    };
                    report_failed_checkpoint(rank, spec.checkpoint_every, written.await);
                }
            }
            println!("rank {rank}: a rank died; saved step {step} for the restart");
            saves.hold_at(step).await;
            stream.cursor = before;
            continue;
        }
        model.apply(&grad, spec.lr);
        step += 1;
        loss = batch_loss;
        {
            let mut p = progress.lock().unwrap();
            p.step = step;
            p.cursor = stream.cursor;
            p.loss = Some(loss);
        }
        // The server's save on notice: in the all-reduce answer of this very step (ranks in
        // lock step), else in the last heartbeat's.
        let request = round_save.or_else(|| saves.current());
        let on_notice = notice::due(request.as_ref(), step) && saved_at != Some(step);
        if step.is_multiple_of(spec.checkpoint_every) || step == total_steps || on_notice {
            saved_at = Some(step);
            progress.lock().unwrap().saved_step = Some(step);
            let header = PartHeader {
                step,
                cursor: stream.cursor,
                loss,
            };
            if let Some(previous) = saving.take() {
                report_failed_checkpoint(rank, spec.checkpoint_every, previous.await?);
            }
            let (store, client, model) = (store.clone(), client.clone(), model.clone());
            saving = Some(tokio::spawn(async move {
                write_part(&store, &client, rank, &header, &model).await
            }));
        }
        if step.is_multiple_of(log_every) || step == total_steps {
            println!("rank {rank}: step {step}/{total_steps} loss {loss:.4}");
        }
        if let Some(request) = request.as_ref().filter(|r| notice::holds(Some(r), step)) {
            // The server ends this rank next: the part must be in, and no step made after it.
            if let Some(part) = saving.take() {
                report_failed_checkpoint(rank, spec.checkpoint_every, part.await?);
            }
            println!(
                "rank {rank}: saved step {step} on notice ({}); holding there",
                request.reason
            );
            saves.hold_at(step).await;
        }
        if !sleep.is_zero() {
            tokio::time::sleep(sleep).await;
        } else if saving.as_ref().is_some_and(|s| !s.is_finished()) {
            // A step that never waits (independent ranks at full speed) would starve the part
            // being written on this one-thread runtime until the next checkpoint: a save on
            // notice must commit within its grace.
            tokio::task::yield_now().await;
        }
    }
    if let Some(last) = saving.take() {
        report_failed_checkpoint(rank, spec.checkpoint_every, last.await?);
    }
    if rank == 0 {
        store
            .put(FINAL_MODEL, model.to_bytes())
            .await
            .with_context(|| format!("writing the final model {}", store.describe(FINAL_MODEL)))?;
    }
    // A last heartbeat so the summary shows the final step.
    let _ = client
        .heartbeat(
            &json!({"step": step, "total_steps": total_steps, "shard_idx": stream.cursor.shard_idx,
                           "line_idx": stream.cursor.line_idx, "metrics": {"loss": loss}}),
        )
        .await;
    println!("rank {rank}: done after {step} steps, loss {loss:.4}");
    Ok(())
}

/// Steps between two `step N/M` lines: at a paced job's speed one about every 2 s, so a few
/// seconds of the log stream always show one; at full speed every 20 checkpoints.
fn log_every(checkpoint_every: u64, sleep_sec: f64) -> u64 {
    if sleep_sec > 0.0 {
        ((2.0 / sleep_sec).ceil() as u64).max(1)
    } else {
        checkpoint_every.saturating_mul(20).max(1)
    }
}

/// The pace a job trains at, said once in its log: a demo's slow pace must not pass for speed.
fn describe_pace(sleep_sec: f64) -> String {
    if sleep_sec > 0.0 {
        format!(
            "pace: sleeping {sleep_sec} s after each step (sleep_sec; the demo's pace on the \
             server's demo dataset; \"sleep_sec\": 0 trains at full speed)"
        )
    } else {
        "pace: full speed (sleep_sec 0)".to_string()
    }
}

/// A checkpoint that could not be written (disk full, storage down) is not fatal: the
/// previous one stays the newest valid checkpoint, and the next interval tries again.
fn report_failed_checkpoint(rank: u32, every: u64, result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("rank {rank}: {e:#}; training goes on and tries again in {every} steps");
    }
}

async fn write_part(
    store: &BlobStore,
    client: &WorkerClient,
    rank: u32,
    header: &PartHeader,
    model: &Model,
) -> anyhow::Result<()> {
    let data = encode_part(header, model);
    let info = PartInfo {
        rank,
        name: checkpoint::part_name(rank),
        bytes: data.len() as u64,
        sha256: checkpoint::sha256_hex(&data),
        shard_idx: Some(header.cursor.shard_idx as u64),
        line_idx: Some(header.cursor.line_idx as u64),
        metrics: Some(json!({"loss": header.loss})),
    };
    let step = header.step;
    store
        .put(&checkpoint::part_key(step, rank), data)
        .await
        .with_context(|| format!("checkpoint of step {step} failed: writing the part"))?;
    client
        .register_part(step, &info)
        .await
        .with_context(|| format!("checkpoint of step {step} failed: reporting the part"))
}

/// One pass over the smallest rank's data, in whole batches.
async fn one_epoch_steps(env: &Env, dataset: &Dataset, shards: &[Shard]) -> anyhow::Result<u64> {
    let mut rows = vec![0usize; env.world_size as usize];
    for (i, shard) in shards.iter().enumerate() {
        rows[i % env.world_size as usize] += dataset.count_rows(shard).await?;
    }
    let min = rows.into_iter().min().unwrap_or(0);
    Ok(((min / env.spec.batch_size as usize) as u64).max(1))
}

/// Heartbeats from their own thread, so a long step never looks like a hang; each answer's
/// save request goes to `saves`. SIGUSR1 (Slurm's `--signal` before a preemption) is passed
/// on to the server at once, in a heartbeat with `"notice": "SIGUSR1"`.
fn start_heartbeats(
    client: WorkerClient,
    progress: Arc<Mutex<Progress>>,
    saves: SaveSlot,
    timeout_s: f64,
    total_steps: u64,
) {
    let interval = Duration::from_secs_f64((timeout_s / 4.0).clamp(0.01, 1.0));
    // While a save is asked for, the answers are awaited more often: a held rank learns at
    // once that it may go on.
    let asked_interval = interval.min(Duration::from_millis(50));
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let mut usr1 =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
            let mut notice = None;
            loop {
                let p = progress.lock().unwrap().clone();
                let mut body = json!({"step": p.step, "total_steps": total_steps,
                                      "saves_on_notice": true,
                                      "shard_idx": p.cursor.shard_idx,
                                      "line_idx": p.cursor.line_idx, "epoch": p.cursor.epoch});
                if let Some(loss) = p.loss {
                    body["metrics"] = json!({"loss": loss});
                }
                if let Some(saved) = p.saved_step {
                    body["saved_step"] = json!(saved);
                }
                if let Some(signal) = notice.take() {
                    body["notice"] = json!(signal);
                }
                match client.heartbeat(&body).await {
                    Ok(request) => saves.heard(request),
                    Err(e) => eprintln!("heartbeat failed: {e}"),
                }
                let wait = if saves.current().is_some() {
                    asked_interval
                } else {
                    interval
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = saves.beat_wanted() => {}
                    Some(()) = async { usr1.as_mut()?.recv().await } => {
                        println!("got SIGUSR1: asking the server to save the job");
                        notice = Some("SIGUSR1");
                    }
                }
            }
        });
    });
}

/// `trainvisor eval`: accuracy of a model file on a JSON-lines file.
pub fn eval(model: &std::path::Path, data: &std::path::Path) -> anyhow::Result<f64> {
    let m = Model::from_bytes(
        &std::fs::read(model).with_context(|| format!("reading {}", model.display()))?,
    )?;
    let examples = data::read_examples(data)?;
    Ok(m.accuracy(&examples))
}

#[cfg(test)]
mod tests {
    use super::log_every;

    /// Issue 29, point 6: at the demo's pace (0.1 s a step) a line every 20 steps (about 2 s),
    /// so the quick start's 5-second look at the log stream shows steps; at full speed every
    /// 20 checkpoints, as before.
    #[test]
    fn a_paced_job_logs_its_step_every_two_seconds() {
        assert_eq!(log_every(5, crate::config::DEMO_SLEEP_SEC), 20);
        assert_eq!(log_every(5, 0.5), 4);
        assert_eq!(log_every(5, 10.0), 1);
        assert_eq!(log_every(5, 0.0), 100);
        assert_eq!(log_every(0, 0.0), 1);
    }
}
