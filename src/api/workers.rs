//! The worker API, authorized by each incarnation's bearer token:
//! `POST /jobs/{job_id}/workers/{rank}/heartbeat | allreduce | checkpoint`. The token and the
//! job are checked before the body is read (in the job's `WorkerTokens`, not through its
//! actor); a token that was never this rank's gets `401` before anything about the job's state
//! is said. A call then crosses the Job's mailbox once, with the attempt its token belongs to.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::{ErrorBody, parse_json};
use super::schema::JobRank;
use super::{ApiError, AppState, parse_job_id};
use crate::actors::messages::{AllReduceRequest, CheckpointPart, Heartbeat, WorkerRejected};
use crate::actors::{JobHandle, hash_token};
use crate::checkpoint::{PartInfo, part_name};
use crate::store;

/// The bearer token of a request, if any. The scheme is case-insensitive (RFC 9110, 11.1):
/// `bearer x` and `BEARER x` are as good as `Bearer x`.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Who is calling: the live job, the rank and the attempt whose token it presented.
struct Caller {
    id: Uuid,
    rank: u32,
    attempt: u32,
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
        // Only a worker of this job learns that it has ended: anyone else (a wrong token) is
        // told nothing about the job.
        let ours = store::jobs::issued_token(&state.rt.pool, id, rank, &hash_token(&token)).await?;
        if !ours {
            return Err(ApiError::Unauthorized(format!(
                "token is not valid for rank {rank} of job {id}"
            )));
        }
        return match store::jobs::get(&state.rt.pool, id).await? {
            Some(job) => Err(ApiError::StaleIncarnation(format!(
                "job {id} is {}; this worker must exit",
                job.state
            ))),
            None => Err(ApiError::job_not_found(id)),
        };
    };
    match job.tokens.attempt_of(rank, &hash_token(&token)) {
        Ok(attempt) => Ok(Caller {
            id,
            rank,
            attempt,
            job,
        }),
        Err(why) => Err(rejected(id, rank, why)),
    }
}

fn rejected(id: Uuid, rank: u32, why: WorkerRejected) -> ApiError {
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

/// A heartbeat body: any JSON object; the fields below are the ones the runtime reads (a
/// `step` makes progress and ETA; `metrics.loss` feeds the summary's loss).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the free-form body.
pub struct HeartbeatBody {
    /// The rank's current step (null or absent: none yet).
    step: Option<u64>,
    /// Anything numeric the rank wants shown, e.g. `{"loss": 0.3}`.
    metrics: Option<Value>,
    /// The rank was given notice (it got SIGUSR1, e.g. Slurm's `--signal` before a
    /// preemption), e.g. `"SIGUSR1"`: the whole job saves and holds at the saved step.
    notice: Option<String>,
    /// Set by trainvisor's Python hook (automatic heartbeats); a script's own heartbeats,
    /// without it, win over them.
    trainvisor_auto: Option<bool>,
    /// The last step the rank saved (began saving a part of; for automatic heartbeats the
    /// step count at the script's last `torch.save`): tells a rank writing its part of a save
    /// request's step from one that missed it.
    saved_step: Option<u64>,
}

/// Reply of the heartbeat and checkpoint routes.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the `json!` reply.
pub struct OkReply {
    ok: bool,
    /// Heartbeats only: save your part of `save.by_step` right after finishing that step
    /// (absent: nothing to do). With `halt`, train no further until the request changes.
    save: Option<crate::domain::notice::SaveRequest>,
    /// Heartbeat only: set when an automatic heartbeat (`"trainvisor_auto": true`, sent by
    /// trainvisor's Python hook) was ignored because the script sends its own.
    ignored: Option<String>,
}

/// Reply of the all-reduce route: the mean over every rank.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the `json!` reply.
pub struct AllReduceReply {
    step: u64,
    values: Vec<f64>,
    /// The save request this round carries (the same for every rank): save right after
    /// applying this step when `save.by_step` is it. With `values` empty the round was called
    /// off (a rank died): apply nothing, save `save.by_step` (the step every rank completed),
    /// then hold.
    save: Option<crate::domain::notice::SaveRequest>,
}

/// A rank's liveness and progress report.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/workers/{rank}/heartbeat",
    operation_id = "worker_heartbeat",
    tag = "workers",
    security(("worker_token" = [])),
    params(JobRank),
    request_body(content = Option<HeartbeatBody>, description = "Any JSON object; empty means `{}`"),
    responses(
        (status = 200, description = "Recorded", body = OkReply),
        (status = 400, description = "Not a JSON object, or `step` not a non-negative integer",
            body = ErrorBody),
        (status = 401, description = "No token, or not this rank's", body = ErrorBody),
        (status = 404, description = "No such job or rank", body = ErrorBody),
        (status = 409, description = "The token's incarnation was replaced or the job ended: exit",
            body = ErrorBody),
    )
)]
pub async fn heartbeat(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let c = caller(&state, &req, path.into_inner()).await?;
    let body = super::body::read(&state, body).await?;
    let body: Value = parse_json(&body, true)?;
    if !body.is_object() {
        return Err(ApiError::InvalidJson(
            "heartbeat body must be a JSON object".into(),
        ));
    }
    if let Some(step) = body.get("step")
        && !(step.is_u64() || step.is_null())
    {
        return Err(ApiError::InvalidJson(
            "step must be a non-negative integer (or null: no step yet)".into(),
        ));
    }
    let msg = Heartbeat {
        rank: c.rank,
        attempt: c.attempt,
        body,
    };
    match c.job.addr.send(msg).await.map_err(|_| ended(&c))? {
        Ok((true, None)) => Ok(HttpResponse::Ok().json(json!({ "ok": true }))),
        Ok((true, Some(save))) => Ok(HttpResponse::Ok().json(json!({ "ok": true, "save": save }))),
        // trainvisor's Python hook stops when it reads this.
        Ok((false, _)) => Ok(HttpResponse::Ok().json(json!({
            "ok": true,
            "ignored": "an automatic heartbeat: this rank's script sends its own, which win"
        }))),
        Err(why) => Err(rejected(c.id, c.rank, why)),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllReduceBody {
    step: u64,
    values: Vec<f64>,
}

/// Averages `values` over every rank of the job for `step`; answers when all ranks sent theirs.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/workers/{rank}/allreduce",
    operation_id = "worker_allreduce",
    tag = "workers",
    security(("worker_token" = [])),
    params(JobRank),
    request_body = AllReduceBody,
    responses(
        (status = 200, description = "The element-wise mean over every rank", body = AllReduceReply),
        (status = 401, description = "No token, or not this rank's", body = ErrorBody),
        (status = 404, description = "No such job or rank", body = ErrorBody),
        (status = 409, description = "The token's incarnation was replaced or the job ended: exit",
            body = ErrorBody),
        (status = 422, description = "A step or length that does not match the other ranks'",
            body = ErrorBody),
    )
)]
pub async fn allreduce(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let c = caller(&state, &req, path.into_inner()).await?;
    let body = super::body::read(&state, body).await?;
    let body: AllReduceBody = parse_json(&body, false)?;
    let msg = AllReduceRequest {
        rank: c.rank,
        attempt: c.attempt,
        step: body.step,
        values: body.values,
    };
    match c.job.addr.send(msg).await.map_err(|_| ended(&c))? {
        Ok(round) => {
            let mut reply = json!({ "step": body.step, "values": round.mean });
            if let Some(save) = &round.save {
                reply["save"] = json!(save);
            }
            Ok(HttpResponse::Ok().json(reply))
        }
        Err(why) => Err(rejected(c.id, c.rank, why)),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    step: u64,
    part: String,
    bytes: u64,
    sha256: String,
    shard_idx: Option<u64>,
    line_idx: Option<u64>,
    metrics: Option<Value>,
    /// The part is a dead rank's, written by a survivor while the survivors save before a
    /// group restart (accepted only then).
    for_rank: Option<u32>,
}

/// A rank reports the part it wrote for a checkpoint step; the step is committed (manifest,
/// then LATEST) when every rank's part is in.
#[utoipa::path(
    post,
    path = "/jobs/{job_id}/workers/{rank}/checkpoint",
    operation_id = "worker_checkpoint",
    tag = "workers",
    security(("worker_token" = [])),
    params(JobRank),
    request_body = CheckpointBody,
    responses(
        (status = 200, description = "Recorded", body = OkReply),
        (status = 401, description = "No token, or not this rank's", body = ErrorBody),
        (status = 404, description = "No such job or rank", body = ErrorBody),
        (status = 409, description = "The token's incarnation was replaced or the job ended: exit",
            body = ErrorBody),
        (status = 422, description = "A wrong part name, a bad sha256 or a step out of order",
            body = ErrorBody),
    )
)]
pub async fn checkpoint(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let c = caller(&state, &req, path.into_inner()).await?;
    let body = super::body::read(&state, body).await?;
    let body: CheckpointBody = parse_json(&body, false)?;
    let owner = body.for_rank.unwrap_or(c.rank);
    if body.part != part_name(owner) {
        return Err(ApiError::InvalidSpec(format!(
            "the part of rank {owner} is named {:?}",
            part_name(owner)
        )));
    }
    if body.sha256.len() != 64 || !body.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::InvalidSpec("sha256 must be 64 hex digits".into()));
    }
    let msg = CheckpointPart {
        rank: c.rank,
        attempt: c.attempt,
        step: body.step,
        part: PartInfo {
            rank: owner,
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
        Err(why) => Err(rejected(c.id, c.rank, why)),
    }
}
