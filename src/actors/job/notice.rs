//! Save on notice, the Job's side: asks the ranks to checkpoint (in heartbeat answers, in the
//! all-reduce answer that fixes the step, SIGUSR1 to ranks that never heartbeated), waits for
//! the commit up to the job's `save_grace_s`, records what it cost, then carries out what
//! came next (stop, the server's shutdown, a group restart, or nothing); the stop and shutdown
//! handlers, which ask first. The rules are `domain::notice`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::{Job, Phase};
use crate::actors::messages::{AskToSave, KillForShutdown, SaveNow, StopJob};
use crate::domain::notice::{
    NoticeCause, NoticeOutcome, NoticeReport, SaveRequest, account, can_be_asked, first_by_step,
    raised_by_step, survivors_step,
};

/// What the Job does once the save committed or the grace ran out.
pub(super) enum AfterSave {
    KeepRunning,
    Stop {
        reason: String,
    },
    /// The server is shutting down: stop the ranks, keep the job `running` for the next one.
    Shutdown,
    /// A rank died: stop the survivors; the group relaunches from the newest checkpoint.
    GroupRestart,
}

/// A notice in flight.
pub(super) struct Pending {
    cause: NoticeCause,
    then: AfterSave,
    /// `None` until the next all-reduce round fixes it (ranks in lock step through the
    /// server's all-reduce must all see the same step in the same answer).
    by_step: Option<u64>,
    /// Dead ranks whose parts a survivor writes.
    for_ranks: Vec<u32>,
    /// Ranks whose part of `by_step` (or a later step) is registered.
    saved: BTreeSet<u32>,
    /// The step committed, while the ranks hold at it (a signal's notice holds until the
    /// grace ends, so the preemption that follows finds them at the saved step).
    committed: Option<u64>,
    asked: Instant,
    timer: SpawnHandle,
    waiters: Vec<oneshot::Sender<NoticeReport>>,
}

impl Job {
    /// Asks every running rank to save, then does `then` once the save committed or after
    /// `grace`. With no running rank, `then` happens at once.
    pub(super) fn ask_to_save(
        &mut self,
        cause: NoticeCause,
        then: AfterSave,
        grace: Duration,
        waiter: Option<oneshot::Sender<NoticeReport>>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(pending) = self.notice.as_mut() {
            // A stronger cause takes over the notice in flight (a stop during a checkpoint):
            // its step stays, its ranks now halt, and the later `then` wins.
            if cause.halts() || !pending.cause.halts() {
                pending.cause = cause;
                if !matches!(then, AfterSave::KeepRunning) {
                    pending.then = then;
                }
            }
            pending.waiters.extend(waiter);
            return;
        }
        let running = self.phase == Phase::Running && self.live_ranks().next().is_some();
        // SIGUSR1 goes only to ranks trainvisor ends next, and only with `save_signal`.
        let signal = self.spec.save_signal
            && matches!(cause, NoticeCause::Stop | NoticeCause::ServerShutdown);
        let heartbeated: Vec<bool> = self
            .live_ranks()
            .map(|r| self.ranks[r as usize].progress.saves_on_notice)
            .collect();
        let outcome = if !running {
            Some(NoticeOutcome::NothingToSave)
        } else if !can_be_asked(heartbeated, signal) {
            Some(NoticeOutcome::Unasked)
        } else {
            None
        };
        if let Some(outcome) = outcome {
            let report = self.report(cause, outcome, None, Instant::now());
            self.close_notice(report, waiter.into_iter().collect(), then, ctx);
            return;
        }
        let by_step = if self.allreduce.used() {
            None
        } else {
            Some(first_by_step(
                self.live_ranks()
                    .map(|r| self.ranks[r as usize].progress.step),
            ))
        };
        let timer = ctx.run_later(grace, |act, ctx| act.grace_over(ctx));
        self.note(
            None,
            None,
            format!(
                "asking the ranks to save ({}): {}, waiting up to {:.1}s for the commit",
                cause.as_str(),
                by_step.map_or("at the next all-reduce round".to_string(), |s| format!(
                    "at step {s}"
                )),
                grace.as_secs_f64()
            ),
        );
        self.notice = Some(Pending {
            cause,
            then,
            by_step,
            for_ranks: Vec::new(),
            saved: BTreeSet::new(),
            committed: None,
            asked: Instant::now(),
            timer,
            waiters: waiter.into_iter().collect(),
        });
        // Ranks that never heartbeated cannot read an answer: with `save_signal` they get
        // SIGUSR1, but only when trainvisor ends them next (the signal's default action ends a
        // process that does not handle it); on a signal's notice they got it themselves.
        if signal {
            for rank in self.live_ranks().collect::<Vec<_>>() {
                if self.ranks[rank as usize].progress.last_heartbeat.is_none() {
                    self.workers[rank as usize].do_send(AskToSave);
                }
            }
        }
    }

    /// What a heartbeat of `rank` at `step` is answered with while a notice is in flight
    /// (`saved_step`: the last step the rank says it began saving).
    pub(super) fn save_request(
        &mut self,
        rank: u32,
        step: Option<u64>,
        saved_step: Option<u64>,
    ) -> Option<SaveRequest> {
        let pending = self.notice.as_mut()?;
        let mut moved = None;
        if let (Some(by), Some(step)) = (pending.by_step, step)
            && pending.committed.is_none()
        {
            // A rank may save past the step (a script that agrees on it with its peers).
            let saved = pending.saved.contains(&rank) || saved_step.is_some_and(|s| s >= by);
            let raised = raised_by_step(by, step, saved);
            if raised != by {
                pending.by_step = Some(raised);
                pending.saved.clear();
                moved = Some(format!(
                    "rank {rank} was at step {step}, past {by}: the save moves to step {raised}"
                ));
            }
        }
        let request = pending.request();
        if let Some(line) = moved {
            self.note(Some(rank), None, line);
        }
        request
    }

    /// The save request of the all-reduce round of `step` that just completed: the first round
    /// after a notice fixes its step.
    pub(super) fn round_save_request(&mut self, step: u64) -> Option<SaveRequest> {
        let pending = self.notice.as_mut()?;
        if pending.by_step.is_none() {
            pending.by_step = Some(step);
        }
        pending.request()
    }

    /// A rank's part of `step` is registered.
    pub(super) fn notice_part(&mut self, rank: u32, step: u64) {
        if let Some(pending) = self.notice.as_mut()
            && pending.by_step.is_some_and(|by| step >= by)
        {
            pending.saved.insert(rank);
        }
    }

    /// A step committed: the notice is over when it is its step (or a later one).
    pub(super) fn notice_committed(&mut self, step: u64, ctx: &mut Context<Self>) {
        let Some(pending) = self.notice.as_mut() else {
            return;
        };
        if pending.committed.is_some() || pending.by_step.is_none_or(|by| step < by) {
            return;
        }
        if pending.cause == NoticeCause::Signal {
            // Hold at the saved step until the grace ends (the preemption comes within it).
            pending.committed = Some(step);
            let report = self.report(
                NoticeCause::Signal,
                NoticeOutcome::Saved,
                Some(step),
                self.notice.as_ref().map_or_else(Instant::now, |p| p.asked),
            );
            self.record_notice(&report);
            if let Some(p) = self.notice.as_mut() {
                for w in p.waiters.drain(..) {
                    let _ = w.send(report.clone());
                }
            }
            return;
        }
        self.end_notice(NoticeOutcome::Saved, Some(step), ctx);
    }

    /// A rank ended while a notice was in flight: the save cannot commit any more.
    pub(super) fn notice_interrupted(&mut self, ctx: &mut Context<Self>) {
        if self.notice.as_ref().is_some_and(|p| p.committed.is_none()) {
            self.end_notice(NoticeOutcome::Interrupted, None, ctx);
        } else if let Some(p) = self.notice.take() {
            ctx.cancel_future(p.timer);
        }
    }

    fn grace_over(&mut self, ctx: &mut Context<Self>) {
        match self.notice.as_ref().map(|p| p.committed) {
            Some(Some(_)) => {
                // A signal's hold is over: release the ranks.
                self.notice = None;
            }
            Some(None) => self.end_notice(NoticeOutcome::TimedOut, None, ctx),
            None => {}
        }
    }

    fn end_notice(&mut self, outcome: NoticeOutcome, saved: Option<u64>, ctx: &mut Context<Self>) {
        let Some(pending) = self.notice.take() else {
            return;
        };
        ctx.cancel_future(pending.timer);
        if pending.cause == NoticeCause::RankDied && outcome != NoticeOutcome::Saved {
            self.survivors_save_failed();
        }
        let report = self.report(pending.cause, outcome, saved, pending.asked);
        self.close_notice(report, pending.waiters, pending.then, ctx);
    }

    fn close_notice(
        &mut self,
        report: NoticeReport,
        waiters: Vec<oneshot::Sender<NoticeReport>>,
        then: AfterSave,
        ctx: &mut Context<Self>,
    ) {
        self.record_notice(&report);
        for w in waiters {
            let _ = w.send(report.clone());
        }
        match then {
            AfterSave::KeepRunning => {}
            AfterSave::Stop { reason } => self.stop_now(reason, ctx),
            AfterSave::Shutdown => self.shut_down_now(ctx),
            AfterSave::GroupRestart => {
                if matches!(self.phase, Phase::GroupRestart { .. }) {
                    self.terminate_live();
                    self.after_rank_down(ctx);
                }
            }
        }
    }

    fn report(
        &self,
        cause: NoticeCause,
        outcome: NoticeOutcome,
        saved: Option<u64>,
        asked: Instant,
    ) -> NoticeReport {
        let last = self.last_checkpoint.as_ref().map(|c| c.step);
        // Heartbeats may lag behind a step every rank has saved.
        let reached = self
            .ranks
            .iter()
            .filter_map(|r| r.progress.step)
            .chain(last)
            .chain(saved)
            .max();
        let (saved_at_step, steps_lost) = account(outcome, saved, last, reached);
        NoticeReport {
            cause,
            outcome,
            saved_at_step,
            reached_step: reached,
            steps_lost,
            wait_ms: asked.elapsed().as_secs_f64() * 1000.0,
            at: crate::store::now(),
        }
    }

    fn record_notice(&mut self, report: &NoticeReport) {
        // A job whose ranks report no step (a shell script) has nothing to account for.
        if report.outcome == NoticeOutcome::NothingToSave
            || (report.outcome == NoticeOutcome::Unasked && report.reached_step.is_none())
        {
            return;
        }
        let line = match report.outcome {
            NoticeOutcome::Saved => format!(
                "saved on notice ({}) at step {} in {:.0} ms: {} steps lost",
                report.cause.as_str(),
                report.saved_at_step.unwrap_or(0),
                report.wait_ms,
                report.steps_lost
            ),
            outcome => format!(
                "save on notice ({}) {}: the job goes on from {}, {} steps lost",
                report.cause.as_str(),
                outcome.as_str(),
                report
                    .saved_at_step
                    .map_or("step 0".to_string(), |s| format!(
                        "the checkpoint of step {s}"
                    )),
                report.steps_lost
            ),
        };
        self.note(None, None, line);
        self.rt.metrics.notice(report);
        self.rt.recorder.event(
            "notice",
            self.id,
            serde_json::to_value(report).unwrap_or_default(),
        );
        self.notices.push(report.clone());
    }
}

impl Pending {
    fn request(&self) -> Option<SaveRequest> {
        Some(SaveRequest {
            by_step: self.by_step?,
            reason: self.cause.as_str().to_string(),
            halt: self.cause.halts(),
            for_ranks: self.for_ranks.clone(),
        })
    }
}

impl Job {
    /// A rank of a synchronous built-in trainer job died and the group restarts: if the
    /// survivors hold a step newer than the last checkpoint, they save it (the dead rank's
    /// part written by the lowest survivor) before they are stopped, so the restart loses at
    /// most the step in flight. Returns whether it asked (the group restart then waits).
    pub(super) fn survivors_save(&mut self, dead: u32, step: u64, ctx: &mut Context<Self>) {
        let grace = self.save_grace();
        let timer = ctx.run_later(grace, |act, ctx| act.grace_over(ctx));
        self.note(
            None,
            None,
            format!(
                "the survivors save step {step} (rank {dead}'s part included) before the group \
                 restarts, waiting up to {:.1}s",
                grace.as_secs_f64()
            ),
        );
        let pending = Pending {
            cause: NoticeCause::RankDied,
            then: AfterSave::GroupRestart,
            by_step: Some(step),
            for_ranks: vec![dead],
            saved: BTreeSet::new(),
            committed: None,
            asked: Instant::now(),
            timer,
            waiters: Vec::new(),
        };
        // Ranks waiting in (or coming to) the next round get the request instead of a mean.
        self.allreduce.call_off(pending.request());
        self.notice = Some(pending);
    }

    /// The step the survivors of a dying synchronous built-in trainer group can save, if any
    /// (no other notice in flight, someone left to save it).
    pub(super) fn survivors_step(&self) -> Option<u64> {
        let builtin_sync = self.spec.command.is_none()
            && self.spec.sync == crate::spec::SyncMode::Allreduce
            && self.allreduce.used();
        if !builtin_sync || self.notice.is_some() || self.live_ranks().next().is_none() {
            return None;
        }
        let last = self.last_checkpoint.as_ref().map(|c| c.step);
        survivors_step(self.allreduce.last_round(), last)
    }

    /// Whether a part of `owner`'s may be registered by `rank`: its own, or a dead rank's
    /// while the survivors save for it.
    pub(super) fn may_register_for(&self, rank: u32, owner: u32) -> bool {
        owner == rank
            || self
                .notice
                .as_ref()
                .is_some_and(|p| p.for_ranks.contains(&owner))
    }
}

impl Handler<SaveNow> for Job {
    type Result = ResponseFuture<Option<NoticeReport>>;

    /// `POST /jobs/{id}/checkpoint`: resolves with the report once the save committed or the
    /// grace ran out.
    fn handle(&mut self, _: SaveNow, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let grace = self.save_grace();
        self.ask_to_save(
            NoticeCause::Checkpoint,
            AfterSave::KeepRunning,
            grace,
            Some(tx),
            ctx,
        );
        Box::pin(async move { rx.await.ok() })
    }
}

impl Job {
    pub(super) fn save_grace(&self) -> Duration {
        Duration::from_secs_f64(self.spec.save_grace_s)
    }

    /// Stops every rank now (after the save, or without one).
    pub(super) fn stop_now(&mut self, reason: String, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Stopping | Phase::Done) {
            return;
        }
        self.reason = Some(reason);
        self.phase = Phase::Stopping;
        self.terminate_live();
        self.after_rank_down(ctx);
    }

    /// Ends the ranks for the server's shutdown; the job stays `running` in the database.
    pub(super) fn shut_down_now(&mut self, ctx: &mut Context<Self>) {
        let winding_down = !matches!(self.phase, Phase::Done);
        self.phase = Phase::ServerShutdown;
        self.close_incidents(crate::domain::incident::IncidentEnd::ServerRestart);
        if winding_down {
            self.terminate_live();
        }
        self.after_rank_down(ctx);
    }
}

impl Handler<StopJob> for Job {
    type Result = ();

    fn handle(&mut self, msg: StopJob, ctx: &mut Context<Self>) {
        if !msg.save {
            self.stop_now(msg.reason, ctx);
            return;
        }
        let grace = self.save_grace();
        self.ask_to_save(
            NoticeCause::Stop,
            AfterSave::Stop { reason: msg.reason },
            grace,
            None,
            ctx,
        );
    }
}

impl Handler<KillForShutdown> for Job {
    type Result = ResponseFuture<()>;

    /// Every rank gets SIGTERM (or what stands for it) and the server's kill grace, as on
    /// stop; their ends are recorded as they come. What is still alive after the grace (and
    /// a margin for the last exits to be recorded) is killed with everything the launcher
    /// holds.
    fn handle(&mut self, _: KillForShutdown, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, all_down) = tokio::sync::oneshot::channel();
        if !matches!(self.phase, Phase::Done) {
            self.shutdown_waiter = Some(tx);
        }
        // First the ranks save (within the kill grace), then they are stopped; no more
        // decisions after that: the exits that follow are the server's doing, not the ranks'.
        let save_wait = self.save_grace().min(self.rt.settings.kill_grace);
        self.ask_to_save(
            NoticeCause::ServerShutdown,
            AfterSave::Shutdown,
            save_wait,
            None,
            ctx,
        );
        let bound = save_wait + self.rt.settings.kill_grace + Duration::from_secs(1);
        let launcher = self.launcher.clone();
        Box::pin(async move {
            let _ = tokio::time::timeout(bound, all_down).await;
            launcher.kill_all().await;
        })
    }
}
