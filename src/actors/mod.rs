//! The actors: `JobManager` supervises `Job`s; a `Job` owns one `Worker` per rank.

pub mod checkpoint;
pub mod job;
pub mod job_manager;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::Addr;
use serde::Serialize;
use sqlx::SqlitePool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::bus::{EventBus, LogBus};
use crate::config::Settings;
use crate::store::Recorder;

pub use job::Job;
pub use job_manager::JobManager;
pub use worker::Worker;

/// A job's lifecycle: `pending → running → succeeded | failed | stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Stopped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Stopped => "stopped",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Stopped
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "stopped" => JobState::Stopped,
            _ => return None,
        })
    }
}

/// What every actor shares: the database, the recorder, the log bus and the settings.
pub struct Runtime {
    pub pool: SqlitePool,
    pub recorder: Recorder,
    pub bus: Arc<LogBus>,
    pub events: EventBus,
    pub settings: Settings,
    /// Marks every worker process of this data dir (see `launcher::local::sweep`).
    pub instance: String,
    /// Base URL workers reach the server at, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub registry: Registry,
}

/// A live job: its actor and a watch of its state.
#[derive(Clone)]
pub struct JobHandle {
    pub addr: Addr<Job>,
    pub state: watch::Receiver<JobState>,
}

/// Live jobs by id, shared by the JobManager (which fills it) and the HTTP handlers (which
/// route heartbeats and summaries straight to a job's actor).
#[derive(Default)]
pub struct Registry {
    jobs: Mutex<HashMap<Uuid, JobHandle>>,
}

impl Registry {
    pub fn get(&self, id: &Uuid) -> Option<JobHandle> {
        self.jobs.lock().unwrap().get(id).cloned()
    }

    pub fn insert(&self, id: Uuid, handle: JobHandle) {
        self.jobs.lock().unwrap().insert(id, handle);
    }

    pub fn remove(&self, id: &Uuid) {
        self.jobs.lock().unwrap().remove(id);
    }

    pub fn all(&self) -> Vec<(Uuid, JobHandle)> {
        let jobs = self.jobs.lock().unwrap();
        jobs.iter().map(|(id, h)| (*id, h.clone())).collect()
    }
}

/// sha256 of a secret, hex: what the database keeps instead of a worker token.
pub fn hash_token(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
