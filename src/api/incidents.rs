//! `GET /jobs/{job_id}/incidents` and `GET /jobs/{job_id}/progress`: every failure of a job
//! with its recovery timeline, and its progress over time, from the history (so they outlive
//! the server that saw them).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};

use super::error::ErrorBody;
use super::schema::JobId;
use super::{ApiError, AppState, parse_job_id};
use crate::domain::incident::IncidentRow;
use crate::store;
use crate::store::jobs::ProgressSample;

/// These routes take no query parameters: any is a 400, as everywhere else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// A job's incidents, oldest first.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/incidents",
    operation_id = "job_incidents",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "Incidents: root cause, timeline (detected, spawned, first \
            heartbeat, training again), steps and seconds lost", body = Vec<IncidentRow>),
        (status = 400, description = "A query parameter (these routes take none)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn incidents(
    state: web::Data<AppState>,
    path: web::Path<String>,
    _query: web::Query<NoQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    super::jobs::record(&state, id).await?;
    let mut rows = store::jobs::incidents(&state.rt.pool, id).await?;
    // An open incident costs time until it ends: count it up to now.
    let now = Utc::now();
    for row in rows.iter_mut().filter(|r| r.end == "open") {
        if let Ok(at) = row.detected_at.parse::<DateTime<Utc>>() {
            row.seconds_lost = (now - at).num_milliseconds().max(0) as f64 / 1000.0;
        }
    }
    Ok(HttpResponse::Ok().json(rows))
}

/// A job's progress over time (step, steps/s, loss), oldest first: one sample every
/// max(2 s, running time / 1000) while it runs.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/progress",
    operation_id = "job_progress",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "Progress samples, oldest first", body = Vec<ProgressSample>),
        (status = 400, description = "A query parameter (these routes take none)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn progress(
    state: web::Data<AppState>,
    path: web::Path<String>,
    _query: web::Query<NoQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    super::jobs::record(&state, id).await?;
    Ok(HttpResponse::Ok().json(store::jobs::progress(&state.rt.pool, id).await?))
}
