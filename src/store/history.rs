//! Writes of the job history (jobs, incarnations, restarts), as typed operations that the
//! recorder applies in the order the actors issued them.

use sqlx::SqliteConnection;
use uuid::Uuid;

use crate::domain::incident::IncidentRow;
use crate::domain::{JobState, Outcome};

/// One write of the history.
#[derive(Debug, Clone)]
pub enum HistoryOp {
    JobState {
        job_id: Uuid,
        state: JobState,
        at: String,
        reason: Option<String>,
        summary: Option<String>,
    },
    IncarnationStarted {
        job_id: Uuid,
        rank: u32,
        attempt: u32,
        pid: Option<u32>,
        master_port: u16,
        token_hash: String,
        started_at: String,
        /// The Slurm node, or this host's name for the local launcher.
        node: Option<String>,
    },
    /// The process of an incarnation recorded by `IncarnationStarted` is running as `pid`.
    IncarnationPid {
        job_id: Uuid,
        rank: u32,
        attempt: u32,
        pid: u32,
        started_at: String,
    },
    IncarnationEnded {
        job_id: Uuid,
        rank: u32,
        attempt: u32,
        ended_at: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
        outcome: Outcome,
    },
    RestartDetected {
        job_id: Uuid,
        rank: u32,
        attempt: u32,
        scope: &'static str,
        reason: Outcome,
        exit_code: Option<i32>,
        signal: Option<i32>,
        detail: String,
        detected_at: String,
        backoff_ms: u64,
    },
    RestartLaunched {
        job_id: Uuid,
        rank: u32,
        attempt: u32,
        restarted_at: String,
    },
    CheckpointCommitted {
        job_id: Uuid,
        step: u64,
        committed_at: String,
        bytes: u64,
        location: String,
        manifest: String,
        commit_ms: f64,
    },
    CheckpointPruned {
        job_id: Uuid,
        step: u64,
        pruned_at: String,
    },
    NodeExcluded {
        job_id: Uuid,
        node: String,
        excluded_at: String,
        failures: u32,
        reason: &'static str,
        detail: String,
    },
    /// An incident opened or moved on (written whole each time: a few times per failure).
    Incident { job_id: Uuid, row: Box<IncidentRow> },
    /// A restarted server closes what its predecessor left open: incarnations without an end
    /// and open incidents, as ended by the server's restart at `at`.
    ClosedByServerRestart { job_id: Uuid, at: String },
    /// One point of the job's progress charts.
    ProgressSample {
        job_id: Uuid,
        at: String,
        step: Option<u64>,
        steps_per_s: Option<f64>,
        loss: Option<f64>,
    },
}

impl HistoryOp {
    pub async fn apply(&self, conn: &mut SqliteConnection) -> sqlx::Result<()> {
        match self {
            HistoryOp::ClosedByServerRestart { job_id, at } => {
                crate::store::jobs::close_orphaned_incarnations(&mut *conn, *job_id, at).await?;
                crate::store::jobs::close_open_incidents(&mut *conn, *job_id, at).await?;
            }
            HistoryOp::JobState {
                job_id,
                state,
                at,
                reason,
                summary,
            } => {
                sqlx::query(
                    "UPDATE jobs SET state = ?1, reason = ?2, summary = COALESCE(?3, summary),
                       started_at = CASE WHEN ?1 = 'running' THEN COALESCE(started_at, ?4)
                                         ELSE started_at END,
                       finished_at = CASE WHEN ?1 IN ('succeeded', 'failed', 'stopped') THEN ?4
                                          ELSE finished_at END
                     WHERE id = ?5",
                )
                .bind(state.as_str())
                .bind(reason)
                .bind(summary)
                .bind(at)
                .bind(job_id.to_string())
                .execute(conn)
                .await?;
            }
            HistoryOp::IncarnationStarted {
                job_id,
                rank,
                attempt,
                pid,
                master_port,
                token_hash,
                started_at,
                node,
            } => {
                sqlx::query(
                    "INSERT OR REPLACE INTO incarnations
                     (job_id, rank, attempt, pid, master_port, token_hash, started_at, node)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(rank)
                .bind(attempt)
                .bind(pid)
                .bind(master_port)
                .bind(token_hash)
                .bind(started_at)
                .bind(node)
                .execute(conn)
                .await?;
            }
            HistoryOp::IncarnationPid {
                job_id,
                rank,
                attempt,
                pid,
                started_at,
            } => {
                sqlx::query(
                    "UPDATE incarnations SET pid = ?, started_at = ?
                     WHERE job_id = ? AND rank = ? AND attempt = ?",
                )
                .bind(pid)
                .bind(started_at)
                .bind(job_id.to_string())
                .bind(rank)
                .bind(attempt)
                .execute(conn)
                .await?;
            }
            HistoryOp::IncarnationEnded {
                job_id,
                rank,
                attempt,
                ended_at,
                exit_code,
                signal,
                outcome,
            } => {
                sqlx::query(
                    "UPDATE incarnations SET ended_at = ?, exit_code = ?, signal = ?, outcome = ?
                     WHERE job_id = ? AND rank = ? AND attempt = ? AND ended_at IS NULL",
                )
                .bind(ended_at)
                .bind(exit_code)
                .bind(signal)
                .bind(outcome.as_str())
                .bind(job_id.to_string())
                .bind(rank)
                .bind(attempt)
                .execute(conn)
                .await?;
            }
            HistoryOp::RestartDetected {
                job_id,
                rank,
                attempt,
                scope,
                reason,
                exit_code,
                signal,
                detail,
                detected_at,
                backoff_ms,
            } => {
                sqlx::query(
                    "INSERT OR IGNORE INTO restarts
                     (job_id, rank, attempt, scope, reason, exit_code, signal, detail, detected_at, backoff_ms)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(rank)
                .bind(attempt)
                .bind(scope)
                .bind(reason.as_str())
                .bind(exit_code)
                .bind(signal)
                .bind(detail)
                .bind(detected_at)
                .bind(*backoff_ms as i64)
                .execute(conn)
                .await?;
            }
            HistoryOp::RestartLaunched {
                job_id,
                rank,
                attempt,
                restarted_at,
            } => {
                sqlx::query(
                    "UPDATE restarts SET restarted_at = ? WHERE job_id = ? AND rank = ? AND attempt = ?",
                )
                .bind(restarted_at)
                .bind(job_id.to_string())
                .bind(rank)
                .bind(attempt)
                .execute(conn)
                .await?;
            }
            HistoryOp::CheckpointCommitted {
                job_id,
                step,
                committed_at,
                bytes,
                location,
                manifest,
                commit_ms,
            } => {
                sqlx::query(
                    "INSERT OR REPLACE INTO checkpoints
                     (job_id, step, committed_at, bytes, location, manifest, commit_ms)
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(*step as i64)
                .bind(committed_at)
                .bind(*bytes as i64)
                .bind(location)
                .bind(manifest)
                .bind(commit_ms)
                .execute(conn)
                .await?;
            }
            HistoryOp::CheckpointPruned {
                job_id,
                step,
                pruned_at,
            } => {
                sqlx::query("UPDATE checkpoints SET pruned_at = ? WHERE job_id = ? AND step = ?")
                    .bind(pruned_at)
                    .bind(job_id.to_string())
                    .bind(*step as i64)
                    .execute(conn)
                    .await?;
            }
            HistoryOp::NodeExcluded {
                job_id,
                node,
                excluded_at,
                failures,
                reason,
                detail,
            } => {
                sqlx::query(
                    "INSERT OR IGNORE INTO excluded_nodes
                     (job_id, node, excluded_at, failures, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(node)
                .bind(excluded_at)
                .bind(failures)
                .bind(reason)
                .bind(detail)
                .execute(conn)
                .await?;
            }
            HistoryOp::Incident { job_id, row } => {
                sqlx::query(
                    "INSERT OR REPLACE INTO incidents
                     (job_id, seq, rank, reason, detail, scope, ranks, backoff_ms, detected_at,
                      spawned_at, first_heartbeat_at, training_at, ended_at, end_state,
                      last_step, resumed_step, steps_lost, seconds_lost, stacks, redo_s)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(row.seq)
                .bind(row.rank)
                .bind(&row.reason)
                .bind(&row.detail)
                .bind(&row.scope)
                .bind(serde_json::to_string(&row.ranks).unwrap_or_default())
                .bind(row.backoff_ms as i64)
                .bind(&row.detected_at)
                .bind(&row.spawned_at)
                .bind(&row.first_heartbeat_at)
                .bind(&row.training_at)
                .bind(&row.ended_at)
                .bind(&row.end)
                .bind(row.last_step.map(|s| s as i64))
                .bind(row.resumed_step.map(|s| s as i64))
                // Unknown is stored as 0 and read back as null: it is unknown exactly when
                // `last_step` is null.
                .bind(row.steps_lost.unwrap_or(0) as i64)
                .bind(row.seconds_lost)
                .bind(serde_json::to_string(&row.stacks).unwrap_or_else(|_| "[]".into()))
                .bind(row.redo_s)
                .execute(conn)
                .await?;
            }
            HistoryOp::ProgressSample {
                job_id,
                at,
                step,
                steps_per_s,
                loss,
            } => {
                sqlx::query(
                    "INSERT OR REPLACE INTO progress_samples (job_id, at, step, steps_per_s, loss)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(job_id.to_string())
                .bind(at)
                .bind(step.map(|s| s as i64))
                .bind(steps_per_s)
                .bind(loss)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }
}
