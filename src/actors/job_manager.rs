//! JobManager: one per server. Creates Job actors, resumes unfinished jobs after a server
//! restart, and handles stop, delete and purge.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use uuid::Uuid;

use super::job::{Job, JobInit};
use super::messages::{
    CreateJob, Delete, DeleteReport, JobEnded, KillForShutdown, ManagerError, Restore, Shutdown,
    Skipped, Stop, StopJob,
};
use super::tokens::WorkerTokens;
use super::{JobHandle, Runtime};
use crate::domain::{JobState, Outcome, RankSlot, RankState, RestartCounts, RestartScope};
use crate::spec::JobSpec;
use crate::store::history::HistoryOp;
use crate::store::{self, jobs::JobRecord, now};
use crate::trainer::data;

pub struct JobManager {
    rt: Arc<Runtime>,
}

impl JobManager {
    pub fn new(rt: Arc<Runtime>) -> Self {
        JobManager { rt }
    }

    fn start_job(&mut self, init: JobInit, ctx: &mut Context<Self>) {
        let id = init.id;
        let processes = init.spec.processes();
        let tokens = init.tokens.clone();
        let (addr, state) = Job::start(init, self.rt.clone(), ctx.address().recipient());
        self.rt.registry.insert(
            id,
            JobHandle {
                addr,
                state,
                processes,
                tokens,
            },
        );
    }
}

impl Actor for JobManager {
    type Context = Context<Self>;
}

impl Handler<CreateJob> for JobManager {
    type Result = ResponseActFuture<Self, Result<Uuid, ManagerError>>;

    fn handle(&mut self, msg: CreateJob, _: &mut Context<Self>) -> Self::Result {
        let pool = self.rt.pool.clone();
        let id = Uuid::new_v4();
        let created_at = now();
        let spec = msg.0;
        let demo = self.rt.settings.job_defaults.dataset.clone();
        let s3 = self.rt.settings.s3.clone();
        let (jobs, ranks) = self.rt.registry.load();
        let settings = &self.rt.settings;
        let refusal = if jobs >= settings.max_jobs {
            Some(format!(
                "{jobs} jobs are running, the limit is {} (--max-jobs)",
                settings.max_jobs
            ))
        } else if ranks + spec.processes() > settings.max_workers {
            Some(format!(
                "{ranks} rank processes are running; {} more{} would pass the limit of {} \
                 (--max-workers)",
                spec.processes(),
                if spec.warm_standby.is_some() {
                    " (its ranks and their warm standbys)"
                } else {
                    ""
                },
                settings.max_workers
            ))
        } else {
            None
        };
        Box::pin(
            async move {
                if let Some(why) = refusal {
                    return Err(ManagerError::AtLimit(why));
                }
                ensure_demo_dataset(&spec, &demo, &s3).await?;
                store::jobs::insert(&pool, id, &spec, &created_at).await?;
                Ok((spec, created_at))
            }
            .into_actor(self)
            .map(move |res: Result<_, ManagerError>, act, ctx| {
                let (spec, created_at) = res?;
                tracing::info!(
                    target: "trainvisor::job",
                    event = "submitted",
                    job_id = %id,
                    world_size = spec.world_size,
                    launcher = spec.launcher.as_str(),
                    name = spec.name.as_deref().unwrap_or(""),
                    "job submitted"
                );
                let ranks = vec![RankSlot::new(); spec.world_size as usize];
                let counts = RestartCounts::new(spec.world_size);
                act.start_job(
                    JobInit {
                        id,
                        tokens: Arc::new(WorkerTokens::new(spec.world_size)),
                        spec,
                        created_at,
                        started_at: None,
                        ranks,
                        counts,
                        restart_events: 0,
                        excluded_nodes: Vec::new(),
                        incidents: Vec::new(),
                    },
                    ctx,
                );
                Ok(id)
            }),
        )
    }
}

/// A first run needs no preparation: the built-in trainer on the default dataset location
/// gets the demo dataset made for it.
async fn ensure_demo_dataset(
    spec: &JobSpec,
    demo: &std::path::Path,
    s3: &crate::storage::S3Config,
) -> Result<(), ManagerError> {
    static MAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if spec.command.is_some() || std::path::Path::new(&spec.dataset) != demo {
        return Ok(());
    }
    let _one_at_a_time = MAKING.lock().await;
    if crate::storage::S3Url::is_s3(&spec.dataset) {
        // The default dataset in the bucket (USE_S3): made locally, then uploaded.
        return data::upload_demo_if_empty(&spec.dataset, s3)
            .await
            .map_err(ManagerError::Internal);
    }
    if !data::is_empty(demo) {
        return Ok(());
    }
    let dir = demo.to_path_buf();
    tracing::info!(dir = %dir.display(), "making the demo dataset");
    tokio::task::spawn_blocking(move || data::make_dataset(&dir, &data::DatasetParams::default()))
        .await
        .map_err(|e| ManagerError::Internal(e.into()))??;
    Ok(())
}

impl Handler<Restore> for JobManager {
    type Result = ResponseActFuture<Self, Result<usize, ManagerError>>;

    fn handle(&mut self, _: Restore, _: &mut Context<Self>) -> Self::Result {
        let pool = self.rt.pool.clone();
        let settings = self.rt.settings.clone();
        let recorder = self.rt.recorder.clone();
        let instance = self.rt.instance.clone();
        Box::pin(
            async move {
                let mut inits = Vec::new();
                let theirs = crate::launcher::siblings::jobs_of_siblings(&instance);
                for record in store::jobs::unfinished(&pool).await? {
                    if let Some(pid) = record
                        .job_id
                        .parse()
                        .ok()
                        .and_then(|id: Uuid| theirs.get(&id))
                    {
                        refuse_sibling_job(&recorder, &record, *pid);
                        continue;
                    }
                    inits.push(restore_plan(&pool, &recorder, record, &settings).await?);
                }
                Ok(inits)
            }
            .into_actor(self)
            .map(|res: Result<Vec<JobInit>, ManagerError>, act, ctx| {
                let inits = res?;
                let n = inits.len();
                for init in inits {
                    tracing::info!(job_id = %init.id, "resuming job after server restart");
                    act.start_job(init, ctx);
                }
                Ok(n)
            }),
        )
    }
}

/// A job another live server runs (this data dir is a copy of its, or the other way round) is
/// not run twice: it ends here, failed, saying who runs it.
fn refuse_sibling_job(recorder: &crate::store::Recorder, record: &JobRecord, pid: u32) {
    let Ok(job_id) = record.job_id.parse::<Uuid>() else {
        return;
    };
    let reason = format!(
        "another live trainvisor server runs this job (its rank is pid {pid}): this data dir \
         is a copy of that server's, or the other way round; it is not run twice"
    );
    tracing::warn!(%job_id, pid, "{reason}");
    recorder.record(HistoryOp::JobState {
        job_id,
        state: JobState::Failed,
        at: now(),
        reason: Some(reason),
        summary: None,
    });
}

/// Rebuilds a job's rank bookkeeping from its history, closes what the dead server left open
/// and records a `server_restart` restart for every rank it will relaunch. It only reads: the
/// writes go through the recorder, in order, so a server booting on a full disk comes up
/// degraded (and resumes the job once they commit) instead of exiting.
async fn restore_plan(
    pool: &sqlx::SqlitePool,
    recorder: &crate::store::Recorder,
    record: JobRecord,
    settings: &crate::config::Settings,
) -> Result<JobInit, ManagerError> {
    let id: Uuid = record
        .job_id
        .parse()
        .map_err(|e| anyhow::anyhow!("bad job id in database: {e}"))?;
    let spec: JobSpec = serde_json::from_value(record.spec)
        .map_err(|e| anyhow::anyhow!("job {id}: stored spec unreadable: {e}"))?;
    let at = now();
    crate::launcher::forget(&spec, id, settings).await;
    recorder.record(HistoryOp::ClosedByServerRestart {
        job_id: id,
        at: at.clone(),
    });
    let mut incidents = store::jobs::incidents(pool, id).await?;
    // As the queued write will have them (its SQL counts an open incident's loss up to `at`).
    let ended = at.parse::<chrono::DateTime<chrono::Utc>>().ok();
    for open in incidents.iter_mut().filter(|i| i.end == "open") {
        open.end = "server_restart".into();
        open.ended_at = Some(at.clone());
        if let (Some(end), Ok(start)) = (
            ended,
            open.detected_at.parse::<chrono::DateTime<chrono::Utc>>(),
        ) {
            open.seconds_lost = (end - start).num_milliseconds().max(0) as f64 / 1000.0;
        }
    }
    let excluded_nodes = store::jobs::excluded_nodes(pool, id)
        .await?
        .into_iter()
        .map(|x| x.node)
        .collect();
    let incarnations = store::jobs::incarnations(pool, id).await?;
    let restarts = store::jobs::restarts(pool, id).await?;
    let mut ranks = vec![RankSlot::new(); spec.world_size as usize];
    let tokens = WorkerTokens::new(spec.world_size);
    for inc in &incarnations {
        let Some(slot) = ranks.get_mut(inc.rank as usize) else {
            continue;
        };
        slot.next_attempt = slot.next_attempt.max(inc.attempt as u32 + 1);
        tokens.retire(inc.rank as u32, inc.token_hash.clone());
        slot.progress.attempt = inc.attempt as u32;
        slot.state = if inc.outcome.as_deref() == Some(Outcome::Succeeded.as_str()) {
            RankState::succeeded()
        } else {
            RankState::Pending
        };
    }
    let mut counts = RestartCounts::new(spec.world_size);
    for r in &restarts {
        counts.count_row(r.rank as u32, &r.scope, &r.reason);
    }
    // The job's own failures: the server's restarts are in the history, not in the count.
    let restart_events = restarts
        .iter()
        .filter(|r| Outcome::parse(&r.reason) != Some(Outcome::ServerRestart))
        .count() as u32;
    let started = !incarnations.is_empty();
    if started {
        for (rank, slot) in ranks.iter_mut().enumerate() {
            if spec.restart_scope == RestartScope::Worker && slot.state.is_succeeded() {
                continue;
            }
            if spec.restart_scope == RestartScope::Job {
                slot.state = RankState::Pending;
            }
            recorder.record(HistoryOp::RestartDetected {
                job_id: id,
                rank: rank as u32,
                attempt: slot.next_attempt,
                scope: spec.restart_scope.as_str(),
                reason: Outcome::ServerRestart,
                exit_code: None,
                signal: None,
                detail: "the trainvisor server restarted; relaunching the rank".to_string(),
                detected_at: at.clone(),
                backoff_ms: 0,
            });
            slot.restart_pending = true;
        }
    }
    Ok(JobInit {
        id,
        tokens: Arc::new(tokens),
        spec,
        created_at: record.created_at,
        started_at: record.started_at,
        ranks,
        counts,
        restart_events,
        excluded_nodes,
        incidents,
    })
}

impl Handler<JobEnded> for JobManager {
    type Result = ();

    fn handle(&mut self, msg: JobEnded, _: &mut Context<Self>) {
        self.rt.registry.remove(&msg.id);
    }
}

/// Waits until a job's watched state is terminal (or the actor is gone).
async fn until_terminal(mut state: watch::Receiver<JobState>) {
    let _ = state.wait_for(|s| s.is_terminal()).await;
}

impl Handler<Stop> for JobManager {
    type Result = ResponseFuture<Result<(), ManagerError>>;

    fn handle(&mut self, msg: Stop, _: &mut Context<Self>) -> Self::Result {
        let handle = self.rt.registry.get(&msg.id);
        let pool = self.rt.pool.clone();
        Box::pin(async move {
            match handle {
                Some(handle) => {
                    handle.addr.do_send(StopJob {
                        reason: "stopped by request".to_string(),
                        save: msg.save,
                    });
                    until_terminal(handle.state).await;
                    Ok(())
                }
                None => match store::jobs::get(&pool, msg.id).await? {
                    Some(_) => Ok(()),
                    None => Err(ManagerError::NotFound(msg.id)),
                },
            }
        })
    }
}

impl Handler<Delete> for JobManager {
    type Result = ResponseFuture<Result<DeleteReport, ManagerError>>;

    fn handle(&mut self, msg: Delete, _: &mut Context<Self>) -> Self::Result {
        let rt = self.rt.clone();
        Box::pin(async move {
            let mut report = DeleteReport::default();
            let ids = match msg.ids {
                Some(ids) => ids,
                None => store::jobs::list(&rt.pool, None)
                    .await?
                    .into_iter()
                    .filter(|j| JobState::parse(&j.state).is_some_and(JobState::is_terminal))
                    .filter_map(|j| j.job_id.parse().ok())
                    .collect(),
            };
            let mut doomed = Vec::new();
            for id in ids {
                if store::jobs::get(&rt.pool, id).await?.is_none() {
                    report.skipped.push(Skipped {
                        job_id: id,
                        reason: "not_found".into(),
                    });
                    continue;
                }
                if let Some(handle) = rt.registry.get(&id) {
                    if !msg.force {
                        report.skipped.push(Skipped {
                            job_id: id,
                            reason: "running".into(),
                        });
                        continue;
                    }
                    handle.addr.do_send(StopJob {
                        reason: "deleted".to_string(),
                        save: false,
                    });
                    until_terminal(handle.state).await;
                }
                doomed.push(id);
            }
            // Everything the stopped jobs queued must land before their rows go.
            rt.recorder.flush().await;
            store::jobs::delete(&rt.pool, &doomed).await?;
            for id in &doomed {
                rt.bus.end(*id);
                rt.events.publish("deleted", *id, serde_json::json!({}));
            }
            report.deleted = doomed;
            Ok(report)
        })
    }
}

impl Handler<Shutdown> for JobManager {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let jobs = self.rt.registry.all();
        let recorder = self.rt.recorder.clone();
        Box::pin(async move {
            // Every job's ranks get their grace at the same time: the shutdown takes one
            // grace period, not one per job.
            futures_util::future::join_all(
                jobs.into_iter()
                    .map(|(_, handle)| handle.addr.send(KillForShutdown)),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), recorder.flush()).await;
        })
    }
}
