//! The worker API, authorized by each incarnation's bearer token:
//! `POST /jobs/{job_id}/workers/{rank}/heartbeat | allreduce | checkpoint`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::parse_json;
use super::{ApiError, AppState, parse_job_id};
use crate::actors::JobHandle;
use crate::actors::job::{AllReduceRequest, CheckpointPart, Heartbeat, WorkerRejected};
use crate::checkpoint::{PartInfo, part_name};
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

/// Who is calling: the live job, the rank and the token it presented.
struct Caller {
    id: Uuid,
    rank: u32,
    token: String,
    job: JobHandle,
}

async fn caller(
    state: &AppState,
    req: &HttpRequest,
    path: (String, String),
) -> Result<Caller, ApiError> {
    let (job, rank) = path;
    let id = parse_job_id(&job)?;
    let rank: u32 = rank
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no rank {rank:?} in job {id}")))?;
    let token = bearer(req)
        .ok_or_else(|| {
            ApiError::Unauthorized("send Authorization: Bearer $TRAINVISOR_TOKEN".into())
        })?
        .to_string();
    let Some(job) = state.rt.registry.get(&id) else {
        return match store::jobs::get(&state.rt.pool, id).await? {
            Some(job) => Err(ApiError::StaleIncarnation(format!(
                "job {id} is {}; this worker must exit",
                job.state
            ))),
            None => Err(ApiError::job_not_found(id)),
        };
    };
    Ok(Caller {
        id,
        rank,
        token,
        job,
    })
}

fn rejected(c: &Caller, why: WorkerRejected) -> ApiError {
    let (id, rank) = (c.id, c.rank);
    match why {
        WorkerRejected::UnknownRank => ApiError::NotFound(format!("job {id} has no rank {rank}")),
        WorkerRejected::Stale => ApiError::StaleIncarnation(format!(
            "this token belongs to an incarnation of rank {rank} that has been replaced or has ended; exit"
        )),
        WorkerRejected::BadToken => {
            ApiError::Unauthorized(format!("token is not valid for rank {rank} of job {id}"))
        }
        WorkerRejected::Invalid(why) => ApiError::InvalidSpec(why),
    }
}

/// The job ended between the lookup and the send.
fn ended(c: &Caller) -> ApiError {
    ApiError::StaleIncarnation(format!("job {} has ended; this worker must exit", c.id))
}

pub async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
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
    let c = caller(&state, &req, path.into_inner()).await?;
    let msg = Heartbeat {
        rank: c.rank,
        token: c.token.clone(),
        body,
    };
    match c.job.addr.send(msg).await.map_err(|_| ended(&c))? {
        Ok(()) => Ok(HttpResponse::Ok().json(json!({ "ok": true }))),
        Err(why) => Err(rejected(&c, why)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllReduceBody {
    step: u64,
    values: Vec<f64>,
}

pub async fn allreduce(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: AllReduceBody = parse_json(&body, false)?;
    let c = caller(&state, &req, path.into_inner()).await?;
    let msg = AllReduceRequest {
        rank: c.rank,
        token: c.token.clone(),
        step: body.step,
        values: body.values,
    };
    match c.job.addr.send(msg).await.map_err(|_| ended(&c))? {
        Ok(mean) => Ok(HttpResponse::Ok().json(json!({ "step": body.step, "values": *mean }))),
        Err(why) => Err(rejected(&c, why)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    step: u64,
    part: String,
    bytes: u64,
    sha256: String,
    shard_idx: Option<u64>,
    line_idx: Option<u64>,
    metrics: Option<Value>,
}

pub async fn checkpoint(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body: CheckpointBody = parse_json(&body, false)?;
    let c = caller(&state, &req, path.into_inner()).await?;
    if body.part != part_name(c.rank) {
        return Err(ApiError::InvalidSpec(format!(
            "rank {} must name its part {:?}",
            c.rank,
            part_name(c.rank)
        )));
    }
    if body.sha256.len() != 64 || !body.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::InvalidSpec("sha256 must be 64 hex digits".into()));
    }
    let msg = CheckpointPart {
        rank: c.rank,
        token: c.token.clone(),
        step: body.step,
        part: PartInfo {
            rank: c.rank,
            name: body.part,
            bytes: body.bytes,
            sha256: body.sha256.to_ascii_lowercase(),
            shard_idx: body.shard_idx,
            line_idx: body.line_idx,
            metrics: body.metrics,
        },
    };
    match c.job.addr.send(msg).await.map_err(|_| ended(&c))? {
        Ok(()) => Ok(HttpResponse::Ok().json(json!({ "ok": true }))),
        Err(why) => Err(rejected(&c, why)),
    }
}
