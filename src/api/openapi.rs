//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated at compile time from
//! the handlers' `#[utoipa::path]` annotations and the `ToSchema` derives of the types they take
//! and return. It is open like `/health` (it holds no data, and clients and fuzzers read it
//! before they authenticate). No UI is bundled: any OpenAPI viewer can load the document.

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::{Code, ErrorBody};
use super::{
    AppState, auth, events, health, incidents, jobs, logs, metrics, notice, page, workers,
};
use crate::config::JobDefaults;

/// This document. Open like `/health`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "server",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        content_type = "application/json", body = Object))
)]
pub async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(document(&state.rt.settings.job_defaults))
}

/// utoipa marks unsigned integers with formats no tool knows (`u-int32`, `u-int64`): state
/// their range instead, which is what the server checks when it parses them.
fn unsigned_bounds(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let max = match map.get("format").and_then(Value::as_str) {
                Some("u-int32") => Some(json!(u32::MAX)),
                Some("u-int64") => Some(json!(u64::MAX)),
                _ => None,
            };
            if let Some(max) = max {
                map.remove("format");
                map.insert("minimum".into(), json!(0));
                map.insert("maximum".into(), max);
            }
            map.values_mut().for_each(unsigned_bounds);
        }
        Value::Array(items) => items.iter_mut().for_each(unsigned_bounds),
        _ => {}
    }
}

/// Bounds of the job spec's numeric fields, as `JobRequest::resolve` checks them
/// (`spec_bounds_match_resolve` keeps the two in step).
const SPEC_BOUNDS: &[(&str, f64, Option<f64>)] = &[
    ("checkpoint_every", 1.0, None),
    ("keep_last", 1.0, Some(1e6)),
    ("total_steps", 1.0, None),
    ("epochs", 1.0, Some(1e6)),
    ("heartbeat_timeout_s", 0.01, Some(86_400.0)),
    ("max_restarts", 0.0, Some(1e6)),
    ("backoff_initial_ms", 0.0, Some(3_600_000.0)),
    ("backoff_multiplier", 1.0, Some(100.0)),
    ("backoff_max_ms", 0.0, Some(3_600_000.0)),
    ("backoff_jitter", 0.0, Some(1.0)),
    ("backoff_reset_s", 0.0, Some(2_592_000.0)),
    ("crash_loop_after", 0.0, Some(1e6)),
    ("straggler_fraction", 0.01, Some(0.99)),
    ("straggler_window_s", 1.0, Some(86_400.0)),
    ("save_grace_s", 0.0, Some(3600.0)),
    ("batch_size", 1.0, Some(1e6)),
    ("lr", 0.0, Some(1e6)),
    ("seed", 0.0, None),
    ("sleep_sec", 0.0, Some(3600.0)),
];

/// The document as served: generated from the handlers, plus the bounds this server checks on
/// a job spec (some depend on its settings, like `--max-world-size`). Rules across fields
/// (`backoff_max_ms >= backoff_initial_ms`, not both `epochs` and `total_steps`, paths inside
/// the allowed roots) are stated in `JobRequest`'s description.
pub fn document(defaults: &JobDefaults) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    unsigned_bounds(&mut doc);
    if let Some(schema) = doc.pointer_mut("/components/schemas/JobRequest") {
        schema["description"] = json!(
            "The request body of `POST /jobs`. Every field but `world_size` is optional; \
             unknown fields are refused. Besides each field's bounds, the server checks: \
             `backoff_max_ms` >= `backoff_initial_ms`; `epochs` or `total_steps`, not both; \
             `dataset` and `checkpoint_dir` inside an allowed root when the server has them \
             (`--allowed-root`). A refused spec gets 422 with a message naming the field."
        );
        schema["examples"] = json!([
            {"world_size": 2, "name": "demo", "total_steps": 200, "checkpoint_every": 20},
            {"world_size": 2, "command": ["python", "train.py"], "env": {"LR": "0.1"},
             "restart_scope": "worker", "max_restarts": 3},
        ]);
    }
    let Some(props) = doc
        .pointer_mut("/components/schemas/JobRequest/properties")
        .and_then(Value::as_object_mut)
    else {
        return doc;
    };
    let mut set = |field: &str, rules: Value| {
        if let (Some(Value::Object(schema)), Value::Object(rules)) = (props.get_mut(field), rules) {
            schema.extend(rules);
        }
    };
    set(
        "world_size",
        json!({"minimum": 1, "maximum": defaults.max_world_size}),
    );
    for &(field, min, max) in SPEC_BOUNDS {
        set(field, json!({ "minimum": min }));
        match max {
            Some(max) => set(field, json!({ "maximum": max })),
            // The integers without an upper bound are i64 on the wire.
            None => set(field, json!({ "maximum": i64::MAX })),
        }
    }
    let no_nul = "^[^\\x00]*$";
    set("name", json!({"maxLength": 200}));
    set(
        "command",
        json!({
            "minItems": 1,
            "prefixItems": [{"type": "string", "minLength": 1}],
            "items": {"type": "string", "pattern": no_nul},
            "description": "argv of each rank; absent means the built-in trainer",
        }),
    );
    set(
        "env",
        json!({
            "propertyNames": {
                "type": "string",
                "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                "not": {"enum": crate::domain::worker_env::reserved_names()},
            },
            "additionalProperties": {"type": "string", "pattern": no_nul},
            "description": "Extra environment of every rank; the names trainvisor sets are reserved",
        }),
    );
    for field in ["dataset", "checkpoint_dir"] {
        set(
            field,
            json!({"minLength": 1, "pattern": no_nul,
                "description": "A local path (inside an allowed root when the server has them)"}),
        );
    }
    doc
}

/// Responses that whole classes of routes share, added where a handler did not describe them:
/// 401 on the admin routes, 400 for a bad query string, 400 and 413 for a body.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let admin = op.security.is_none();
                let has_query = op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == ParameterIn::Query));
                let has_body = op.request_body.is_some();
                let mut add = |code: Code| {
                    op.responses
                        .responses
                        .entry(code.status().as_str().to_string())
                        .or_insert_with(|| error_response(code.meaning()));
                };
                if admin {
                    add(Code::Unauthorized);
                }
                if has_query {
                    add(Code::BadRequest);
                }
                if has_body {
                    add(Code::InvalidJson);
                    add(Code::BodyTimeout);
                    add(Code::PayloadTooLarge);
                }
            }
        }
    }
}

/// An optional body (`Option<T>` in a `request_body`) is generated as `T | null`; the routes
/// mean "may be empty", not "may be the JSON `null`": keep `T` and `required: false`.
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.post].into_iter().flatten() {
                let Some(RefOr::T(body)) = &mut op.request_body else {
                    continue;
                };
                for content in body.content.values_mut() {
                    let RefOr::T(content) = content else { continue };
                    if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema
                        && one_of.items.len() == 2
                        && let Some(inner) = one_of.items.iter().find(|i| !is_null(i))
                    {
                        content.schema = Some(inner.clone());
                    }
                }
            }
        }
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::Object(o))
        if o.schema_type == SchemaType::Type(Type::Null))
}

/// Links from `POST /jobs` (its `job_id`) to every admin operation on `/jobs/{job_id}...`, so
/// clients and fuzzers (schemathesis' stateful phase) can follow a job through its life.
struct JobLinks;

impl Modify for JobLinks {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut links = Vec::new();
        for (path, item) in &openapi.paths.paths {
            if !path.contains("{job_id}") || path.contains("{rank}") {
                continue;
            }
            for (method, op) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("DELETE", &item.delete),
            ] {
                if let Some(id) = op.as_ref().and_then(|op| op.operation_id.clone()) {
                    links.push((format!("{method} {path}"), id));
                }
            }
        }
        let created = openapi
            .paths
            .paths
            .get_mut("/jobs")
            .and_then(|item| item.post.as_mut())
            .and_then(|op| op.responses.responses.get_mut("201"));
        if let Some(RefOr::T(created)) = created {
            for (name, operation_id) in links {
                let link = LinkBuilder::new()
                    .operation_id(operation_id)
                    .parameter("job_id", "$response.body#/job_id")
                    .build();
                created.links.insert(name, RefOr::T(link));
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ApiError"))),
            )
            .build(),
    )
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut admin = Http::new(HttpAuthScheme::Bearer);
        admin.description = Some(
            "The server's API token (`--api-token`, `TRAINVISOR_API_TOKEN`). Needed only when \
             the server has one; every route but `/health`, `/ready`, `/openapi.json`, the page, \
             `POST /session` and the worker routes then requires it (or the session cookie)."
                .into(),
        );
        components.add_security_scheme("api_token", SecurityScheme::Http(admin));
        components.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                auth::SESSION_COOKIE,
                "Set by `POST /session`: how the browser page and its EventSource streams \
                 (which cannot send headers) authenticate.",
            ))),
        );
        let mut worker = Http::new(HttpAuthScheme::Bearer);
        worker.description = Some(
            "A rank's own token (`TRAINVISOR_TOKEN` in its environment): valid only for its \
             job, rank and incarnation, and never for the admin API."
                .into(),
        );
        components.add_security_scheme("worker_token", SecurityScheme::Http(worker));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "trainvisor",
        description = "Fault-tolerant runtime for distributed training jobs. Errors are always \
            JSON `{error, message}` (schema `ApiError`). With an API token configured, the admin \
            routes need `Authorization: Bearer <token>` or the session cookie."
    ),
    paths(
        page::index,
        page::file,
        health::health,
        health::ready,
        openapi_json,
        auth::session,
        metrics::metrics,
        events::events,
        jobs::list,
        jobs::create,
        jobs::summaries,
        jobs::purge,
        jobs::get,
        jobs::delete,
        jobs::summary,
        jobs::workers,
        jobs::restarts,
        incidents::incidents,
        incidents::progress,
        jobs::excluded_nodes,
        notice::stop,
        notice::checkpoint,
        logs::tail,
        logs::stream,
        jobs::checkpoints,
        jobs::model,
        workers::heartbeat,
        workers::allreduce,
        workers::checkpoint,
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes, &CommonResponses, &OptionalBodies, &JobLinks),
    security(("api_token" = []), ("session_cookie" = [])),
    tags(
        (name = "jobs", description = "Create, inspect, stop and delete jobs"),
        (name = "logs", description = "Job logs: JSON tail and SSE stream"),
        (name = "workers", description = "Called by the ranks themselves, with their worker token"),
        (name = "server", description = "Health, metrics, events, authentication, the page"),
    )
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests;
