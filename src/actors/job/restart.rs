//! A Job's decision when one of its ranks fails: the failure policy, crash-loop detection,
//! the restart policy's budget and backoff, and the restart itself (one rank, or the group).

use std::time::Duration;

use actix::prelude::*;
use rand::Rng;

use super::{Job, Phase};
use crate::actors::messages::WorkerExited;
use crate::domain::failure_policy::{self, FailureAction};
use crate::domain::{Decision, Outcome, RankState, RestartPolicy, RestartScope};
use crate::store::history::HistoryOp;
use crate::store::now;

impl Job {
    pub(super) fn on_failure(&mut self, msg: WorkerExited, ctx: &mut Context<Job>) {
        let rank = msg.rank;
        let cause = format!("rank {rank} (attempt {}): {}", msg.attempt, msg.detail);
        let with_tail = if msg.tail.is_empty() {
            cause.clone()
        } else {
            format!("{cause}; last lines:\n{}", msg.tail.join("\n"))
        };
        let scope = self.policy.scope;
        let draw = rand::rng().random_range(0.0..1.0);
        // How long the incarnation ran: a failure after a stable run starts the backoff over.
        let ran_for_s = match self.ranks[rank as usize].state {
            RankState::Running { since } => {
                (chrono::Utc::now() - since).num_milliseconds() as f64 / 1000.0
            }
            _ => 0.0,
        };
        // The job's failure policy first: some failures end the job, some cost nothing.
        let (action, why) = failure_policy::action_for(
            &self.spec.failure_policy,
            self.spec.command.is_none(),
            msg.exit.code,
            msg.exit.signal,
        );
        if action == FailureAction::FailJob {
            self.ranks[rank as usize].state = RankState::failed(Some(msg.outcome));
            let why = why.unwrap_or_default();
            self.fail(format!("failure_policy: {why}: {with_tail}"), ctx);
            return;
        }
        let counted = action == FailureAction::Count;
        let policy = if counted {
            self.policy
        } else {
            // Not counted: no budget to run out of.
            RestartPolicy {
                max_restarts: u32::MAX,
                ..self.policy
            }
        };
        let (n, backoff_ms) = match policy.decide(&self.counts, rank, ran_for_s, draw) {
            Decision::Restart { n, backoff_ms } => (n, backoff_ms),
            Decision::GiveUp { spent } => {
                self.ranks[rank as usize].state = RankState::failed(Some(msg.outcome));
                let reason = format!(
                    "{} after {spent} restart(s) (max_restarts {}): {with_tail}",
                    msg.outcome.as_str(),
                    self.policy.max_restarts
                );
                self.fail(reason, ctx);
                return;
            }
        };
        // A deterministic error that repeats without progress will repeat again: end the job
        // instead of spending its budget (killed or hung ranks, and failures the policy
        // ignores, are not such errors).
        if counted
            && self.spec.crash_loop_after > 0
            && matches!(msg.outcome, Outcome::ExitCode | Outcome::SpawnError)
        {
            let progress = (
                self.ranks[rank as usize].progress.step,
                self.last_checkpoint.as_ref().map(|c| c.step),
            );
            let times = self.crash_loop.observe(rank, &msg.detail, progress);
            if times >= self.spec.crash_loop_after {
                self.ranks[rank as usize].state = RankState::failed(Some(msg.outcome));
                let reason = format!(
                    "crash_loop: rank {rank} failed {times} times in a row the same way with no \
                     progress in between (crash_loop_after {}): {with_tail}",
                    self.spec.crash_loop_after
                );
                self.fail(reason, ctx);
                return;
            }
        }
        if counted {
            self.policy.record(&mut self.counts, rank, n, ran_for_s);
        }
        let slot = &mut self.ranks[rank as usize];
        self.rt.recorder.record(HistoryOp::RestartDetected {
            job_id: self.id,
            rank,
            attempt: slot.next_attempt,
            scope: scope.as_str(),
            reason: msg.outcome,
            exit_code: msg.exit.code,
            signal: msg.exit.signal,
            detail: with_tail,
            detected_at: now(),
            backoff_ms,
        });
        slot.restart_pending = true;
        self.restart_events += 1;
        tracing::warn!(
            target: "trainvisor::job",
            event = "rank_failed",
            job_id = %self.id,
            rank,
            attempt = msg.attempt,
            reason = msg.outcome.as_str(),
            cause = %cause,
            scope = scope.as_str(),
            backoff_ms,
            "rank failed; restarting"
        );
        self.rt
            .metrics
            .restarts
            .get_or_create(&crate::metrics::RestartLabels {
                reason: msg.outcome.as_str().to_string(),
                scope: scope.as_str().to_string(),
            })
            .inc();
        self.rt
            .metrics
            .detection_seconds
            .observe(msg.ended.elapsed().as_secs_f64());
        self.rt.recorder.event(
            "restart",
            self.id,
            serde_json::json!({"rank": rank, "reason": msg.outcome.as_str(), "detail": cause,
                               "scope": scope.as_str(), "backoff_ms": backoff_ms,
                               "restarts": self.restart_events}),
        );
        self.rt.recorder.note(
            self.id,
            Some(rank),
            Some(msg.attempt),
            if counted {
                format!(
                    "{cause}; restart {n}/{} ({} scope) in {backoff_ms} ms",
                    self.policy.max_restarts,
                    scope.as_str()
                )
            } else {
                format!(
                    "{cause}; restart not counted against max_restarts ({}) ({} scope) in \
                     {backoff_ms} ms",
                    why.unwrap_or_default(),
                    scope.as_str()
                )
            },
        );
        self.open_incident(rank, msg.outcome, &cause, scope, backoff_ms);
        let slot = &mut self.ranks[rank as usize];
        match scope {
            RestartScope::Worker => {
                slot.state = RankState::backoff(backoff_ms);
                ctx.run_later(Duration::from_millis(backoff_ms), move |act, ctx| {
                    let state = act.ranks[rank as usize].state;
                    if act.phase == Phase::Running && matches!(state, RankState::Backoff { .. }) {
                        act.start_ranks(vec![rank], ctx);
                    }
                });
            }
            RestartScope::Job => {
                slot.state = RankState::failed(Some(msg.outcome));
                self.phase = Phase::GroupRestart { backoff_ms };
                self.terminate_live();
                self.after_rank_down(ctx);
            }
        }
    }
}
