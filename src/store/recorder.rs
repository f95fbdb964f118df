//! The recorder: one task that owns every write a running job makes (history and log lines),
//! applies them in order in batched `BEGIN IMMEDIATE` transactions, assigns log sequence ids,
//! and publishes committed lines to the LogBus.
//!
//! Batching is adaptive: the task takes everything queued when it wakes up (up to a limit), so
//! an idle server writes a line within a millisecond and a busy one writes thousands per
//! transaction. Log lines hold a permit from a semaphore until committed, which bounds memory
//! when workers print faster than the disk can take: readers wait, the actors never do.

use std::sync::Arc;

use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use uuid::Uuid;

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
}

impl Recorder {
    /// Starts the recorder task on the current runtime. `next_seq` is one past the largest
    /// stored sequence id.
    pub async fn start(
        pool: SqlitePool,
        bus: Arc<LogBus>,
        events: Arc<EventBus>,
        max_lines_per_job: u64,
    ) -> anyhow::Result<Self> {
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM logs")
            .fetch_one(&pool)
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let retention = Retention::new(max_lines_per_job);
        tokio::spawn(run(pool, bus, events, rx, max.unwrap_or(0) + 1, retention));
        Ok(Recorder {
            tx,
            permits: Arc::new(Semaphore::new(LOG_PERMITS)),
        })
    }

    pub fn record(&self, op: HistoryOp) {
        let _ = self.tx.send(Op::History(op, None));
    }

    /// Records and resolves once the write is committed.
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
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
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

async fn run(
    pool: SqlitePool,
    bus: Arc<LogBus>,
    events: Arc<EventBus>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    mut next_seq: i64,
    mut retention: Retention,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut published = Vec::new();
        if let Err(e) = write_batch(&pool, &mut batch, &mut next_seq, &mut published).await {
            tracing::error!(error = %e, "recorder: batch not written");
            published.clear();
        }
        for job in retention.due(&published) {
            if let Err(e) = retention.trim(&pool, job).await {
                tracing::error!(error = %e, %job, "recorder: log retention failed");
            }
        }
        bus.publish(published);
        for op in batch.drain(..) {
            match op {
                Op::History(_, Some(ack)) | Op::Flush(ack) => {
                    let _ = ack.send(());
                }
                Op::EndOfLogs(job_id) => bus.end(job_id),
                Op::Event(kind, job_id, data) => events.publish(kind, job_id, data),
                _ => {}
            }
        }
    }
}

async fn write_batch(
    pool: &SqlitePool,
    batch: &mut [Op],
    next_seq: &mut i64,
    published: &mut Vec<(Uuid, LogLine)>,
) -> sqlx::Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let ts = super::now();
    let mut lines = Vec::new();
    for op in batch.iter() {
        match op {
            Op::History(h, _) => {
                // A failed statement does not abort the transaction; log it and go on so one
                // bad row never loses the rest of the batch.
                if let Err(e) = h.apply(&mut tx).await {
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
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO logs (seq, job_id, rank, attempt, stream, ts, line) ",
        );
        insert.push_values(chunk, |mut row, (job_id, l)| {
            row.push_bind(l.seq)
                .push_bind(job_id.to_string())
                .push_bind(l.rank)
                .push_bind(l.attempt)
                .push_bind(l.stream.clone())
                .push_bind(l.ts.clone())
                .push_bind(l.line.clone());
        });
        // Lines of a job deleted meanwhile have nowhere to go (foreign key): drop them.
        if let Err(e) = insert.build().execute(&mut *tx).await {
            tracing::debug!(error = %e, "recorder: log lines dropped, retrying row by row");
            for (job_id, l) in chunk {
                let one = sqlx::query(
                    "INSERT INTO logs (seq, job_id, rank, attempt, stream, ts, line)
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(l.seq)
                .bind(job_id.to_string())
                .bind(l.rank)
                .bind(l.attempt)
                .bind(&l.stream)
                .bind(&l.ts)
                .bind(&l.line)
                .execute(&mut *tx)
                .await;
                if one.is_ok() {
                    published.push((*job_id, l.clone()));
                }
            }
            continue;
        }
        published.extend(chunk.iter().cloned());
    }
    tx.commit().await
}
