//! Logs: `GET /jobs/{id}/logs` (JSON tail) and `GET /jobs/{id}/logs/stream` (SSE).
//!
//! The stream subscribes to the LogBus *before* reading the database, replays what is stored
//! after `Last-Event-ID`, then follows live lines from the job's ring, skipping any `seq` it
//! already sent. Lines reach the bus only after they are committed, so between the two nothing
//! is lost and nothing is sent twice. A subscriber that falls out of the ring gets a `lagged`
//! event and the missed lines from the database, in order; the publisher never waits for it.
//! Frames are encoded once per line and written in chunks of many frames, so a thousand
//! subscribers cost a copy each, not a serialization and a wake-up per line each.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;
use sqlx::SqlitePool;
use uuid::Uuid;

use super::error::ErrorBody;
use super::schema::{JobId, SseEvent};
use super::{ApiError, AppState, parse_job_id};
use crate::actors::StreamSlot;
use crate::bus::{Live, LogLine, Read};
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
        (status = 400, description = "`tail` out of range, or a bad query string", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
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
            body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 429, description = "Too many open streams (`--max-sse-subscribers`)", body = ErrorBody),
    )
)]
pub async fn stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
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
    let follower = Follower {
        pool: state.rt.pool.clone(),
        id,
        rank: query.rank,
        live,
        cursor: 0,
        phase: match header_id.or(query.last_event_id) {
            Some(seq) => Phase::CatchUp(seq),
            None => Phase::Tail(tail),
        },
        lagging: false,
        _slot: slot,
    };
    let body = futures_util::stream::unfold(follower, |mut f| async move {
        let chunk = f.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), f))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(body))
}

/// One chunk written to a subscriber's socket holds at most about this many bytes of frames.
const CHUNK_BYTES: usize = 256 << 10;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

enum Phase {
    /// Replay the last n stored lines, then catch up.
    Tail(i64),
    /// Send stored lines after the cursor (the value) page by page, then follow.
    CatchUp(i64),
    /// Send live lines from the job's ring.
    Follow,
    /// Send the `end` event.
    End,
    Done,
}

/// One subscriber: a cursor (the last seq it has seen) walking the database, then the ring.
struct Follower {
    pool: SqlitePool,
    id: Uuid,
    rank: Option<u32>,
    live: Option<Live>,
    cursor: i64,
    phase: Phase,
    /// A `lagged` event was sent for the current catch-up.
    lagging: bool,
    _slot: StreamSlot,
}

impl Follower {
    /// The next bytes for the socket; `None` ends the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                Phase::Tail(n) => {
                    let recent = store::logs::tail(&self.pool, self.id, self.rank, n.max(1))
                        .await
                        .ok()?;
                    // Everything up to the newest stored line counts as seen.
                    self.cursor = recent.last().map(|l| l.seq).unwrap_or(0);
                    self.phase = Phase::CatchUp(self.cursor);
                    if n > 0 && !recent.is_empty() {
                        return Some(frames(&recent));
                    }
                }
                Phase::CatchUp(after) => {
                    let page = store::logs::after(&self.pool, self.id, self.rank, after, PAGE)
                        .await
                        .ok()?;
                    self.cursor = page.last().map(|l| l.seq).unwrap_or(after);
                    self.phase = if (page.len() as i64) == PAGE {
                        Phase::CatchUp(self.cursor)
                    } else if self.live.is_some() {
                        self.lagging = false;
                        Phase::Follow
                    } else {
                        Phase::End
                    };
                    if !page.is_empty() {
                        return Some(frames(&page));
                    }
                }
                Phase::Follow => {
                    let live = self.live.as_mut()?;
                    match live.read_after(self.cursor, self.rank, CHUNK_BYTES) {
                        Read::Frames(chunk, cursor) => {
                            self.cursor = cursor;
                            if !chunk.is_empty() {
                                return Some(chunk);
                            }
                        }
                        Read::Behind => {
                            self.phase = Phase::CatchUp(self.cursor);
                            if !self.lagging {
                                self.lagging = true;
                                let note = json!({ "resuming_after": self.cursor });
                                return Some(Bytes::from(format!(
                                    "event: lagged\ndata: {note}\n\n"
                                )));
                            }
                        }
                        Read::Ended => {
                            // A last look at the database, then the end event.
                            self.live = None;
                            self.phase = Phase::CatchUp(self.cursor);
                        }
                        Read::Idle => {
                            if tokio::time::timeout(KEEP_ALIVE, live.changed())
                                .await
                                .is_err()
                            {
                                return Some(Bytes::from_static(b": keep-alive\n\n"));
                            }
                        }
                    }
                }
                Phase::End => {
                    self.phase = Phase::Done;
                    let state = store::jobs::get(&self.pool, self.id)
                        .await
                        .ok()
                        .flatten()
                        .map(|j| j.state);
                    let data = json!({ "job_id": self.id, "state": state });
                    return Some(Bytes::from(format!("event: end\ndata: {data}\n\n")));
                }
                Phase::Done => return None,
            }
        }
    }
}

fn frames(lines: &[LogLine]) -> Bytes {
    let mut out = BytesMut::new();
    for line in lines {
        out.extend_from_slice(&line.sse_frame());
    }
    out.freeze()
}
