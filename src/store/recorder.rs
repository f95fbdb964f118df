//! The recorder: one task that owns every write a running job makes (history and log lines),
//! applies them in order in batched `BEGIN IMMEDIATE` transactions, assigns log sequence ids,
//! and publishes committed lines to the LogBus.
//!
//! Batching is adaptive: the task takes everything queued when it wakes up (up to a limit), so
//! an idle server writes a line within a millisecond and a busy one writes thousands per
//! transaction. Log lines hold a permit from a semaphore until committed, which bounds memory
//! when workers print faster than the disk can take: readers wait, the actors never do.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::health::{StoreHealth, is_storage_fault};
use super::history::HistoryOp;
use crate::bus::{EventBus, LogBus, LogLine};

/// A line as produced, before it has a sequence id.
#[derive(Debug)]
pub struct NewLine {
    pub job_id: Uuid,
    pub rank: Option<u32>,
    pub attempt: Option<u32>,
    pub stream: &'static str,
    pub line: String,
}

enum Op {
    History(HistoryOp, Option<oneshot::Sender<()>>),
    /// The permit is released when the batch holding the line is done.
    Log {
        line: NewLine,
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// Publish the end of a job's logs once everything before it is committed.
    EndOfLogs(Uuid),
    /// A job event, published once everything recorded before it is committed, so a client
    /// that reads the API on the event sees what the event announces.
    Event(&'static str, Uuid, serde_json::Value),
    Flush(oneshot::Sender<()>),
}

const MAX_BATCH: usize = 4096;
const LOG_PERMITS: usize = 65_536;
/// SQLite allows 32,766 bound parameters per statement; 7 per row.
const ROWS_PER_INSERT: usize = 500;

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Op>,
    permits: Arc<Semaphore>,
    health: Arc<StoreHealth>,
}

impl Recorder {
    /// Starts the recorder task on the current runtime. `next_seq` is one past the largest
    /// stored sequence id.
    pub async fn start(
        pool: SqlitePool,
        data_dir: PathBuf,
        bus: Arc<LogBus>,
        events: Arc<EventBus>,
        max_lines_per_job: u64,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM logs")
            .fetch_one(&pool)
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(StoreHealth::default());
        let task = Task {
            pool,
            data_dir,
            bus,
            events,
            health: health.clone(),
            metrics,
            next_seq: max.unwrap_or(0) + 1,
            retention: Retention::new(max_lines_per_job),
            queue: VecDeque::new(),
            dropped: HashMap::new(),
            retry_in: RETRY_MIN,
        };
        tokio::spawn(run(task, rx));
        Ok(Recorder {
            tx,
            permits: Arc::new(Semaphore::new(LOG_PERMITS)),
            health,
        })
    }

    /// Whether the history can be written now, and what was dropped while it could not.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.health
    }

    pub fn record(&self, op: HistoryOp) {
        let _ = self.tx.send(Op::History(op, None));
    }

    /// Records and resolves once the write is committed (and only then: while the history
    /// cannot be written, the write is retried and the caller waits).
    pub fn record_acked(&self, op: HistoryOp) -> oneshot::Receiver<()> {
        let (ack, done) = oneshot::channel();
        let _ = self.tx.send(Op::History(op, Some(ack)));
        done
    }

    /// A worker's line; waits while too many lines are queued.
    pub async fn log(&self, line: NewLine) {
        let permit = self.permits.clone().acquire_owned().await.ok();
        let _ = self.tx.send(Op::Log {
            line,
            _permit: permit,
        });
    }

    /// A note of trainvisor's own (rare: not subject to the queue bound).
    pub fn note(&self, job_id: Uuid, rank: Option<u32>, attempt: Option<u32>, line: String) {
        let line = NewLine {
            job_id,
            rank,
            attempt,
            stream: "system",
            line,
        };
        let _ = self.tx.send(Op::Log {
            line,
            _permit: None,
        });
    }

    pub fn event(&self, kind: &'static str, job_id: Uuid, data: serde_json::Value) {
        let _ = self.tx.send(Op::Event(kind, job_id, data));
    }

    pub fn end_of_logs(&self, job_id: Uuid) {
        let _ = self.tx.send(Op::EndOfLogs(job_id));
    }

    /// Resolves when everything queued before it is committed.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Op::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

/// Keeps at most `max_lines` log lines per job: every `trim_every` new lines of a job, its
/// oldest lines beyond the limit are deleted and counted in `jobs.logs_dropped`.
struct Retention {
    max_lines: u64,
    trim_every: u64,
    since_trim: std::collections::HashMap<Uuid, u64>,
}

impl Retention {
    fn new(max_lines: u64) -> Self {
        Retention {
            max_lines,
            trim_every: (max_lines / 10).clamp(1, 100_000),
            since_trim: Default::default(),
        }
    }

    /// Jobs due for a trim after `lines` more were written.
    fn due(&mut self, lines: &[(Uuid, LogLine)]) -> Vec<Uuid> {
        for (job, _) in lines {
            *self.since_trim.entry(*job).or_default() += 1;
        }
        let every = self.trim_every;
        let due: Vec<Uuid> = self
            .since_trim
            .iter()
            .filter(|(_, n)| **n >= every)
            .map(|(j, _)| *j)
            .collect();
        for j in &due {
            self.since_trim.remove(j);
        }
        due
    }

    async fn trim(&self, pool: &SqlitePool, job: Uuid) -> sqlx::Result<()> {
        let mut conn = pool.acquire().await?;
        let result = self.trim_on(&mut conn, job).await;
        if result.is_err() {
            conn.close_on_drop();
        }
        result
    }

    async fn trim_on(&self, conn: &mut SqliteConnection, job: Uuid) -> sqlx::Result<()> {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let dropped = sqlx::query(
            "DELETE FROM logs WHERE job_id = ?1 AND seq <=
               (SELECT seq FROM logs WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        )
        .bind(job.to_string())
        .bind(self.max_lines as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if dropped > 0 {
            sqlx::query("UPDATE jobs SET logs_dropped = logs_dropped + ? WHERE id = ?")
                .bind(dropped as i64)
                .bind(job.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }
}

/// What the recorder task keeps between batches.
struct Task {
    metrics: Arc<crate::metrics::Metrics>,
    pool: SqlitePool,
    /// Where the database lives: its free space decides when a degraded period ends.
    data_dir: PathBuf,
    bus: Arc<LogBus>,
    events: Arc<EventBus>,
    health: Arc<StoreHealth>,
    next_seq: i64,
    retention: Retention,
    /// Operations taken from the channel and not yet done, in the order they were issued.
    queue: VecDeque<Op>,
    /// Log lines dropped per job while the history could not be written, not yet counted in
    /// `jobs.logs_dropped`.
    dropped: HashMap<Uuid, u64>,
    retry_in: Duration,
}

/// The first retry of a failed write comes after this, doubling up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A degraded period ends when the data dir has this much free space again (and writes work).
const RECOVERED_FREE_BYTES: u64 = 8 << 20;

async fn run(mut task: Task, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut incoming = Vec::with_capacity(MAX_BATCH);
    let mut open = true;
    loop {
        if task.health.degraded().is_some() {
            tokio::time::sleep(task.retry_in).await;
        } else if task.queue.is_empty()
            && (!open || rx.recv_many(&mut incoming, MAX_BATCH).await == 0)
        {
            return;
        }
        // Whatever else is queued joins this batch.
        while open && incoming.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => incoming.push(op),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        task.take(&mut incoming);
        if !task.queue.is_empty() {
            task.write_next().await;
        } else {
            task.try_recover();
        }
    }
}

impl Task {
    /// Queues new operations. While the history cannot be written, log lines are dropped and
    /// counted at once (they must not pile up in memory); every other operation waits, in order.
    fn take(&mut self, incoming: &mut Vec<Op>) {
        let degraded = self.health.degraded().is_some();
        for op in incoming.drain(..) {
            match op {
                Op::Log { line, .. } if degraded => self.drop_line(line.job_id),
                op => self.queue.push_back(op),
            }
        }
        self.health.set_pending(self.queue.len());
    }

    fn drop_line(&mut self, job: Uuid) {
        *self.dropped.entry(job).or_default() += 1;
        self.health.add_logs_dropped(1);
    }

    /// Writes the oldest operations in one transaction. On success their callers are answered
    /// and the lines and events published; on a storage failure nothing is acknowledged, the
    /// log lines of the batch are dropped (counted) and the rest stays queued for a retry.
    async fn write_next(&mut self) {
        let n = self.queue.len().min(MAX_BATCH);
        let mut batch: Vec<Op> = self.queue.drain(..n).collect();
        let mut published = Vec::new();
        let first_seq = self.next_seq;
        let started = std::time::Instant::now();
        let result = write_batch(
            &self.pool,
            &batch,
            &self.dropped,
            &mut self.next_seq,
            &mut published,
        )
        .await;
        if let Err(e) = result {
            self.next_seq = first_seq;
            self.failed(e, batch);
            return;
        }
        self.metrics.recorder_batch_ops.observe(n as f64);
        self.metrics
            .recorder_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.dropped.clear();
        self.try_recover();
        for job in self.retention.due(&published) {
            if let Err(e) = self.retention.trim(&self.pool, job).await {
                tracing::error!(error = %e, %job, "recorder: log retention failed");
            }
        }
        self.bus.publish(published);
        for op in batch.drain(..) {
            match op {
                Op::History(_, Some(ack)) | Op::Flush(ack) => {
                    let _ = ack.send(());
                }
                Op::EndOfLogs(job_id) => self.bus.end(job_id),
                Op::Event(kind, job_id, data) => self.events.publish(kind, job_id, data),
                _ => {}
            }
        }
        self.health.set_pending(self.queue.len());
    }

    /// Ends a degraded period once a write has succeeded and the data dir has room again. A
    /// full disk often still takes a small write (SQLite reuses the WAL's space), so success
    /// alone would flap between refusing and taking new work while the disk stays full.
    fn try_recover(&mut self) {
        if self.health.degraded().is_none() {
            return;
        }
        let free = super::health::free_bytes(&self.data_dir).unwrap_or(u64::MAX);
        if free < RECOVERED_FREE_BYTES {
            return;
        }
        self.retry_in = RETRY_MIN;
        if let Some(was) = self.health.set_ok() {
            tracing::warn!(
                since = %was.since,
                logs_dropped = self.health.logs_dropped(),
                free_mb = free >> 20,
                "the history is being recorded again"
            );
        }
    }

    fn failed(&mut self, e: sqlx::Error, batch: Vec<Op>) {
        let reason = e.to_string();
        if self.health.set_degraded(reason.clone()) {
            tracing::error!(
                error = %reason,
                "recorder: the history cannot be written; retrying in order, refusing new jobs \
                 and dropping log lines until it can"
            );
        } else {
            tracing::debug!(error = %reason, "recorder: write still failing");
        }
        for op in batch.into_iter().rev() {
            match op {
                Op::Log { line, .. } => self.drop_line(line.job_id),
                op => self.queue.push_front(op),
            }
        }
        self.health.set_pending(self.queue.len());
        self.retry_in = (self.retry_in * 2).min(RETRY_MAX);
    }
}

/// One transaction on a connection of its own. A failed transaction is rolled back and, after
/// a storage failure, its connection is closed rather than returned to the pool, so the next
/// try starts on a clean one (SQLite can leave a failed COMMIT's transaction open).
async fn write_batch(
    pool: &SqlitePool,
    batch: &[Op],
    dropped: &HashMap<Uuid, u64>,
    next_seq: &mut i64,
    published: &mut Vec<(Uuid, LogLine)>,
) -> sqlx::Result<()> {
    let mut conn = pool.acquire().await?;
    let result = write_on(&mut conn, batch, dropped, next_seq, published).await;
    if result.is_err() {
        published.clear();
        conn.close_on_drop();
    }
    result
}

async fn write_on(
    conn: &mut SqliteConnection,
    batch: &[Op],
    dropped: &HashMap<Uuid, u64>,
    next_seq: &mut i64,
    published: &mut Vec<(Uuid, LogLine)>,
) -> sqlx::Result<()> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let ts = super::now();
    let mut lines = Vec::new();
    for (job, n) in dropped {
        sqlx::query("UPDATE jobs SET logs_dropped = logs_dropped + ? WHERE id = ?")
            .bind(*n as i64)
            .bind(job.to_string())
            .execute(&mut *tx)
            .await?;
        lines.push(system_line(
            *job,
            next_seq,
            &ts,
            format!(
                "{n} log lines of this job were dropped while the data dir could not be \
                 written (counted in logs_dropped)"
            ),
        ));
    }
    for op in batch {
        match op {
            Op::History(h, _) => {
                // A statement that fails on its own (a constraint: its job was deleted) is
                // logged and skipped so one bad row never loses the rest of the batch; a
                // storage failure fails the whole transaction.
                if let Err(e) = h.apply(&mut tx).await {
                    if is_storage_fault(&e) {
                        return Err(e);
                    }
                    tracing::error!(error = %e, op = ?h, "recorder: history write failed");
                }
            }
            Op::Log { line: l, .. } => {
                lines.push((
                    l.job_id,
                    LogLine {
                        seq: *next_seq,
                        rank: l.rank,
                        attempt: l.attempt,
                        stream: l.stream.to_string(),
                        ts: ts.clone(),
                        line: l.line.clone(),
                    },
                ));
                *next_seq += 1;
            }
            Op::EndOfLogs(_) | Op::Flush(_) | Op::Event(..) => {}
        }
    }
    for chunk in lines.chunks(ROWS_PER_INSERT) {
        match insert_lines(&mut tx, chunk).await {
            Ok(()) => published.extend(chunk.iter().cloned()),
            Err(e) if is_storage_fault(&e) => return Err(e),
            // Lines of a job deleted meanwhile have nowhere to go (foreign key): keep the
            // others.
            Err(e) => {
                tracing::debug!(error = %e, "recorder: log lines dropped, retrying row by row");
                for line in chunk {
                    match insert_lines(&mut tx, std::slice::from_ref(line)).await {
                        Ok(()) => published.push(line.clone()),
                        Err(e) if is_storage_fault(&e) => return Err(e),
                        Err(_) => {}
                    }
                }
            }
        }
    }
    tx.commit().await
}

fn system_line(job: Uuid, next_seq: &mut i64, ts: &str, line: String) -> (Uuid, LogLine) {
    let seq = *next_seq;
    *next_seq += 1;
    (
        job,
        LogLine {
            seq,
            rank: None,
            attempt: None,
            stream: "system".to_string(),
            ts: ts.to_string(),
            line,
        },
    )
}

async fn insert_lines(conn: &mut SqliteConnection, lines: &[(Uuid, LogLine)]) -> sqlx::Result<()> {
    let mut insert = QueryBuilder::<Sqlite>::new(
        "INSERT INTO logs (seq, job_id, rank, attempt, stream, ts, line) ",
    );
    insert.push_values(lines, |mut row, (job_id, l)| {
        row.push_bind(l.seq)
            .push_bind(job_id.to_string())
            .push_bind(l.rank)
            .push_bind(l.attempt)
            .push_bind(l.stream.clone())
            .push_bind(l.ts.clone())
            .push_bind(l.line.clone());
    });
    insert.build().execute(conn).await.map(|_| ())
}
