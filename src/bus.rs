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
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogLine {
    pub seq: i64,
    pub rank: Option<u32>,
    pub attempt: Option<u32>,
    pub stream: String,
    pub ts: String,
    pub line: String,
}

#[derive(Debug, Clone)]
pub enum LogEvent {
    Line(Arc<LogLine>),
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

    pub fn publish(&self, job_id: Uuid, line: Arc<LogLine>) {
        let channels = self.channels.lock().unwrap();
        if let Some(tx) = channels.get(&job_id) {
            // No subscribers is not an error.
            let _ = tx.send(LogEvent::Line(line));
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
