//! The one table of the API's error codes: each code once, with its HTTP status and what it
//! means. The responses (`ApiError::code`, its status), the OpenAPI document (the `error` field
//! of `ApiError` is the enum of these codes, each described) and the README's table of codes
//! all come from it; `readme_lists_every_code` fails when the README drifts.

use actix_web::http::StatusCode;
use serde::{Serialize, Serializer};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};

/// Declares `Code` from rows of `Variant = STATUS, "code", "meaning";` (the idea of
/// meilisearch's `make_error_codes!`).
macro_rules! error_codes {
    ($($variant:ident = $status:ident, $code:literal, $meaning:literal;)+) => {
        /// A stable error code, sent as `error` in every error body.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($variant,)+
        }

        impl Code {
            /// Every code, in the table's order.
            pub const ALL: &[Code] = &[$(Code::$variant,)+];

            /// The code as sent.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $code,)+
                }
            }

            /// The HTTP status every response with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)+
                }
            }

            /// What the code means, for a person reading the docs.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Code::$variant => $meaning,)+
                }
            }
        }
    };
}

error_codes! {
    BadRequest = BAD_REQUEST, "bad_request",
        "A malformed request: an unknown or bad query parameter, a bad `Last-Event-ID`, or a \
         value the route cannot use (a purge `job_ids` entry that is not a UUID)";
    InvalidJson = BAD_REQUEST, "invalid_json",
        "The body is not JSON of the expected shape: malformed, an unknown field, a wrong type";
    Unauthorized = UNAUTHORIZED, "unauthorized",
        "The server has an API token and the request carries neither it nor the session \
         cookie, or a worker route got a token not valid for that job, rank and incarnation";
    NotFound = NOT_FOUND, "not_found", "No such job or route (job ids are UUIDs)";
    MethodNotAllowed = METHOD_NOT_ALLOWED, "method_not_allowed",
        "The route does not serve this method; the `Allow` header names those it does";
    Conflict = CONFLICT, "conflict", "The job's state forbids it (deleting a running job)";
    StaleIncarnation = CONFLICT, "stale_incarnation",
        "A worker call from an incarnation that has been replaced, or of a job that has \
         ended: the worker must exit";
    BodyTimeout = REQUEST_TIMEOUT, "body_timeout",
        "The request body did not arrive whole within `--body-timeout-ms` (10 s); the \
         connection is closed";
    PayloadTooLarge = PAYLOAD_TOO_LARGE, "payload_too_large",
        "The body is larger than `--max-body-bytes` (1 MiB)";
    UnsupportedMediaType = UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
        "The body's content type is not one the route reads";
    InvalidSpec = UNPROCESSABLE_ENTITY, "invalid_spec",
        "The job spec is refused (a value out of range, an empty command, a reserved env \
         name, a path outside the allowed roots); the message names the field";
    LimitReached = TOO_MANY_REQUESTS, "limit_reached",
        "At `--max-jobs`, `--max-workers` or `--max-sse-subscribers`; nothing was changed";
    Internal = INTERNAL_SERVER_ERROR, "internal",
        "A fault of the server; the cause is in its log, never in the answer";
    StorageUnavailable = SERVICE_UNAVAILABLE, "storage_unavailable",
        "The history cannot be written now (the data dir's disk is full or failing): new jobs \
         are refused until it can, running jobs go on and catch up by themselves; the message \
         gives the storage error. Nothing was changed; retry after `Retry-After` (5 s)";
    Busy = SERVICE_UNAVAILABLE, "busy",
        "SQLite stayed locked past its 30 s busy timeout (a loaded disk); nothing was \
         changed, retry after `Retry-After` (1 s)";
}

impl Code {
    /// The code of an error response actix made itself (unknown route, bad query string,
    /// payload too large, ...): the code of that status in the table where one is meant for
    /// it, else `bad_request` for a 4xx and `internal` for anything else.
    pub fn of_framework_error(status: StatusCode) -> Code {
        [
            Code::NotFound,
            Code::MethodNotAllowed,
            Code::PayloadTooLarge,
            Code::UnsupportedMediaType,
        ]
        .into_iter()
        .find(|code| code.status() == status)
        .unwrap_or(if status.is_client_error() {
            Code::BadRequest
        } else {
            Code::Internal
        })
    }

    /// The README's table of error codes, as the README must show it.
    pub fn markdown_table() -> String {
        let mut table = String::from("| status | code | meaning |\n|---|---|---|\n");
        for code in Code::ALL {
            table += &format!(
                "| {} | `{}` | {} |\n",
                code.status().as_u16(),
                code.as_str(),
                code.meaning()
            );
        }
        table
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl utoipa::PartialSchema for Code {
    /// A string enum of every code, described code by code with its status.
    fn schema() -> RefOr<Schema> {
        let mut description = String::from("A stable code:\n");
        for code in Code::ALL {
            description += &format!(
                "- `{}` ({}): {}\n",
                code.as_str(),
                code.status().as_u16(),
                code.meaning()
            );
        }
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(Code::ALL.iter().map(|c| c.as_str())))
            .description(Some(description))
            .examples([Code::NotFound.as_str()])
            .into()
    }
}

impl utoipa::ToSchema for Code {
    fn name() -> std::borrow::Cow<'static, str> {
        "ErrorCode".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{} twice", code.as_str());
            assert!(
                code.status().is_client_error() || code.status().is_server_error(),
                "{code:?}"
            );
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
        for (status, code) in [
            (StatusCode::NOT_FOUND, "not_found"),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            (StatusCode::BAD_REQUEST, "bad_request"),
            (StatusCode::URI_TOO_LONG, "bad_request"),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            (StatusCode::SERVICE_UNAVAILABLE, "internal"),
        ] {
            assert_eq!(Code::of_framework_error(status).as_str(), code, "{status}");
        }
    }

    /// The README's "Errors" table is this table; on drift, paste the expected text.
    #[test]
    fn readme_lists_every_code() {
        let readme = include_str!("../../../README.md");
        let expected = Code::markdown_table();
        let header = expected.lines().next().unwrap();
        let start = readme
            .find(header)
            .expect("README.md has a table of error codes");
        let end = readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |n| start + n + 1);
        assert!(
            readme[start..end] == expected,
            "README.md's table of error codes differs from src/api/error/codes.rs; it should \
             read:\n\n{expected}"
        );
    }
}
