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
use crate::checkpoint::{self, LATEST, Manifest, PartInfo};
use crate::storage::Store;
use crate::store::history::HistoryOp;
use crate::store::now;

pub struct Checkpoint {
    job_id: Uuid,
    world_size: u32,
    keep_last: usize,
    store: Store,
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
        store: Store,
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
        // Retention: after this commit, keep the newest `keep_last` committed steps.
        let mut all: Vec<u64> = self.committed.iter().copied().chain([step]).collect();
        all.sort_unstable();
        let prune: Vec<u64> = all
            .iter()
            .copied()
            .take(all.len().saturating_sub(self.keep_last))
            .collect();
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let res = commit(&store, &manifest, &prune, since).await;
                (manifest, prune, res)
            }
            .into_actor(self)
            .map(|(manifest, prune, res), act, ctx| {
                act.committing = false;
                act.finish_commit(manifest, prune, res);
                act.commit_next(ctx);
            }),
        );
    }

    fn finish_commit(
        &mut self,
        manifest: Manifest,
        prune: Vec<u64>,
        res: std::io::Result<(f64, Vec<u64>)>,
    ) {
        let step = manifest.step;
        let (commit_ms, garbage) = match res {
            Ok(done) => done,
            Err(e) => {
                // The previous LATEST and its step are untouched; the next interval retries.
                self.rt.recorder.note(
                    self.job_id,
                    None,
                    None,
                    format!("checkpoint of step {step} failed, keeping the previous one: {e}"),
                );
                return;
            }
        };
        self.committed.insert(step);
        let at = now();
        self.rt.recorder.record(HistoryOp::CheckpointCommitted {
            job_id: self.job_id,
            step,
            committed_at: at.clone(),
            bytes: manifest.total_bytes(),
            location: self.store.describe(&checkpoint::step_dir(step)),
            manifest: serde_json::to_string(&manifest).unwrap_or_default(),
            commit_ms,
        });
        for s in prune {
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
        if !garbage.is_empty() {
            tracing::debug!(job_id = %self.job_id, ?garbage, "removed uncommitted steps");
        }
        let committed = Committed { step, at };
        self.last = Some(committed.clone());
        self.notify.do_send(committed);
    }
}

/// Manifest, then LATEST, then retention and garbage. Returns the commit latency (from the
/// last part's registration to LATEST written) and the uncommitted steps removed.
pub async fn commit(
    store: &Store,
    manifest: &Manifest,
    prune: &[u64],
    since: Instant,
) -> std::io::Result<(f64, Vec<u64>)> {
    let step = manifest.step;
    let body = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    store.put(&checkpoint::manifest_key(step), body).await?;
    // LATEST is a hint (resume verifies and falls back), so it is not fsynced: a commit costs
    // one durable write, the manifest.
    store
        .put_hint(
            LATEST,
            format!("{}\n", checkpoint::step_dir(step)).into_bytes(),
        )
        .await?;
    let commit_ms = since.elapsed().as_secs_f64() * 1e3;
    for s in prune {
        store.delete_all(&checkpoint::step_dir(*s)).await?;
    }
    let mut garbage = Vec::new();
    for name in store.list("step-").await? {
        if let Some(s) = checkpoint::parse_step_dir(&name)
            && s < step
            && store.size(&checkpoint::manifest_key(s)).await?.is_none()
        {
            store.delete_all(&name).await?;
            garbage.push(s);
        }
    }
    Ok((commit_ms, garbage))
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

/// A rank's part of `step` is durable in the store.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct RegisterPart {
    pub rank: u32,
    pub step: u64,
    pub part: PartInfo,
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

/// Sent to the Job after each commit (for the summary).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Committed {
    pub step: u64,
    pub at: String,
}

/// Resolves once no commit is running or waiting, with the newest committed step.
#[derive(Message)]
#[rtype(result = "Option<Committed>")]
pub struct WhenIdle;

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
