//! Job: one per job. Launches its ranks through their Workers, checks heartbeat tokens,
//! decides restarts (backoff, budget, scope), aggregates progress into the summary, and
//! records every transition through the recorder.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use uuid::Uuid;

use super::Runtime;
use super::checkpoint::Checkpoint;
use super::messages::{
    Committed, GetSummary, JobEnded, JobInbox, StopActor, Terminate, WhenIdle, WorkerExited,
    WorkerStarted,
};
use super::tokens::WorkerTokens;
use super::worker::Worker;
use crate::domain::failure_policy::CrashLoop;
use crate::domain::incident::{Incident, IncidentEnd, IncidentRow};
use crate::domain::progress::{LauncherRef, Progress, Summary, SummaryInput};
use crate::domain::{JobState, Outcome, RestartCounts, RestartPolicy};
use crate::launcher::{self, JobContext, JobLauncher};
use crate::spec::JobSpec;
use crate::storage::BlobStore;
use crate::store::history::HistoryOp;
use crate::store::now;

mod incidents;
mod launch;
mod notice;
mod restart;
mod stragglers;
mod worker_api;

use crate::domain::{RankSlot, RankState};

pub use worker_api::{AllReduce, Contribution};

/// What the job as a whole is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// restart_scope = job: every rank is being stopped, then all relaunch after `backoff_ms`.
    GroupRestart {
        backoff_ms: u64,
    },
    Stopping,
    Failing,
    /// The server is shutting down: ranks are stopped with grace, the job stays `running` in
    /// the database, and the next server resumes it.
    ServerShutdown,
    Done,
}

pub struct Job {
    id: Uuid,
    spec: Arc<JobSpec>,
    rt: Arc<Runtime>,
    manager: Recipient<JobEnded>,
    state: JobState,
    reason: Option<String>,
    phase: Phase,
    ranks: Vec<RankSlot>,
    tokens: Arc<WorkerTokens>,
    workers: Vec<Addr<Worker>>,
    master_port: u16,
    policy: RestartPolicy,
    /// Restarts made, as the policy counts them against the budget.
    counts: RestartCounts,
    restart_events: u32,
    created_at: String,
    started_at: Option<String>,
    progress: Progress,
    state_tx: watch::Sender<JobState>,
    checkpoint: Addr<Checkpoint>,
    last_checkpoint: Option<Committed>,
    allreduce: AllReduce,
    last_progress_event: Option<std::time::Instant>,
    /// When this actor started, and when it last stored a progress sample.
    born: std::time::Instant,
    last_sample: Option<std::time::Instant>,
    launcher: Arc<dyn JobLauncher>,
    crash_loop: CrashLoop,
    /// This run's incidents, and those of earlier servers' runs (closed, from the history).
    incidents: Vec<Incident>,
    past_incidents: Vec<IncidentRow>,
    /// Every rank's stacks taken when this rank was declared hung, for the incident its
    /// failure opens.
    hang_stacks: Option<(u32, Vec<crate::domain::incident::RankStacks>)>,
    stragglers: crate::domain::straggler::Stragglers,
    /// Told when the last rank is down during a server shutdown.
    shutdown_waiter: Option<tokio::sync::oneshot::Sender<()>>,
    /// The save on notice in flight, and what the notices of this run cost.
    notice: Option<notice::Pending>,
    notices: Vec<crate::domain::notice::NoticeReport>,
}

/// How a job actor begins: fresh, or resumed after a server restart.
pub struct JobInit {
    pub id: Uuid,
    /// The job's worker tokens (earlier runs' restored as stale), shared with the worker API.
    pub tokens: Arc<WorkerTokens>,
    pub spec: JobSpec,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ranks: Vec<RankSlot>,
    pub counts: RestartCounts,
    pub restart_events: u32,
    /// Nodes already excluded from the job's launches (restored from the history).
    pub excluded_nodes: Vec<String>,
    /// Incidents of earlier runs (restored from the history, all closed).
    pub incidents: Vec<IncidentRow>,
}

impl Job {
    pub fn start(
        init: JobInit,
        rt: Arc<Runtime>,
        manager: Recipient<JobEnded>,
    ) -> (Addr<Job>, watch::Receiver<JobState>) {
        let initial = if init.started_at.is_some() {
            JobState::Running
        } else {
            JobState::Pending
        };
        let (state_tx, state_rx) = watch::channel(initial);
        rt.bus.open(init.id);
        let addr = Job::create(move |ctx| {
            let timeout = Duration::from_secs_f64(init.spec.heartbeat_timeout_s);
            let spec = Arc::new(init.spec);
            let launcher = launcher::for_job(JobContext {
                job_id: init.id,
                spec: spec.clone(),
                settings: rt.settings.clone(),
                instance: rt.instance.clone(),
                base_url: rt.base_url.clone(),
                recorder: rt.recorder.clone(),
                excluded_nodes: init.excluded_nodes,
            });
            let init_spec = &spec;
            let location = init_spec.job_checkpoint_dir(&init.id);
            // The spec was validated, so the location opens.
            let store = BlobStore::open_with(&location, &rt.settings.s3)
                .unwrap_or_else(|_| BlobStore::open(".").expect("a path"));
            let checkpoint = Checkpoint::new(
                init.id,
                spec.world_size,
                spec.keep_last,
                store,
                rt.clone(),
                ctx.address().recipient(),
            )
            .start();
            let spec_world = spec.world_size;
            let straggler_policy = spec.straggler_policy();
            let inbox = JobInbox::of(&ctx.address());
            let workers = (0..spec.world_size)
                .map(|rank| {
                    Worker::new(
                        inbox.clone(),
                        init.id,
                        rank,
                        rt.clone(),
                        launcher.clone(),
                        timeout,
                    )
                    .start()
                })
                .collect();
            Job {
                id: init.id,
                policy: spec.restart_policy(),
                spec,
                rt,
                manager,
                state: initial,
                reason: None,
                phase: Phase::Running,
                ranks: init.ranks,
                tokens: init.tokens,
                workers,
                master_port: 0,
                counts: init.counts,
                restart_events: init.restart_events,
                created_at: init.created_at,
                started_at: init.started_at,
                progress: Progress::default(),
                state_tx,
                checkpoint,
                last_checkpoint: None,
                allreduce: AllReduce::default(),
                last_progress_event: None,
                born: std::time::Instant::now(),
                last_sample: None,
                launcher,
                crash_loop: CrashLoop::new(spec_world),
                incidents: Vec::new(),
                past_incidents: init.incidents,
                hang_stacks: None,
                stragglers: crate::domain::straggler::Stragglers::new(spec_world, straggler_policy),
                shutdown_waiter: None,
                notice: None,
                notices: Vec::new(),
            }
        });
        (addr, state_rx)
    }

    /// One line per job state on the server's console (`--log-format json` for machines).
    fn console(&self, state: JobState, reason: Option<&str>) {
        let reason = reason.unwrap_or("");
        if state == JobState::Failed {
            tracing::warn!(target: "trainvisor::job", event = state.as_str(), job_id = %self.id,
                           reason, "job failed");
        } else {
            tracing::info!(target: "trainvisor::job", event = state.as_str(), job_id = %self.id,
                           reason, "job {}", state.as_str());
        }
    }

    fn note(&self, rank: Option<u32>, attempt: Option<u32>, line: String) {
        self.rt.recorder.note(self.id, rank, attempt, line);
    }

    fn set_state(&mut self, state: JobState, reason: Option<String>, summary: Option<String>) {
        self.console(state, reason.as_deref());
        self.state = state;
        self.reason = reason.clone();
        if state == JobState::Running && self.started_at.is_none() {
            self.started_at = Some(now());
        }
        self.rt.recorder.record(HistoryOp::JobState {
            job_id: self.id,
            state,
            at: now(),
            reason,
            summary,
        });
        if !state.is_terminal() {
            let _ = self.state_tx.send(state);
        }
        self.publish_job();
    }

    fn publish_job(&self) {
        let data = serde_json::json!({"state": self.state, "reason": self.reason,
                                      "world_size": self.spec.world_size, "name": self.spec.name,
                                      "restarts": self.restart_events});
        self.rt.recorder.event("job", self.id, data);
    }

    fn publish_rank(&self, rank: u32) {
        let slot = &self.ranks[rank as usize];
        let data = serde_json::json!({"rank": rank, "state": slot.state.as_str(), "pid": slot.progress.pid,
                                      "attempt": slot.progress.attempt});
        self.rt.recorder.event("worker", self.id, data);
    }

    fn live_ranks(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.spec.world_size).filter(|&r| self.ranks[r as usize].state.is_live())
    }

    fn terminate_live(&mut self) {
        self.allreduce.reset();
        let live: Vec<u32> = self.live_ranks().collect();
        for rank in live {
            self.ranks[rank as usize].state = RankState::stopping();
            self.workers[rank as usize].do_send(Terminate);
        }
    }

    /// Called whenever a rank goes down while the job is winding down or restarting.
    fn after_rank_down(&mut self, ctx: &mut Context<Self>) {
        if self.live_ranks().next().is_some() {
            return;
        }
        match self.phase {
            Phase::Stopping => self.finish(JobState::Stopped, ctx),
            Phase::Failing => self.finish(JobState::Failed, ctx),
            Phase::GroupRestart { backoff_ms } => {
                ctx.run_later(Duration::from_millis(backoff_ms), |act, ctx| {
                    if matches!(act.phase, Phase::GroupRestart { .. }) {
                        act.phase = Phase::Running;
                        let ranks = act.ranks_to_launch();
                        act.launch_group(ranks, ctx);
                    }
                });
            }
            Phase::ServerShutdown => {
                if let Some(all_down) = self.shutdown_waiter.take() {
                    let _ = all_down.send(());
                }
            }
            Phase::Running | Phase::Done => {}
        }
    }

    fn finish(&mut self, state: JobState, ctx: &mut Context<Self>) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        let end_state = match state {
            JobState::Succeeded => RankState::succeeded(),
            JobState::Failed => RankState::failed(None),
            _ => RankState::stopped(),
        };
        for slot in &mut self.ranks {
            if !slot.state.is_succeeded() {
                slot.state = end_state;
            }
        }
        self.state = state;
        // Let the last checkpoints land first, so the final summary and the index agree.
        ctx.spawn(
            self.checkpoint
                .send(WhenIdle)
                .into_actor(self)
                .map(move |last, act, ctx| {
                    if let Ok(Some(last)) = last {
                        act.last_checkpoint = Some(last);
                    }
                    act.record_end(state, ctx)
                }),
        );
    }

    /// Ends the job: first gives back what the launcher holds for it (an allocation, a
    /// network, containers still being removed), so that a job the database calls ended holds
    /// nothing any more; then records the end and announces it once it is in the database, so
    /// whoever waits on it reads the final state back.
    fn record_end(&mut self, state: JobState, ctx: &mut Context<Self>) {
        for worker in &self.workers {
            worker.do_send(StopActor);
        }
        ctx.spawn(
            self.launcher
                .release()
                .into_actor(self)
                .map(move |(), act, ctx| act.record_ended(state, ctx)),
        );
    }

    fn record_ended(&mut self, state: JobState, ctx: &mut Context<Self>) {
        self.close_incidents(IncidentEnd::JobEnded);
        self.console(state, self.reason.as_deref());
        let summary = serde_json::to_string(&self.summary()).ok();
        let reason = self.reason.clone();
        self.note(
            None,
            None,
            match &reason {
                Some(r) => format!("job {}: {r}", state.as_str()),
                None => format!("job {}", state.as_str()),
            },
        );
        let ack = self.rt.recorder.record_acked(HistoryOp::JobState {
            job_id: self.id,
            state,
            at: now(),
            reason,
            summary,
        });
        self.rt.recorder.end_of_logs(self.id);
        ctx.spawn(ack.into_actor(self).map(move |_, act, ctx| {
            let _ = act.state_tx.send(state);
            act.publish_job();
            act.manager.do_send(JobEnded { id: act.id });
            ctx.stop();
        }));
    }

    fn fail(&mut self, reason: String, ctx: &mut Context<Self>) {
        self.reason = Some(reason);
        self.phase = Phase::Failing;
        self.terminate_live();
        self.after_rank_down(ctx);
    }

    pub fn summary(&self) -> Summary {
        let status = self.launcher.status();
        let step = self.ranks.iter().filter_map(|r| r.progress.step).min();
        Summary::build(SummaryInput {
            id: self.id,
            spec: &self.spec,
            state: self.state,
            reason: self.reason.clone(),
            created_at: &self.created_at,
            started_at: self.started_at.clone(),
            ranks: &self.ranks,
            restarts: self.restart_events,
            progress: &self.progress,
            last_checkpoint: self
                .last_checkpoint
                .as_ref()
                .map(|c| (c.step, c.at.clone())),
            launcher_ref: status.handle.map(|id| LauncherRef {
                kind: self.spec.launcher.as_str().to_string(),
                id,
            }),
            excluded_nodes: status.excluded_nodes,
            goodput: self.goodput(step),
            rank_rates: self.rank_rates(),
            standbys: status.standbys.by_rank,
            standby_off: status.standbys.off,
            last_notice: self.notices.last().cloned(),
        })
    }
}

impl Actor for Job {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.publish_job();
        ctx.run_interval(stragglers::CHECK_EVERY, |act, ctx| {
            act.check_stragglers(ctx);
            act.check_quiet_incidents();
        });
        if !self.spec.env.contains_key("OMP_NUM_THREADS") {
            // torchrun warns about it too: one thread per rank unless the job says otherwise.
            self.note(
                None,
                None,
                "OMP_NUM_THREADS=1 is set for every rank, as torchrun does; set it in the job's \
                 env to change it"
                    .to_string(),
            );
        }
        let ranks = self.ranks_to_launch();
        if ranks.is_empty() {
            // Resumed after every rank had succeeded but before the job's end was recorded.
            self.finish(JobState::Succeeded, ctx);
            return;
        }
        self.launch_group(ranks, ctx);
    }
}

impl Handler<WorkerStarted> for Job {
    type Result = ();

    fn handle(&mut self, msg: WorkerStarted, _: &mut Context<Self>) {
        let slot = &mut self.ranks[msg.rank as usize];
        if msg.attempt + 1 != slot.next_attempt {
            return;
        }
        if matches!(slot.state, RankState::Starting { .. }) {
            slot.state = RankState::running();
        }
        slot.progress.pid = Some(msg.pid);
        slot.progress.warm = msg.warm;
        slot.progress.started_at = Some(now());
        self.rt.recorder.record(HistoryOp::IncarnationPid {
            job_id: self.id,
            rank: msg.rank,
            attempt: msg.attempt,
            pid: msg.pid,
            started_at: now(),
        });
        if std::mem::take(&mut slot.restart_pending) {
            tracing::info!(
                target: "trainvisor::job",
                event = "restarted",
                job_id = %self.id,
                rank = msg.rank,
                attempt = msg.attempt,
                pid = msg.pid,
                "rank restarted"
            );
            self.rt.recorder.record(HistoryOp::RestartLaunched {
                job_id: self.id,
                rank: msg.rank,
                attempt: msg.attempt,
                restarted_at: now(),
            });
        }
        self.incident_spawned(msg.rank);
        if self.state == JobState::Pending {
            self.set_state(JobState::Running, None, None);
        }
        self.publish_rank(msg.rank);
    }
}

impl Handler<WorkerExited> for Job {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Context<Self>) {
        let rank = msg.rank;
        let slot = &mut self.ranks[rank as usize];
        if msg.attempt + 1 != slot.next_attempt || !slot.state.is_live() {
            return;
        }
        self.rt.recorder.record(HistoryOp::IncarnationEnded {
            job_id: self.id,
            rank,
            attempt: msg.attempt,
            ended_at: now(),
            exit_code: msg.exit.code,
            signal: msg.exit.signal,
            outcome: msg.outcome,
        });
        slot.progress.pid = None;
        self.straggler_gone(rank);
        // The save cannot commit without this rank: what follows the notice (a stop) happens
        // now, before the exit is judged.
        self.notice_interrupted(ctx);
        if self.phase == Phase::Running && msg.outcome.is_failure() {
            self.launcher.rank_failed(rank, msg.outcome, &msg.detail);
        }
        let slot = &mut self.ranks[rank as usize];
        match self.phase {
            Phase::Running => match msg.outcome {
                Outcome::Succeeded => {
                    slot.state = RankState::succeeded();
                    if self.ranks.iter().all(|r| r.state.is_succeeded()) {
                        self.finish(JobState::Succeeded, ctx);
                    }
                }
                // Stopped while running only happens when the job is being stopped.
                Outcome::Stopped => slot.state = RankState::stopped(),
                _ => self.on_failure(msg, ctx),
            },
            Phase::GroupRestart { .. }
            | Phase::Stopping
            | Phase::Failing
            | Phase::ServerShutdown => {
                if !slot.state.is_failed() {
                    slot.state = if msg.outcome == Outcome::Succeeded {
                        RankState::succeeded()
                    } else {
                        RankState::stopped()
                    };
                }
                self.after_rank_down(ctx);
            }
            Phase::Done => {}
        }
    }
}

impl Handler<GetSummary> for Job {
    type Result = MessageResult<GetSummary>;

    fn handle(&mut self, _: GetSummary, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.summary())
    }
}
