//! Checks of the OpenAPI document against what the server does and what the docs say: every
//! route documented, the spec's bounds as `resolve` checks them, the error codes and the spec
//! fields as the README lists them.

use super::*;
use crate::spec::JobRequest;

fn resolves(defaults: &JobDefaults, field: &str, value: f64) -> bool {
    let mut body = json!({"world_size": 1});
    // backoff_initial_ms may not exceed backoff_max_ms: test each bound on its own.
    match field {
        "backoff_initial_ms" => body["backoff_max_ms"] = json!(3_600_000),
        "backoff_max_ms" => body["backoff_initial_ms"] = json!(0),
        _ => {}
    }
    body[field] = json!(value);
    let body = serde_json::to_vec(&body).unwrap();
    let request: JobRequest = match super::super::error::parse_json(&body, false) {
        Ok(r) => r,
        Err(_) => return false,
    };
    request.resolve(defaults).is_ok()
}

/// `(METHOD, path)` of every route `api::routes` registers, read from its source: each
/// `resource(path, allow)` with the methods chained on it, which must equal `allow`.
fn routes_in_mod_rs() -> std::collections::BTreeSet<(String, String)> {
    let src = include_str!("../mod.rs");
    let body = &src[src.find("pub fn routes(").expect("routes() in mod.rs")..];
    let mut routes = std::collections::BTreeSet::new();
    for chunk in body.split("resource(\"").skip(1) {
        let (path, rest) = chunk.split_once('"').unwrap();
        let allow = rest.split('"').nth(1).unwrap();
        let chained = rest.split(".service(").next().unwrap();
        let mut methods: Vec<String> = ["get", "post", "delete", "put", "patch"]
            .iter()
            .filter(|m| chained.contains(&format!(".{m}(")))
            .map(|m| m.to_uppercase())
            .collect();
        methods.sort();
        let mut allowed: Vec<String> = allow.split(", ").map(str::to_string).collect();
        allowed.sort();
        assert_eq!(
            methods, allowed,
            "{path}: Allow header vs registered methods"
        );
        for m in methods {
            routes.insert((m, path.to_string()));
        }
    }
    routes
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let doc = document(&JobDefaults::for_data_dir(std::path::Path::new("/data")));
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
            // Every operation says what it answers, and every error is an ApiError.
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{method} {path}"
            );
            for (code, res) in responses {
                if !code.starts_with('2') {
                    assert!(
                        Code::ALL.iter().any(|c| c.status().as_str() == code),
                        "{method} {path} documents {code}, which no error code has"
                    );
                    assert_eq!(
                        res["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ApiError",
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }
    let ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .map(|op| op["operationId"].as_str().expect("an operationId"))
        .collect();
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "operationIds repeat: {ids:?}");
    let served = routes_in_mod_rs();
    assert!(served.len() >= 24, "parsed only {served:?}");
    assert_eq!(documented, served);
    // References resolve.
    let text = doc.to_string();
    for name in text.split("#/components/schemas/").skip(1) {
        let name = name.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "dangling $ref {name}"
        );
    }
    // The error codes are the table's.
    let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    let error = &doc["components"]["schemas"]["ApiError"]["properties"]["error"];
    assert_eq!(error["enum"], json!(codes), "{error}");
    assert!(
        error["description"]
            .as_str()
            .unwrap()
            .contains("`busy` (503)")
    );
    for scheme in ["api_token", "worker_token", "session_cookie"] {
        assert!(doc["components"]["securitySchemes"].get(scheme).is_some());
    }
}

/// The document depends on the handlers, never the other way: shared schemas and
/// parameters live in `schema.rs`, so only the routing in `mod.rs` names this module.
#[test]
fn only_the_routing_imports_openapi() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.ends_with(".rs") || name == "openapi.rs" || name == "mod.rs" {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for import in ["super::openapi", "api::openapi"] {
            assert!(!src.contains(import), "{name} imports openapi");
        }
    }
}

#[test]
fn spec_bounds_match_resolve() {
    let defaults = JobDefaults::for_data_dir(std::path::Path::new("/data"));
    for &(field, min, max) in SPEC_BOUNDS {
        assert!(resolves(&defaults, field, min), "{field} = {min} refused");
        let below = if min.fract() == 0.0 {
            min - 1.0
        } else {
            min / 2.0
        };
        assert!(
            !resolves(&defaults, field, below),
            "{field} = {below} accepted"
        );
        if let Some(max) = max {
            assert!(resolves(&defaults, field, max), "{field} = {max} refused");
            let above = if max.fract() == 0.0 {
                max + 1.0
            } else {
                max * 1.5
            };
            assert!(
                !resolves(&defaults, field, above),
                "{field} = {above} accepted"
            );
        }
    }
    let doc = document(&defaults);
    let props = &doc["components"]["schemas"]["JobRequest"]["properties"];
    assert_eq!(
        props["world_size"]["maximum"],
        json!(defaults.max_world_size)
    );
    // `document` skips a field the request does not have: a renamed field would lose its
    // rules silently.
    for &(field, min, _) in SPEC_BOUNDS {
        assert_eq!(props[field]["minimum"], json!(min), "{field}");
    }
    for field in ["name", "command", "env", "dataset", "checkpoint_dir"] {
        assert!(props[field].is_object(), "{field} is not in JobRequest");
    }
}

/// The README's spec tables (every `| field ...` table: the job spec and the Slurm
/// options) name each field of `JobRequest` once, and nothing else.
#[test]
fn readme_documents_every_spec_field() {
    let doc = document(&JobDefaults::for_data_dir(std::path::Path::new("/data")));
    let fields: std::collections::BTreeSet<&str> =
        doc["components"]["schemas"]["JobRequest"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
    let mut documented = Vec::new();
    let mut in_spec_table = false;
    for line in include_str!("../../../README.md").lines() {
        if line.starts_with("| field") {
            in_spec_table = true;
        } else if !line.starts_with('|') {
            in_spec_table = false;
        } else if in_spec_table {
            let first_column = line.split('|').nth(1).unwrap_or_default();
            documented.extend(first_column.split('`').skip(1).step_by(2));
        }
    }
    let unique: std::collections::BTreeSet<&str> = documented.iter().copied().collect();
    assert_eq!(
        unique.len(),
        documented.len(),
        "a field twice: {documented:?}"
    );
    let missing: Vec<_> = fields.difference(&unique).collect();
    let unknown: Vec<_> = unique.difference(&fields).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README.md's spec tables lack {missing:?} and name {unknown:?}, which JobRequest has not"
    );
    // The page's form (`FIELD_INPUT` in app.js: field -> input) sends a few of them.
    let app = include_str!("../../../static/app.js");
    let form = app
        .split("const FIELD_INPUT = {")
        .nth(1)
        .and_then(|rest| rest.split("};").next())
        .expect("FIELD_INPUT in static/app.js");
    for entry in form.split(',').filter(|e| e.contains(':')) {
        let field = entry.split(':').next().unwrap().trim();
        assert!(fields.contains(field), "the page's form sends {field:?}");
    }
}
