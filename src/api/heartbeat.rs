//! `POST /jobs/{job_id}/workers/{rank}/heartbeat`: a worker says it is alive and how far it got.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

use super::error::parse_json;
use super::{ApiError, AppState, parse_job_id};
use crate::actors::job::{Heartbeat, HeartbeatRejected};
use crate::store;

/// The bearer token of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let (job, rank) = path.into_inner();
    let id = parse_job_id(&job)?;
    let rank: u32 = rank
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no rank {rank:?} in job {id}")))?;
    let token = bearer(&req)
        .ok_or_else(|| {
            ApiError::Unauthorized("send Authorization: Bearer $TRAINVISOR_TOKEN".into())
        })?
        .to_string();
    let body: Value = parse_json(&body, true)?;
    if !body.is_object() {
        return Err(ApiError::InvalidJson(
            "heartbeat body must be a JSON object".into(),
        ));
    }
    if let Some(step) = body.get("step")
        && !step.is_u64()
    {
        return Err(ApiError::InvalidJson(
            "step must be a non-negative integer".into(),
        ));
    }
    let Some(handle) = state.rt.registry.get(&id) else {
        return match store::jobs::get(&state.rt.pool, id).await? {
            Some(job) => Err(ApiError::StaleIncarnation(format!(
                "job {id} is {}; this worker must exit",
                job.state
            ))),
            None => Err(ApiError::job_not_found(id)),
        };
    };
    let result = handle
        .addr
        .send(Heartbeat { rank, token, body })
        .await
        // The job ended between the lookup and the send.
        .map_err(|_| {
            ApiError::StaleIncarnation(format!("job {id} has ended; this worker must exit"))
        })?;
    match result {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({ "ok": true }))),
        Err(HeartbeatRejected::UnknownRank) => {
            Err(ApiError::NotFound(format!("job {id} has no rank {rank}")))
        }
        Err(HeartbeatRejected::Stale) => Err(ApiError::StaleIncarnation(format!(
            "this token belongs to an incarnation of rank {rank} that has been replaced or has ended; exit"
        ))),
        Err(HeartbeatRejected::BadToken) => Err(ApiError::Unauthorized(format!(
            "token is not valid for rank {rank} of job {id}"
        ))),
    }
}
