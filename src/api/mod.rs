//! HTTP routes, grouped by resource.

pub mod error;
mod heartbeat;
mod jobs;
mod logs;
mod metrics;

use std::sync::Arc;

use actix::Addr;
use actix_web::{HttpResponse, web};
use uuid::Uuid;

use crate::actors::{JobManager, Runtime};
pub use error::ApiError;

/// What every handler gets through `web::Data`.
pub struct AppState {
    pub rt: Arc<Runtime>,
    pub manager: Addr<JobManager>,
}

/// Job ids in paths are UUIDs; anything else names no job.
pub fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("no job with id {raw:?} (job ids are UUIDs)")))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/jobs", web::post().to(jobs::create))
        .route("/jobs", web::get().to(jobs::list))
        .route("/jobs/summaries", web::get().to(jobs::summaries))
        .route("/jobs/purge", web::post().to(jobs::purge))
        .route("/jobs/{job_id}", web::get().to(jobs::get))
        .route("/jobs/{job_id}", web::delete().to(jobs::delete))
        .route("/jobs/{job_id}/summary", web::get().to(jobs::summary))
        .route("/jobs/{job_id}/workers", web::get().to(jobs::workers))
        .route("/jobs/{job_id}/restarts", web::get().to(jobs::restarts))
        .route("/jobs/{job_id}/stop", web::post().to(jobs::stop))
        .route("/jobs/{job_id}/logs", web::get().to(logs::tail))
        .route("/jobs/{job_id}/logs/stream", web::get().to(logs::stream))
        .route(
            "/jobs/{job_id}/workers/{rank}/heartbeat",
            web::post().to(heartbeat::heartbeat),
        );
}
