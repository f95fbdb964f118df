//! Every message of the actors, in one place: what the HTTP handlers ask (the JobManager,
//! a Job), what the actors send each other (JobManager → Job → Worker and back, Job ↔
//! Checkpoint), and the errors they answer with.

use std::sync::Arc;

use actix::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::checkpoint::PartInfo;
use crate::domain::progress::Summary;
use crate::domain::{Exit, Outcome};
use crate::launcher::{Launch, Place};
use crate::spec::JobSpec;

/// Job → Worker: start incarnation `attempt` of this rank at `place`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LaunchRank {
    pub attempt: u32,
    pub launch: Launch,
    pub place: Place,
}

/// Job → Worker: a valid heartbeat of incarnation `attempt` arrived (the Job checked the
/// token).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Beat {
    pub attempt: u32,
}

/// Worker → Job: incarnation `attempt` of `rank` sent no heartbeat in time. The Job captures
/// every rank's stacks, then answers with [`KillHung`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct RankHung {
    pub rank: u32,
    pub attempt: u32,
}

/// Job → Worker: capture what the current incarnation's processes are doing (within about a
/// second); none when it has no process on this host.
#[derive(Message)]
#[rtype(result = "Option<crate::domain::incident::RankStacks>")]
pub struct CaptureStacks;

/// Job → Worker: the stacks are taken; terminate hung incarnation `attempt`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KillHung {
    pub attempt: u32,
}

/// Job → Worker: incarnation `attempt` is a straggler to restart (`straggler_action:
/// restart`): terminate it; its exit is a failure with reason `straggler`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RestartStraggler {
    pub attempt: u32,
}

/// Job → Worker: ask the current incarnation to checkpoint with SIGUSR1 (or what stands for
/// it), for a rank that never heartbeated and so cannot read the request in an answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AskToSave;

/// Job → Worker: stop the current incarnation (terminate, then kill after the grace period).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Terminate;

/// Job → Worker: the job is over; stop the actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopActor;

/// Worker → Job: incarnation `attempt` of `rank` is running as `pid`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerStarted {
    pub rank: u32,
    pub attempt: u32,
    pub pid: u32,
    /// A warm standby became this incarnation.
    pub warm: bool,
}

/// Worker → Job: incarnation `attempt` of `rank` ended (or never started).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WorkerExited {
    pub rank: u32,
    pub attempt: u32,
    /// When the rank's end was seen (its exit reaped, its spawn failed).
    pub ended: std::time::Instant,
    pub outcome: Outcome,
    pub exit: Exit,
    pub detail: String,
    pub tail: Vec<String>,
}

/// Where a Worker reports to its Job: the three messages it sends, as recipients, so the
/// Worker needs neither the Job's type nor its address (no import circle between the two).
#[derive(Clone)]
pub struct JobInbox {
    pub started: Recipient<WorkerStarted>,
    pub hung: Recipient<RankHung>,
    pub exited: Recipient<WorkerExited>,
}

impl JobInbox {
    pub fn of<A>(job: &Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<WorkerStarted>
            + Handler<RankHung>
            + Handler<WorkerExited>,
    {
        JobInbox {
            started: job.clone().recipient(),
            hung: job.clone().recipient(),
            exited: job.clone().recipient(),
        }
    }
}

/// Job → JobManager: the job has ended and its final state is in the database.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JobEnded {
    pub id: Uuid,
}

// HTTP handlers → JobManager.

/// Why a manager request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no job with id {0}")]
    NotFound(Uuid),
    #[error("job {0} is still running; stop it first or pass ?force=true")]
    Running(Uuid),
    #[error("{0}")]
    AtLimit(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ManagerError {
    fn from(e: sqlx::Error) -> Self {
        ManagerError::Internal(e.into())
    }
}

/// Create a job from a validated spec and start it.
#[derive(Message)]
#[rtype(result = "Result<Uuid, ManagerError>")]
pub struct CreateJob(pub JobSpec);

/// At boot: resume every job the database says is pending or running.
#[derive(Message)]
#[rtype(result = "Result<usize, ManagerError>")]
pub struct Restore;

/// Stop a job; resolves once it is stopped (or had already ended).
#[derive(Message)]
#[rtype(result = "Result<(), ManagerError>")]
pub struct Stop {
    pub id: Uuid,
    /// Ask the ranks to save first (up to the job's `save_grace_s`).
    pub save: bool,
}

/// Delete jobs and their records. A running job is refused unless `force`, which stops it
/// first. With `ids: None`, every finished job is deleted.
#[derive(Message)]
#[rtype(result = "Result<DeleteReport, ManagerError>")]
pub struct Delete {
    pub ids: Option<Vec<Uuid>>,
    pub force: bool,
}

/// Server shutdown: kill every rank now; jobs stay `running` and resume on the next start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

#[derive(Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct DeleteReport {
    pub deleted: Vec<Uuid>,
    /// Ids not deleted, each with why.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Skipped {
    pub job_id: Uuid,
    pub reason: String,
}

// HTTP handlers → Job.

/// The live summary of the job.
#[derive(Message)]
#[rtype(result = "Summary")]
pub struct GetSummary;

/// Stop every rank and end the job as `stopped`; with `save`, the ranks save first.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopJob {
    pub reason: String,
    pub save: bool,
}

/// `POST /jobs/{id}/checkpoint`: ask the ranks to save now and keep running; resolves with
/// what the save did once it committed or its grace ran out.
#[derive(Message)]
#[rtype(result = "Option<crate::domain::notice::NoticeReport>")]
pub struct SaveNow;

/// Server shutdown: kill every rank now, leave the job `running` in the database so the next
/// start resumes it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KillForShutdown;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerRejected {
    /// No such rank.
    UnknownRank,
    /// The token belongs to an earlier incarnation, or this one has ended: the worker must stop.
    Stale,
    /// The token belongs to no incarnation of this rank.
    BadToken,
    /// The request does not fit the job's state (e.g. all-reduce values of the wrong length).
    Invalid(String),
}

// Worker API → Job. Each carries the attempt whose token the request presented (checked in
// the job's `WorkerTokens` before the body was read); the Job refuses it as stale (409) unless
// that attempt still runs.

/// A heartbeat from incarnation `attempt` of `rank`; answered with whether it was recorded
/// (false: an automatic heartbeat ignored because the script sends its own) and the save
/// request in flight, if any.
#[derive(Message)]
#[rtype(result = "Result<(bool, Option<crate::domain::notice::SaveRequest>), WorkerRejected>")]
pub struct Heartbeat {
    pub rank: u32,
    pub attempt: u32,
    pub body: Value,
}

/// A rank's contribution to the all-reduce of `step`; answered with the mean of all ranks'.
#[derive(Message)]
#[rtype(result = "Result<Arc<Round>, WorkerRejected>")]
pub struct AllReduceRequest {
    pub rank: u32,
    pub attempt: u32,
    pub step: u64,
    pub values: Vec<f64>,
}

/// The outcome of an all-reduce round, the same for every rank: the mean, and the save
/// request the round carries (ranks in lock step must all learn it at the same step).
#[derive(Debug)]
pub struct Round {
    pub mean: Vec<f64>,
    pub save: Option<crate::domain::notice::SaveRequest>,
}

/// A rank reports its checkpoint part of `step` as durable.
#[derive(Message)]
#[rtype(result = "Result<(), WorkerRejected>")]
pub struct CheckpointPart {
    pub rank: u32,
    pub attempt: u32,
    pub step: u64,
    pub part: PartInfo,
}

// Job ↔ Checkpoint.

/// A rank's part of `step` is durable in the store.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct RegisterPart {
    pub rank: u32,
    pub step: u64,
    pub part: PartInfo,
}

/// Sent to the Job after each commit (for the summary).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Committed {
    pub step: u64,
    pub at: String,
}

/// Resolves once no commit is running or waiting, with the newest committed step.
#[derive(Message)]
#[rtype(result = "Option<Committed>")]
pub struct WhenIdle;
