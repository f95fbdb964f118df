//! Reads of jobs, incarnations and restarts, and the writes made outside a job's actor
//! (creation, deletion, closing a dead server's incarnations).

use serde::Serialize;
use sqlx::SqlitePool;
use uuid::Uuid;

use crate::domain::incident::IncidentRow;
use crate::spec::JobSpec;

/// A job as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct JobRecord {
    #[sqlx(rename = "id")]
    pub job_id: String,
    pub name: Option<String>,
    #[schema(value_type = crate::domain::JobState)]
    pub state: String,
    pub world_size: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub reason: Option<String>,
    pub restarts: i64,
    /// Log lines dropped by the retention limit.
    pub logs_dropped: i64,
    #[sqlx(json)]
    pub spec: serde_json::Value,
    /// Nodes excluded from the job's launches (Slurm bad-node quarantine), in order.
    #[sqlx(json)]
    pub excluded_nodes: serde_json::Value,
    #[serde(skip)]
    #[schema(ignore)]
    pub summary: Option<String>,
}

const SELECT_JOB: &str = "SELECT id, name, state, world_size, created_at, started_at, finished_at,
    reason, spec, summary, logs_dropped,
    (SELECT COUNT(*) FROM restarts r WHERE r.job_id = jobs.id
       AND r.reason <> 'server_restart') AS restarts,
    (SELECT json_group_array(node) FROM (SELECT node FROM excluded_nodes x
       WHERE x.job_id = jobs.id ORDER BY excluded_at, node)) AS excluded_nodes
    FROM jobs";

pub async fn insert(
    pool: &SqlitePool,
    id: Uuid,
    spec: &JobSpec,
    created_at: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO jobs (id, name, spec, state, world_size, created_at) VALUES (?, ?, ?, 'pending', ?, ?)",
    )
    .bind(id.to_string())
    .bind(&spec.name)
    .bind(serde_json::to_string(spec).expect("a spec always serializes"))
    .bind(spec.world_size)
    .bind(created_at)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn get(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Option<JobRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_JOB} WHERE id = ?")))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await
}

/// Jobs newest first, optionally only those in one state.
pub async fn list(pool: &SqlitePool, state: Option<&str>) -> sqlx::Result<Vec<JobRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOB} WHERE ?1 IS NULL OR state = ?1 ORDER BY created_at DESC, id"
    )))
    .bind(state)
    .fetch_all(pool)
    .await
}

/// One page of jobs, newest first: `limit` from the `offset`-th.
pub async fn list_page(
    pool: &SqlitePool,
    state: Option<&str>,
    limit: i64,
    offset: i64,
) -> sqlx::Result<Vec<JobRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOB} WHERE ?1 IS NULL OR state = ?1 ORDER BY created_at DESC, id LIMIT ?2 OFFSET ?3"
    )))
    .bind(state)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
}

/// Jobs a server must resume when it starts.
pub async fn unfinished(pool: &SqlitePool) -> sqlx::Result<Vec<JobRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOB} WHERE state IN ('pending', 'running') ORDER BY created_at"
    )))
    .fetch_all(pool)
    .await
}

/// Deletes jobs and (by cascade) their incarnations, restarts and log lines, in one transaction.
pub async fn delete(pool: &SqlitePool, ids: &[Uuid]) -> sqlx::Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for id in ids {
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Incarnation {
    pub rank: i64,
    pub attempt: i64,
    pub pid: Option<i64>,
    pub master_port: i64,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub outcome: Option<String>,
    /// The Slurm node, or the server's host name for the local launcher.
    pub node: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    pub token_hash: String,
}

pub async fn incarnations(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Vec<Incarnation>> {
    sqlx::query_as(
        "SELECT rank, attempt, pid, master_port, started_at, ended_at, exit_code, signal, outcome,
                node, token_hash
         FROM incarnations WHERE job_id = ? ORDER BY rank, attempt",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
}

/// Whether `token_hash` is the digest of a token issued to some incarnation of this rank.
pub async fn issued_token(
    pool: &SqlitePool,
    id: Uuid,
    rank: u32,
    token_hash: &str,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM incarnations WHERE job_id = ? AND rank = ? AND token_hash = ?)",
    )
    .bind(id.to_string())
    .bind(rank)
    .bind(token_hash)
    .fetch_one(pool)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Restart {
    pub rank: i64,
    pub attempt: i64,
    pub scope: String,
    pub reason: String,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub detail: Option<String>,
    pub detected_at: String,
    pub backoff_ms: i64,
    pub restarted_at: Option<String>,
}

pub async fn restarts(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Vec<Restart>> {
    sqlx::query_as(
        "SELECT rank, attempt, scope, reason, exit_code, signal, detail, detected_at, backoff_ms,
                restarted_at
         FROM restarts WHERE job_id = ? ORDER BY id",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
}

/// Marks the incarnations a dead server left open as ended by the server restart.
pub async fn close_orphaned_incarnations(
    conn: &mut sqlx::SqliteConnection,
    id: Uuid,
    at: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE incarnations SET ended_at = ?, outcome = 'server_restart'
         WHERE job_id = ? AND ended_at IS NULL",
    )
    .bind(at)
    .bind(id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// A job's incidents, oldest first.
/// One point of a job's progress history: `GET /jobs/{id}/progress`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ProgressSample {
    pub at: String,
    /// The global step (the slowest rank's).
    pub step: Option<i64>,
    pub steps_per_s: Option<f64>,
    /// The mean of the ranks' last reported losses.
    pub loss: Option<f64>,
}

/// A job's progress history, oldest first.
pub async fn progress(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Vec<ProgressSample>> {
    sqlx::query_as(
        "SELECT at, step, steps_per_s, loss FROM progress_samples WHERE job_id = ? ORDER BY at",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
}

pub async fn incidents(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Vec<IncidentRow>> {
    let rows: Vec<IncidentDb> = sqlx::query_as(
        "SELECT seq, rank, reason, detail, scope, ranks, backoff_ms, detected_at, spawned_at,
                first_heartbeat_at, training_at, ended_at, end_state, last_step, resumed_step,
                steps_lost, seconds_lost, stacks, redo_s
         FROM incidents WHERE job_id = ? ORDER BY seq",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(IncidentDb::into_row).collect())
}

#[derive(sqlx::FromRow)]
struct IncidentDb {
    seq: i64,
    rank: i64,
    reason: String,
    detail: String,
    scope: String,
    ranks: String,
    backoff_ms: i64,
    detected_at: String,
    spawned_at: Option<String>,
    first_heartbeat_at: Option<String>,
    training_at: Option<String>,
    ended_at: Option<String>,
    end_state: String,
    last_step: Option<i64>,
    resumed_step: Option<i64>,
    steps_lost: i64,
    seconds_lost: f64,
    stacks: String,
    redo_s: Option<f64>,
}

impl IncidentDb {
    fn into_row(self) -> IncidentRow {
        IncidentRow {
            seq: self.seq as u32,
            rank: self.rank as u32,
            reason: self.reason,
            detail: self.detail,
            scope: self.scope,
            ranks: serde_json::from_str(&self.ranks).unwrap_or_default(),
            backoff_ms: self.backoff_ms as u64,
            detected_at: self.detected_at,
            spawned_at: self.spawned_at,
            first_heartbeat_at: self.first_heartbeat_at,
            training_at: self.training_at,
            ended_at: self.ended_at,
            end: self.end_state,
            last_step: self.last_step.map(|s| s as u64),
            resumed_step: self.resumed_step.map(|s| s as u64),
            steps_lost: self.last_step.map(|_| self.steps_lost as u64),
            seconds_lost: self.seconds_lost,
            stacks: serde_json::from_str(&self.stacks).unwrap_or_default(),
            redo_s: self.redo_s,
        }
    }
}

/// Closes the incidents a dead server left open: they ended with it, at `at`.
pub async fn close_open_incidents(
    conn: &mut sqlx::SqliteConnection,
    id: Uuid,
    at: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE incidents SET end_state = 'server_restart', ended_at = ?1,
           seconds_lost = MAX(0, (julianday(?1) - julianday(detected_at)) * 86400.0)
         WHERE job_id = ?2 AND end_state = 'open'",
    )
    .bind(at)
    .bind(id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// A node a job stopped using (bad-node quarantine).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ExcludedNode {
    pub node: String,
    pub excluded_at: String,
    pub failures: i64,
    pub reason: String,
    pub detail: Option<String>,
}

pub async fn excluded_nodes(pool: &SqlitePool, id: Uuid) -> sqlx::Result<Vec<ExcludedNode>> {
    sqlx::query_as(
        "SELECT node, excluded_at, failures, reason, detail FROM excluded_nodes
         WHERE job_id = ? ORDER BY excluded_at, node",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct CheckpointRow {
    pub step: i64,
    pub committed_at: String,
    pub bytes: i64,
    pub location: String,
    pub commit_ms: f64,
    pub pruned_at: Option<String>,
    #[sqlx(json)]
    pub manifest: serde_json::Value,
}

/// Committed checkpoints, newest first; pruned ones only when asked.
pub async fn checkpoints(
    pool: &SqlitePool,
    id: Uuid,
    include_pruned: bool,
) -> sqlx::Result<Vec<CheckpointRow>> {
    sqlx::query_as(
        "SELECT step, committed_at, bytes, location, commit_ms, pruned_at, manifest
         FROM checkpoints WHERE job_id = ? AND (? OR pruned_at IS NULL) ORDER BY step DESC",
    )
    .bind(id.to_string())
    .bind(include_pruned)
    .fetch_all(pool)
    .await
}

/// What `GET /metrics` reports from the database.
#[derive(Debug, Default)]
pub struct Counts {
    /// `(state, jobs)` for every state some job is in.
    pub jobs_by_state: Vec<(String, i64)>,
    /// Incarnations with a process that has not ended.
    pub workers_running: i64,
}

pub async fn counts(pool: &SqlitePool) -> sqlx::Result<Counts> {
    let jobs_by_state = sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        .fetch_all(pool)
        .await?;
    let workers_running = sqlx::query_scalar(
        "SELECT COUNT(*) FROM incarnations WHERE ended_at IS NULL AND pid IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(Counts {
        jobs_by_state,
        workers_running,
    })
}

#[cfg(test)]
mod tests {
    /// The SQL lives in `store/`: a query anywhere else in `src/` fails here.
    #[test]
    fn sql_stays_in_store() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = vec![src.clone()];
        while let Some(path) = paths.pop() {
            if path.is_dir() {
                if path != src.join("store") {
                    paths.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                }
                continue;
            }
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for call in ["sqlx::query", "query_as(", "query_scalar(", "sqlx::raw_sql"] {
                    assert!(
                        !text.contains(call),
                        "{} runs SQL ({call}); put the query in store/",
                        path.display()
                    );
                }
            }
        }
    }
}
