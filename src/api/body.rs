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
pub async fn read(state: &AppState, mut payload: web::Payload) -> Result<Bytes, ApiError> {
    let limit = state.rt.settings.max_body_bytes;
    let timeout = state.rt.settings.body_timeout;
    let whole = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::TooLarge(format!(
                    "request body larger than {limit} bytes (--max-body-bytes)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(timeout, whole).await.map_err(|_| {
        ApiError::BodyTimeout(format!(
            "the request body did not arrive whole within {} ms (--body-timeout-ms); the \
             connection is closed",
            timeout.as_millis()
        ))
    })?
}
