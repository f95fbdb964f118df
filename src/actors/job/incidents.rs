//! A Job's incidents: opened when a failure is answered with a restart, moved on as the
//! replacements start, beat and step past the checkpoint they resumed from, closed when the
//! job (or the server) ends first; each change is recorded whole. Goodput for the summary.

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::Job;
use crate::actors::messages::{CaptureStacks, KillHung, RankHung};
use crate::actors::worker::STACKS_LIMIT;
use crate::domain::incident::{Failure, Goodput, Incident, IncidentEnd, RankStacks};
use crate::domain::{Outcome, RestartScope};
use crate::store::history::HistoryOp;

impl Job {
    /// A failure of `rank` is being answered with a restart of `scope`.
    pub(super) fn open_incident(
        &mut self,
        rank: u32,
        reason: Outcome,
        detail: &str,
        scope: RestartScope,
        backoff_ms: u64,
        survivors_save: Option<u64>,
    ) {
        if !self.rt.settings.accounting {
            return;
        }
        let now = Utc::now();
        let ranks: Vec<u32> = match scope {
            RestartScope::Worker => vec![rank],
            RestartScope::Job => (0..self.spec.world_size)
                .filter(|&r| r == rank || !self.ranks[r as usize].state.is_succeeded())
                .collect(),
        };
        // A restarted rank that fails again ends the incident it was recovering from.
        for i in 0..self.incidents.len() {
            let inc = &mut self.incidents[i];
            if inc.is_open() && ranks.iter().any(|&r| inc.covers(r)) {
                inc.close(IncidentEnd::FailedAgain, now);
                self.record_incident(i, now);
            }
        }
        // Heartbeats may lag behind a commit: every rank had reached a committed step. A
        // script that checkpoints by itself resumes from its last `torch.save` (as automatic
        // heartbeats reported it; see `TRAINVISOR_RESUME_STEP`). The survivors' save of a
        // synchronous group, when they make one, comes first.
        let resumed_step = survivors_save
            .or(self.last_checkpoint.as_ref().map(|c| c.step))
            .or_else(|| {
                self.ranks
                    .iter()
                    .filter_map(|r| r.progress.saved_step)
                    .max()
            });
        let last_step = ranks
            .iter()
            .filter_map(|&r| self.ranks[r as usize].progress.step)
            .max()
            .max(resumed_step);
        let seq = (self.past_incidents.len() + self.incidents.len()) as u32 + 1;
        self.incidents.push(Incident::open(Failure {
            seq,
            rank,
            reason,
            detail: detail.to_string(),
            scope,
            ranks,
            backoff_ms,
            at: now,
            last_step,
            resumed_step,
            step_s: self.progress.step_s(),
            stacks: match self.hang_stacks.take() {
                Some((hung, stacks)) if hung == rank => stacks,
                _ => Vec::new(),
            },
        }));
        self.record_incident(self.incidents.len() - 1, now);
        let m = &self.rt.metrics;
        m.incidents.inc();
        if let Some(i) = self.incidents.last() {
            m.steps_lost.inc_by(i.steps_lost().unwrap_or(0));
        }
    }

    /// The survivors' save did not commit: the group resumes from the last checkpoint, and
    /// the open incident says so (its steps lost counted now).
    pub(super) fn survivors_save_failed(&mut self) {
        let resumed = self.last_checkpoint.as_ref().map(|c| c.step);
        let Some(i) = self.incidents.iter().rposition(Incident::is_open) else {
            return;
        };
        let before = self.incidents[i].steps_lost().unwrap_or(0);
        self.incidents[i].failure.resumed_step = resumed;
        let after = self.incidents[i].steps_lost().unwrap_or(0);
        self.rt
            .metrics
            .steps_lost
            .inc_by(after.saturating_sub(before));
        self.record_incident(i, Utc::now());
    }

    /// A process of `rank` is running.
    pub(super) fn incident_spawned(&mut self, rank: u32) {
        if self.incidents.is_empty() {
            return;
        }
        let now = Utc::now();
        for i in 0..self.incidents.len() {
            if self.incidents[i].spawned(rank, now) {
                self.record_incident(i, now);
                let took = now - self.incidents[i].failure.at;
                self.rt
                    .metrics
                    .replacement_seconds
                    .observe(took.num_milliseconds() as f64 / 1000.0);
            }
        }
    }

    /// A heartbeat of `rank` (its current incarnation) reporting `step`.
    pub(super) fn incident_heartbeat(&mut self, rank: u32, step: Option<u64>) {
        if !self.incidents.iter().any(Incident::is_open) {
            return;
        }
        let now = Utc::now();
        for i in 0..self.incidents.len() {
            if self.incidents[i].heartbeat(rank, step, now) {
                self.record_incident(i, now);
                if let Some(at) = self.incidents[i].training_at {
                    let took = at - self.incidents[i].failure.at;
                    self.rt
                        .metrics
                        .training_again_seconds
                        .observe(took.num_milliseconds() as f64 / 1000.0);
                }
            }
        }
    }

    /// Once a second: incidents of ranks that report nothing end once they have stayed up
    /// (`Incident::alive`).
    pub(super) fn check_quiet_incidents(&mut self) {
        if !self.incidents.iter().any(Incident::is_open) {
            return;
        }
        let now = Utc::now();
        for i in 0..self.incidents.len() {
            if self.incidents[i].alive(now) {
                self.record_incident(i, now);
            }
        }
    }

    /// The job or the server ends: what is still open ends with it.
    pub(super) fn close_incidents(&mut self, end: IncidentEnd) {
        let now = Utc::now();
        for i in 0..self.incidents.len() {
            if self.incidents[i].close(end, now) {
                self.record_incident(i, now);
            }
        }
    }

    fn record_incident(&self, i: usize, now: DateTime<Utc>) {
        self.rt.recorder.record(HistoryOp::Incident {
            job_id: self.id,
            row: Box::new(self.incidents[i].row(now)),
        });
    }

    /// Where the job's wall time went, from its start (running) to its end or now.
    pub(super) fn goodput(&self, step: Option<u64>) -> Option<Goodput> {
        let started: DateTime<Utc> = self.started_at.as_deref()?.parse().ok()?;
        let now = Utc::now();
        let wall_s = (now - started).num_milliseconds() as f64 / 1000.0;
        let rows: Vec<_> = self
            .past_incidents
            .iter()
            .cloned()
            .chain(self.incidents.iter().map(|i| i.row(now)))
            .collect();
        Some(Goodput::of(&rows, wall_s, step))
    }
}

impl Handler<RankHung> for Job {
    type Result = ();

    /// Before a hung rank is killed: what every rank of the job is doing, kept for the
    /// incident its failure opens, with one line per rank in the job's log.
    fn handle(&mut self, msg: RankHung, ctx: &mut Context<Self>) {
        let asks: Vec<_> = self
            .workers
            .iter()
            .map(|w| tokio::time::timeout(STACKS_LIMIT * 2, w.send(CaptureStacks)))
            .collect();
        ctx.spawn(futures_util::future::join_all(asks).into_actor(self).map(
            move |answers, act, _| {
                let stacks: Vec<RankStacks> =
                    answers.into_iter().filter_map(|a| a.ok()?.ok()?).collect();
                for s in &stacks {
                    let lines = s.text.lines().count();
                    act.note(
                        Some(s.rank),
                        Some(s.attempt),
                        format!(
                            "stacks of rank {} (pid {}) before rank {} is killed: {} ({} lines; \
                                 GET /jobs/{}/incidents){}",
                            s.rank,
                            s.pid,
                            msg.rank,
                            s.kind,
                            lines,
                            act.id,
                            innermost(&s.text)
                                .map(|f| format!(", innermost: {f}"))
                                .unwrap_or_default()
                        ),
                    );
                }
                act.hang_stacks = Some((msg.rank, stacks));
                if let Some(w) = act.workers.get(msg.rank as usize) {
                    w.do_send(KillHung {
                        attempt: msg.attempt,
                    });
                }
            },
        ));
    }
}

/// The innermost frame of the first thread listed in a faulthandler dump:
/// `File "train.py", line 5 in wait_for_peers`.
fn innermost(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("File \""))
}
