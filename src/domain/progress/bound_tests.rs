//! A heartbeat body is kept small before it is stored in a rank's view.

use super::bounded_heartbeat;
use serde_json::json;

#[test]
fn a_heartbeat_is_kept_small() {
    let long = "y".repeat(1000);
    let mut metrics = serde_json::Map::new();
    metrics.insert("loss".into(), json!(0.5));
    for i in 0..100 {
        metrics.insert(format!("m{i:03}"), json!(i));
    }
    metrics.insert("nested".into(), json!({"a": 1}));
    let body = json!({"step": 9, "metrics": metrics, "note": long, "lr": 0.1, "x": [1, 2]});
    let kept = bounded_heartbeat(body);
    assert_eq!(kept["step"], 9);
    assert_eq!(kept["metrics"]["loss"], 0.5);
    assert_eq!(kept["metrics"].as_object().unwrap().len(), 32);
    assert_eq!(kept["lr"], 0.1);
    assert!(kept.get("note").is_none() && kept.get("x").is_none());
    // 69 metrics past the 32, the nested one, the long note and the list.
    assert_eq!(kept["dropped"], 69 + 1 + 2);
    assert!(kept.to_string().len() < 2048);
    // A small heartbeat is kept as it was.
    let small = json!({"step": 1, "metrics": {"loss": 0.1}});
    assert_eq!(bounded_heartbeat(small.clone()), small);
}
