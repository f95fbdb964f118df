//! Stored logs and the SSE stream: replay, follow, end, resume, lagging subscribers.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn lines_of(events: &[SseEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(
                e.id.as_deref(),
                Some(v["seq"].to_string().as_str()),
                "id is the seq"
            );
            v
        })
        .collect()
}

fn assert_strictly_increasing(lines: &[Value]) {
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs not increasing: {seqs:?}"
    );
}

async fn open_stream(app: &TestApp, id: &str, query: &str, last_id: Option<&str>) -> SseReader {
    let mut req = app
        .client
        .get(app.url(&format!("/jobs/{id}/logs/stream{query}")));
    if let Some(last) = last_id {
        req = req.header("Last-Event-ID", last);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    SseReader::new(res)
}

#[actix_web::test]
async fn stream_follows_live_lines_and_ends_with_the_job() {
    let app = spawn_app().await;
    let script = "sleep 0.3; i=0; while [ $i -lt 30 ]; do echo \"r$RANK line $i\"; i=$((i+1)); sleep 0.02; done";
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(script)}))
        .await;
    let mut all = open_stream(&app, &id, "", None).await;
    let mut rank1 = open_stream(&app, &id, "?rank=1", None).await;
    let events = all.until_end().await;
    let end = events.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(
        serde_json::from_str::<Value>(&end.data).unwrap()["state"],
        "succeeded"
    );
    let lines = lines_of(&events);
    assert_strictly_increasing(&lines);
    let worker_lines: Vec<&Value> = lines.iter().filter(|l| l["stream"] == "stdout").collect();
    assert_eq!(worker_lines.len(), 60, "every line once");
    let only1 = lines_of(&rank1.until_end().await);
    assert_eq!(only1.len(), 30);
    assert!(only1.iter().all(|l| l["rank"] == 1));
    // The stored tail agrees with what was streamed.
    let stored = app.log_lines(&id).await;
    assert_eq!(stored, lines);
    let tail = app
        .get_json(&format!("/jobs/{id}/logs?tail=5&rank=0"))
        .await;
    let tail = tail["lines"].as_array().unwrap();
    assert_eq!(tail.len(), 5);
    assert_eq!(tail[4]["line"], "r0 line 29");
}

#[actix_web::test]
async fn last_event_id_resumes_without_gaps_or_duplicates() {
    let app = spawn_app().await;
    let script = "i=0; while [ $i -lt 40 ]; do echo \"line $i\"; i=$((i+1)); sleep 0.02; done";
    let id = app
        .create_job(json!({"world_size": 2, "command": sh(script)}))
        .await;
    // Read a few events, drop the connection, resume from the last id seen.
    let mut first = open_stream(&app, &id, "?tail=0", None).await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let ev = first.next().await.unwrap();
        if ev.event == "log" {
            seen.push(ev);
        }
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = seen.last().unwrap().id.clone().unwrap();
    let mut second = open_stream(&app, &id, "", Some(&last)).await;
    let mut rest = second.until_end().await;
    seen.append(&mut rest);
    let lines = lines_of(&seen);
    assert_strictly_increasing(&lines);
    let stored = app.log_lines(&id).await;
    // tail=0 started at the first line printed after subscribing; from there on, all of them.
    let from = lines[0]["seq"].as_i64().unwrap();
    let expected: Vec<Value> = stored
        .into_iter()
        .filter(|l| l["seq"].as_i64().unwrap() >= from)
        .collect();
    assert_eq!(lines, expected);

    // A finished job's stream replays and ends at once; ?last_event_id works like the header.
    let mut again = open_stream(&app, &id, &format!("?last_event_id={last}"), None).await;
    let replay = lines_of(&again.until_end().await);
    assert_eq!(
        replay.first().unwrap()["seq"].as_i64().unwrap(),
        last.parse::<i64>().unwrap() + 1
    );
}

#[actix_web::test]
async fn a_slow_subscriber_is_told_it_lagged_and_loses_nothing() {
    let app = spawn_app().await;
    // 30,000 lines as fast as the shell prints them: far past the bus capacity.
    // Lines of ~500 bytes: 15 MB in all, more than the loopback socket buffers can hide.
    let script = "sleep 0.5; seq 1 30000 | awk '{printf \"%s %0490d\\n\", $1, 0}'";
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(script)}))
        .await;
    let mut slow = open_stream(&app, &id, "", None).await;
    let fast = open_stream(&app, &id, "", None).await;
    // The fast subscriber reads concurrently; the slow one reads nothing until the job printed
    // everything.
    let fast = actix_web::rt::spawn(async move {
        let mut fast = fast;
        fast.until_end().await
    });
    let fast_lines = lines_of(&fast.await.unwrap());
    let events = slow.until_end().await;
    assert!(
        events.iter().any(|e| e.event == "lagged"),
        "no lagged event"
    );
    let lines = lines_of(&events);
    assert_strictly_increasing(&lines);
    let unique: BTreeSet<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(unique.len(), lines.len(), "no duplicates");
    let numbers: Vec<&str> = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["line"].as_str().unwrap().split(' ').next().unwrap())
        .collect();
    assert_eq!(numbers.len(), 30000, "lines lost or repeated");
    assert_eq!(numbers.first(), Some(&"1"));
    assert_eq!(numbers.last(), Some(&"30000"));
    assert_eq!(fast_lines, lines);
    assert_eq!(app.job(&id).await["state"], "succeeded");
}

#[actix_web::test]
async fn job_events_report_state_changes_and_restarts() {
    let app = spawn_app().await;
    let res = app.client.get(app.url("/events")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut events = SseReader::new(res);
    assert_eq!(events.next().await.unwrap().event, "hello");
    let script = r#"[ "$RESTART_COUNT" = 0 ] && exit 7; echo ok"#;
    let id = app
        .create_job(json!({"world_size": 1, "command": sh(script), "backoff_initial_ms": 0}))
        .await;
    let mut seen = Vec::new();
    loop {
        let ev = events.next().await.expect("events keep coming");
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(v["job_id"], id.as_str());
        assert_eq!(v["kind"], ev.event.as_str());
        let done = ev.event == "job" && v["data"]["state"] == "succeeded";
        seen.push((ev.event.clone(), v["data"].clone()));
        if done {
            break;
        }
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert!(kinds.contains(&"worker"), "{kinds:?}");
    let restart = seen
        .iter()
        .find(|(k, _)| k == "restart")
        .expect("a restart event");
    assert_eq!(restart.1["reason"], "exit_code");
    assert_eq!(restart.1["rank"], 0);
    assert!(
        seen.iter()
            .any(|(k, d)| k == "job" && d["state"] == "running")
    );
}
