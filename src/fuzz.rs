//! Seeded random JSON for the property tests of the spec and manifest parsers and for the
//! random-body test of the HTTP routes: one generator, so both probe the same corners.

use std::sync::LazyLock;

use serde_json::{Value, json};
use utoipa::PartialSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use crate::spec::JobRequest;
use crate::trainer::rng::SplitMix64;

/// Every field of the job spec, as `JobRequest`'s schema lists them (a field added to the
/// request is fuzzed with no list to update), plus one that does not exist.
pub static SPEC_FIELDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let RefOr::T(Schema::Object(request)) = JobRequest::schema() else {
        panic!("JobRequest's schema is an object");
    };
    // Leaked once per process, so the list reads like a `&[&str]`.
    let fields = request.properties.into_keys().map(|field| &*field.leak());
    fields.chain(["unknown"]).collect()
});

/// Strings that mean something somewhere: enum values, reserved and invalid env names, NUL,
/// path tricks, URLs.
const STRINGS: &[&str] = &[
    "",
    "worker",
    "job",
    "none",
    "allreduce",
    "RANK",
    "A-B",
    "x\u{0}y",
    "s3://b/k",
    "/tmp/x",
    "../../etc",
];

/// A random JSON value: nulls, booleans, small and extreme numbers, meaningful strings, and
/// (up to `max_depth`) arrays and objects with env-like keys.
pub fn random_json(rng: &mut SplitMix64, depth: u32, max_depth: u32) -> Value {
    match rng.below(if depth >= max_depth { 8 } else { 10 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.below(4000) as i64 - 2000),
        3 => json!((rng.next_f64() - 0.5) * 10f64.powi(rng.below(12) as i32)),
        4 => json!(i64::MIN + rng.below(3) as i64),
        5 => json!(u64::MAX - rng.below(3)),
        6 => json!(STRINGS[rng.below(STRINGS.len() as u64) as usize]),
        7 => json!([f64::MAX, -1e308][rng.below(2) as usize]),
        8 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth + 1, max_depth))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                let key = ["X", "RANK", "1A", "PATH", "k0"][rng.below(5) as usize];
                m.insert(key.into(), random_json(rng, depth + 1, max_depth));
            }
            Value::Object(m)
        }
    }
}
