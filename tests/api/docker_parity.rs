//! Container ranks on a par with local ones, against the real engine: the root cause a rank
//! writes to torchrun's error file is read back from its container.

use std::time::Duration;

use serde_json::json;

use crate::docker_launcher::{PRELUDE, finish, python_job, spawn_reachable_app};
use crate::docker_support::JobLeftovers;

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
