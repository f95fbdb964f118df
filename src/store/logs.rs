//! Reads of stored log lines.

use sqlx::SqlitePool;
use uuid::Uuid;

use crate::bus::LogLine;

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    rank: Option<i64>,
    attempt: Option<i64>,
    stream: String,
    ts: String,
    line: String,
}

impl From<Row> for LogLine {
    fn from(r: Row) -> Self {
        LogLine {
            seq: r.seq,
            rank: r.rank.map(|v| v as u32),
            attempt: r.attempt.map(|v| v as u32),
            stream: r.stream,
            ts: r.ts,
            line: r.line,
        }
    }
}

/// Lines with `seq > after`, oldest first, at most `limit`; `rank` filters one rank.
pub async fn after(
    pool: &SqlitePool,
    job_id: Uuid,
    rank: Option<u32>,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<LogLine>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, rank, attempt, stream, ts, line FROM logs
         WHERE job_id = ?1 AND seq > ?2 AND (?3 IS NULL OR rank = ?3)
         ORDER BY seq LIMIT ?4",
    )
    .bind(job_id.to_string())
    .bind(after)
    .bind(rank)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(LogLine::from).collect())
}

/// The last `n` lines (oldest first).
pub async fn tail(
    pool: &SqlitePool,
    job_id: Uuid,
    rank: Option<u32>,
    n: i64,
) -> sqlx::Result<Vec<LogLine>> {
    let mut rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, rank, attempt, stream, ts, line FROM logs
         WHERE job_id = ?1 AND (?2 IS NULL OR rank = ?2)
         ORDER BY seq DESC LIMIT ?3",
    )
    .bind(job_id.to_string())
    .bind(rank)
    .bind(n)
    .fetch_all(pool)
    .await?;
    rows.reverse();
    Ok(rows.into_iter().map(LogLine::from).collect())
}
