//! The restart policy, in one place: which restarts count against which budget, the
//! exponential backoff with its jitter, and the decision to restart or give up.

use serde::{Deserialize, Serialize};

use super::Outcome;

/// What to restart when a rank fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestartScope {
    /// Only the failed rank (independent workers).
    Worker,
    /// Every rank, from the latest checkpoint, like torchrun (synchronous training).
    Job,
}

impl RestartScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartScope::Worker => "worker",
            RestartScope::Job => "job",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "worker" => Some(RestartScope::Worker),
            "job" => Some(RestartScope::Job),
            _ => None,
        }
    }
}

/// A job's restart policy, from its spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    pub scope: RestartScope,
    /// Restarts allowed per rank (worker scope) or for the group (job scope).
    pub max_restarts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_multiplier: f64,
    pub backoff_max_ms: u64,
    /// Up to this fraction of each backoff is cut at random, so ranks that failed together
    /// do not come back in lockstep.
    pub backoff_jitter: f64,
    /// A failure after the incarnation ran at least this long starts the backoff over (the
    /// budget still counts it), as Kubernetes does for a crash loop after 10 minutes.
    pub backoff_reset_s: f64,
}

/// What to do about one failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Restart number `n` (1-based) of the budget, after `backoff_ms`.
    Restart { n: u32, backoff_ms: u64 },
    /// The budget is spent: `spent` restarts were already made.
    GiveUp { spent: u32 },
}

/// The restarts already made, as the policy counts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartCounts {
    /// Group restarts (job scope).
    pub group: u32,
    /// Restarts of each rank (worker scope).
    pub per_rank: Vec<u32>,
    /// Failures in a row without a stable run in between, of the group and of each rank:
    /// what the backoff grows with.
    pub group_streak: u32,
    pub rank_streak: Vec<u32>,
}

impl RestartCounts {
    pub fn new(world_size: u32) -> Self {
        RestartCounts {
            group: 0,
            per_rank: vec![0; world_size as usize],
            group_streak: 0,
            rank_streak: vec![0; world_size as usize],
        }
    }

    /// Counts a recorded restart row (as restored from the history). A server restart is not
    /// the job's failure and costs nothing.
    pub fn count_row(&mut self, rank: u32, scope: &str, reason: &str) {
        if Outcome::parse(reason) == Some(Outcome::ServerRestart) {
            return;
        }
        match RestartScope::parse(scope) {
            Some(RestartScope::Job) => {
                self.group += 1;
                self.group_streak += 1;
            }
            Some(RestartScope::Worker) => {
                if let Some(n) = self.per_rank.get_mut(rank as usize) {
                    *n += 1;
                }
                if let Some(n) = self.rank_streak.get_mut(rank as usize) {
                    *n += 1;
                }
            }
            None => {}
        }
    }
}

impl RestartPolicy {
    /// Exponential backoff before restart number `n` (1-based), without jitter.
    pub fn backoff_ms(&self, n: u32) -> u64 {
        let exp = self
            .backoff_multiplier
            .powi(n.saturating_sub(1).min(64) as i32);
        let ms = self.backoff_initial_ms as f64 * exp;
        ms.min(self.backoff_max_ms as f64) as u64
    }

    /// How many restarts the failure of `rank` has already used up.
    pub fn spent(&self, counts: &RestartCounts, rank: u32) -> u32 {
        match self.scope {
            RestartScope::Worker => counts.per_rank.get(rank as usize).copied().unwrap_or(0),
            RestartScope::Job => counts.group,
        }
    }

    fn streak(&self, counts: &RestartCounts, rank: u32) -> u32 {
        match self.scope {
            RestartScope::Worker => counts.rank_streak.get(rank as usize).copied().unwrap_or(0),
            RestartScope::Job => counts.group_streak,
        }
    }

    /// Decides about a failure of `rank` whose incarnation ran `ran_for_s` seconds; `draw` is
    /// a uniform random number in [0, 1) for the jitter. Does not change `counts`: `record`
    /// does once the restart is made.
    pub fn decide(&self, counts: &RestartCounts, rank: u32, ran_for_s: f64, draw: f64) -> Decision {
        let spent = self.spent(counts, rank);
        if spent >= self.max_restarts {
            return Decision::GiveUp { spent };
        }
        let n = spent + 1;
        let streak = if ran_for_s >= self.backoff_reset_s {
            0
        } else {
            self.streak(counts, rank)
        };
        let mut backoff_ms = self.backoff_ms(streak + 1);
        if self.backoff_jitter > 0.0 {
            let cut = draw.clamp(0.0, 1.0) * self.backoff_jitter;
            backoff_ms = (backoff_ms as f64 * (1.0 - cut)) as u64;
        }
        Decision::Restart { n, backoff_ms }
    }

    /// Counts restart number `n` of `rank`'s budget as made, after a failure of an
    /// incarnation that ran `ran_for_s` seconds.
    pub fn record(&self, counts: &mut RestartCounts, rank: u32, n: u32, ran_for_s: f64) {
        let stable = ran_for_s >= self.backoff_reset_s;
        let bump = |streak: &mut u32| *streak = if stable { 1 } else { *streak + 1 };
        match self.scope {
            RestartScope::Worker => {
                if let Some(c) = counts.per_rank.get_mut(rank as usize) {
                    *c = n;
                }
                if let Some(s) = counts.rank_streak.get_mut(rank as usize) {
                    bump(s);
                }
            }
            RestartScope::Job => {
                counts.group = n;
                bump(&mut counts.group_streak);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(scope: RestartScope) -> RestartPolicy {
        RestartPolicy {
            scope,
            max_restarts: 2,
            backoff_initial_ms: 500,
            backoff_multiplier: 2.0,
            backoff_max_ms: 1500,
            backoff_jitter: 0.0,
            backoff_reset_s: 600.0,
        }
    }

    #[test]
    fn worker_scope_spends_each_ranks_own_budget() {
        let p = policy(RestartScope::Worker);
        let mut c = RestartCounts::new(2);
        assert_eq!(
            p.decide(&c, 0, 1.0, 0.0),
            Decision::Restart {
                n: 1,
                backoff_ms: 500
            }
        );
        p.record(&mut c, 0, 1, 1.0);
        assert_eq!(
            p.decide(&c, 0, 1.0, 0.0),
            Decision::Restart {
                n: 2,
                backoff_ms: 1000
            }
        );
        p.record(&mut c, 0, 2, 1.0);
        assert_eq!(p.decide(&c, 0, 1.0, 0.0), Decision::GiveUp { spent: 2 });
        // Rank 1 has its own budget.
        assert!(matches!(
            p.decide(&c, 1, 1.0, 0.0),
            Decision::Restart { n: 1, .. }
        ));
    }

    #[test]
    fn job_scope_shares_one_budget_and_backoff_is_capped() {
        let mut p = policy(RestartScope::Job);
        p.max_restarts = 10;
        let mut c = RestartCounts::new(4);
        c.group = 5;
        c.group_streak = 5;
        assert_eq!(
            p.decide(&c, 0, 1.0, 0.0),
            Decision::Restart {
                n: 6,
                backoff_ms: 1500
            }
        );
    }

    #[test]
    fn a_stable_run_starts_the_backoff_over_but_still_counts() {
        let mut p = policy(RestartScope::Worker);
        p.max_restarts = 10;
        let mut c = RestartCounts::new(1);
        for n in 1..=3 {
            p.record(&mut c, 0, n, 1.0);
        }
        assert_eq!(
            p.decide(&c, 0, 1.0, 0.0),
            Decision::Restart {
                n: 4,
                backoff_ms: 1500
            }
        );
        // The fourth incarnation ran for an hour: its failure backs off as a first one.
        assert_eq!(
            p.decide(&c, 0, 3600.0, 0.0),
            Decision::Restart {
                n: 4,
                backoff_ms: 500
            }
        );
        p.record(&mut c, 0, 4, 3600.0);
        assert_eq!(c.rank_streak[0], 1);
        assert_eq!(c.per_rank[0], 4);
    }

    #[test]
    fn jitter_only_shortens_the_backoff() {
        let mut p = policy(RestartScope::Worker);
        p.backoff_jitter = 0.5;
        let c = RestartCounts::new(1);
        let Decision::Restart { backoff_ms, .. } = p.decide(&c, 0, 1.0, 0.999) else {
            panic!()
        };
        assert!((250..=500).contains(&backoff_ms));
    }

    #[test]
    fn restored_rows_count_by_scope_and_server_restarts_are_free() {
        let mut c = RestartCounts::new(2);
        c.count_row(1, "worker", "exit_code");
        c.count_row(0, "job", "signal");
        c.count_row(0, "job", "server_restart");
        assert_eq!(c.group, 1);
        assert_eq!(c.per_rank, vec![0, 1]);
    }
}
