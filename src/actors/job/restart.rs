//! A Job's response when one of its ranks fails: it asks the pure restart verdict
//! (`domain::verdict`: failure policy, budget, crash loop, backoff) what to do, and carries it
//! out (the records, events and metrics, and the restart of one rank or of the group).

use std::time::Duration;

use actix::prelude::*;
use rand::Rng;

use super::{Job, Phase};
use crate::actors::messages::WorkerExited;
use crate::domain::verdict::{Failure, Rules, Verdict, verdict};
use crate::domain::{RankState, RestartScope};
use crate::store::history::HistoryOp;

impl Job {
    pub(super) fn on_failure(&mut self, msg: WorkerExited, ctx: &mut Context<Job>) {
        let rank = msg.rank;
        let cause = format!("rank {rank} (attempt {}): {}", msg.attempt, msg.detail);
        let with_tail = if msg.tail.is_empty() {
            cause.clone()
        } else {
            format!("{cause}; last lines:\n{}", msg.tail.join("\n"))
        };
        let draw = rand::rng().random_range(0.0..1.0);
        // How long the incarnation ran: a failure after a stable run starts the backoff over.
        let ran_for_s = match self.ranks[rank as usize].state {
            RankState::Running { since } => {
                (chrono::Utc::now() - since).num_milliseconds() as f64 / 1000.0
            }
            _ => 0.0,
        };
        let failure = Failure {
            rank,
            outcome: msg.outcome,
            exit_code: msg.exit.code,
            signal: msg.exit.signal,
            cause: &msg.detail,
            ran_for_s,
            progress: (
                self.ranks[rank as usize].progress.step,
                self.last_checkpoint.as_ref().map(|c| c.step),
            ),
        };
        let rules = Rules {
            policy: self.policy,
            failure_policy: &self.spec.failure_policy,
            builtin_trainer: self.spec.command.is_none(),
            crash_loop_after: self.spec.crash_loop_after,
        };
        let (scope, backoff_ms, n, ignored) =
            match verdict(&failure, &rules, &self.counts, &mut self.crash_loop, draw) {
                Verdict::Restart {
                    scope,
                    backoff_ms,
                    n,
                    ignored,
                } => (scope, backoff_ms, n, ignored),
                Verdict::Fail(why) => {
                    self.ranks[rank as usize].state = RankState::failed(Some(msg.outcome));
                    self.fail(why.reason(rank, msg.outcome, &with_tail), ctx);
                    return;
                }
            };
        if let Some(n) = n {
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
            // When the rank's end was seen, which may be before its exit code was known.
            detected_at: crate::domain::ts(
                chrono::Utc::now()
                    - chrono::Duration::from_std(msg.ended.elapsed()).unwrap_or_default(),
            ),
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
            match (n, ignored) {
                (Some(n), _) => format!(
                    "{cause}; restart {n}/{} ({} scope) in {backoff_ms} ms",
                    self.policy.max_restarts,
                    scope.as_str()
                ),
                (None, why) => format!(
                    "{cause}; restart not counted against max_restarts ({}) ({} scope) in \
                     {backoff_ms} ms",
                    why.unwrap_or_default(),
                    scope.as_str()
                ),
            },
        );
        // In a synchronous group the survivors may save the last step every rank completed:
        // the group then resumes there, not at the last checkpoint.
        let survivors = match scope {
            RestartScope::Job => self.survivors_step(),
            RestartScope::Worker => None,
        };
        self.open_incident(rank, msg.outcome, &cause, scope, backoff_ms, survivors);
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
                // The survivors save first; the group is stopped once they have.
                if let Some(step) = survivors {
                    self.survivors_save(rank, step, ctx);
                } else {
                    self.terminate_live();
                    self.after_rank_down(ctx);
                }
            }
        }
    }
}
