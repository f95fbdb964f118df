//! Container ranks on a par with local ones, against the real engine: the root cause a rank
//! writes to torchrun's error file is read back from its container; S3 on loopback, which a
//! container cannot reach, is refused at the door; a hung rank's Python stacks are taken in
//! its container; the README's snippet runs as typed.

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

/// The README's "Ranks as Docker containers" snippet, as typed: the token it exports for the
/// server is the one its curl sends, so the job is judged on its merits (here a 422: the
/// example's paths and image are not on this host), never refused as unauthorized (401).
#[test]
fn the_docker_ranks_snippet_runs_as_typed() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme
        .find("## Ranks as Docker containers")
        .expect("the section")..];
    let block = section
        .split("```bash\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its bash block");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    // Only where the server runs changes; a human types the curl once it listens.
    let serve = format!(
        "{} serve --data-dir {}",
        env!("CARGO_BIN_EXE_trainvisor"),
        data.path().display()
    );
    let script = block
        .replace("trainvisor serve", &serve)
        .replace(":8000", &format!(":{port}"))
        .replace(
            " &\n",
            &format!(
                " &\nSERVER=$!\nfor i in $(seq 300); do curl -sf localhost:{port}/health >/dev/null \
                 && break; sleep 0.1; done\n"
            ),
        );
    assert!(
        script.contains("SERVER=$!"),
        "the snippet starts a server: {block}"
    );
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{script}\necho\nkill $SERVER; wait $SERVER"))
        .env_remove("TRAINVISOR_API_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("curl answered nothing: {stdout}"));
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
    // Past the token: judged on the spec (its example paths are not on this host), not a 401.
    assert_eq!(answer["error"], "invalid_spec", "{answer}");
}

/// A hung rank's Python stacks are taken inside its container (the hook is mounted, the signal
/// goes to its host pid) before it is killed and restarted.
#[actix_web::test]
async fn a_hung_containers_stacks_are_taken_before_it_is_killed() {
    let app = spawn_reachable_app().await;
    let script = format!(
        "{PRELUDE}
def stuck_in_here():
    time.sleep(3600)
beat(1)
if attempt == 0:
    stuck_in_here()
"
    );
    let id = app
        .create_job(python_job(
            1,
            &script,
            json!({"heartbeat_timeout_s": 1.0, "max_restarts": 1}),
        ))
        .await;
    let _leftovers = JobLeftovers::new(&id);
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let incidents = app.get_json(&format!("/jobs/{id}/incidents")).await;
    let incident = &incidents[0];
    assert_eq!(incident["reason"], "heartbeat_timeout", "{incidents}");
    let stacks = &incident["stacks"][0];
    assert_eq!(stacks["kind"], "python", "{stacks}");
    let text = stacks["text"].as_str().unwrap();
    assert!(text.contains("in stuck_in_here"), "{text}");
}
