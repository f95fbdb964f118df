//! Save on notice under Slurm (issue 24): the allocation asks for `--signal=USR1@<save_grace_s>`,
//! so Slurm signals every step before the time limit (and at a preemption, with the cluster's
//! `PreemptParameters=send_user_signal`); the ranks pass it on and the whole job saves the
//! step reached and holds there, so the end that follows loses nothing.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::slurm::{Cluster, app_on, running_past, trainer_spec};

#[actix_web::test]
async fn slurms_signal_before_the_end_saves_the_step_reached() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let data = small_dataset(&app);
    let mut spec = trainer_spec(&data, 1_000_000, 0.002, true);
    spec["checkpoint_every"] = json!(5000);
    spec["save_grace_s"] = json!(600);
    let id = app.create_job(spec).await;
    let summary = running_past(&app, &id, 20).await;
    let alloc = summary["launcher_ref"]["id"].as_str().unwrap().to_string();
    let asked = cluster.cmd("squeue", &["-h", "-j", &alloc, "-o", "%i"]);
    assert_eq!(asked.trim(), alloc, "the allocation is {alloc}");
    // What Slurm sends save_grace_s before the time limit: SIGUSR1 to every step's tasks.
    cluster.cmd("scancel", &["--signal=USR1", &alloc]);
    let notice = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (s["last_notice"]["outcome"] == "saved").then(|| s["last_notice"].clone())
    })
    .await;
    let Some(notice) = notice else {
        panic!("no save on Slurm's signal: {:?}", app.log_texts(&id).await);
    };
    assert_eq!(notice["cause"], "signal", "{notice}");
    assert_eq!(notice["steps_lost"], 0, "{notice}");
    let saved = notice["saved_at_step"].as_u64().unwrap();
    assert!((20..5000).contains(&saved), "{notice}");
    // Every rank holds at the saved step until the end comes.
    let held = wait_for(Duration::from_secs(20), || async {
        let s = app.summary(&id).await;
        let steps: Vec<_> = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["step"].as_u64())
            .collect();
        steps.iter().all(|s| *s == Some(saved)).then_some(())
    })
    .await;
    assert!(held.is_some(), "{}", app.summary(&id).await);
    app.post_json(&format!("/jobs/{id}/stop"), &json!({"save": false}))
        .await;
}
