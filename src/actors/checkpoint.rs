//! Checkpoint: one per job. Collects the parts ranks report as durable, commits a step once
//! every rank's part is there (manifest, then LATEST), applies retention, and indexes commits
//! in SQLite. Commits run one at a time, in step order, off the actor's thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Runtime;
use super::messages::{Committed, RegisterPart, WhenIdle};
use crate::checkpoint::{self, LATEST, Manifest, PartInfo};
use crate::storage::BlobStore;
use crate::store::history::HistoryOp;
use crate::store::now;

pub struct Checkpoint {
    job_id: Uuid,
    world_size: u32,
    keep_last: usize,
    store: BlobStore,
    rt: Arc<Runtime>,
    /// Parts reported per uncommitted step, by rank.
    pending: BTreeMap<u64, BTreeMap<u32, PartInfo>>,
    /// When the last part of each complete step arrived (commit latency starts there).
    ready: BTreeMap<u64, Instant>,
    committed: BTreeSet<u64>,
    committing: bool,
    notify: Recipient<Committed>,
    /// Who waits for the commits in flight to finish (the Job, before it ends).
    idle_waiters: Vec<oneshot::Sender<()>>,
    last: Option<Committed>,
}

impl Checkpoint {
    pub fn new(
        job_id: Uuid,
        world_size: u32,
        keep_last: u32,
        store: BlobStore,
        rt: Arc<Runtime>,
        notify: Recipient<Committed>,
    ) -> Self {
        Checkpoint {
            job_id,
            world_size,
            keep_last: keep_last.max(1) as usize,
            store,
            rt,
            pending: BTreeMap::new(),
            ready: BTreeMap::new(),
            committed: BTreeSet::new(),
            committing: false,
            notify,
            idle_waiters: Vec::new(),
            last: None,
        }
    }

    /// Starts the next commit if none is running.
    fn commit_next(&mut self, ctx: &mut Context<Self>) {
        if self.committing {
            return;
        }
        // When commits fall behind, the newest complete step supersedes the older ones.
        let Some((&step, &since)) = self.ready.iter().next_back() else {
            for waiter in self.idle_waiters.drain(..) {
                let _ = waiter.send(());
            }
            return;
        };
        self.ready.clear();
        self.pending.retain(|s, _| *s >= step);
        let Some(parts) = self.pending.remove(&step) else {
            return;
        };
        self.committing = true;
        let manifest = Manifest {
            version: 1,
            job_id: self.job_id.to_string(),
            step,
            world_size: self.world_size,
            committed_at: now(),
            parts: parts.into_values().collect(),
        };
        let store = self.store.clone();
        let keep_last = self.keep_last;
        ctx.spawn(
            async move {
                let res = commit(&store, &manifest, keep_last, since).await;
                (manifest, res)
            }
            .into_actor(self)
            .map(|(manifest, res), act, ctx| {
                act.committing = false;
                act.finish_commit(manifest, res);
                act.commit_next(ctx);
            }),
        );
    }

    fn finish_commit(&mut self, manifest: Manifest, res: std::io::Result<CommitDone>) {
        let step = manifest.step;
        let done = match res {
            Ok(done) => done,
            Err(e) => {
                // The previous LATEST and its step are untouched; the next interval retries.
                let line =
                    format!("checkpoint of step {step} failed, keeping the previous one: {e}");
                self.rt.recorder.note(self.job_id, None, None, line);
                self.rt.metrics.checkpoint_failures.inc();
                tracing::warn!(
                    target: "trainvisor::job",
                    event = "checkpoint_failed",
                    job_id = %self.job_id,
                    step,
                    error = %e,
                    "checkpoint failed"
                );
                self.rt.recorder.event(
                    "checkpoint_failed",
                    self.job_id,
                    serde_json::json!({"step": step, "error": e.to_string()}),
                );
                return;
            }
        };
        for warning in &done.warnings {
            self.rt.recorder.note(
                self.job_id,
                None,
                None,
                format!("checkpoint of step {step}: {warning}"),
            );
        }
        self.committed.insert(step);
        self.rt
            .metrics
            .checkpoint_commit_seconds
            .observe(done.commit_ms / 1000.0);
        self.rt
            .metrics
            .checkpoint_bytes
            .inc_by(manifest.total_bytes());
        let at = now();
        self.rt.recorder.record(HistoryOp::CheckpointCommitted {
            job_id: self.job_id,
            step,
            committed_at: at.clone(),
            bytes: manifest.total_bytes(),
            location: self.store.describe(&checkpoint::step_dir(step)),
            manifest: serde_json::to_string(&manifest).unwrap_or_default(),
            commit_ms: done.commit_ms,
        });
        for s in done.pruned {
            self.committed.remove(&s);
            self.rt.recorder.record(HistoryOp::CheckpointPruned {
                job_id: self.job_id,
                step: s,
                pruned_at: at.clone(),
            });
        }
        // Older incomplete steps can never commit now.
        self.pending.retain(|s, _| *s > step);
        self.ready.retain(|s, _| *s > step);
        if !done.garbage.is_empty() {
            tracing::debug!(job_id = %self.job_id, garbage = ?done.garbage, "removed uncommitted steps");
        }
        let committed = Committed { step, at };
        self.last = Some(committed.clone());
        self.notify.do_send(committed);
    }
}

/// What a commit did.
pub struct CommitDone {
    /// From the last part's registration to LATEST written.
    pub commit_ms: f64,
    /// Committed steps removed by retention.
    pub pruned: Vec<u64>,
    /// Older steps without a manifest, removed.
    pub garbage: Vec<u64>,
    /// Things that went wrong after the manifest was written: the step is committed anyway
    /// (the manifest is the truth), e.g. LATEST could not be moved or old steps not deleted.
    pub warnings: Vec<String>,
}

/// The commit protocol: the manifest (create-if-absent), then LATEST as a hint
/// (compare-and-swap where the store supports it), then retention and garbage. An error
/// before the manifest is written leaves the previous checkpoint as the newest one.
pub async fn commit(
    store: &BlobStore,
    manifest: &Manifest,
    keep_last: usize,
    since: Instant,
) -> std::io::Result<CommitDone> {
    let step = manifest.step;
    let body = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    let key = checkpoint::manifest_key(step);
    if !store.put_if_absent(&key, body).await? {
        // Already there: a retried request whose first attempt landed, or a replay. The same
        // parts are the same checkpoint; anything else is refused, never overwritten.
        let existing = store.get(&key).await?.unwrap_or_default();
        let same = serde_json::from_slice::<Manifest>(&existing)
            .is_ok_and(|m| m.step == step && m.parts == manifest.parts);
        if !same {
            return Err(std::io::Error::other(format!(
                "{} already holds a different manifest",
                store.describe(&key)
            )));
        }
    }
    let mut warnings = Vec::new();
    if let Err(e) = advance_latest(store, step).await {
        warnings.push(format!(
            "committed, but LATEST was not moved (resume finds the step by its manifest): {e}"
        ));
    }
    let commit_ms = since.elapsed().as_secs_f64() * 1e3;
    let (mut pruned, mut garbage) = (Vec::new(), Vec::new());
    if let Err(e) = clean_up(store, step, keep_last, &mut pruned, &mut garbage).await {
        warnings.push(format!(
            "old steps not deleted yet (next commit retries): {e}"
        ));
    }
    Ok(CommitDone {
        commit_ms,
        pruned,
        garbage,
        warnings,
    })
}

/// Moves LATEST to `step`, never backwards: read it with its version, write if it still has
/// that version (a plain write on stores without conditional writes; LATEST is only a hint).
async fn advance_latest(store: &BlobStore, step: u64) -> std::io::Result<()> {
    let body = format!("{}\n", checkpoint::step_dir(step)).into_bytes();
    for _ in 0..8 {
        let current = store.get_versioned(LATEST).await?;
        if let Some((data, _)) = &current
            && checkpoint::parse_step_dir(String::from_utf8_lossy(data).trim())
                .is_some_and(|s| s >= step)
        {
            return Ok(());
        }
        if store
            .put_hint_if(LATEST, body.clone(), current.map(|(_, v)| v))
            .await?
        {
            return Ok(());
        }
    }
    Err(std::io::Error::other(
        "LATEST kept changing under the committer",
    ))
}

/// Retention and garbage, from what the store holds (the truth): of the steps older than
/// `step`, those with a manifest beyond the newest `keep_last` (counting `step`) are pruned,
/// those without one are garbage.
async fn clean_up(
    store: &BlobStore,
    step: u64,
    keep_last: usize,
    pruned: &mut Vec<u64>,
    garbage: &mut Vec<u64>,
) -> std::io::Result<()> {
    let mut committed = Vec::new();
    let mut first_error = None;
    for name in store.list("step-").await? {
        let Some(s) = checkpoint::parse_step_dir(&name) else {
            continue;
        };
        if s >= step {
            continue;
        }
        let res = match store.size(&checkpoint::manifest_key(s)).await {
            Ok(Some(_)) => {
                committed.push(s);
                Ok(())
            }
            Ok(None) => store.delete_all(&name).await.map(|()| garbage.push(s)),
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            first_error.get_or_insert(e);
        }
    }
    committed.sort_unstable();
    let excess = committed.len().saturating_sub(keep_last.saturating_sub(1));
    for s in committed.into_iter().take(excess) {
        // The manifest goes first: a half-deleted step is then garbage, never a broken commit.
        let res = match store.delete_all(&checkpoint::manifest_key(s)).await {
            Ok(()) => {
                pruned.push(s);
                store.delete_all(&checkpoint::step_dir(s)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Actor for Checkpoint {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Steps committed before a server restart count for retention.
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let mut steps = BTreeSet::new();
                for name in store.list("step-").await.unwrap_or_default() {
                    if let Some(s) = checkpoint::parse_step_dir(&name)
                        && matches!(store.size(&checkpoint::manifest_key(s)).await, Ok(Some(_)))
                    {
                        steps.insert(s);
                    }
                }
                steps
            }
            .into_actor(self)
            .map(|steps, act, _| act.committed.extend(steps)),
        );
    }
}

impl Handler<RegisterPart> for Checkpoint {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, msg: RegisterPart, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let key = format!("{}/{}", checkpoint::step_dir(msg.step), msg.part.name);
        let lookup = key.clone();
        Box::pin(
            async move { store.size(&lookup).await }
                .into_actor(self)
                .map(move |size, act, ctx| {
                    let size = size.map_err(|e| format!("cannot read the part: {e}"))?;
                    match size {
                        None => return Err(format!("part {key} is not in the store")),
                        Some(n) if n != msg.part.bytes => {
                            return Err(format!(
                                "part {key} has {n} bytes, not {}",
                                msg.part.bytes
                            ));
                        }
                        Some(_) => {}
                    }
                    if act
                        .committed
                        .last()
                        .is_some_and(|newest| msg.step <= *newest)
                    {
                        // A replay after a restart rewrote an identical part of a step that is
                        // already committed (or older): LATEST never moves backwards.
                        return Ok(());
                    }
                    let parts = act.pending.entry(msg.step).or_default();
                    parts.insert(msg.rank, msg.part);
                    if parts.len() == act.world_size as usize {
                        act.ready.entry(msg.step).or_insert_with(Instant::now);
                        act.commit_next(ctx);
                    }
                    Ok(())
                }),
        )
    }
}

impl Handler<WhenIdle> for Checkpoint {
    type Result = ResponseActFuture<Self, Option<Committed>>;

    fn handle(&mut self, _: WhenIdle, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.committing || !self.ready.is_empty() {
            self.idle_waiters.push(tx);
        } else {
            let _ = tx.send(());
        }
        Box::pin(
            async move {
                let _ = rx.await;
            }
            .into_actor(self)
            .map(|_, act, _| act.last.clone()),
        )
    }
}

/// The commit protocol alone, for `trainvisor bench` (S3 checkpoint throughput).
pub async fn commit_for_bench(
    store: &BlobStore,
    manifest: &Manifest,
    keep_last: usize,
) -> std::io::Result<()> {
    let done = commit(store, manifest, keep_last, Instant::now()).await?;
    if let Some(w) = done.warnings.first() {
        return Err(std::io::Error::other(w.clone()));
    }
    Ok(())
}
