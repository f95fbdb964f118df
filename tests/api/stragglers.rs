//! Stragglers (issue 15, item 4): a rank slowed on purpose is flagged (summary, log line) and
//! its normal peers are not; with `straggler_action: restart` it is restarted as a failure
//! with reason `straggler` and the job goes on.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// Three shell ranks heartbeating a step every 0.1 s; rank 2's first incarnation every 0.4 s.
fn job(extra: Value) -> Value {
    let script = r#"n=0; d=0.1
if [ "$RANK" = 2 ] && [ "$RESTART_COUNT" = 0 ]; then d=0.4; fi
while [ $n -lt 60 ]; do
  n=$((n+1))
  curl -s -o /dev/null -X POST -H "Authorization: Bearer $TRAINVISOR_TOKEN" -d "{\"step\": $n}" "$TRAINVISOR_HEARTBEAT_URL"
  sleep $d
done"#;
    let mut spec = json!({"world_size": 3, "command": sh(script), "restart_scope": "worker",
                          "straggler_window_s": 2, "straggler_fraction": 0.5,
                          "backoff_initial_ms": 100});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[actix_web::test]
async fn a_slowed_rank_is_flagged_and_its_peers_are_not() {
    let app = spawn_app().await;
    let id = app.create_job(job(json!({}))).await;
    let s = wait_for(Duration::from_secs(30), || async {
        let s = app.summary(&id).await;
        (s["workers"][2]["straggler"] == true).then_some(s)
    })
    .await
    .expect("rank 2 is flagged as a straggler");
    for rank in [0, 1] {
        assert_eq!(s["workers"][rank]["straggler"], false, "{s}");
    }
    let slow = s["workers"][2]["steps_per_s"].as_f64().unwrap();
    let fast = s["workers"][0]["steps_per_s"].as_f64().unwrap();
    assert!(slow < fast * 0.5, "{slow} vs {fast}");
    let lines = app.log_lines(&id).await;
    let flagged: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["line"].as_str())
        .filter(|l| l.contains("is a straggler"))
        .collect();
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert!(
        flagged[0].starts_with("rank 2 is a straggler: "),
        "{flagged:?}"
    );
    println!("{}", flagged[0]);
    // The flag in /metrics: 1 for rank 2, 0 for its peers.
    let live = crate::metrics::scrape(&app).await;
    for (rank, flag) in [("0", 0.0), ("1", 0.0), ("2", 1.0)] {
        assert_eq!(
            crate::metrics::value(
                &live,
                "trainvisor_rank_straggler",
                &[("job_id", &id), ("rank", rank)]
            ),
            Some(flag),
            "rank {rank}: {live:?}"
        );
    }
    // Flagging alone changes nothing: no restart.
    assert_eq!(s["restarts"], 0, "{s}");
    app.stop(&id).await;
}

#[actix_web::test]
async fn a_straggler_is_restarted_when_the_job_says_so() {
    let app = spawn_app().await;
    let id = app
        .create_job(job(json!({"straggler_action": "restart"})))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.get_json(&format!("/jobs/{id}/restarts")).await;
    let restarts = restarts.as_array().unwrap();
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0]["rank"], 2);
    assert_eq!(restarts[0]["reason"], "straggler");
    let incidents = app.get_json(&format!("/jobs/{id}/incidents")).await;
    assert_eq!(incidents[0]["reason"], "straggler", "{incidents}");
    assert_eq!(incidents[0]["end"], "recovered", "{incidents}");
    let workers = app.get_json(&format!("/jobs/{id}/workers")).await;
    assert!(
        workers
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["rank"] == 2 && w["attempt"] == 0 && w["outcome"] == "straggler"),
        "{workers}"
    );
}
