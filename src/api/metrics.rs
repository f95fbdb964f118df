//! `GET /metrics`: Prometheus text format, formatted from `store::jobs::counts` and the
//! runtime's live figures.

use std::fmt::Write;

use actix_web::{HttpResponse, web};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::store;

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
    let counts = store::jobs::counts(&state.rt.pool).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP trainvisor_jobs Jobs by state.\n# TYPE trainvisor_jobs gauge"
    );
    for (s, n) in counts.jobs_by_state {
        let _ = writeln!(out, "trainvisor_jobs{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP trainvisor_restarts_total Restart decisions by reason.\n# TYPE trainvisor_restarts_total counter"
    );
    for (r, n) in counts.restarts_by_reason {
        let _ = writeln!(out, "trainvisor_restarts_total{{reason=\"{r}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP trainvisor_workers_running Worker processes running.\n# TYPE trainvisor_workers_running gauge"
    );
    let _ = writeln!(out, "trainvisor_workers_running {}", counts.workers_running);
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
