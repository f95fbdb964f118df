//! `/jobs`: create, list, inspect, delete, purge (stop and checkpoint: `notice.rs`).

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ErrorBody, parse_json};
use super::schema::{JobId, Model};
use super::{ApiError, AppState, parse_job_id};
use crate::actors::messages::DeleteReport;
use crate::actors::messages::{CreateJob, Delete, GetSummary};
use crate::checkpoint::{FINAL_MODEL, sha256_hex};
use crate::domain::JobState;
use crate::domain::progress::{Progress, Summary, SummaryInput};
use crate::spec::{JobRequest, JobSpec};
use crate::storage::BlobStore;
use crate::store;
use crate::store::jobs::{CheckpointRow, Incarnation, JobRecord, Restart};

pub(super) async fn record(state: &AppState, id: Uuid) -> Result<JobRecord, ApiError> {
    store::jobs::get(&state.rt.pool, id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))
}

/// Creates a job and starts its ranks.
#[utoipa::path(
    post,
    path = "/jobs",
    operation_id = "create_job",
    tag = "jobs",
    request_body = JobRequest,
    responses(
        (status = 201, description = "Created; the job starts at once", body = JobRecord),
        (status = 422, description = "The spec is refused (a field out of range, a path outside \
            the allowed roots, ...); nothing was created", body = ErrorBody),
        (status = 429, description = "At `--max-jobs` or `--max-workers`", body = ErrorBody),
        (status = 503, description = "The history cannot be written now (a full disk): \
            nothing was created; retry", body = ErrorBody),
    )
)]
pub async fn create(
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    super::health::refuse_if_degraded(&state)?;
    let body = super::body::read(&state, body).await?;
    let request: JobRequest = parse_json(&body, false)?;
    let spec = request
        .resolve(&state.rt.settings.job_defaults)
        .map_err(|e| ApiError::InvalidSpec(e.to_string()))?;
    spec.check_roots(&state.rt.settings.allowed_roots)
        .map_err(|e| ApiError::InvalidSpec(e.to_string()))?;
    for (field, location) in [
        ("dataset", &spec.dataset),
        ("checkpoint_dir", &spec.checkpoint_dir),
    ] {
        crate::storage::s3::check_location(location, &state.rt.settings.s3)
            .await
            .map_err(|e| ApiError::InvalidSpec(format!("{field}: {e}")))?;
    }
    crate::launcher::admit(&spec, &state.rt.settings, &state.rt.base_url)
        .await
        .map_err(ApiError::InvalidSpec)?;
    let id = state.manager.send(CreateJob(spec)).await??;
    let job = record(&state, id).await?;
    Ok(HttpResponse::Created().json(job))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    #[param(value_type = Option<JobState>)]
    state: Option<String>,
    /// Jobs in the page, 1 to 1000 (default 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Jobs skipped before the page (default 0).
    #[param(minimum = 0)]
    offset: Option<i64>,
}

/// A page of a listing: `?limit=N&offset=M`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Jobs in the page, 1 to 1000 (default 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Jobs skipped before the page (default 0).
    #[param(minimum = 0)]
    offset: Option<i64>,
}

/// The most jobs one page of `/jobs` or `/jobs/summaries` holds.
pub const MAX_PAGE: i64 = 1000;

/// `(limit, offset)` of a listing, or a 400 naming what is wrong.
fn page(limit: Option<i64>, offset: Option<i64>) -> Result<(i64, i64), ApiError> {
    let limit = limit.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}, not {limit}"
        )));
    }
    let offset = offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::BadRequest(format!(
            "offset must be 0 or more, not {offset}"
        )));
    }
    Ok((limit, offset))
}

/// Jobs, newest first.
#[utoipa::path(
    get,
    path = "/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(ListQuery),
    responses((status = 200, description = "Jobs, newest first", body = Vec<JobRecord>))
)]
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    if let Some(s) = &query.state
        && JobState::parse(s).is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "unknown state {s:?}; one of pending, running, succeeded, failed, stopped"
        )));
    }
    let (limit, offset) = page(query.limit, query.offset)?;
    let jobs =
        store::jobs::list_page(&state.rt.pool, query.state.as_deref(), limit, offset).await?;
    Ok(HttpResponse::Ok().json(jobs))
}

#[utoipa::path(
    get,
    path = "/jobs/{job_id}",
    operation_id = "get_job",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "The job", body = JobRecord),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    Ok(HttpResponse::Ok().json(record(&state, id).await?))
}

/// The live summary from the job's actor, or the one stored when it ended.
async fn summary_of(state: &AppState, job: &JobRecord) -> Result<Summary, ApiError> {
    let id = parse_job_id(&job.job_id)?;
    if let Some(handle) = state.rt.registry.get(&id)
        && let Ok(summary) = handle.addr.send(GetSummary).await
    {
        return Ok(summary);
    }
    // Re-read: the job may have ended between the list and now.
    let job = record(state, id).await?;
    if let Some(stored) = job.summary.as_deref()
        && let Ok(summary) = serde_json::from_str::<Summary>(stored)
    {
        return Ok(summary);
    }
    let spec: JobSpec = serde_json::from_value(job.spec.clone())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored spec unreadable: {e}")))?;
    Ok(Summary::build(SummaryInput {
        id,
        spec: &spec,
        state: JobState::parse(&job.state).unwrap_or(JobState::Pending),
        reason: job.reason.clone(),
        created_at: &job.created_at,
        started_at: job.started_at.clone(),
        ranks: &[],
        restarts: job.restarts as u32,
        progress: &Progress::default(),
        last_checkpoint: None,
        goodput: None,
        rank_rates: Vec::new(),
        standbys: Default::default(),
        standby_off: None,
        last_notice: None,
        launcher_ref: None,
        excluded_nodes: serde_json::from_value(job.excluded_nodes.clone()).unwrap_or_default(),
    }))
}

/// State, progress, throughput, ETA, loss, last checkpoint and a per-rank table.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/summary",
    operation_id = "job_summary",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "The job's summary", body = Summary),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn summary(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    let job = record(&state, id).await?;
    Ok(HttpResponse::Ok().json(summary_of(&state, &job).await?))
}

/// Every job's summary, newest first (what the page shows).
#[utoipa::path(
    get,
    path = "/jobs/summaries",
    operation_id = "job_summaries",
    tag = "jobs",
    params(PageQuery),
    responses(
        (status = 200, description = "Summaries, newest first", body = Vec<Summary>),
        (status = 400, description = "An unknown or invalid query parameter", body = ErrorBody),
    )
)]
pub async fn summaries(
    state: web::Data<AppState>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let (limit, offset) = page(query.limit, query.offset)?;
    let jobs = store::jobs::list_page(&state.rt.pool, None, limit, offset).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in &jobs {
        match summary_of(&state, job).await {
            Ok(s) => out.push(s),
            // Deleted between the list and now.
            Err(ApiError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(HttpResponse::Ok().json(out))
}

/// Every incarnation of every rank (one row per launch), by rank then attempt.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/workers",
    operation_id = "job_incarnations",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "Incarnations", body = Vec<Incarnation>),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn workers(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    record(&state, id).await?;
    let incarnations = store::jobs::incarnations(&state.rt.pool, id).await?;
    Ok(HttpResponse::Ok().json(incarnations))
}

/// Restart decisions, oldest first.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/restarts",
    operation_id = "job_restarts",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "Restarts", body = Vec<Restart>),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn restarts(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    record(&state, id).await?;
    Ok(HttpResponse::Ok().json(store::jobs::restarts(&state.rt.pool, id).await?))
}

/// The job's bad-node quarantine: nodes its launches no longer use (Slurm), oldest first.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/excluded_nodes",
    operation_id = "job_excluded_nodes",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "Excluded nodes", body = Vec<store::jobs::ExcludedNode>),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn excluded_nodes(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    record(&state, id).await?;
    Ok(HttpResponse::Ok().json(store::jobs::excluded_nodes(&state.rt.pool, id).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Stop the job first if it is running.
    #[serde(default)]
    force: bool,
}

/// What `DELETE /jobs/{job_id}` deleted.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the `json!` reply.
pub struct Deleted {
    deleted: Vec<Uuid>,
}

/// Deletes a finished job and its history, logs and checkpoint records.
#[utoipa::path(
    delete,
    path = "/jobs/{job_id}",
    operation_id = "delete_job",
    tag = "jobs",
    params(JobId, DeleteQuery),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is running and `force` was not given", body = ErrorBody),
    )
)]
pub async fn delete(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<DeleteQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    let job = record(&state, id).await?;
    if state.rt.registry.get(&id).is_some() && !query.force {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; stop it first or pass ?force=true",
            job.state
        )));
    }
    let report = state
        .manager
        .send(Delete {
            ids: Some(vec![id]),
            force: query.force,
        })
        .await??;
    if report.deleted.contains(&id) {
        Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": [id] })))
    } else {
        Err(ApiError::Conflict(format!("job {id} was not deleted")))
    }
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Jobs to delete; without it, every finished job.
    #[schema(value_type = Option<Vec<Uuid>>)]
    job_ids: Option<Vec<String>>,
    /// Also stop and delete running jobs among `job_ids`.
    #[serde(default)]
    force: bool,
}

/// Deletes many jobs at once: those listed, or every finished job. An empty body is `{}`.
#[utoipa::path(
    post,
    path = "/jobs/purge",
    operation_id = "purge_jobs",
    tag = "jobs",
    request_body(content = Option<PurgeRequest>, description = "Optional; empty means `{}`"),
    responses(
        (status = 200, description = "What was deleted and what was skipped (and why)", body = DeleteReport),
    )
)]
pub async fn purge(
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = super::body::read(&state, body).await?;
    let request: PurgeRequest = parse_json(&body, true)?;
    let ids = match request.job_ids {
        Some(raw) => {
            let mut ids = Vec::with_capacity(raw.len());
            for r in &raw {
                ids.push(r.parse::<Uuid>().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "job_ids: {r:?} is not a job id (a UUID); nothing was deleted"
                    ))
                })?);
            }
            Some(ids)
        }
        None if request.force => {
            return Err(ApiError::BadRequest(
                "force needs an explicit job_ids list; nothing was deleted".into(),
            ));
        }
        None => None,
    };
    let report = state
        .manager
        .send(Delete {
            ids,
            force: request.force,
        })
        .await??;
    Ok(HttpResponse::Ok().json(report))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckpointsQuery {
    /// Also list steps removed by retention.
    #[serde(default)]
    all: bool,
}

/// Committed checkpoints, newest first.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/checkpoints",
    operation_id = "job_checkpoints",
    tag = "jobs",
    params(JobId, CheckpointsQuery),
    responses(
        (status = 200, description = "Checkpoints", body = Vec<CheckpointRow>),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn checkpoints(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<CheckpointsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    record(&state, id).await?;
    Ok(HttpResponse::Ok().json(store::jobs::checkpoints(&state.rt.pool, id, query.all).await?))
}

/// The final model the job wrote (`<checkpoint dir>/model.bin`), as bytes.
#[utoipa::path(
    get,
    path = "/jobs/{job_id}/model",
    operation_id = "job_model",
    tag = "jobs",
    params(JobId),
    responses(
        (status = 200, description = "The model file", content_type = "application/octet-stream",
            body = Model, headers(("X-Model-Sha256" = String, description = "SHA-256 of the body, hex"))),
        (status = 404, description = "No such job, or it has no final model", body = ErrorBody),
    )
)]
pub async fn model(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_job_id(&path)?;
    let job = record(&state, id).await?;
    let spec: JobSpec = serde_json::from_value(job.spec)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored spec unreadable: {e}")))?;
    let store = BlobStore::open_with(&spec.job_checkpoint_dir(&id), &state.rt.settings.s3)
        .map_err(ApiError::Internal)?;
    match store.get(FINAL_MODEL).await {
        Ok(Some(bytes)) => Ok(HttpResponse::Ok()
            .content_type("application/octet-stream")
            .insert_header(("X-Model-Sha256", sha256_hex(&bytes)))
            .body(bytes)),
        Ok(None) => Err(ApiError::NotFound(format!(
            "job {id} has no final model (it is written by rank 0 of the built-in trainer when training ends)"
        ))),
        Err(e) => Err(ApiError::Internal(e.into())),
    }
}
