//! One row per rule of the README's "Failures and restarts" (and the failure policy and
//! crash-loop detection it points to): a failure, the state before it, the verdict.

use super::*;
use crate::domain::failure_policy::FailureRule;

fn policy(scope: RestartScope) -> RestartPolicy {
    RestartPolicy {
        scope,
        max_restarts: 3,
        backoff_initial_ms: 500,
        backoff_multiplier: 2.0,
        backoff_max_ms: 1500,
        backoff_jitter: 0.0,
        backoff_reset_s: 600.0,
    }
}

fn failure(outcome: Outcome, code: Option<i32>, signal: Option<i32>) -> Failure<'static> {
    Failure {
        rank: 1,
        outcome,
        exit_code: code,
        signal,
        cause: "exit code 1",
        ran_for_s: 1.0,
        progress: (Some(10), Some(5)),
    }
}

fn crash(code: i32) -> Failure<'static> {
    failure(Outcome::ExitCode, Some(code), None)
}

fn restart(scope: RestartScope, backoff_ms: u64, n: u32) -> Verdict {
    Verdict::Restart {
        scope,
        backoff_ms,
        n: Some(n),
        ignored: None,
    }
}

const W: RestartScope = RestartScope::Worker;

struct Row {
    rule: &'static str,
    failure: Failure<'static>,
    scope: RestartScope,
    /// Restarts of rank 1 (worker scope) or of the group (job scope) so far, all in a row.
    made: u32,
    failure_policy: Vec<FailureRule>,
    rules: fn(&mut Rules),
    /// Failures of rank 1 just before, with the same cause and no progress.
    repeats: u32,
    draw: f64,
    expect: Verdict,
}

fn row(rule: &'static str, failure: Failure<'static>, expect: Verdict) -> Row {
    Row {
        rule,
        failure,
        scope: W,
        made: 0,
        failure_policy: Vec::new(),
        rules: |_| {},
        repeats: 0,
        draw: 0.0,
        expect,
    }
}

fn on_exit(code: i32, action: FailureAction) -> Vec<FailureRule> {
    vec![FailureRule {
        exit_codes: vec![code],
        signals: Vec::new(),
        action,
    }]
}

fn rows() -> Vec<Row> {
    vec![
        row(
            "crash: an exit code restarts the rank",
            crash(1),
            restart(W, 500, 1),
        ),
        row(
            "crash: a signal restarts the rank",
            failure(Outcome::Signal, None, Some(9)),
            restart(W, 500, 1),
        ),
        row(
            "hang: a heartbeat timeout restarts the rank",
            failure(Outcome::HeartbeatTimeout, None, Some(15)),
            restart(W, 500, 1),
        ),
        row(
            "spawn error restarts the rank",
            failure(Outcome::SpawnError, None, None),
            restart(W, 500, 1),
        ),
        row(
            "an OOM kill restarts the rank",
            failure(Outcome::OomKilled, Some(137), None),
            restart(W, 500, 1),
        ),
        Row {
            made: 2,
            repeats: 2,
            ..row(
                "straggler_action restart: counted and backed off as any failure, never a crash loop",
                failure(Outcome::Straggler, None, Some(15)),
                restart(W, 1500, 3),
            )
        },
        Row {
            made: 1,
            ..row(
                "restart: the backoff grows with failures in a row",
                crash(1),
                restart(W, 1000, 2),
            )
        },
        Row {
            made: 2,
            rules: |r| r.policy.max_restarts = 9,
            ..row(
                "restart: the backoff is capped at backoff_max_ms",
                crash(1),
                restart(W, 1500, 3),
            )
        },
        Row {
            rules: |r| r.policy.backoff_jitter = 0.5,
            draw: 0.5,
            ..row(
                "restart: jitter shortens the backoff",
                crash(1),
                restart(W, 375, 1),
            )
        },
        Row {
            made: 2,
            failure: Failure {
                ran_for_s: 3600.0,
                ..crash(1)
            },
            ..row(
                "restart: a failure after a stable run backs off as a first one, still counted",
                crash(1),
                restart(W, 500, 3),
            )
        },
        Row {
            made: 3,
            ..row(
                "restart: max_restarts spent fails the job",
                crash(1),
                Verdict::Fail(FailWhy::BudgetSpent { spent: 3, max: 3 }),
            )
        },
        Row {
            scope: RestartScope::Job,
            made: 1,
            ..row(
                "scope job: the group restarts and spends the group's budget",
                crash(1),
                restart(RestartScope::Job, 1000, 2),
            )
        },
        Row {
            scope: RestartScope::Job,
            made: 3,
            ..row(
                "scope job: the group's budget spent fails the job",
                crash(1),
                Verdict::Fail(FailWhy::BudgetSpent { spent: 3, max: 3 }),
            )
        },
        Row {
            failure_policy: on_exit(3, FailureAction::FailJob),
            ..row(
                "failure_policy fail_job: the job fails at once",
                crash(3),
                Verdict::Fail(FailWhy::FailurePolicy(
                    "exit code 3 matches failure_policy rule 1".into(),
                )),
            )
        },
        Row {
            made: 3,
            failure_policy: on_exit(143, FailureAction::Ignore),
            ..row(
                "failure_policy ignore: restarted without counting, past the budget",
                crash(143),
                Verdict::Restart {
                    scope: W,
                    backoff_ms: 1500,
                    n: None,
                    ignored: Some("exit code 143 matches failure_policy rule 1".into()),
                },
            )
        },
        Row {
            rules: |r| r.builtin_trainer = true,
            ..row(
                "the built-in trainer's configuration error (78) fails the job",
                crash(78),
                Verdict::Fail(FailWhy::FailurePolicy(
                    "a configuration error of the built-in trainer".into(),
                )),
            )
        },
        row(
            "another command's exit 78 is an ordinary crash",
            crash(78),
            restart(W, 500, 1),
        ),
        Row {
            made: 2,
            repeats: 2,
            ..row(
                "crash loop: the same error crash_loop_after times without progress",
                crash(1),
                Verdict::Fail(FailWhy::CrashLoop { times: 3, after: 3 }),
            )
        },
        Row {
            made: 2,
            repeats: 2,
            rules: |r| r.crash_loop_after = 0,
            ..row(
                "crash loop: crash_loop_after 0 turns it off",
                crash(1),
                restart(W, 1500, 3),
            )
        },
        Row {
            made: 2,
            repeats: 2,
            ..row(
                "crash loop: a signal is not a deterministic error",
                failure(Outcome::Signal, None, Some(9)),
                restart(W, 1500, 3),
            )
        },
        Row {
            made: 2,
            repeats: 2,
            failure: Failure {
                progress: (Some(11), Some(5)),
                ..crash(1)
            },
            ..row(
                "crash loop: progress in between starts it over",
                crash(1),
                restart(W, 1500, 3),
            )
        },
    ]
}

#[test]
fn every_rule_of_failures_and_restarts() {
    for row in rows() {
        let mut rules = Rules {
            policy: policy(row.scope),
            failure_policy: &row.failure_policy,
            builtin_trainer: false,
            crash_loop_after: 3,
        };
        (row.rules)(&mut rules);
        let mut counts = RestartCounts::new(2);
        for n in 1..=row.made {
            rules.policy.record(&mut counts, 1, n, 1.0);
        }
        let mut crash_loop = CrashLoop::new(2);
        for _ in 0..row.repeats {
            crash_loop.observe(1, "exit code 1", (Some(10), Some(5)));
        }
        let got = verdict(&row.failure, &rules, &counts, &mut crash_loop, row.draw);
        assert_eq!(got, row.expect, "{}", row.rule);
    }
}

#[test]
fn the_reasons_name_the_rule_the_rank_and_the_cause() {
    let tail = "rank 1 (attempt 3): exit code 1; last lines:\nboom";
    let budget = FailWhy::BudgetSpent { spent: 3, max: 3 };
    assert_eq!(
        budget.reason(1, Outcome::ExitCode, tail),
        format!("exit_code after 3 restart(s) (max_restarts 3): {tail}")
    );
    let looped = FailWhy::CrashLoop { times: 3, after: 3 }.reason(1, Outcome::ExitCode, tail);
    assert!(looped.starts_with("crash_loop: rank 1 failed 3 times in a row"));
    let policy = FailWhy::FailurePolicy("exit code 3 matches failure_policy rule 1".into());
    assert!(
        policy
            .reason(1, Outcome::ExitCode, tail)
            .starts_with("failure_policy: exit code 3 matches")
    );
}
