//! `GET /metrics`: the server's Prometheus metrics (`crate::metrics`), with the scrape-time
//! gauges read here (jobs by state from the history, live jobs' summaries from their actors),
//! and the middleware that counts every HTTP request by route pattern and status.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::actors::messages::GetSummary;
use crate::metrics::{HttpLabels, Live, LiveJob, RouteLabels};
use crate::store;

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "server",
    responses(
        (status = 200, description = "Prometheus metrics, OpenMetrics text format",
            content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "The server has an API token and none was sent", body = ErrorBody),
    )
)]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let counts = store::jobs::counts(&state.rt.pool).await?;
    let mut live = Live {
        jobs_by_state: counts.jobs_by_state,
        workers_running: counts.workers_running,
        log_subscribers: state.rt.bus.subscriber_count() as i64,
        sse_streams: state
            .rt
            .sse_streams
            .load(std::sync::atomic::Ordering::Relaxed) as i64,
        ..Live::default()
    };
    let handles = state.rt.registry.all();
    live.live_jobs = handles.len() as i64;
    for (id, handle) in handles {
        // A job that ends meanwhile is simply left out.
        let Ok(s) = handle.addr.send(GetSummary).await else {
            continue;
        };
        live.jobs.push(LiveJob {
            id: id.to_string(),
            goodput: s.goodput.as_ref().map(|g| g.goodput),
            steps_per_s: s.steps_per_s,
            step: s.step,
            ranks: s
                .workers
                .iter()
                .map(|w| (w.rank, w.heartbeat_age_s, w.straggler))
                .collect(),
        });
    }
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.rt.metrics.encode(&live)))
}

/// Counts a request by its route pattern (never the raw path: the label set stays small),
/// method and status, and observes its latency (to the response head; a stream's body is not
/// waited for).
pub async fn count_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" | "PATCH") => m.to_string(),
        _ => "other".to_string(),
    };
    let res = next.call(req).await;
    if let Some(state) = state {
        let (route, status) = match &res {
            Ok(r) => (r.request().match_pattern(), r.response().status().as_u16()),
            Err(e) => (None, e.as_response_error().status_code().as_u16()),
        };
        let route = route.unwrap_or_else(|| "unmatched".to_string());
        let m = &state.rt.metrics;
        m.http_requests
            .get_or_create(&HttpLabels {
                route: route.clone(),
                method: method.clone(),
                status,
            })
            .inc();
        m.http_seconds
            .get_or_create(&RouteLabels { route, method })
            .observe(started.elapsed().as_secs_f64());
    }
    res
}
