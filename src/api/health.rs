//! `GET /health`: liveness and version.

use actix_web::HttpResponse;
use serde::Serialize;
use utoipa::ToSchema;

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    status: &'static str,
    version: &'static str,
}

/// Liveness: always open, even with an API token configured.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "server",
    security(()),
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}
