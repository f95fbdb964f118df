//! Request bodies, read by the handler once it has checked what it can without them (the
//! worker routes check the token first), within `--max-body-bytes` and `--body-timeout-ms`:
//! a client that sends headers and then trickles (or stops sending) its body gets `408` and
//! its connection is closed, so slow clients cannot hold the server's connections.

use actix_web::web;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::{ApiError, AppState};

/// The whole body, or 413 past the size limit, 408 past the deadline, 400 when the client
/// broke it off.
pub async fn read(state: &AppState, payload: web::Payload) -> Result<Bytes, ApiError> {
    let limit = state.rt.settings.max_body_bytes;
    read_within(payload, limit, state.rt.settings.body_timeout).await
}

/// The body of a route anyone may call without a token (`POST /session`): what it carries is
/// small, so it is held to [`UNAUTHENTICATED_BODY_BYTES`] and a quarter of the body deadline.
pub async fn read_unauthenticated(
    state: &AppState,
    payload: web::Payload,
) -> Result<Bytes, ApiError> {
    let limit = UNAUTHENTICATED_BODY_BYTES.min(state.rt.settings.max_body_bytes);
    read_within(payload, limit, state.rt.settings.body_timeout / 4).await
}

/// Largest body of a route that needs no token.
pub const UNAUTHENTICATED_BODY_BYTES: usize = 4096;

async fn read_within(
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let whole = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::TooLarge(format!(
                    "request body larger than {limit} bytes (--max-body-bytes; 4096 for \
                     POST /session)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(timeout, whole).await.map_err(|_| {
        ApiError::BodyTimeout(format!(
            "the request body did not arrive whole within {} ms (--body-timeout-ms; a quarter \
             of it for POST /session); the connection is closed",
            timeout.as_millis()
        ))
    })?
}
