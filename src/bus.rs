//! LogBus: live log lines of running jobs, fanned out to SSE subscribers.
//!
//! The recorder publishes a line only after it is committed to SQLite, so a subscriber that
//! subscribes first and then reads the database sees every line exactly once (deduplicated by
//! `seq`). Each watched job has one shared ring of recent lines, each already encoded as its
//! SSE frame: a publish is one push and one wake-up, and every subscriber copies the frames
//! after its own cursor into one chunk for its socket. Nothing is queued per subscriber, so a
//! thousand subscribers cost a thousand cursors, not a thousand copies of the queue. A
//! subscriber whose cursor falls out of the ring (a slow reader) catches up from the database;
//! the publisher never waits for it. The ring is bounded in lines and bytes and is emptied
//! when the last subscriber leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
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

impl LogLine {
    /// The line as one SSE `log` event: `id` is its seq, `data` its JSON (which never holds a
    /// raw newline, so it is a single `data:` line).
    pub fn sse_frame(&self) -> Bytes {
        let json = serde_json::to_string(self).unwrap_or_default();
        Bytes::from(format!("event: log\nid: {}\ndata: {json}\n\n", self.seq))
    }
}

/// A committed line, encoded once for every subscriber.
#[derive(Debug)]
struct Frame {
    seq: i64,
    rank: Option<u32>,
    bytes: Bytes,
}

/// Lines and bytes a job's ring holds before the oldest are dropped.
const RING_LINES: usize = 65_536;
const RING_BYTES: usize = 8 << 20;

#[derive(Default)]
struct Ring {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// The largest seq that left the ring: a cursor below it may have missed lines.
    evicted_upto: i64,
    /// Every line of the job has been published; nothing follows.
    ended: bool,
}

impl Ring {
    fn push(&mut self, frame: Frame) {
        self.bytes += frame.bytes.len();
        self.frames.push_back(frame);
        while self.frames.len() > RING_LINES || self.bytes > RING_BYTES {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.bytes.len();
            self.evicted_upto = old.seq;
        }
    }

    fn clear(&mut self) {
        if let Some(last) = self.frames.back() {
            self.evicted_upto = last.seq;
        }
        self.frames.clear();
        self.bytes = 0;
    }
}

/// The live side of one job's log.
struct JobLog {
    ring: RwLock<Ring>,
    /// Bumped after every published batch and at the end; subscribers wait on it.
    wake: watch::Sender<u64>,
}

/// What a subscriber reads from the ring.
pub enum Read {
    /// Frames after the cursor (possibly none of its rank), and the new cursor.
    Frames(Bytes, i64),
    /// The cursor fell out of the ring: read the database from the cursor on.
    Behind,
    /// Nothing new yet.
    Idle,
    /// Nothing new, and nothing will come.
    Ended,
}

/// A subscriber's handle on a job's live log.
pub struct Live {
    log: Arc<JobLog>,
    wake: watch::Receiver<u64>,
}

impl Live {
    /// Copies the frames after `cursor` (of `rank`, when given) into one chunk of at most about
    /// `max_bytes`.
    pub fn read_after(&self, cursor: i64, rank: Option<u32>, max_bytes: usize) -> Read {
        let ring = self.log.ring.read().unwrap();
        if cursor < ring.evicted_upto {
            return Read::Behind;
        }
        let start = ring.frames.partition_point(|f| f.seq <= cursor);
        if start == ring.frames.len() {
            return if ring.ended { Read::Ended } else { Read::Idle };
        }
        let mut out = BytesMut::new();
        let mut last = cursor;
        for frame in ring.frames.range(start..) {
            if out.len() >= max_bytes {
                break;
            }
            if rank.is_none() || frame.rank == rank {
                out.extend_from_slice(&frame.bytes);
            }
            last = frame.seq;
        }
        Read::Frames(out.freeze(), last)
    }

    /// Waits until something is published (or the job's log ends).
    pub async fn changed(&mut self) {
        if self.wake.changed().await.is_err() {
            // The job's log is gone from the bus; `read_after` reports the end.
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Default)]
pub struct LogBus {
    jobs: Mutex<HashMap<Uuid, Arc<JobLog>>>,
}

impl LogBus {
    /// Called when a job's actor starts: its lines will be published from now on.
    pub fn open(&self, job_id: Uuid) {
        self.jobs.lock().unwrap().entry(job_id).or_insert_with(|| {
            Arc::new(JobLog {
                ring: RwLock::new(Ring::default()),
                wake: watch::Sender::new(0),
            })
        });
    }

    /// Publishes committed lines, in seq order, with one wake-up per job.
    pub fn publish(&self, lines: Vec<(Uuid, LogLine)>) {
        let jobs = self.jobs.lock().unwrap();
        let mut woken: Vec<&Arc<JobLog>> = Vec::new();
        for (job_id, line) in lines {
            let Some(log) = jobs.get(&job_id) else {
                continue;
            };
            let mut ring = log.ring.write().unwrap();
            if log.wake.receiver_count() == 0 {
                // Nobody watches: a new subscriber reads these from the database.
                ring.clear();
                continue;
            }
            ring.push(Frame {
                seq: line.seq,
                rank: line.rank,
                bytes: line.sse_frame(),
            });
            if !woken.iter().any(|l| Arc::ptr_eq(l, log)) {
                woken.push(log);
            }
        }
        for log in woken {
            log.wake.send_modify(|n| *n += 1);
        }
    }

    /// The job's last line is published: tell subscribers and forget the job.
    pub fn end(&self, job_id: Uuid) {
        if let Some(log) = self.jobs.lock().unwrap().remove(&job_id) {
            log.ring.write().unwrap().ended = true;
            log.wake.send_modify(|n| *n += 1);
        }
    }

    /// Live lines of a running job, or `None` when the job's logs are complete already.
    pub fn subscribe(&self, job_id: Uuid) -> Option<Live> {
        let jobs = self.jobs.lock().unwrap();
        let log = jobs.get(&job_id)?.clone();
        let wake = log.wake.subscribe();
        Some(Live { log, wake })
    }

    pub fn subscriber_count(&self) -> usize {
        self.jobs
            .lock()
            .unwrap()
            .values()
            .map(|log| log.wake.receiver_count())
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
            at: crate::domain::now(),
            data,
        };
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.tx.subscribe()
    }
}
