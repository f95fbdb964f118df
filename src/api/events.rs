//! `GET /events`: an SSE stream of job and rank changes (`job`, `worker`, `restart`,
//! `checkpoint`, `progress`, `straggler`, `deleted`), each `data` a JSON object with `seq`, `kind`,
//! `job_id`, `at` and `data`. Nothing is replayed: a client reads the current state from the
//! API when it connects, and again when it receives `resync` (it fell behind).

use std::time::Duration;

use actix_web::{Responder, web};
use actix_web_lab::sse;
use tokio::sync::{broadcast, mpsc};

use super::error::ErrorBody;
use super::schema::SseEvent;
use super::{ApiError, AppState};

#[utoipa::path(
    get,
    path = "/events",
    operation_id = "events",
    tag = "server",
    responses(
        (status = 200, description = "Server-sent events: `hello` first, then `job`, `worker`, \
            `restart`, `checkpoint`, `progress`, `straggler`, `deleted` (each `data` a JSON object with `seq`, \
            `kind`, `job_id`, `at`, `data`) and `resync` when the client fell behind. The stream \
            does not end by itself", content_type = "text/event-stream", body = SseEvent),
        (status = 401, description = "The server has an API token and none was sent", body = ErrorBody),
        (status = 429, description = "Too many open streams (`--max-sse-subscribers`)", body = ErrorBody),
    )
)]
pub async fn events(state: web::Data<AppState>) -> Result<impl Responder, ApiError> {
    let slot = state
        .rt
        .open_stream()
        .ok_or_else(super::logs::too_many_streams)?;
    let mut rx = state.rt.events.subscribe();
    let (tx, out) = mpsc::channel(256);
    actix_web::rt::spawn(async move {
        let _slot = slot;
        if tx
            .send(sse::Event::Data(sse::Data::new("{}").event("hello")))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let event = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let data = match event {
                Ok(ev) => match sse::Data::new_json(&*ev) {
                    Ok(d) => d.id(ev.seq.to_string()).event(ev.kind),
                    Err(_) => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    sse::Data::new(format!("{{\"missed\":{n}}}")).event("resync")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(sse::Event::Data(data)).await.is_err() {
                return;
            }
        }
    });
    Ok(sse::Sse::from_infallible_receiver(out).with_keep_alive(Duration::from_secs(15)))
}
