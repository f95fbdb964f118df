//! Save on notice from the admin API: `POST /jobs/{id}/stop` (the ranks save first unless
//! `{"save": false}`) and `POST /jobs/{id}/checkpoint` (save now and keep running).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::error::{ErrorBody, parse_json};
use super::jobs::record;
use super::schema::JobId;
use super::{ApiError, AppState, parse_job_id};
use crate::actors::messages::{SaveNow, Stop};
use crate::domain::notice::NoticeReport;
use crate::store::jobs::JobRecord;

/// The optional body of `POST /jobs/{job_id}/stop`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// Ask the ranks to checkpoint first and wait for the commit up to the job's
    /// `save_grace_s` (default true); false ends them at once.
    #[serde(default = "yes")]
    save: bool,
}

fn yes() -> bool {
    true
}

/// Stops a job and returns it once it is stopped: first the ranks are asked to save (their
/// heartbeat's answer, SIGUSR1 for ranks that never heartbeated) and the commit is awaited up
/// to `save_grace_s`; then SIGTERM to every rank's process group, SIGKILL after the grace.
/// Stopping a finished job changes nothing.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/stop",
    operation_id = "stop_job",
    tag = "jobs",
    params(JobId),
    request_body(content = Option<StopBody>, description = "Optional; empty means `{\"save\": true}`"),
    responses(
        (status = 200, description = "The job, now finished", body = JobRecord),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn stop(
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    let body = super::body::read(&state, body).await?;
    let body: StopBody = parse_json(&body, true)?;
    state
        .manager
        .send(Stop {
            id,
            save: body.save,
        })
        .await??;
    Ok(HttpResponse::Ok().json(record(&state, id).await?))
}

/// Asks the ranks of a running job to checkpoint at their next step boundary and keep
/// training; answers once the checkpoint committed or the job's `save_grace_s` ran out.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/checkpoint",
    operation_id = "checkpoint_job",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "What the save did: `outcome` `saved` (with \
            `saved_at_step`), `timed_out` or `interrupted`", body = NoticeReport),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has ended: nothing to checkpoint", body = ErrorBody),
    )
)]
pub async fn checkpoint(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    let job = record(&state, id).await?;
    let ended = || ApiError::Conflict(format!("job {id} is {}; nothing to checkpoint", job.state));
    let handle = state.rt.registry.get(&id).ok_or_else(ended)?;
    match handle.addr.send(SaveNow).await {
        Ok(Some(report)) => Ok(HttpResponse::Ok().json(report)),
        _ => Err(ended()),
    }
}
