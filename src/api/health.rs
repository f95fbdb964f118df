//! `GET /health` (liveness, version, and whether the history can be written) and `GET /ready`
//! (readiness: whether the server takes new jobs; Kubernetes' readinessProbe).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ErrorBody;
use crate::store::StoreHealth;
use crate::store::health::Degraded;

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` while the history cannot be written (new jobs are refused; running
    /// jobs go on and are recorded once it can).
    #[schema(example = "ok")]
    status: &'static str,
    version: &'static str,
    /// Set while the history cannot be written: the storage error, and since when.
    degraded: Option<Degraded>,
    /// History writes accepted and not yet durable (non-zero while degraded).
    pending_writes: usize,
    /// Log lines dropped since the server started because they could not be written.
    logs_dropped: u64,
    /// Free bytes on the data dir's file system (null before the first measure).
    disk_free_bytes: Option<u64>,
    /// True while the data dir's free space is under `--low-disk-mb`.
    disk_low: bool,
}

impl Health {
    fn of(h: &StoreHealth) -> Self {
        let degraded = h.degraded();
        Health {
            status: if degraded.is_some() { "degraded" } else { "ok" },
            version: env!("CARGO_PKG_VERSION"),
            degraded,
            pending_writes: h.pending(),
            logs_dropped: h.logs_dropped(),
            disk_free_bytes: h.disk_free_bytes(),
            disk_low: h.disk_low(),
        }
    }
}

/// Liveness: always open, even with an API token configured, and 200 while the process
/// serves (restarting it would not free a disk); `status` says whether it is degraded.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "server",
    security(()),
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(Health::of(state.rt.recorder.health()))
}

/// `GET /ready`.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    ready: bool,
}

/// Readiness: 200 while the server takes new jobs, 503 `storage_unavailable` while the
/// history cannot be written. Open like `/health`.
#[utoipa::path(
    get,
    path = "/ready",
    operation_id = "ready",
    tag = "server",
    security(()),
    responses(
        (status = 200, description = "Takes new jobs", body = Ready),
        (status = 503, description = "The history cannot be written: not ready", body = ErrorBody),
    )
)]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, super::ApiError> {
    refuse_if_degraded(&state)?;
    Ok(HttpResponse::Ok().json(Ready { ready: true }))
}

/// New work is refused while the history cannot be written: it would run processes the server
/// cannot account for.
pub fn refuse_if_degraded(state: &AppState) -> Result<(), super::ApiError> {
    match state.rt.recorder.health().degraded() {
        Some(d) => Err(super::ApiError::storage_unavailable(&d.reason)),
        None => Ok(()),
    }
}
