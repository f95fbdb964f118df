//! The restart verdict: what one rank's failure leads to, as one function over plain data,
//! its rules in the order they apply (README, "Failures and restarts"):
//!
//! 1. the job's `failure_policy` (first matching rule; the built-in trainer's configuration
//!    error, exit 78, fails the job): `fail_job` fails it, `ignore` restarts without counting;
//! 2. the budget (`max_restarts`, per rank or for the group): spent, the job fails;
//! 3. crash-loop detection (`crash_loop_after`): a counted exit code or spawn error repeated
//!    with the same cause and no progress in between fails the job;
//! 4. otherwise a restart of the rank (`worker` scope) or of the group (`job` scope) after the
//!    exponential backoff, counted unless the policy ignores the failure.
//!
//! The Job carries the verdict out (records, events, timers); nothing here does I/O.

use super::failure_policy::{self, CrashLoop, FailureAction, FailureRule};
use super::restart::{Decision, RestartCounts, RestartPolicy, RestartScope};
use super::state::Outcome;

/// One failure of one incarnation.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub rank: u32,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// What the failure was (the crash-loop detector compares it between failures).
    pub cause: &'a str,
    /// How long the incarnation ran, in seconds.
    pub ran_for_s: f64,
    /// The rank's step and the job's last committed checkpoint: progress between failures.
    pub progress: failure_policy::Progress,
}

/// The job's rules for failures, from its spec.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub policy: RestartPolicy,
    pub failure_policy: &'a [FailureRule],
    /// The job runs the built-in trainer (whose exit 78 is a configuration error).
    pub builtin_trainer: bool,
    /// 0: crash-loop detection is off.
    pub crash_loop_after: u32,
}

/// What to do about a failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Restart the rank (`Worker`) or every rank (`Job`) after `backoff_ms`.
    Restart {
        scope: RestartScope,
        backoff_ms: u64,
        /// Restart number `n` of the budget; none when the failure policy ignores it (then
        /// `ignored` says why).
        n: Option<u32>,
        ignored: Option<String>,
    },
    /// Fail the job.
    Fail(FailWhy),
}

/// Why a failure fails the job.
#[derive(Debug, Clone, PartialEq)]
pub enum FailWhy {
    /// A failure-policy rule (or the built-in trainer's configuration error) says so.
    FailurePolicy(String),
    /// `spent` restarts were made of `max` allowed.
    BudgetSpent { spent: u32, max: u32 },
    /// The same failure `times` times in a row without progress (`after` allowed).
    CrashLoop { times: u32, after: u32 },
}

impl FailWhy {
    /// The job's failure reason, `with_tail` being the rank, the cause and its last lines.
    pub fn reason(&self, rank: u32, outcome: Outcome, with_tail: &str) -> String {
        match self {
            FailWhy::FailurePolicy(why) => format!("failure_policy: {why}: {with_tail}"),
            FailWhy::BudgetSpent { spent, max } => format!(
                "{} after {spent} restart(s) (max_restarts {max}): {with_tail}",
                outcome.as_str()
            ),
            FailWhy::CrashLoop { times, after } => format!(
                "crash_loop: rank {rank} failed {times} times in a row the same way with no \
                 progress in between (crash_loop_after {after}): {with_tail}"
            ),
        }
    }
}

/// The verdict on `failure`, given the restarts made so far (`counts`), the job's `rules` and
/// the crash-loop state (which this failure updates when it is one the detector watches);
/// `draw` is a uniform random number in [0, 1) for the backoff's jitter. `counts` is left
/// as it is: the Job records the restart once it makes it.
pub fn verdict(
    failure: &Failure,
    rules: &Rules,
    counts: &RestartCounts,
    crash_loop: &mut CrashLoop,
    draw: f64,
) -> Verdict {
    let (action, why) = failure_policy::action_for(
        rules.failure_policy,
        rules.builtin_trainer,
        failure.exit_code,
        failure.signal,
    );
    if action == FailureAction::FailJob {
        return Verdict::Fail(FailWhy::FailurePolicy(why.unwrap_or_default()));
    }
    let counted = action == FailureAction::Count;
    let policy = if counted {
        rules.policy
    } else {
        // Not counted: no budget to run out of.
        RestartPolicy {
            max_restarts: u32::MAX,
            ..rules.policy
        }
    };
    let rank = failure.rank;
    let (n, backoff_ms) = match policy.decide(counts, rank, failure.ran_for_s, draw) {
        Decision::Restart { n, backoff_ms } => (n, backoff_ms),
        Decision::GiveUp { spent } => {
            return Verdict::Fail(FailWhy::BudgetSpent {
                spent,
                max: rules.policy.max_restarts,
            });
        }
    };
    // A deterministic error that repeats without progress will repeat again: end the job
    // instead of spending its budget (killed or hung ranks, and failures the policy ignores,
    // are not such errors).
    if counted
        && rules.crash_loop_after > 0
        && matches!(failure.outcome, Outcome::ExitCode | Outcome::SpawnError)
    {
        let times = crash_loop.observe(rank, failure.cause, failure.progress);
        if times >= rules.crash_loop_after {
            return Verdict::Fail(FailWhy::CrashLoop {
                times,
                after: rules.crash_loop_after,
            });
        }
    }
    Verdict::Restart {
        scope: rules.policy.scope,
        backoff_ms,
        n: counted.then_some(n),
        ignored: (!counted).then(|| why.unwrap_or_default()),
    }
}

#[cfg(test)]
#[path = "verdict/tests.rs"]
mod tests;
