//! One JSON error type for the whole API: `{"error": CODE, "message": TEXT}`, its codes and
//! statuses from the one table in `error/codes.rs`.
//! Causes are logged; only the message meant for the client is sent.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

pub use self::codes::Code;
use crate::actors::messages::ManagerError;

mod codes;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    StaleIncarnation(String),
    #[error("{0}")]
    TooLarge(String),
    /// The body did not arrive within `--body-timeout-ms`.
    #[error("{0}")]
    BodyTimeout(String),
    #[error("{0}")]
    AtLimit(String),
    /// The database stayed locked past its busy timeout (a long checkpoint of the WAL on a
    /// loaded disk): nothing was changed, the client may retry.
    #[error("the server is busy: the database stayed locked; nothing was changed, retry")]
    Busy,
    /// The history cannot be written (a full or failing disk under the data dir).
    #[error("{0}")]
    StorageUnavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

// Documented as the `ApiError` schema, its `error` as the enum of the table's codes.
/// Every error: `{"error": CODE, "message": TEXT}`.
#[derive(Serialize, ToSchema)]
#[schema(as = ApiError)]
pub struct ErrorBody {
    #[schema(inline)]
    error: Code,
    /// What went wrong, for a person.
    message: String,
}

impl ErrorBody {
    fn new(error: Code, message: String) -> Self {
        ErrorBody { error, message }
    }
}

impl ApiError {
    pub fn code(&self) -> Code {
        match self {
            ApiError::BadRequest(_) => Code::BadRequest,
            ApiError::InvalidJson(_) => Code::InvalidJson,
            ApiError::InvalidSpec(_) => Code::InvalidSpec,
            ApiError::Unauthorized(_) => Code::Unauthorized,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Conflict(_) => Code::Conflict,
            ApiError::StaleIncarnation(_) => Code::StaleIncarnation,
            ApiError::TooLarge(_) => Code::PayloadTooLarge,
            ApiError::BodyTimeout(_) => Code::BodyTimeout,
            ApiError::AtLimit(_) => Code::LimitReached,
            ApiError::Busy => Code::Busy,
            ApiError::StorageUnavailable(_) => Code::StorageUnavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// New work refused because the history cannot be written.
    pub fn storage_unavailable(reason: &str) -> Self {
        ApiError::StorageUnavailable(format!(
            "the server cannot record history now ({reason}); new jobs are refused until it \
             can: free space in the data dir (running jobs go on and are recorded once it can)"
        ))
    }

    pub fn job_not_found(id: impl std::fmt::Display) -> Self {
        ApiError::NotFound(format!("no job with id {id}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code().status()
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = ?cause, "internal error");
        }
        let mut res = HttpResponse::build(self.status_code());
        match self {
            ApiError::Busy => {
                tracing::warn!("database busy: answered 503");
                res.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::StorageUnavailable(_) => {
                res.insert_header((header::RETRY_AFTER, "5"));
            }
            // The rest of the body may still be on its way: do not wait for it.
            ApiError::BodyTimeout(_) | ApiError::TooLarge(_) => {
                res.force_close();
            }
            _ => {}
        }
        res.json(ErrorBody::new(self.code(), self.to_string()))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_busy(&e) {
            return ApiError::Busy;
        }
        if crate::store::is_storage_fault(&e) {
            return ApiError::storage_unavailable(&e.to_string());
        }
        ApiError::Internal(e.into())
    }
}

/// SQLite's "database is locked" (past the busy timeout) or no free pooled connection.
fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            matches!(code & 0xff, 5 | 6)
        }
        _ => false,
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::NotFound(id) => ApiError::job_not_found(id),
            ManagerError::Running(_) => ApiError::Conflict(e.to_string()),
            ManagerError::AtLimit(why) => ApiError::AtLimit(why),
            ManagerError::Internal(e) => match e.downcast_ref::<sqlx::Error>() {
                Some(db) if is_busy(db) => ApiError::Busy,
                Some(db) if crate::store::is_storage_fault(db) => {
                    ApiError::storage_unavailable(&db.to_string())
                }
                _ => ApiError::Internal(e),
            },
        }
    }
}

/// Parses a JSON body; an empty body reads as `{}` when `empty_ok`.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    empty_ok: bool,
) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        if !empty_ok {
            return Err(ApiError::InvalidJson(
                "request body is empty; send a JSON object".into(),
            ));
        }
        b"{}".as_slice()
    } else {
        body
    };
    // serde_json keeps the last of duplicate keys; a body that says two things is refused.
    serde_json::from_slice::<UniqueKeys>(body)
        .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))?;
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))?;
    integral_floats_as_integers(&mut value);
    serde_json::from_value(value)
        .map_err(|e| ApiError::InvalidJson(format!("invalid JSON body: {e}")))
}

/// Any JSON document, refused when an object in it names a key twice.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// JSON has one number type: `3.0` is the integer 3 (as JSON Schema says, and as clients that
/// write every number as a float send it). Whole numbers written with a fraction become
/// integers; they still deserialize into float fields.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Strictly inside the i64 range: every such whole f64 converts exactly.
            if f.fract() == 0.0 && f > -9.2e18 && f < 9.2e18 {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// 405 for a known path with a method it does not serve, naming the ones it does.
pub fn method_not_allowed(allow: &'static str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, allow))
        .json(ErrorBody::new(
            Code::MethodNotAllowed,
            format!("method not allowed on this route; allowed: {allow}"),
        ))
}

/// Turns every error response that is not JSON yet (actix's own: unknown route, wrong method,
/// payload too large, bad query string) into `{error, message}`.
pub fn json_errors<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let code = Code::of_framework_error(status);
    let message = match status {
        StatusCode::NOT_FOUND => "no such route".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_string(),
        s => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let body = serde_json::to_string(&ErrorBody::new(code, message)).unwrap_or_default();
    let (req, res) = res.into_parts();
    let mut res = res.set_body(BoxBody::new(body));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, res).map_into_right_body(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Body {
        step: u64,
        lr: f64,
        values: Vec<f64>,
    }

    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let b: Body = parse_json(
            br#"{"step": 558.0, "lr": 2.0, "values": [1.0, 0.5]}"#,
            false,
        )
        .expect("parses");
        assert_eq!(
            b,
            Body {
                step: 558,
                lr: 2.0,
                values: vec![1.0, 0.5]
            }
        );
        for bad in [
            r#"{"step": 1.5, "lr": 1, "values": []}"#,
            r#"{"step": -1.0, "lr": 1, "values": []}"#,
        ] {
            assert!(parse_json::<Body>(bad.as_bytes(), false).is_err(), "{bad}");
        }
        let big: serde_json::Value = parse_json(b"[1e300, -0.0, 9.3e18]", false).unwrap();
        assert_eq!(big, serde_json::json!([1e300, 0, 9.3e18]));
    }
}
