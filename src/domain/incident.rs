//! Incidents and goodput: one record per failure of a job (a group restart is one incident
//! covering every rank), with its timeline — detected, replacement(s) spawned, first
//! heartbeat, training again (the first step past the checkpoint resumed from) — and what it
//! cost (steps redone, seconds lost). From a job's incidents, its goodput: the fraction of its
//! wall time not lost to failures.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Outcome, RestartScope, ts};

/// Ranks that report no steps and never heartbeat train again once every restarted rank has
/// stayed up this long after the last of them started: long enough to import torch and join
/// a process group on a loaded machine, and a failure within it is a new incident.
pub const QUIET_ALIVE: Duration = Duration::from_secs(10);

/// How an incident ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentEnd {
    /// Still recovering.
    Open,
    /// The job trains again.
    Recovered,
    /// The job ended (failed, stopped or succeeded) before it trained again.
    JobEnded,
    /// The server stopped or died before the job trained again.
    ServerRestart,
    /// A restarted rank failed again before the job trained again: a new incident follows.
    FailedAgain,
}

impl IncidentEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentEnd::Open => "open",
            IncidentEnd::Recovered => "recovered",
            IncidentEnd::JobEnded => "job_ended",
            IncidentEnd::ServerRestart => "server_restart",
            IncidentEnd::FailedAgain => "failed_again",
        }
    }
}

/// One failure of a job and the recovery from it.
#[derive(Debug, Clone)]
pub struct Incident {
    /// The failure that opened it: the root-cause rank, why, the scope and ranks restarted,
    /// when it was detected, the steps and the stacks.
    pub failure: Failure,
    /// Every replacement process is running.
    pub spawned_at: Option<DateTime<Utc>>,
    /// The first heartbeat of a replacement.
    pub first_heartbeat_at: Option<DateTime<Utc>>,
    /// Every replaced rank reported a step past `resumed_step`: the job trains again.
    pub training_at: Option<DateTime<Utc>>,
    pub end: IncidentEnd,
    /// When it ended (recovered, or the job or server ended first).
    pub ended_at: Option<DateTime<Utc>>,
    /// Ranks of the incident not yet spawned again / not yet past the resumed step.
    not_spawned: BTreeSet<u32>,
    not_training: BTreeSet<u32>,
}

/// What opens an incident.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 1, 2, … within the job.
    pub seq: u32,
    /// The rank whose failure started it (the root cause).
    pub rank: u32,
    pub reason: Outcome,
    pub detail: String,
    pub scope: RestartScope,
    /// The ranks restarted for it: the failed one (worker scope) or all (job scope).
    pub ranks: Vec<u32>,
    pub backoff_ms: u64,
    /// When it was detected.
    pub at: DateTime<Utc>,
    /// The highest step the restarted ranks had reached when it was detected.
    pub last_step: Option<u64>,
    /// The step of the checkpoint the replacements resume from (none: from the start).
    pub resumed_step: Option<u64>,
    /// The job's mean seconds per step just before it was detected (none: not known).
    pub step_s: Option<f64>,
    /// What every rank was doing when this (hung) rank was declared hung, captured before
    /// anything was killed. Empty for other failures.
    pub stacks: Vec<RankStacks>,
}

/// The stacks of one rank's processes, captured before a hung rank was killed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct RankStacks {
    pub rank: u32,
    pub attempt: u32,
    /// The rank's process (group leader).
    pub pid: u32,
    /// `python` (every thread's Python stack, from faulthandler), `native` (each thread's wait
    /// channel and kernel stack from /proc) or `none` (nothing left to look at).
    pub kind: String,
    /// At most 64 KiB.
    pub text: String,
}

impl Incident {
    pub fn open(f: Failure) -> Self {
        let set: BTreeSet<u32> = f.ranks.iter().copied().collect();
        Incident {
            failure: f,
            spawned_at: None,
            first_heartbeat_at: None,
            training_at: None,
            end: IncidentEnd::Open,
            ended_at: None,
            not_spawned: set.clone(),
            not_training: set,
        }
    }

    pub fn is_open(&self) -> bool {
        self.end == IncidentEnd::Open
    }

    /// Whether `rank` is one of the ranks restarted for it.
    pub fn covers(&self, rank: u32) -> bool {
        self.failure.ranks.contains(&rank)
    }

    /// A replacement of `rank` is running. Returns true when the record changed.
    pub fn spawned(&mut self, rank: u32, at: DateTime<Utc>) -> bool {
        if !self.is_open() || !self.not_spawned.remove(&rank) {
            return false;
        }
        if self.not_spawned.is_empty() {
            self.spawned_at = Some(at);
            return true;
        }
        false
    }

    /// A heartbeat of a replacement of `rank`, at `step` if it reported one. The job trains
    /// again once every restarted rank has reported a step past the one resumed from (or, for
    /// ranks that report no steps, has sent a heartbeat). Returns true when the record changed.
    pub fn heartbeat(&mut self, rank: u32, step: Option<u64>, at: DateTime<Utc>) -> bool {
        if !self.is_open() || !self.failure.ranks.contains(&rank) || !self.not_spawned.is_empty() {
            return false;
        }
        let mut changed = false;
        if self.first_heartbeat_at.is_none() {
            self.first_heartbeat_at = Some(at);
            changed = true;
        }
        let past = match (step, self.failure.last_step) {
            (Some(step), _) => step > self.failure.resumed_step.unwrap_or(0),
            // A rank that never reported steps trains again when it is heard from.
            (None, None) => true,
            (None, Some(_)) => false,
        };
        if past && self.not_training.remove(&rank) && self.not_training.is_empty() {
            self.training_at = Some(at);
            self.end = IncidentEnd::Recovered;
            self.ended_at = Some(at);
            changed = true;
        }
        changed
    }

    /// Ranks that report nothing (no step ever, no heartbeat since the failure): the job
    /// trains again once they have all stayed up [`QUIET_ALIVE`], and that moment counts as
    /// when it did. Returns true when the record changed.
    pub fn alive(&mut self, now: DateTime<Utc>) -> bool {
        let quiet = self.failure.last_step.is_none() && self.first_heartbeat_at.is_none();
        let Some(spawned) = self.spawned_at.filter(|_| self.is_open() && quiet) else {
            return false;
        };
        let at = spawned + chrono::Duration::from_std(QUIET_ALIVE).unwrap_or_default();
        if now < at {
            return false;
        }
        self.not_training.clear();
        self.training_at = Some(at);
        self.end = IncidentEnd::Recovered;
        self.ended_at = Some(at);
        true
    }

    /// The job or the server ended while the incident was open.
    pub fn close(&mut self, end: IncidentEnd, at: DateTime<Utc>) -> bool {
        if !self.is_open() {
            return false;
        }
        self.end = end;
        self.ended_at = Some(at);
        true
    }

    /// Steps done before the failure that must be done again; unknown (None) when the
    /// ranks reported no step before it.
    pub fn steps_lost(&self) -> Option<u64> {
        let f = &self.failure;
        let last = f.last_step?;
        Some(last.saturating_sub(f.resumed_step.unwrap_or(0)))
    }

    /// The time the lost steps had taken: steps lost at the job's step time.
    pub fn redo_s(&self) -> Option<f64> {
        Some(self.steps_lost()? as f64 * self.failure.step_s?)
    }

    /// Seconds from detection to training again (or to the end, or to `now` while open).
    pub fn seconds_lost(&self, now: DateTime<Utc>) -> f64 {
        let until = self.ended_at.unwrap_or(now);
        ((until - self.failure.at).num_milliseconds().max(0)) as f64 / 1000.0
    }

    /// The record as the database and the API carry it.
    pub fn row(&self, now: DateTime<Utc>) -> IncidentRow {
        let f = &self.failure;
        IncidentRow {
            seq: f.seq,
            rank: f.rank,
            reason: f.reason.as_str().to_string(),
            detail: f.detail.clone(),
            scope: f.scope.as_str().to_string(),
            ranks: f.ranks.clone(),
            backoff_ms: f.backoff_ms,
            detected_at: ts(f.at),
            spawned_at: self.spawned_at.map(ts),
            first_heartbeat_at: self.first_heartbeat_at.map(ts),
            training_at: self.training_at.map(ts),
            ended_at: self.ended_at.map(ts),
            end: self.end.as_str().to_string(),
            last_step: f.last_step,
            resumed_step: f.resumed_step,
            steps_lost: self.steps_lost(),
            seconds_lost: self.seconds_lost(now),
            stacks: f.stacks.clone(),
            redo_s: self.redo_s(),
        }
    }
}

/// An incident as stored and served: `GET /jobs/{id}/incidents`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct IncidentRow {
    pub seq: u32,
    /// The rank whose failure started it.
    pub rank: u32,
    /// `exit_code | signal | heartbeat_timeout | spawn_error | oom_killed | …`.
    pub reason: String,
    pub detail: String,
    /// `worker` (the failed rank restarted) or `job` (every rank restarted: one incident).
    pub scope: String,
    pub ranks: Vec<u32>,
    pub backoff_ms: u64,
    pub detected_at: String,
    pub spawned_at: Option<String>,
    pub first_heartbeat_at: Option<String>,
    pub training_at: Option<String>,
    pub ended_at: Option<String>,
    /// `open | recovered | job_ended | server_restart | failed_again`.
    pub end: String,
    pub last_step: Option<u64>,
    pub resumed_step: Option<u64>,
    /// Null when the ranks reported no step before the failure: unknown, not none.
    pub steps_lost: Option<u64>,
    pub seconds_lost: f64,
    /// For a hung rank: what every rank of the job was doing before it was killed.
    #[serde(default)]
    pub stacks: Vec<RankStacks>,
    /// The time the lost steps had taken: `steps_lost` at the job's step time just before
    /// the failure (null when either is unknown).
    #[serde(default)]
    pub redo_s: Option<f64>,
}

/// Where a job's wall time went: `goodput` in the summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Goodput {
    pub incidents: u32,
    /// From the job's start (running) to its end, or to now.
    pub wall_s: f64,
    /// Wall time less the time recovering.
    pub training_s: f64,
    /// Σ seconds from each failure's detection to training again.
    pub recovering_s: f64,
    /// The part of `recovering_s` spent waiting in restart backoff.
    pub backoff_s: f64,
    /// Σ steps done again after resuming from an older checkpoint (of the incidents where
    /// they are known).
    pub steps_redone: u64,
    /// The training time those steps took the first time (at the job's mean step time); null
    /// when an incident's steps lost are unknown (its ranks reported no steps).
    pub redo_s: Option<f64>,
    /// (wall − recovering − redo) / wall: 1.0 for a job that never failed.
    pub goodput: f64,
    /// True when an incident's steps lost are unknown: the redone steps are left out and the
    /// time recovering of ranks that report nothing is an estimate (see `QUIET_ALIVE`), so
    /// `goodput` is an upper bound.
    pub estimate: bool,
}

impl Goodput {
    /// `step` is the job's step now (the slowest rank's).
    pub fn of(incidents: &[IncidentRow], wall_s: f64, step: Option<u64>) -> Goodput {
        // Folded from +0.0: `sum()` of no floats is -0.0, which the API would show as such.
        let recovering_s = incidents.iter().fold(0.0, |a, i| a + i.seconds_lost);
        let backoff_s = incidents.iter().fold(0.0, |a, i| {
            a + (i.backoff_ms as f64 / 1000.0).min(i.seconds_lost)
        });
        let steps_redone: u64 = incidents.iter().filter_map(|i| i.steps_lost).sum();
        let estimate = incidents.iter().any(|i| i.steps_lost.is_none());
        let wall_s = wall_s.max(0.0);
        let training_s = (wall_s - recovering_s).max(0.0);
        // Each incident's redo at the step time measured before it; where that is not known,
        // at the job's mean step time over its whole training time.
        let executed = step.unwrap_or(0) + steps_redone;
        let redo_s: f64 = incidents
            .iter()
            .map(|i| match (i.redo_s, i.steps_lost) {
                (Some(redo), _) => redo,
                (None, Some(lost)) if executed > 0 => training_s * lost as f64 / executed as f64,
                _ => 0.0,
            })
            // Not `sum()`, whose empty sum is -0.0.
            .fold(0.0, |a, b| a + b);
        let goodput = if wall_s > 0.0 {
            ((wall_s - recovering_s - redo_s) / wall_s).clamp(0.0, 1.0)
        } else {
            1.0
        };
        Goodput {
            incidents: incidents.len() as u32,
            wall_s,
            training_s,
            recovering_s,
            backoff_s,
            steps_redone,
            redo_s: (!estimate).then_some(redo_s),
            goodput,
            estimate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn failure(ranks: Vec<u32>, last: Option<u64>, resumed: Option<u64>) -> Failure {
        Failure {
            seq: 1,
            rank: ranks[0],
            reason: Outcome::Signal,
            detail: "killed".into(),
            scope: if ranks.len() > 1 {
                RestartScope::Job
            } else {
                RestartScope::Worker
            },
            ranks,
            backoff_ms: 500,
            at: Utc::now(),
            last_step: last,
            resumed_step: resumed,
            step_s: None,
            stacks: Vec::new(),
        }
    }

    #[test]
    fn a_job_without_incidents_recovered_for_plus_zero_seconds() {
        let g = Goodput::of(&[], 12.0, Some(40));
        assert!(
            g.recovering_s == 0.0 && g.recovering_s.is_sign_positive(),
            "{g:?}"
        );
        assert!(g.backoff_s.is_sign_positive(), "{g:?}");
    }

    #[test]
    fn a_group_restart_recovers_when_every_rank_steps_past_the_checkpoint() {
        let t0 = Utc::now();
        let at = |ms| t0 + Duration::milliseconds(ms);
        let mut i = Incident::open(failure(vec![0, 1], Some(37), Some(30)));
        assert!(!i.heartbeat(0, Some(31), at(10)), "not spawned yet");
        assert!(!i.spawned(0, at(600)));
        assert!(i.spawned(1, at(650)));
        assert_eq!(i.spawned_at, Some(at(650)));
        assert!(i.heartbeat(0, Some(30), at(900)), "first heartbeat");
        assert!(!i.heartbeat(0, Some(31), at(950)), "rank 1 is not past yet");
        assert!(i.heartbeat(1, Some(31), at(1000)));
        assert_eq!(i.end, IncidentEnd::Recovered);
        assert_eq!(i.training_at, Some(at(1000)));
        assert_eq!(i.steps_lost(), Some(7));
        assert!(!i.close(IncidentEnd::JobEnded, at(2000)), "already ended");
        let row = i.row(at(5000));
        assert_eq!(row.first_heartbeat_at, Some(ts(at(900))));
        assert!(row.detected_at <= row.spawned_at.clone().unwrap());
        assert!(row.spawned_at <= row.first_heartbeat_at);
        assert!(row.first_heartbeat_at <= row.training_at);
    }

    #[test]
    fn without_a_checkpoint_every_step_is_lost_and_ranks_without_steps_count_on_heartbeat() {
        let mut i = Incident::open(failure(vec![2], Some(12), None));
        assert_eq!(i.steps_lost(), Some(12));
        let mut quiet = Incident::open(failure(vec![2], None, None));
        let t = Utc::now();
        quiet.spawned(2, t);
        assert!(quiet.heartbeat(2, None, t));
        assert_eq!(quiet.end, IncidentEnd::Recovered);
        assert!(i.close(IncidentEnd::ServerRestart, t));
        assert_eq!(i.end.as_str(), "server_restart");
    }

    #[test]
    fn goodput_is_one_without_failures_and_lower_with_them() {
        assert_eq!(Goodput::of(&[], 100.0, Some(1000)).goodput, 1.0);
        let mut i = Incident::open(failure(vec![0], Some(500), Some(400)));
        let t = i.failure.at;
        i.spawned(0, t);
        i.heartbeat(0, Some(401), t + Duration::seconds(10));
        let g = Goodput::of(&[i.row(t)], 100.0, Some(1000));
        assert_eq!(g.recovering_s, 10.0);
        assert_eq!(g.steps_redone, 100);
        assert_eq!(g.backoff_s, 0.5);
        // 90 s of training did 1100 steps; 100 of them were redone.
        let redo_s = g.redo_s.unwrap();
        assert!((redo_s - 90.0 * 100.0 / 1100.0).abs() < 1e-9);
        assert!((g.goodput - (100.0 - 10.0 - redo_s) / 100.0).abs() < 1e-9);
        assert!(g.goodput < 1.0);
        assert!(!g.estimate);
        // With the step time measured before the failure, the redo is the time the lost
        // steps took (startup and stalls in the training time do not inflate it).
        i.failure.step_s = Some(0.05);
        let g = Goodput::of(&[i.row(t)], 100.0, Some(1000));
        assert!((g.redo_s.unwrap() - 100.0 * 0.05).abs() < 1e-9);
        assert!((g.goodput - (100.0 - 10.0 - 5.0) / 100.0).abs() < 1e-9);
    }

    /// A script that reports nothing: training again once every replacement has stayed up
    /// QUIET_ALIVE, steps lost unknown (not 0), the goodput an estimate without a redo time.
    #[test]
    fn ranks_that_report_nothing_train_again_after_staying_up_and_lose_unknown_steps() {
        let mut i = Incident::open(failure(vec![0, 1], None, None));
        let t = i.failure.at;
        let alive = chrono::Duration::from_std(QUIET_ALIVE).unwrap();
        assert!(!i.alive(t + alive * 2), "not running yet");
        i.spawned(0, t + Duration::seconds(1));
        i.spawned(1, t + Duration::seconds(2));
        assert!(!i.alive(t + Duration::seconds(2) + alive - Duration::milliseconds(1)));
        assert!(i.is_open());
        assert!(i.alive(t + Duration::seconds(30)));
        assert_eq!(i.end, IncidentEnd::Recovered);
        assert_eq!(i.training_at, Some(t + Duration::seconds(2) + alive));
        assert_eq!(i.steps_lost(), None);
        let row = i.row(t + Duration::seconds(60));
        assert_eq!(row.steps_lost, None);
        assert_eq!(row.seconds_lost, 2.0 + QUIET_ALIVE.as_secs_f64());
        let g = Goodput::of(&[row], 100.0, None);
        assert!(g.estimate);
        assert_eq!(g.redo_s, None);
        assert_eq!(g.steps_redone, 0);
        assert!((g.goodput - (100.0 - g.recovering_s) / 100.0).abs() < 1e-9);
        // Ranks that reported steps before the failure are waited for, however long.
        let mut stepping = Incident::open(failure(vec![0], Some(5), None));
        stepping.spawned(0, t);
        assert!(!stepping.alive(t + Duration::hours(1)));
        assert!(stepping.is_open());
    }
}
