//! Logs: `GET /jobs/{id}/logs` (JSON tail) and `GET /jobs/{id}/logs/stream` (SSE).
//!
//! The stream subscribes to the LogBus *before* reading the database, replays what is stored
//! after `Last-Event-ID`, then follows live lines, skipping any `seq` it already sent. Lines
//! reach the bus only after they are committed, so between the two nothing is lost and nothing
//! is sent twice. A subscriber that lags behind the bus gets a `lagged` event and the missed
//! lines from the database, in order; the publisher never waits for it.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, Responder, web};
use actix_web_lab::sse;
use serde::Deserialize;
use sqlx::SqlitePool;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::openapi::{ApiErrorDoc, JobId, SseEvent};
use super::{ApiError, AppState, parse_job_id};
use crate::bus::{LogEvent, LogLine};
use crate::store;

const DEFAULT_TAIL: i64 = 100;
const MAX_TAIL: i64 = 100_000;
const PAGE: i64 = 1000;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TailQuery {
    /// How many lines (the newest, or the first after `after`); default 100.
    #[param(minimum = 0, maximum = 100_000)]
    tail: Option<i64>,
    /// Only this rank's lines.
    rank: Option<u32>,
    /// Only lines with a larger seq (pagination).
    after: Option<i64>,
}

/// The job's newest log lines (or the ones after a seq), oldest first.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/logs",
    operation_id = "job_logs",
    tag = "logs",
    params(JobId, TailQuery),
    responses(
        (status = 200, description = "Log lines", body = LogTail),
        (status = 400, description = "`tail` out of range, or a bad query string", body = ApiErrorDoc),
        (status = 404, description = "No such job", body = ApiErrorDoc),
    )
)]
pub async fn tail(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<TailQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    ensure_job(&state.rt.pool, id).await?;
    let n = query.tail.unwrap_or(DEFAULT_TAIL);
    if !(0..=MAX_TAIL).contains(&n) {
        return Err(ApiError::BadRequest(format!(
            "tail must be between 0 and {MAX_TAIL}"
        )));
    }
    let lines = match query.after {
        Some(after) => store::logs::after(&state.rt.pool, id, query.rank, after, n).await?,
        None => store::logs::tail(&state.rt.pool, id, query.rank, n).await?,
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({ "job_id": id, "lines": lines })))
}

/// The reply of `GET /jobs/{job_id}/logs`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the `json!` reply.
pub struct LogTail {
    job_id: Uuid,
    lines: Vec<LogLine>,
}

pub fn too_many_streams() -> ApiError {
    ApiError::AtLimit("too many open streams (--max-sse-subscribers); close one and retry".into())
}

async fn ensure_job(pool: &SqlitePool, id: Uuid) -> Result<store::jobs::JobRecord, ApiError> {
    store::jobs::get(pool, id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Only this rank's lines.
    rank: Option<u32>,
    /// Lines replayed when the client sends no Last-Event-ID; default 100.
    #[param(minimum = 0, maximum = 100_000)]
    tail: Option<i64>,
    /// For clients that cannot set the Last-Event-ID header.
    last_event_id: Option<i64>,
}

/// Follows the job's logs as server-sent events: stored lines first, then live ones, each
/// once and in order, resuming after `Last-Event-ID`. Ends with an `end` event when the job
/// has finished and every line was sent.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/logs/stream",
    operation_id = "job_log_stream",
    tag = "logs",
    params(
        JobId,
        StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this log seq"),
    ),
    responses(
        (status = 200, description = "Server-sent events: `log` (data: a log line as JSON, id: \
            its seq), `lagged` (the client fell behind; missed lines follow from the database) \
            and a last `end` (data: `{job_id, state}`)", content_type = "text/event-stream", body = SseEvent),
        (status = 400, description = "`tail` out of range, or a Last-Event-ID that is not an integer",
            body = ApiErrorDoc),
        (status = 404, description = "No such job", body = ApiErrorDoc),
        (status = 429, description = "Too many open streams (`--max-sse-subscribers`)", body = ApiErrorDoc),
    )
)]
pub async fn stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<StreamQuery>,
) -> Result<impl Responder, ApiError> {
    let id = parse_job_id(&path)?;
    let header_id = match req.headers().get("Last-Event-ID") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be a log seq (an integer)".into())
                })?,
        ),
        None => None,
    };
    let tail = query.tail.unwrap_or(DEFAULT_TAIL);
    if !(0..=MAX_TAIL).contains(&tail) {
        return Err(ApiError::BadRequest(format!(
            "tail must be between 0 and {MAX_TAIL}"
        )));
    }
    let slot = state.rt.open_stream().ok_or_else(too_many_streams)?;
    // Subscribe first, then look at the database: see the module docs.
    let live = state.rt.bus.subscribe(id);
    ensure_job(&state.rt.pool, id).await?;
    let resume_from = header_id.or(query.last_event_id);
    let (tx, rx) = mpsc::channel(256);
    let pool = state.rt.pool.clone();
    let rank = query.rank;
    actix_web::rt::spawn(async move {
        let _slot = slot;
        let follower = Follower { pool, id, rank, tx };
        let _ = follower.run(live, resume_from, tail).await;
    });
    Ok(sse::Sse::from_infallible_receiver(rx).with_keep_alive(Duration::from_secs(15)))
}

struct Follower {
    pool: SqlitePool,
    id: Uuid,
    rank: Option<u32>,
    tx: mpsc::Sender<sse::Event>,
}

/// The client went away (or the database failed): stop following.
struct Gone;

impl Follower {
    async fn run(
        &self,
        live: Option<broadcast::Receiver<LogEvent>>,
        resume_from: Option<i64>,
        tail: i64,
    ) -> Result<(), Gone> {
        let mut last = match resume_from {
            Some(seq) => seq,
            None => {
                let recent = store::logs::tail(&self.pool, self.id, self.rank, tail.max(1))
                    .await
                    .map_err(|_| Gone)?;
                if tail > 0 {
                    for line in &recent {
                        self.send_line(line).await?;
                    }
                }
                // Everything up to the newest stored line counts as seen.
                recent.last().map(|l| l.seq).unwrap_or(0)
            }
        };
        last = self.catch_up(last).await?;
        let Some(mut live) = live else {
            // The job's logs were complete before we subscribed.
            return self.send_end().await;
        };
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok(LogEvent::Line(p)) => {
                        if p.line.seq > last && self.wants(&p.line) {
                            let data = sse::Data::new(p.json.clone());
                            self.send(data.id(p.line.seq.to_string()).event("log")).await?;
                        }
                        last = last.max(p.line.seq);
                    }
                    Ok(LogEvent::End) | Err(broadcast::error::RecvError::Closed) => {
                        self.catch_up(last).await?;
                        return self.send_end().await;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let note = serde_json::json!({ "missed": missed, "resuming_after": last });
                        self.send(sse::Data::new(note.to_string()).event("lagged")).await?;
                        last = self.catch_up(last).await?;
                    }
                },
                _ = self.tx.closed() => return Err(Gone),
            }
        }
    }

    fn wants(&self, line: &LogLine) -> bool {
        self.rank.is_none() || line.rank == self.rank
    }

    /// Sends every stored line after `last`; returns the new `last`.
    async fn catch_up(&self, mut last: i64) -> Result<i64, Gone> {
        loop {
            let page = store::logs::after(&self.pool, self.id, self.rank, last, PAGE)
                .await
                .map_err(|_| Gone)?;
            for line in &page {
                self.send_line(line).await?;
                last = line.seq;
            }
            if (page.len() as i64) < PAGE {
                return Ok(last);
            }
        }
    }

    async fn send_line(&self, line: &LogLine) -> Result<(), Gone> {
        let data = sse::Data::new_json(line).map_err(|_| Gone)?;
        self.send(data.id(line.seq.to_string()).event("log")).await
    }

    async fn send_end(&self) -> Result<(), Gone> {
        let state = store::jobs::get(&self.pool, self.id)
            .await
            .ok()
            .flatten()
            .map(|j| j.state);
        let data = serde_json::json!({ "job_id": self.id, "state": state });
        self.send(sse::Data::new(data.to_string()).event("end"))
            .await
    }

    async fn send(&self, data: sse::Data) -> Result<(), Gone> {
        self.tx.send(sse::Event::Data(data)).await.map_err(|_| Gone)
    }
}
