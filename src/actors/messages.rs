//! The messages the actors send each other (JobManager → Job → Worker and back), in one
//! place; the messages the HTTP handlers send live beside the actor that answers them.

use actix::prelude::*;
use uuid::Uuid;

use crate::domain::{Exit, Outcome};
use crate::launcher::{Launch, Place};

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
}

/// Worker → Job: incarnation `attempt` of `rank` ended (or never started).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WorkerExited {
    pub rank: u32,
    pub attempt: u32,
    pub outcome: Outcome,
    pub exit: Exit,
    pub detail: String,
    pub tail: Vec<String>,
}

/// Job → JobManager: the job has ended and its final state is in the database.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JobEnded {
    pub id: Uuid,
}
