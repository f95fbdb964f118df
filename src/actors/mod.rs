//! The actors: `JobManager` supervises `Job`s; a `Job` owns one `Worker` per rank.

pub mod checkpoint;
pub mod job;
pub mod job_manager;
pub mod messages;
pub mod tokens;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::Addr;
use sqlx::SqlitePool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::bus::{EventBus, LogBus};
use crate::config::Settings;
use crate::store::Recorder;

pub use job::Job;
pub use job_manager::JobManager;
pub use worker::Worker;

use crate::domain::JobState;

/// What every actor shares: the database, the recorder, the log bus and the settings.
pub struct Runtime {
    pub pool: SqlitePool,
    pub recorder: Recorder,
    pub bus: Arc<LogBus>,
    pub events: Arc<EventBus>,
    pub settings: Settings,
    /// Marks every worker process of this data dir (see `launcher::process::sweep`).
    pub instance: String,
    /// Base URL workers reach the server at, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub registry: Registry,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Open SSE streams (log and event streams together).
    pub sse_streams: std::sync::atomic::AtomicUsize,
    /// How full the HTTP listener is (a saturated server hears no heartbeats).
    pub http: Arc<crate::pressure::HttpPressure>,
}

/// Counts one open SSE stream while alive.
pub struct StreamSlot(Arc<Runtime>);

impl Runtime {
    /// A slot for one more SSE stream, or None at the limit.
    pub fn open_stream(self: &Arc<Self>) -> Option<StreamSlot> {
        use std::sync::atomic::Ordering;
        let max = self.settings.max_sse_subscribers;
        self.sse_streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .sse_streams
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A live job: its actor and a watch of its state.
#[derive(Clone)]
pub struct JobHandle {
    pub addr: Addr<Job>,
    pub state: watch::Receiver<JobState>,
    /// Its ranks, and their standbys with warm standby (`JobSpec::processes`).
    pub processes: usize,
    /// Its worker tokens, checked by the worker API without asking the actor.
    pub tokens: Arc<tokens::WorkerTokens>,
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

    /// Live jobs and their rank processes (standbys included), for the limits.
    pub fn load(&self) -> (usize, usize) {
        let jobs = self.jobs.lock().unwrap();
        (jobs.len(), jobs.values().map(|h| h.processes).sum())
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
