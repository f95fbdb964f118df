//! Progress from heartbeats: per-rank views, throughput over a sliding window, and the job
//! summary the API serves.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::incident::Goodput;
use super::{JobState, RankSlot, ts};
use crate::spec::JobSpec;

/// What the last heartbeats of one rank said.
#[derive(Debug, Clone, Default)]
pub struct RankView {
    pub attempt: u32,
    pub pid: Option<u32>,
    /// The Slurm node of the current incarnation, or this host's name (local launcher).
    pub node: Option<String>,
    pub started_at: Option<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub step: Option<u64>,
    pub heartbeat: Option<Value>,
    /// The current incarnation is a warm standby that became the rank.
    pub warm: bool,
    /// The rank's script has sent heartbeats of its own: automatic ones are ignored.
    pub own_heartbeats: bool,
    /// The step count at the script's last `torch.save`, as automatic heartbeats report it.
    pub saved_step: Option<u64>,
    /// The rank said it saves when asked (`"saves_on_notice": true` in a heartbeat): the
    /// built-in trainer and the Python helper do. A stop waits for the save of such ranks only.
    pub saves_on_notice: bool,
}

/// The mark of a heartbeat sent by trainvisor's Python hook rather than by the script.
pub const AUTO_HEARTBEAT: &str = "trainvisor_auto";

impl RankView {
    /// Records a heartbeat; false when it was an automatic one and the script sends its own,
    /// which win (the two would count steps differently).
    pub fn record_heartbeat(&mut self, at: DateTime<Utc>, body: Value) -> bool {
        let auto = body.get(AUTO_HEARTBEAT) == Some(&Value::Bool(true));
        if auto && self.own_heartbeats {
            return false;
        }
        self.own_heartbeats |= !auto;
        self.last_heartbeat = Some(at);
        if let Some(step) = body.get("step").and_then(Value::as_u64) {
            self.step = Some(step);
        }
        if !auto && body.get("saves_on_notice") == Some(&Value::Bool(true)) {
            self.saves_on_notice = true;
        }
        if auto && let Some(saved) = body.get("saved_step").and_then(Value::as_u64) {
            self.saved_step = Some(saved);
        }
        if body.as_object().is_some_and(|o| !o.is_empty()) {
            self.heartbeat = Some(bounded_heartbeat(body));
        }
        true
    }

    fn loss(&self) -> Option<f64> {
        self.heartbeat
            .as_ref()?
            .get("metrics")?
            .get("loss")?
            .as_f64()
    }
}

/// Metrics of a heartbeat kept for the summary, at most.
const MAX_METRICS: usize = 32;
/// Other fields of a heartbeat kept, at most.
const MAX_FIELDS: usize = 8;
/// Longest key and longest string value kept.
const MAX_KEY: usize = 64;
const MAX_STRING: usize = 128;

/// What of a heartbeat body the summary keeps: a rank controls it, and the summary is held in
/// memory, stored with the job and sent with every `/jobs/summaries`. `step` always; up to
/// [`MAX_METRICS`] scalar `metrics` and [`MAX_FIELDS`] other scalar fields with short keys and
/// strings; how many were left out is said in `dropped`.
pub fn bounded_heartbeat(body: Value) -> Value {
    let Value::Object(fields) = body else {
        return Value::Null;
    };
    let scalar = |v: &Value| match v {
        Value::String(s) => s.len() <= MAX_STRING,
        Value::Number(_) | Value::Bool(_) | Value::Null => true,
        _ => false,
    };
    let mut kept = serde_json::Map::new();
    let mut dropped = 0usize;
    let mut others = 0usize;
    for (key, value) in fields {
        match key.as_str() {
            "step" | "dropped" => {
                kept.insert(key, value);
            }
            "metrics" => {
                let Value::Object(metrics) = value else {
                    dropped += 1;
                    continue;
                };
                let mut small = serde_json::Map::new();
                for (k, v) in metrics {
                    if small.len() < MAX_METRICS && k.len() <= MAX_KEY && scalar(&v) {
                        small.insert(k, v);
                    } else {
                        dropped += 1;
                    }
                }
                kept.insert(key, Value::Object(small));
            }
            _ if others < MAX_FIELDS && key.len() <= MAX_KEY && scalar(&value) => {
                others += 1;
                kept.insert(key, value);
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        kept.insert("dropped".into(), Value::from(dropped));
    } else {
        kept.remove("dropped");
    }
    Value::Object(kept)
}

const WINDOW: Duration = Duration::from_secs(10);

/// The global step (the slowest rank's) over time, for steps/s.
#[derive(Debug, Default)]
pub struct Progress {
    samples: VecDeque<(Instant, u64)>,
}

impl Progress {
    pub fn observe(&mut self, ranks: &[RankSlot]) {
        let Some(step) = ranks.iter().filter_map(|r| r.progress.step).min() else {
            return;
        };
        let now = Instant::now();
        if self.samples.back().is_some_and(|&(_, s)| s == step) {
            return;
        }
        self.samples.push_back((now, step));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Mean seconds per step over the window, up to the last step seen (a stall that follows
    /// does not count: it is the time a step took, for the steps a failure loses).
    pub fn step_s(&self) -> Option<f64> {
        let (t0, s0) = *self.samples.front()?;
        let (t1, s1) = *self.samples.back()?;
        (s1 > s0).then(|| t1.duration_since(t0).as_secs_f64() / (s1 - s0) as f64)
    }

    pub fn steps_per_s(&self) -> Option<f64> {
        self.steps_per_s_at(Instant::now())
    }

    /// Steps over time up to the last step seen — not up to now, which made the figure sag
    /// between two steps and jump back at the next (20 then 31 from one redraw to the next) —
    /// unless that step is older than two of the job's usual step intervals: then up to now,
    /// so a job that stalls slows down.
    fn steps_per_s_at(&self, now: Instant) -> Option<f64> {
        let (t0, s0) = *self.samples.front()?;
        let (t1, s1) = *self.samples.back()?;
        if s1 <= s0 {
            return None;
        }
        let span = t1.duration_since(t0).as_secs_f64();
        let interval = span / (s1 - s0) as f64;
        let since_last = now.duration_since(t1).as_secs_f64();
        let dt = if since_last > 2.0 * interval {
            now.duration_since(t0).as_secs_f64()
        } else {
            span
        };
        (dt > 0.0).then(|| (s1 - s0) as f64 / dt)
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    /// A job stepping 25 times a second reads 25 steps/s whenever it is asked (between two
    /// steps too), and slows down once it stalls.
    #[test]
    fn the_rate_holds_between_steps_and_falls_when_steps_stop() {
        let t0 = Instant::now();
        let mut p = Progress::default();
        // A short history (a job just started, or bursts of the slowest rank's step) is where
        // measuring to `now` swung the most.
        for i in 0..5u64 {
            p.samples.push_back((t0 + Duration::from_millis(40 * i), i));
        }
        let last = t0 + Duration::from_millis(40 * 4);
        for after_ms in [0, 10, 20, 39, 60] {
            let r = p
                .steps_per_s_at(last + Duration::from_millis(after_ms))
                .unwrap();
            assert!((r - 25.0).abs() < 0.5, "{after_ms} ms after a step: {r}");
        }
        let stalled = p.steps_per_s_at(last + Duration::from_secs(1)).unwrap();
        assert!(stalled < 5.0, "{stalled}");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerSummary {
    pub rank: u32,
    pub state: String,
    /// When the rank got into `state`.
    #[serde(default)]
    pub state_since: Option<String>,
    /// While in `backoff`: when its next launch is due.
    #[serde(default)]
    pub backoff_until: Option<String>,
    pub pid: Option<u32>,
    /// Where the rank runs: its Slurm node, or the server's host name (local launcher).
    pub node: Option<String>,
    pub attempt: u32,
    /// How many times this rank was relaunched, for any reason.
    pub restarts: u32,
    pub started_at: Option<String>,
    pub last_heartbeat_at: Option<String>,
    /// Seconds since the last heartbeat; null once the job has ended.
    pub heartbeat_age_s: Option<f64>,
    pub step: Option<u64>,
    /// This rank's own steps/s over the last seconds (null until it has two steps).
    #[serde(default)]
    pub steps_per_s: Option<f64>,
    /// Stepping slower than the job's median by `straggler_fraction` for
    /// `straggler_window_s`.
    #[serde(default)]
    pub straggler: bool,
    /// The latest heartbeat body as the worker sent it.
    pub heartbeat: Option<Value>,
    /// The current incarnation was a warm standby (`warm_standby`), not a cold start.
    #[serde(default)]
    pub warm_start: bool,
    /// The rank's warm standby, while it has one.
    #[serde(default)]
    pub standby: Option<StandbyView>,
}

/// A rank's warm standby: a process that has imported the job's `preload` and waits to
/// become the rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StandbyView {
    pub pid: u32,
    pub node: String,
    /// `starting` (importing its preloads) or `ready`.
    pub state: String,
    pub since: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    pub job_id: Uuid,
    pub name: Option<String>,
    pub state: JobState,
    pub reason: Option<String>,
    pub world_size: u32,
    pub restart_scope: String,
    pub created_at: String,
    pub started_at: Option<String>,
    /// The global step: the slowest rank's last reported step, and never below
    /// `last_checkpoint_step` (every rank had reached it to commit it).
    pub step: Option<u64>,
    pub total_steps: Option<u64>,
    pub progress: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// Mean of the ranks' last reported `metrics.loss`.
    pub loss: Option<f64>,
    /// Restarts for the job's own failures: the rows of `/jobs/{id}/restarts` less the
    /// `server_restart` ones (the server's own restarts are not the job's failures).
    pub restarts: u32,
    pub last_checkpoint_step: Option<u64>,
    pub last_checkpoint_at: Option<String>,
    /// Seconds since the last checkpoint; null once the job has ended.
    pub last_checkpoint_age_s: Option<f64>,
    /// `local` or `slurm`.
    #[serde(default)]
    pub launcher: String,
    /// The launcher's own handle on the job's ranks, while there is one: for Slurm
    /// `{"kind": "slurm", "id": "<job id of the allocation>"}`; null for local and docker.
    #[serde(default)]
    pub launcher_ref: Option<LauncherRef>,
    /// Nodes excluded from this job's launches (bad-node quarantine), in order.
    #[serde(default)]
    pub excluded_nodes: Vec<String>,
    /// Where the wall time went: failures, time recovering, steps redone, goodput (null
    /// before the job runs). The incidents behind it: `GET /jobs/{id}/incidents`.
    #[serde(default)]
    pub goodput: Option<Goodput>,
    /// With `warm_standby`: why the ranks start cold, once standbys kept failing to start.
    #[serde(default)]
    pub standby_off: Option<String>,
    /// Once the job has run 20 s (or ended) without any rank reporting a step: what is not
    /// known (step, steps/s, ETA, steps lost) and how to make it known. Null when steps are
    /// reported.
    #[serde(default)]
    pub no_step_data: Option<String>,
    /// The last save on notice of this run (stop, SIGTERM, signal, checkpoint request): its
    /// outcome, `saved_at_step` and `steps_lost`.
    #[serde(default)]
    pub last_notice: Option<super::notice::NoticeReport>,
    pub workers: Vec<WorkerSummary>,
}

/// How long a job runs without a step before its summary says it has no step data.
pub const NO_STEP_DATA_AFTER: Duration = Duration::from_secs(20);

/// Why a job that has run has no step data, and how to get it.
fn no_step_data(spec: &JobSpec, heard: bool) -> String {
    let what = if heard {
        "this script's heartbeats carry no step"
    } else {
        "this script sends no heartbeats"
    };
    let how = if !spec.launcher.host_local_hooks() {
        "POST heartbeats with a step from the script (README: the worker contract); the \
         automatic heartbeats of torch scripts need the local or Docker launcher"
    } else if !spec.auto_heartbeat {
        "automatic heartbeats are off (\"auto_heartbeat\": false): drop that field, or POST \
         heartbeats with a step (README: the worker contract)"
    } else {
        "a Python script that imports torch reports its optimizer steps by itself; any other \
         script can POST heartbeats with a step (README: the worker contract)"
    };
    format!("no step data: {what}; {how}")
}

/// A launcher's own handle on a job's ranks, named by the launcher's kind, so that a client
/// reads every launcher's the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LauncherRef {
    /// The launcher (`slurm`).
    pub kind: String,
    /// Its id there (the Slurm job id of the allocation).
    pub id: String,
}

pub struct SummaryInput<'a> {
    pub id: Uuid,
    pub spec: &'a JobSpec,
    pub state: JobState,
    pub reason: Option<String>,
    pub created_at: &'a str,
    pub started_at: Option<String>,
    pub ranks: &'a [RankSlot],
    pub restarts: u32,
    pub progress: &'a Progress,
    pub last_checkpoint: Option<(u64, String)>,
    pub launcher_ref: Option<LauncherRef>,
    pub excluded_nodes: Vec<String>,
    pub goodput: Option<Goodput>,
    /// Per rank: its own steps/s and whether it is a straggler (empty: unknown).
    pub rank_rates: Vec<(Option<f64>, bool)>,
    /// The ranks' warm standbys, and why there are none when standbys kept failing.
    pub standbys: std::collections::HashMap<u32, StandbyView>,
    pub standby_off: Option<String>,
    pub last_notice: Option<super::notice::NoticeReport>,
}

impl Summary {
    pub fn build(input: SummaryInput<'_>) -> Summary {
        let now = Utc::now();
        let ranks = input.ranks;
        // Ages are of live things: once the job has ended they are null (the times stay).
        let ended = input.state.is_terminal();
        // The slowest rank's reported step, but never below the last committed checkpoint:
        // every rank had reached that step to commit it (heartbeats may lag behind it).
        let step = ranks
            .iter()
            .filter_map(|r| r.progress.step)
            .min()
            .max(input.last_checkpoint.as_ref().map(|(s, _)| *s));
        let steps_per_s = if input.state == JobState::Running {
            input.progress.steps_per_s()
        } else {
            None
        };
        // Without total_steps in the spec, a worker may report its own (the built-in trainer
        // does), so progress and ETA still work.
        let total = input.spec.total_steps.or_else(|| {
            ranks
                .iter()
                .filter_map(|r| r.progress.heartbeat.as_ref()?.get("total_steps")?.as_u64())
                .max()
        });
        let eta_s = match (total, step, steps_per_s) {
            (Some(total), Some(step), Some(rate)) if rate > 0.0 => {
                Some(total.saturating_sub(step) as f64 / rate)
            }
            _ => None,
        };
        let losses: Vec<f64> = ranks.iter().filter_map(|r| r.progress.loss()).collect();
        let loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        // Said once the job has run for a while (a torch script needs seconds to import torch
        // and take its first step) or has ended without a step.
        let ran = input
            .started_at
            .as_deref()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .is_some_and(|t| ended || (now - t).to_std().is_ok_and(|d| d >= NO_STEP_DATA_AFTER));
        let no_step_data = (step.is_none() && ran).then(|| {
            let heard = ranks.iter().any(|r| r.progress.last_heartbeat.is_some());
            no_step_data(input.spec, heard)
        });
        let workers = ranks
            .iter()
            .enumerate()
            .map(|(rank, slot)| {
                let p = &slot.progress;
                WorkerSummary {
                    rank: rank as u32,
                    state: slot.state.as_str().to_string(),
                    state_since: slot.state.since().map(ts),
                    backoff_until: match slot.state {
                        super::RankState::Backoff { until, .. } => Some(ts(until)),
                        _ => None,
                    },
                    pid: p.pid,
                    node: p.node.clone(),
                    attempt: p.attempt,
                    restarts: slot.next_attempt.saturating_sub(1),
                    started_at: p.started_at.clone(),
                    last_heartbeat_at: p.last_heartbeat.map(ts),
                    heartbeat_age_s: p
                        .last_heartbeat
                        .filter(|_| !ended)
                        .map(|t| (now - t).num_milliseconds() as f64 / 1000.0),
                    step: p.step,
                    steps_per_s: input.rank_rates.get(rank).and_then(|r| r.0),
                    straggler: input.rank_rates.get(rank).is_some_and(|r| r.1),
                    heartbeat: p.heartbeat.clone(),
                    warm_start: p.warm,
                    standby: input.standbys.get(&(rank as u32)).cloned(),
                }
            })
            .collect();
        Summary {
            job_id: input.id,
            name: input.spec.name.clone(),
            state: input.state,
            reason: input.reason,
            world_size: input.spec.world_size,
            restart_scope: input.spec.restart_scope.as_str().to_string(),
            created_at: input.created_at.to_string(),
            started_at: input.started_at,
            step,
            total_steps: total,
            progress: match (total, step) {
                (Some(total), Some(step)) => Some((step as f64 / total as f64).min(1.0)),
                _ => None,
            },
            steps_per_s,
            eta_s,
            loss,
            restarts: input.restarts,
            last_checkpoint_age_s: input.last_checkpoint.as_ref().filter(|_| !ended).and_then(
                |(_, at)| {
                    let at = DateTime::parse_from_rfc3339(at).ok()?;
                    Some((now - at.with_timezone(&Utc)).num_milliseconds() as f64 / 1000.0)
                },
            ),
            last_checkpoint_step: input.last_checkpoint.as_ref().map(|(s, _)| *s),
            last_checkpoint_at: input.last_checkpoint.map(|(_, at)| at),
            launcher: input.spec.launcher.as_str().to_string(),
            launcher_ref: input.launcher_ref,
            excluded_nodes: input.excluded_nodes,
            no_step_data,
            goodput: input.goodput,
            standby_off: input.standby_off,
            last_notice: input.last_notice,
            workers,
        }
    }
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;
    use serde_json::json;

    /// Automatic heartbeats count until the script sends one of its own; from then on they
    /// are ignored, whatever step they say.
    #[test]
    fn a_scripts_own_heartbeats_win_over_automatic_ones() {
        let mut v = RankView::default();
        let t = Utc::now();
        assert!(v.record_heartbeat(t, json!({"step": 3, AUTO_HEARTBEAT: true, "saved_step": 2})));
        assert_eq!((v.step, v.saved_step), (Some(3), Some(2)));
        assert!(v.record_heartbeat(t, json!({"step": 10})));
        assert!(!v.record_heartbeat(t, json!({"step": 4, AUTO_HEARTBEAT: true, "saved_step": 4})));
        assert_eq!((v.step, v.saved_step), (Some(10), Some(2)));
        // A script's own `saved_step` means nothing to trainvisor.
        assert!(v.record_heartbeat(t, json!({"step": 11, "saved_step": 11})));
        assert_eq!(v.saved_step, Some(2));
    }

    #[test]
    fn no_step_data_says_how_to_get_it() {
        let mut spec = crate::spec::JobRequest {
            world_size: Some(1),
            ..Default::default()
        }
        .resolve(&crate::config::JobDefaults::for_data_dir(
            std::path::Path::new("/d"),
        ))
        .unwrap();
        assert!(no_step_data(&spec, false).contains("sends no heartbeats; a Python script"));
        spec.auto_heartbeat = false;
        assert!(no_step_data(&spec, true).contains("carry no step; automatic heartbeats are off"));
        spec.launcher = "slurm".parse().unwrap();
        assert!(no_step_data(&spec, false).contains("need the local or Docker launcher"));
    }

    /// Not while a script may still be importing torch: after NO_STEP_DATA_AFTER of running,
    /// or once the job ended, and never once a step is known.
    #[test]
    fn no_step_data_is_said_after_a_while_or_at_the_end() {
        let spec = crate::spec::JobRequest {
            world_size: Some(1),
            ..Default::default()
        }
        .resolve(&crate::config::JobDefaults::for_data_dir(
            std::path::Path::new("/d"),
        ))
        .unwrap();
        let mut ranks = vec![RankSlot::new()];
        let progress = Progress::default();
        let summary = |state, started: chrono::Duration, ranks: &[RankSlot]| {
            Summary::build(SummaryInput {
                id: Uuid::nil(),
                spec: &spec,
                state,
                reason: None,
                created_at: "",
                started_at: Some(ts(Utc::now() - started)),
                ranks,
                restarts: 0,
                progress: &progress,
                last_checkpoint: None,
                launcher_ref: None,
                excluded_nodes: Vec::new(),
                goodput: None,
                rank_rates: Vec::new(),
                standbys: Default::default(),
                standby_off: None,
                last_notice: None,
            })
            .no_step_data
        };
        let secs = chrono::Duration::seconds;
        assert_eq!(summary(JobState::Running, secs(5), &ranks), None);
        assert!(summary(JobState::Running, secs(25), &ranks).is_some());
        assert!(summary(JobState::Succeeded, secs(5), &ranks).is_some());
        ranks[0]
            .progress
            .record_heartbeat(Utc::now(), json!({"step": 1}));
        assert_eq!(summary(JobState::Running, secs(25), &ranks), None);
    }
}

#[cfg(test)]
mod bound_tests;
