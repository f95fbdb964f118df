//! Schemas and path parameters that several handlers' OpenAPI annotations share. They only
//! describe what the handlers read and write; `openapi.rs` collects them with the handlers.

use utoipa::ToSchema;

/// The `{job_id}` path parameter.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct JobId {
    /// The job's id (a UUID); anything else is a 404.
    job_id: uuid::Uuid,
}

/// The `{job_id}` and `{rank}` path parameters of the worker routes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct JobRank {
    /// The job's id (a UUID).
    job_id: uuid::Uuid,
    /// The caller's rank.
    rank: u32,
}

/// A model file (`model.bin`), as bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct Model(Vec<u8>);

/// One server-sent event of `GET /events` or `GET /jobs/{job_id}/logs/stream`, as an SSE
/// client reads it (the document describes each event, not the whole stream).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// The event's name (see the operation).
    event: String,
    /// Its payload: a JSON text.
    data: String,
    /// The seq to resume after (`Last-Event-ID`), on `log` and job events.
    id: Option<String>,
}
