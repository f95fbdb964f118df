//! What a failure costs, decided by rules in the spirit of Kubernetes' `podFailurePolicy`:
//! exit codes or signals that fail the job at once, that are ignored (restarted without
//! counting against `max_restarts`), or that count (the default); and crash-loop detection,
//! which ends a job whose rank keeps failing the same way without making progress.

use serde::{Deserialize, Serialize};

/// The exit code of the built-in trainer's configuration errors (bad dataset, bad spec):
/// `EX_CONFIG` of sysexits.h. No restart can fix them, so they fail the job at once.
pub const EXIT_CONFIG: i32 = 78;

/// What a matching failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    /// No more restarts: the job fails now.
    FailJob,
    /// Restart without counting against `max_restarts` (e.g. a preemption's exit code).
    Ignore,
    /// Restart and count it (what any failure does without a rule).
    Count,
}

/// One rule: `exit_codes` or `signals` (exactly one of them) and the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureRule {
    /// Exit codes (1–255) this rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_codes: Vec<i32>,
    /// Signal numbers (1–64) this rule matches, e.g. 9 for SIGKILL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<i32>,
    pub action: FailureAction,
}

impl FailureRule {
    /// Why the rule is malformed, if it is.
    pub fn problem(&self) -> Option<&'static str> {
        match (self.exit_codes.is_empty(), self.signals.is_empty()) {
            (true, true) => Some("each failure_policy rule needs exit_codes or signals"),
            (false, false) => Some("a failure_policy rule has exit_codes or signals, not both"),
            _ if self.exit_codes.iter().any(|c| !(1..=255).contains(c)) => {
                Some("failure_policy exit_codes must be between 1 and 255")
            }
            _ if self.signals.iter().any(|s| !(1..=64).contains(s)) => {
                Some("failure_policy signals must be between 1 and 64")
            }
            _ => None,
        }
    }

    fn matches(&self, code: Option<i32>, signal: Option<i32>) -> bool {
        code.is_some_and(|c| self.exit_codes.contains(&c))
            || signal.is_some_and(|s| self.signals.contains(&s))
    }
}

/// The action for a failure with this exit code or signal, and why: the job's first matching
/// rule, else the built-in trainer's configuration errors, else `count`.
pub fn action_for(
    rules: &[FailureRule],
    builtin_trainer: bool,
    code: Option<i32>,
    signal: Option<i32>,
) -> (FailureAction, Option<String>) {
    if let Some((i, rule)) = rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(code, signal))
    {
        let what = match (code, signal) {
            (_, Some(s)) => format!("signal {s}"),
            (Some(c), _) => format!("exit code {c}"),
            _ => "the failure".to_string(),
        };
        return (
            rule.action,
            Some(format!("{what} matches failure_policy rule {}", i + 1)),
        );
    }
    if builtin_trainer && code == Some(EXIT_CONFIG) {
        return (
            FailureAction::FailJob,
            Some("a configuration error of the built-in trainer".to_string()),
        );
    }
    (FailureAction::Count, None)
}

/// Failures of each rank in a row with the same cause and no progress in between.
#[derive(Debug, Clone, Default)]
pub struct CrashLoop {
    last: Vec<Option<Repeat>>,
}

#[derive(Debug, Clone)]
struct Repeat {
    cause: String,
    progress: Progress,
    times: u32,
}

/// What counts as progress: the rank's step and the job's last committed checkpoint.
pub type Progress = (Option<u64>, Option<u64>);

impl CrashLoop {
    pub fn new(world_size: u32) -> Self {
        CrashLoop {
            last: vec![None; world_size as usize],
        }
    }

    /// Counts a failure of `rank`; returns how many times in a row it has now failed with
    /// this cause without progress (1 for a new cause or after progress).
    pub fn observe(&mut self, rank: u32, cause: &str, progress: Progress) -> u32 {
        let Some(slot) = self.last.get_mut(rank as usize) else {
            return 1;
        };
        let times = match slot {
            Some(r) if r.cause == cause && r.progress == progress => r.times + 1,
            _ => 1,
        };
        *slot = Some(Repeat {
            cause: cause.to_string(),
            progress,
            times,
        });
        times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_wins_then_the_builtin_then_count() {
        let rules = vec![
            FailureRule {
                exit_codes: vec![3, 4],
                signals: vec![],
                action: FailureAction::FailJob,
            },
            FailureRule {
                exit_codes: vec![],
                signals: vec![9],
                action: FailureAction::Ignore,
            },
        ];
        assert_eq!(
            action_for(&rules, false, Some(4), None).0,
            FailureAction::FailJob
        );
        assert_eq!(
            action_for(&rules, false, None, Some(9)).0,
            FailureAction::Ignore
        );
        assert_eq!(
            action_for(&rules, false, Some(1), None).0,
            FailureAction::Count
        );
        assert_eq!(
            action_for(&[], true, Some(78), None).0,
            FailureAction::FailJob
        );
        assert_eq!(
            action_for(&[], false, Some(78), None).0,
            FailureAction::Count
        );
        assert!(rules.iter().all(|r| r.problem().is_none()));
        let both = FailureRule {
            exit_codes: vec![1],
            signals: vec![9],
            action: FailureAction::Count,
        };
        assert!(both.problem().is_some());
    }

    #[test]
    fn progress_or_another_cause_resets_the_count() {
        let mut c = CrashLoop::new(2);
        assert_eq!(c.observe(0, "exit 1", (Some(5), None)), 1);
        assert_eq!(c.observe(0, "exit 1", (Some(5), None)), 2);
        assert_eq!(c.observe(1, "exit 1", (Some(5), None)), 1, "per rank");
        assert_eq!(
            c.observe(0, "exit 1", (Some(9), None)),
            1,
            "progress resets"
        );
        assert_eq!(
            c.observe(0, "exit 2", (Some(9), None)),
            1,
            "another cause resets"
        );
        assert_eq!(c.observe(0, "exit 2", (Some(9), None)), 2);
    }
}
