//! HTTP routes, grouped by resource.

pub mod auth;
mod body;
pub mod error;
mod events;
mod health;
mod incidents;
mod jobs;
mod logs;
pub mod metrics;
pub mod openapi;
mod page;
mod schema;
pub mod workers;

use std::sync::Arc;

use actix::Addr;
use actix_web::web;
use uuid::Uuid;

use crate::actors::{JobManager, Runtime};
pub use error::ApiError;

/// What every handler gets through `web::Data`.
pub struct AppState {
    pub rt: Arc<Runtime>,
    pub manager: Addr<JobManager>,
}

/// Job ids in paths are UUIDs in the one form the server writes them (lower-case, hyphenated,
/// 36 characters); anything else (upper case, braces, `urn:uuid:`, no hyphens) names no job,
/// so one job has one URL.
pub fn parse_job_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse::<Uuid>()
        .ok()
        .filter(|id| id.hyphenated().to_string() == raw)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no job with id {raw:?} (job ids are lower-case UUIDs such as \
                 3dcb3e33-0f5e-4c1a-9a57-8d2b1e0c4f6a)"
            ))
        })
}

/// A resource whose other methods get a JSON 405 with the `Allow` header (RFC 9110).
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(
        move || async move { error::method_not_allowed(allow) },
    ))
}

/// Every route. Each one is documented in `openapi::ApiDoc` (`GET /openapi.json`); the test
/// `openapi::every_route_is_documented` compares this list with the document.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // Resources (not bare routes) so a known path with the wrong method is a 405.
    cfg.service(resource("/", "GET").get(page::index))
        .service(resource("/static/{file}", "GET").get(page::file))
        .service(resource("/health", "GET").get(health::health))
        .service(resource("/ready", "GET").get(health::ready))
        .service(resource("/openapi.json", "GET").get(openapi::openapi_json))
        .service(resource("/session", "POST").post(auth::session))
        .service(resource("/metrics", "GET").get(metrics::metrics))
        .service(resource("/events", "GET").get(events::events))
        .service(
            resource("/jobs", "GET, POST")
                .get(jobs::list)
                .post(jobs::create),
        )
        .service(resource("/jobs/summaries", "GET").get(jobs::summaries))
        .service(resource("/jobs/purge", "POST").post(jobs::purge))
        .service(
            resource("/jobs/{job_id}", "GET, DELETE")
                .get(jobs::get)
                .delete(jobs::delete),
        )
        .service(resource("/jobs/{job_id}/summary", "GET").get(jobs::summary))
        .service(resource("/jobs/{job_id}/workers", "GET").get(jobs::workers))
        .service(resource("/jobs/{job_id}/restarts", "GET").get(jobs::restarts))
        .service(resource("/jobs/{job_id}/incidents", "GET").get(incidents::incidents))
        .service(resource("/jobs/{job_id}/progress", "GET").get(incidents::progress))
        .service(resource("/jobs/{job_id}/excluded_nodes", "GET").get(jobs::excluded_nodes))
        .service(resource("/jobs/{job_id}/stop", "POST").post(jobs::stop))
        .service(resource("/jobs/{job_id}/logs", "GET").get(logs::tail))
        .service(resource("/jobs/{job_id}/logs/stream", "GET").get(logs::stream))
        .service(resource("/jobs/{job_id}/checkpoints", "GET").get(jobs::checkpoints))
        .service(resource("/jobs/{job_id}/model", "GET").get(jobs::model))
        .service(
            resource("/jobs/{job_id}/workers/{rank}/heartbeat", "POST").post(workers::heartbeat),
        )
        .service(
            resource("/jobs/{job_id}/workers/{rank}/allreduce", "POST").post(workers::allreduce),
        )
        .service(
            resource("/jobs/{job_id}/workers/{rank}/checkpoint", "POST").post(workers::checkpoint),
        );
}
