//! `trainvisor status`'s account of a job's failures: its goodput line and one row per
//! incident, with each recovery phase as seconds after the failure was detected.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::output::number;

/// Lines of each rank's stacks printed (the API has them all).
const STACK_LINES: usize = 12;

/// `goodput 0.93  (wall 61.0 s, recovering 2.4 s of which backoff 0.2 s, 15 steps redone)`;
/// an estimate (steps lost unknown) reads `goodput ≤ 0.930 (estimate: …)`.
pub fn describe_goodput(g: &Value) -> Option<String> {
    let goodput = g["goodput"].as_f64()?;
    let secs = |k: &str| g[k].as_f64().unwrap_or(0.0);
    let estimate = g["estimate"] == true;
    Some(format!(
        "goodput {}{goodput:.3}  (wall {} s, recovering {} s of which backoff {} s, {}, {}){}",
        if estimate { "≤ " } else { "" },
        number(secs("wall_s"), 1),
        number(secs("recovering_s"), 1),
        number(secs("backoff_s"), 1),
        plural(
            g["steps_redone"].as_u64().unwrap_or(0),
            "step redone",
            "steps redone"
        ),
        plural(
            g["incidents"].as_u64().unwrap_or(0),
            "incident",
            "incidents"
        ),
        if estimate {
            "\n  estimate: steps lost unknown (the ranks reported no steps), so redone steps are \
             left out and recovery of ranks that report nothing ends 10 s after they all started"
        } else {
            ""
        },
    ))
}

/// The last save on notice: `notice (stop): saved at step 120 in 41 ms, 0 steps lost`, or
/// `notice (stop): timed_out, resumes from step 100, 30 steps lost`.
pub fn describe_notice(n: &Value) -> Option<String> {
    let cause = n["cause"].as_str()?;
    let outcome = n["outcome"].as_str().unwrap_or("?");
    let at = n["saved_at_step"]
        .as_u64()
        .map_or("step 0".to_string(), |s| format!("step {s}"));
    let lost = plural(
        n["steps_lost"].as_u64().unwrap_or(0),
        "step lost",
        "steps lost",
    );
    Some(if outcome == "saved" {
        format!(
            "notice ({cause}): saved at {at} in {} ms, {lost}",
            number(n["wait_ms"].as_f64().unwrap_or(0.0), 0)
        )
    } else {
        format!("notice ({cause}): {outcome}, resumes from {at}, {lost}")
    })
}

/// One line per incident, then its timeline:
/// `#1 rank 1 signal: killed by SIGKILL — job restart of ranks 0,1 — recovered`
/// `   detected 12:00:01.123  spawned +0.21 s  first heartbeat +0.35 s  training +1.02 s  lost 15 steps, 1.0 s`.
pub fn describe_incidents(incidents: &[Value]) -> String {
    let mut out = String::new();
    for i in incidents {
        let ranks: Vec<String> = i["ranks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r.to_string())
            .collect();
        out.push_str(&format!(
            "#{} rank {} {}: {} — {} restart of rank{} {} — {}\n",
            i["seq"],
            i["rank"],
            i["reason"].as_str().unwrap_or_default(),
            i["detail"].as_str().unwrap_or_default(),
            i["scope"].as_str().unwrap_or_default(),
            if ranks.len() == 1 { "" } else { "s" },
            ranks.join(","),
            i["end"].as_str().unwrap_or_default(),
        ));
        let detected = at(&i["detected_at"]);
        let phase = |k: &str| match (detected, at(&i[k])) {
            (Some(d), Some(t)) => format!(
                "+{} s",
                number((t - d).num_milliseconds() as f64 / 1000.0, 2)
            ),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "   detected {}  spawned {}  first heartbeat {}  training {}  lost {}, {} s\n",
            detected
                .map(|d| d.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                .unwrap_or_default(),
            phase("spawned_at"),
            phase("first_heartbeat_at"),
            phase("training_at"),
            match i["steps_lost"].as_u64() {
                Some(n) => plural(n, "step", "steps"),
                None => "unknown steps".to_string(),
            },
            number(i["seconds_lost"].as_f64().unwrap_or(0.0), 1),
        ));
        // A hung rank's incident: what every rank was doing before it was killed.
        for s in i["stacks"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "   stacks of rank {} (pid {}, {}):\n",
                s["rank"],
                s["pid"],
                s["kind"].as_str().unwrap_or_default()
            ));
            let text = s["text"].as_str().unwrap_or_default();
            for line in text.lines().take(STACK_LINES) {
                out.push_str(&format!("     {line}\n"));
            }
            let more = text.lines().count().saturating_sub(STACK_LINES);
            if more > 0 {
                out.push_str(&format!(
                    "     … {more} more lines in GET /jobs/{{id}}/incidents\n"
                ));
            }
        }
    }
    out.trim_end().to_string()
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn at(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_incident_reads_as_its_cause_then_its_phases_after_detection() {
        let text = describe_incidents(&[json!({
            "seq": 1, "rank": 1, "reason": "signal", "detail": "killed by SIGKILL",
            "scope": "job", "ranks": [0, 1], "end": "recovered",
            "detected_at": "2026-12-03T12:00:01.000Z", "spawned_at": "2026-12-03T12:00:01.210Z",
            "first_heartbeat_at": "2026-12-03T12:00:01.350Z",
            "training_at": "2026-12-03T12:00:02.020Z", "steps_lost": 15, "seconds_lost": 1.02
        })]);
        assert_eq!(
            text,
            "#1 rank 1 signal: killed by SIGKILL — job restart of ranks 0,1 — recovered\n   \
             detected 2026-12-03 12:00:01.000  spawned +0.21 s  first heartbeat +0.35 s  \
             training +1.02 s  lost 15 steps, 1.0 s"
        );
    }

    /// Steps lost that nobody reported read as unknown, never as 0; the goodput says it is
    /// an estimate.
    #[test]
    fn unknown_steps_lost_and_an_estimated_goodput_say_so() {
        let text = describe_incidents(&[json!({
            "seq": 1, "rank": 0, "reason": "signal", "detail": "killed by SIGKILL",
            "scope": "worker", "ranks": [0], "end": "recovered",
            "detected_at": "2026-12-03T12:00:01.000Z", "training_at": "2026-12-03T12:00:12.000Z",
            "steps_lost": null, "seconds_lost": 11.0
        })]);
        assert!(text.ends_with("lost unknown steps, 11.0 s"), "{text}");
        let g = json!({"goodput": 0.8, "wall_s": 55.0, "recovering_s": 11.0, "backoff_s": 0.5,
                       "steps_redone": 0, "redo_s": null, "incidents": 1, "estimate": true});
        let line = describe_goodput(&g).unwrap();
        assert!(line.starts_with("goodput ≤ 0.800"), "{line}");
        assert!(line.contains("estimate: steps lost unknown"), "{line}");
    }
}
