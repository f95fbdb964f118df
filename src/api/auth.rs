//! API authentication. With an API token configured (`--api-token`), every route but
//! `/health`, `/ready`, `/openapi.json`, the page's own files, `POST /session` and the worker routes
//! (which take their incarnation's token) needs either `Authorization: Bearer <api token>` or the session cookie
//! that `POST /session` sets. The cookie is how the page and its EventSource streams (which
//! cannot set headers) authenticate: HttpOnly, SameSite=Strict, holding the time it was issued
//! and a digest of that time and the token, never the token itself. It expires after
//! `Settings::session_ttl` (12 h; and says so in `Max-Age`), and a new token invalidates every cookie issued
//! for the old one.

use actix_web::body::MessageBody;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::error::{ErrorBody, parse_json};
use super::workers::bearer;
use super::{ApiError, AppState};
use crate::actors::hash_token;

pub const SESSION_COOKIE: &str = "trainvisor_session";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The cookie value for a token issued at `issued` (Unix seconds): `<issued>.<digest>`, so a
/// leaked cookie reveals neither the token nor a way to extend its life.
fn session_value(token: &str, issued: u64) -> String {
    let digest = hash_token(&format!("trainvisor-session:{issued}:{token}"));
    format!("{issued}.{digest}")
}

/// Whether a cookie value was issued for `token` less than `ttl` ago.
fn session_valid(value: &str, token: &str, now: u64, ttl: std::time::Duration) -> bool {
    let Some(issued) = value
        .split_once('.')
        .and_then(|(t, _)| t.parse::<u64>().ok())
    else {
        return false;
    };
    issued <= now && now - issued < ttl.as_secs() && same(value, &session_value(token, issued))
}

/// Constant-time comparison of two digests.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn is_open(path: &str) -> bool {
    if matches!(
        path,
        "/" | "/health" | "/ready" | "/openapi.json" | "/session"
    ) || path.starts_with("/static/")
    {
        return true;
    }
    // /jobs/{id}/workers/{rank}/{heartbeat|allreduce|checkpoint}: worker tokens.
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    parts.len() == 5
        && parts[0] == "jobs"
        && parts[2] == "workers"
        && matches!(parts[4], "heartbeat" | "allreduce" | "checkpoint")
}

pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let settings = req
        .app_data::<web::Data<AppState>>()
        .map(|s| (s.rt.settings.api_token.clone(), s.rt.settings.session_ttl));
    let Some((Some(token), ttl)) = settings else {
        return next.call(req).await;
    };
    if is_open(req.path()) {
        return next.call(req).await;
    }
    let by_header =
        bearer(req.request()).is_some_and(|t| same(&hash_token(t), &hash_token(&token)));
    let by_cookie = req
        .cookie(SESSION_COOKIE)
        .is_some_and(|c| session_valid(c.value(), &token, unix_now(), ttl));
    if by_header || by_cookie {
        return next.call(req).await;
    }
    Err(ApiError::Unauthorized(
        "this server needs its API token: send Authorization: Bearer $TRAINVISOR_API_TOKEN (or sign in on the page)".into(),
    )
    .into())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The server's API token.
    token: String,
}

/// How the caller is now authenticated.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the `json!` reply.
pub struct SessionReply {
    /// `none` (the server has no API token) or `session` (the cookie was set).
    #[schema(example = "session")]
    auth: String,
}

/// `POST /session {"token": ...}`: sets the session cookie when the token is right.
#[utoipa::path(
    post,
    path = "/session",
    operation_id = "session",
    tag = "server",
    security(()),
    request_body = SessionRequest,
    responses(
        (status = 200, description = "Signed in: the `trainvisor_session` cookie is set (HttpOnly, \
            SameSite=Strict). `auth` is `none` when the server has no API token", body = SessionReply),
        (status = 400, description = "Not a JSON object with a `token` string", body = ErrorBody),
        (status = 401, description = "Wrong API token", body = ErrorBody),
        (status = 413, description = "Body larger than 4096 bytes", body = ErrorBody),
    )
)]
pub async fn session(
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = super::body::read_unauthenticated(&state, body).await?;
    let request: SessionRequest = parse_json(&body, false)?;
    let Some(token) = state.rt.settings.api_token.as_deref() else {
        return Ok(HttpResponse::Ok().json(serde_json::json!({"auth": "none"})));
    };
    if !same(&hash_token(&request.token), &hash_token(token)) {
        return Err(ApiError::Unauthorized("wrong API token".into()));
    }
    let ttl = state.rt.settings.session_ttl;
    let cookie = Cookie::build(SESSION_COOKIE, session_value(token, unix_now()))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::seconds(
            ttl.as_secs() as i64
        ))
        .finish();
    Ok(HttpResponse::Ok()
        .cookie(cookie)
        .json(serde_json::json!({"auth": "session"})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_worker_routes_and_the_page_are_open() {
        assert!(is_open("/health"));
        assert!(is_open("/ready"));
        assert!(is_open("/openapi.json"));
        assert!(is_open("/static/app.js"));
        assert!(is_open("/jobs/abc/workers/0/heartbeat"));
        assert!(!is_open("/jobs/abc/workers"));
        assert!(!is_open("/jobs"));
        assert!(!is_open("/jobs/abc/workers/0/heartbeat/x"));
        assert!(!is_open("/events"));
    }

    #[test]
    fn session_cookies_expire_and_belong_to_one_token() {
        let ttl = std::time::Duration::from_secs(100);
        let v = session_value("token-one", 1000);
        assert!(session_valid(&v, "token-one", 1000, ttl));
        assert!(session_valid(&v, "token-one", 1099, ttl));
        assert!(!session_valid(&v, "token-one", 1100, ttl), "expired");
        assert!(
            !session_valid(&v, "token-one", 999, ttl),
            "issued in the future"
        );
        assert!(!session_valid(&v, "token-two", 1000, ttl), "another token");
        let (_, digest) = v.split_once('.').unwrap();
        let extended = format!("1050.{digest}");
        assert!(
            !session_valid(&extended, "token-one", 1060, ttl),
            "the time cannot be changed"
        );
        assert!(!session_valid("garbage", "token-one", 1000, ttl));
    }
}
