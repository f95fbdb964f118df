//! LogBus: live log lines of running jobs, fanned out to SSE subscribers.
//!
//! The recorder publishes a line only after it is committed to SQLite, so a subscriber that
//! subscribes first and then reads the database sees every line exactly once (deduplicated by
//! `seq`). Each job has a bounded broadcast channel: a slow subscriber lags and catches up from
//! the database; the publisher never waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use uuid::Uuid;

/// One stored log line, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct LogLine {
    pub seq: i64,
    pub rank: Option<u32>,
    pub attempt: Option<u32>,
    pub stream: String,
    pub ts: String,
    pub line: String,
}

/// A committed line and its JSON, serialized once for every subscriber.
#[derive(Debug)]
pub struct Published {
    pub line: LogLine,
    pub json: String,
}

#[derive(Debug, Clone)]
pub enum LogEvent {
    Line(Arc<Published>),
    /// Every line of the job has been published; nothing follows.
    End,
}

const CHANNEL_CAPACITY: usize = 4096;

#[derive(Default)]
pub struct LogBus {
    channels: Mutex<HashMap<Uuid, broadcast::Sender<LogEvent>>>,
}

/// What a subscriber gets: live events, or `None` when the job's logs are complete already.
pub type Subscription = Option<broadcast::Receiver<LogEvent>>;

impl LogBus {
    /// Called when a job's actor starts: its lines will be published from now on.
    pub fn open(&self, job_id: Uuid) {
        let mut channels = self.channels.lock().unwrap();
        channels
            .entry(job_id)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0);
    }

    pub fn publish(&self, job_id: Uuid, line: LogLine) {
        let channels = self.channels.lock().unwrap();
        if let Some(tx) = channels.get(&job_id)
            && tx.receiver_count() > 0
        {
            let json = serde_json::to_string(&line).unwrap_or_default();
            let _ = tx.send(LogEvent::Line(Arc::new(Published { line, json })));
        }
    }

    /// The job's last line is committed: tell subscribers and forget the channel.
    pub fn end(&self, job_id: Uuid) {
        if let Some(tx) = self.channels.lock().unwrap().remove(&job_id) {
            let _ = tx.send(LogEvent::End);
        }
    }

    pub fn subscribe(&self, job_id: Uuid) -> Subscription {
        self.channels
            .lock()
            .unwrap()
            .get(&job_id)
            .map(|tx| tx.subscribe())
    }

    pub fn subscriber_count(&self) -> usize {
        self.channels
            .lock()
            .unwrap()
            .values()
            .map(|tx| tx.receiver_count())
            .sum()
    }
}

/// A change of a job or one of its ranks, for `GET /events` (the browser page listens to it
/// instead of polling).
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub seq: u64,
    /// `job`, `worker`, `restart`, `checkpoint`, `progress` or `deleted`.
    pub kind: &'static str,
    pub job_id: Uuid,
    pub at: String,
    pub data: serde_json::Value,
}

/// Fan-out of job events to every `/events` subscriber. Nothing is kept: a subscriber that
/// connects (or lags) re-reads the state it needs from the API.
pub struct EventBus {
    tx: broadcast::Sender<Arc<JobEvent>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(1024).0,
            seq: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl EventBus {
    pub fn publish(&self, kind: &'static str, job_id: Uuid, data: serde_json::Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let event = JobEvent {
            seq,
            kind,
            job_id,
            at: crate::store::now(),
            data,
        };
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.tx.subscribe()
    }
}
