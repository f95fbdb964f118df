//! The worker API side of a Job: tokens, heartbeats, the all-reduce of synchronous training,
//! and checkpoint parts handed on to the job's Checkpoint actor.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::Utc;
use tokio::sync::oneshot;

use super::{Job, RankState};
use crate::actors::messages::Beat;
use crate::actors::messages::{
    AllReduceRequest, CheckpointPart, Committed, Heartbeat, RegisterPart, Round, WorkerRejected,
};
use crate::domain::notice::{NoticeCause, SaveRequest};
use crate::store::history::HistoryOp;

/// The shortest interval between two stored progress samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Progress events (for charts) at most this often per job.
pub(super) const PROGRESS_EVENT_EVERY: Duration = Duration::from_millis(500);

/// One all-reduce round: every rank's values for `step`, and the ranks waiting for the mean.
#[derive(Default)]
pub struct AllReduce {
    step: u64,
    values: Vec<Option<Vec<f64>>>,
    waiters: Vec<oneshot::Sender<Arc<Round>>>,
    /// A round has been asked for: the ranks step in lock step through the server.
    used: bool,
    /// The step of the last round every rank completed.
    last_round: Option<u64>,
    /// Rounds are called off (a rank died): every request gets this answer, a save request
    /// and no mean.
    called_off: Option<Arc<Round>>,
}

impl AllReduce {
    /// Forget the round: the waiters' requests fail (409) and their ranks are being replaced.
    pub(super) fn reset(&mut self) {
        self.values.clear();
        self.waiters.clear();
        self.called_off = None;
    }

    pub(super) fn used(&self) -> bool {
        self.used
    }

    pub(super) fn last_round(&self) -> Option<u64> {
        self.last_round
    }

    /// Answers the round in progress, and every later request until `reset`, with `save`
    /// instead of a mean.
    pub(super) fn call_off(&mut self, save: Option<SaveRequest>) {
        let round = Arc::new(Round {
            mean: Vec::new(),
            save,
        });
        for w in self.waiters.drain(..) {
            let _ = w.send(round.clone());
        }
        self.values.clear();
        self.called_off = Some(round);
    }
}

impl Job {
    /// Whether incarnation `attempt` of `rank` (whose token the worker API checked) is still
    /// the rank's current one and runs: a worker call of any other is stale.
    fn still_runs(&self, rank: u32, attempt: u32) -> Result<(), WorkerRejected> {
        let slot = self
            .ranks
            .get(rank as usize)
            .ok_or(WorkerRejected::UnknownRank)?;
        let runs = matches!(
            slot.state,
            RankState::Starting { .. } | RankState::Running { .. }
        );
        if !runs || slot.next_attempt != attempt + 1 {
            return Err(WorkerRejected::Stale);
        }
        Ok(())
    }
}

impl Handler<Heartbeat> for Job {
    type Result = Result<(bool, Option<SaveRequest>), WorkerRejected>;

    fn handle(&mut self, msg: Heartbeat, ctx: &mut Context<Self>) -> Self::Result {
        let attempt = msg.attempt;
        self.still_runs(msg.rank, attempt)?;
        let step = msg.body.get("step").and_then(serde_json::Value::as_u64);
        if let Some(signal) = msg.body.get("notice").and_then(serde_json::Value::as_str) {
            // The rank got SIGUSR1 (Slurm's `--signal` before a preemption): the whole job
            // saves, and the ranks hold at the saved step until the grace ends.
            self.note(
                Some(msg.rank),
                Some(attempt),
                format!("rank {} was given notice ({signal})", msg.rank),
            );
            let grace = self.save_grace();
            self.ask_to_save(
                NoticeCause::Signal,
                super::notice::AfterSave::KeepRunning,
                grace,
                None,
                ctx,
            );
        }
        let saved_step = msg
            .body
            .get("saved_step")
            .and_then(serde_json::Value::as_u64);
        let slot = &mut self.ranks[msg.rank as usize];
        if !slot.progress.record_heartbeat(Utc::now(), msg.body) {
            return Ok((false, None));
        }
        let save = self.save_request(msg.rank, step, saved_step);
        if let Some(step) = step {
            self.straggler_step(msg.rank, attempt, step);
            self.launcher.rank_stepping(msg.rank);
        }
        self.incident_heartbeat(msg.rank, step);
        self.workers[msg.rank as usize].do_send(Beat { attempt });
        self.progress.observe(&self.ranks);
        if self
            .last_progress_event
            .is_none_or(|t| t.elapsed() >= PROGRESS_EVENT_EVERY)
        {
            let now = std::time::Instant::now();
            self.last_progress_event = Some(now);
            let s = self.summary();
            self.rt.recorder.event(
                "progress",
                self.id,
                serde_json::json!({"step": s.step, "loss": s.loss, "steps_per_s": s.steps_per_s,
                                   "progress": s.progress, "eta_s": s.eta_s}),
            );
            // The charts' history: one sample every max(2 s, running time / 1000).
            let every = SAMPLE_EVERY.max(self.born.elapsed() / 1000);
            if self.rt.settings.accounting
                && self
                    .last_sample
                    .is_none_or(|t| now.duration_since(t) >= every)
            {
                self.last_sample = Some(now);
                self.rt.recorder.record(HistoryOp::ProgressSample {
                    job_id: self.id,
                    at: crate::store::now(),
                    step: s.step,
                    steps_per_s: s.steps_per_s,
                    loss: s.loss,
                });
            }
        }
        Ok((true, save))
    }
}

impl Handler<AllReduceRequest> for Job {
    type Result = ResponseFuture<Result<Arc<Round>, WorkerRejected>>;

    fn handle(&mut self, msg: AllReduceRequest, _: &mut Context<Self>) -> Self::Result {
        let result = self.contribute(msg);
        Box::pin(async move {
            match result? {
                Ok(mean) => Ok(mean),
                Err(waiting) => waiting.await.map_err(|_| WorkerRejected::Stale),
            }
        })
    }
}

/// The round at once (the last rank of the round), or a receiver for it.
pub type Contribution = Result<Arc<Round>, oneshot::Receiver<Arc<Round>>>;

impl Job {
    fn contribute(&mut self, msg: AllReduceRequest) -> Result<Contribution, WorkerRejected> {
        self.still_runs(msg.rank, msg.attempt)?;
        let world = self.spec.world_size as usize;
        let mut allreduce = std::mem::take(&mut self.allreduce);
        let result = allreduce.contribute(world, msg.rank, msg.step, msg.values, |step| {
            self.round_save_request(step)
        });
        self.allreduce = allreduce;
        result
    }
}

impl AllReduce {
    /// Adds rank `rank`'s values for `step` (`rank < world`, checked with the caller's token). The last rank of the round gets the mean and wakes the others.
    pub fn contribute(
        &mut self,
        world: usize,
        rank: u32,
        step: u64,
        values: Vec<f64>,
        save: impl FnOnce(u64) -> Option<SaveRequest>,
    ) -> Result<Contribution, WorkerRejected> {
        self.used = true;
        if let Some(round) = &self.called_off {
            return Ok(Ok(round.clone()));
        }
        if self.values.is_empty() {
            self.values = vec![None; world];
            self.step = step;
        }
        if self.step != step {
            return Err(WorkerRejected::Invalid(format!(
                "all-reduce is at step {}, rank {rank} sent step {step}",
                self.step
            )));
        }
        if let Some(len) = self.values.iter().flatten().map(Vec::len).next()
            && len != values.len()
        {
            return Err(WorkerRejected::Invalid(format!(
                "rank {rank} sent {} values, others {len}",
                values.len()
            )));
        }
        self.values[rank as usize] = Some(values);
        if self.values.iter().all(Option::is_some) {
            // Summed in rank order, so the mean is the same bits on every run.
            let mut sum = vec![0.0; self.values[0].as_ref().map_or(0, Vec::len)];
            for v in self.values.iter().flatten() {
                for (s, x) in sum.iter_mut().zip(v) {
                    *s += x;
                }
            }
            for s in &mut sum {
                *s /= world as f64;
            }
            let round = Arc::new(Round {
                mean: sum,
                save: save(step),
            });
            for w in self.waiters.drain(..) {
                let _ = w.send(round.clone());
            }
            self.values.clear();
            self.last_round = Some(step);
            return Ok(Ok(round));
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        Ok(Err(rx))
    }
}

impl Handler<CheckpointPart> for Job {
    type Result = ResponseFuture<Result<(), WorkerRejected>>;

    fn handle(&mut self, msg: CheckpointPart, _: &mut Context<Self>) -> Self::Result {
        let mut authorized = self.still_runs(msg.rank, msg.attempt);
        if authorized.is_ok() && !self.may_register_for(msg.rank, msg.part.rank) {
            authorized = Err(WorkerRejected::Invalid(format!(
                "rank {} may register only its own part",
                msg.rank
            )));
        }
        if authorized.is_ok() {
            self.notice_part(msg.part.rank, msg.step);
        }
        let checkpoint = self.checkpoint.clone();
        Box::pin(async move {
            authorized?;
            let register = RegisterPart {
                rank: msg.part.rank,
                step: msg.step,
                part: msg.part,
            };
            match checkpoint.send(register).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(WorkerRejected::Invalid(why)),
                Err(_) => Err(WorkerRejected::Stale),
            }
        })
    }
}

impl Handler<Committed> for Job {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        self.rt
            .recorder
            .event("checkpoint", self.id, serde_json::json!({"step": msg.step}));
        let step = msg.step;
        self.last_checkpoint = Some(msg);
        self.notice_committed(step, ctx);
    }
}
