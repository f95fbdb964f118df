//! HTTP routes, grouped by resource.

pub mod auth;
pub mod error;
mod events;
mod jobs;
mod logs;
mod metrics;
mod page;
pub mod workers;

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
    // Resources (not bare routes) so a known path with the wrong method is a 405.
    cfg.service(web::resource("/").get(page::index))
        .service(web::resource("/static/{file}").get(page::file))
        .service(web::resource("/health").get(health))
        .service(web::resource("/session").post(auth::session))
        .service(web::resource("/metrics").get(metrics::metrics))
        .service(web::resource("/events").get(events::events))
        .service(web::resource("/jobs").get(jobs::list).post(jobs::create))
        .service(web::resource("/jobs/summaries").get(jobs::summaries))
        .service(web::resource("/jobs/purge").post(jobs::purge))
        .service(
            web::resource("/jobs/{job_id}")
                .get(jobs::get)
                .delete(jobs::delete),
        )
        .service(web::resource("/jobs/{job_id}/summary").get(jobs::summary))
        .service(web::resource("/jobs/{job_id}/workers").get(jobs::workers))
        .service(web::resource("/jobs/{job_id}/restarts").get(jobs::restarts))
        .service(web::resource("/jobs/{job_id}/excluded_nodes").get(jobs::excluded_nodes))
        .service(web::resource("/jobs/{job_id}/stop").post(jobs::stop))
        .service(web::resource("/jobs/{job_id}/logs").get(logs::tail))
        .service(web::resource("/jobs/{job_id}/logs/stream").get(logs::stream))
        .service(web::resource("/jobs/{job_id}/checkpoints").get(jobs::checkpoints))
        .service(web::resource("/jobs/{job_id}/model").get(jobs::model))
        .service(web::resource("/jobs/{job_id}/workers/{rank}/heartbeat").post(workers::heartbeat))
        .service(web::resource("/jobs/{job_id}/workers/{rank}/allreduce").post(workers::allreduce))
        .service(
            web::resource("/jobs/{job_id}/workers/{rank}/checkpoint").post(workers::checkpoint),
        );
}
