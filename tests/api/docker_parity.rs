//! Container ranks on a par with local ones, against the real engine: the root cause a rank
//! writes to torchrun's error file is read back from its container; S3 on loopback, which a
//! container cannot reach, is refused at the door.

use std::time::Duration;

use serde_json::json;

use crate::docker_launcher::{
    PRELUDE, TOKEN, authed_client, finish, python_job, spawn_reachable_app,
};
use crate::docker_support::JobLeftovers;
use crate::helpers::s3_server::{Kind, S3Server};
use crate::helpers::*;

#[actix_web::test]
async fn a_containers_error_file_is_the_root_cause() {
    let app = spawn_reachable_app().await;
    // What torch's @record writes; the rank sees its own incarnation's directory and no other.
    let script = format!(
        "{PRELUDE}
path = os.environ['TORCHELASTIC_ERROR_FILE']
print('SIBLINGS', sorted(os.listdir(os.path.dirname(os.path.dirname(path)))), flush=True)
with open(path, 'w') as f:
    json.dump({{'message': {{'message': 'ValueError: shard 7 is corrupt',
               'extraInfo': {{'py_callstack': 'Traceback (most recent call last):\\n  in load_shard\\n',
                             'timestamp': '0'}}}}}}, f)
sys.exit(1)
"
    );
    let id = app
        .create_job(python_job(1, &script, json!({"max_restarts": 0})))
        .await;
    let _leftovers = JobLeftovers::new(&id);
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited with code 1: ValueError: shard 7 is corrupt"),
        "{reason}"
    );
    assert!(reason.contains("in load_shard"), "the traceback: {reason}");
    let lines = crate::docker_launcher::lines_of(&app, &id).await;
    assert!(
        lines.contains(&"SIBLINGS ['rank-0-attempt-0']".to_string()),
        "{lines:?}"
    );
}

/// S3 on the server's loopback is the server's alone: a container rank would reach itself.
#[actix_web::test]
async fn s3_on_loopback_is_refused_for_container_ranks() {
    let s3 = S3Server::start(Kind::S3sFs).await;
    let config = s3.config();
    let mut app = spawn_app_with(|s| {
        s.bind = "0.0.0.0:0".into();
        s.api_token = Some(TOKEN.into());
        s.s3 = config;
    })
    .await;
    app.client = authed_client();
    for (field, value) in [
        ("dataset", s3.url("data")),
        ("checkpoint_dir", s3.url("ckpt")),
    ] {
        let res = app
            .post_json("/jobs", &python_job(1, "print(1)", json!({ field: value })))
            .await;
        let err = assert_json_error(res, 422).await;
        let message = err["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}: ")) && message.contains("loopback"),
            "{err}"
        );
    }
    let jobs = app.get_json("/jobs").await;
    assert_eq!(jobs, json!([]), "nothing was created: {jobs}");
}
