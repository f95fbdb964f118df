//! A Job's stragglers: every rank's step rate compared with the job's median once a second;
//! a rank slow for the whole window is flagged (summary, page, `straggler` event, a log line)
//! and, with `straggler_action: restart`, restarted as a failure with reason `straggler`.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{Job, Phase};
use crate::actors::messages::RestartStraggler;
use crate::domain::straggler::Verdict;

/// How often the ranks' rates are compared.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

impl Job {
    /// A heartbeat of incarnation `attempt` of `rank` reported `step`.
    pub(super) fn straggler_step(&mut self, rank: u32, attempt: u32, step: u64) {
        if !self.rt.settings.accounting {
            return;
        }
        self.stragglers.observe(rank, attempt, step, Instant::now());
    }

    /// `rank`'s process is gone: it has no rate until its next incarnation steps.
    pub(super) fn straggler_gone(&mut self, rank: u32) {
        if let Some(v) = self.stragglers.forget(rank) {
            self.publish_straggler(v);
        }
    }

    pub(super) fn check_stragglers(&mut self, _: &mut Context<Self>) {
        if self.phase != Phase::Running || !self.rt.settings.accounting {
            return;
        }
        let policy = self.stragglers.policy();
        for v in self.stragglers.check(Instant::now()) {
            let rank = v.rank;
            let slot = &self.ranks[rank as usize];
            let attempt = slot.next_attempt.saturating_sub(1);
            self.note(
                Some(rank),
                Some(attempt),
                if v.straggler {
                    format!(
                        "rank {rank} is a straggler: {:.2} steps/s against the job's median of \
                         {:.2} for {:.0} s (straggler_fraction {}){}",
                        v.rate,
                        v.median,
                        policy.window.as_secs_f64(),
                        policy.fraction,
                        if policy.restart {
                            ": restarting it (straggler_action: restart)"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!(
                        "rank {rank} is no longer a straggler: {:.2} steps/s, median {:.2}",
                        v.rate, v.median
                    )
                },
            );
            self.publish_straggler(v);
            if v.straggler {
                self.rt.metrics.stragglers.inc();
            }
            if v.straggler && policy.restart && slot.state.is_live() {
                self.workers[rank as usize].do_send(RestartStraggler { attempt });
            }
        }
    }

    fn publish_straggler(&self, v: Verdict) {
        self.rt.recorder.event(
            "straggler",
            self.id,
            serde_json::json!({"rank": v.rank, "straggler": v.straggler,
                               "steps_per_s": v.rate, "median_steps_per_s": v.median}),
        );
    }

    /// Per rank: its own steps/s and its straggler flag, for the summary.
    pub(super) fn rank_rates(&self) -> Vec<(Option<f64>, bool)> {
        let now = Instant::now();
        (0..self.spec.world_size)
            .map(|r| {
                (
                    self.stragglers.rate(r, now),
                    self.stragglers.is_straggler(r),
                )
            })
            .collect()
    }
}
