//! `GET /metrics`: Prometheus text format.

use std::fmt::Write;

use actix_web::{HttpResponse, web};

use super::error::ErrorBody;
use super::{ApiError, AppState};

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "server",
    responses(
        (status = 200, description = "Prometheus text exposition format",
            content_type = "text/plain", body = String),
        (status = 401, description = "The server has an API token and none was sent", body = ErrorBody),
    )
)]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let pool = &state.rt.pool;
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .fetch_all(pool)
            .await?;
    let restarts: Vec<(String, i64)> =
        sqlx::query_as("SELECT reason, COUNT(*) FROM restarts GROUP BY reason")
            .fetch_all(pool)
            .await?;
    let running: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM incarnations WHERE ended_at IS NULL AND pid IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP trainvisor_jobs Jobs by state.\n# TYPE trainvisor_jobs gauge"
    );
    for (s, n) in by_state {
        let _ = writeln!(out, "trainvisor_jobs{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP trainvisor_restarts_total Restart decisions by reason.\n# TYPE trainvisor_restarts_total counter"
    );
    for (r, n) in restarts {
        let _ = writeln!(out, "trainvisor_restarts_total{{reason=\"{r}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP trainvisor_workers_running Worker processes running.\n# TYPE trainvisor_workers_running gauge"
    );
    let _ = writeln!(out, "trainvisor_workers_running {running}");
    let _ = writeln!(
        out,
        "# HELP trainvisor_live_jobs Jobs with a live actor.\n# TYPE trainvisor_live_jobs gauge"
    );
    let _ = writeln!(
        out,
        "trainvisor_live_jobs {}",
        state.rt.registry.all().len()
    );
    let _ = writeln!(
        out,
        "# HELP trainvisor_log_subscribers SSE log subscribers.\n# TYPE trainvisor_log_subscribers gauge"
    );
    let _ = writeln!(
        out,
        "trainvisor_log_subscribers {}",
        state.rt.bus.subscriber_count()
    );
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}
