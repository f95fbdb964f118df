//! Warm standbys' limits (issue 23, item 12): a preload that hangs is killed after
//! `--standby-ready-timeout-s`, as a standby that failed.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::standby::{Files, instance};

/// A preload that never finishes importing holds its standby no longer than
/// `--standby-ready-timeout-s`: killed, counted as failed, and after three the job runs cold
/// with the reason (issue 23, item 12).
#[actix_web::test]
async fn a_hung_preload_is_killed_after_the_ready_timeout() {
    let files = Files::new();
    std::fs::write(
        files.path("code/hung_preload.py"),
        "import time\ntime.sleep(3600)\n",
    )
    .unwrap();
    let app = spawn_app_with(|s| s.standby_ready_timeout = Duration::from_secs(1)).await;
    let id = app
        .create_job(files.spec(1, 400, json!({"preload": ["hung_preload"]})))
        .await;
    let s = wait_for(Duration::from_secs(90), || async {
        let s = app.summary(&id).await;
        s["standby_off"].is_string().then_some(s)
    })
    .await
    .expect("the job says standbys are off after three timed-out preloads");
    let off = s["standby_off"].as_str().unwrap();
    assert!(!off.is_empty(), "{s}");
    // No standby process is left importing.
    let instance = instance(&app);
    let left: Vec<u32> = marked_processes(&instance)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("standby"))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(app.stop(&id).await.status(), 200);
    assert!(left.is_empty(), "standbys left: {left:?}");
}
