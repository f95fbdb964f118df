//! The Docker launcher against the real engine: ranks as containers of an image built here
//! (the registry-free base plus a `VOLUME` and a `HEALTHCHECK`, which ranks must neither leave
//! behind nor inherit), on a network of the job's own. Every test counts what its job left on
//! the engine (containers, networks, volumes): nothing. Lifecycle and the worker contract
//! inside a container, a container killed and a rank cut off from the network (both
//! recovered, the model exact), a hang, job-scope restarts, stop, a server kill -9 with
//! nothing of its own left behind (and nothing of anyone else's removed), the OOM killer, and
//! what is refused at the door.

use std::time::Duration;

use serde_json::{Value, json};

use crate::docker_support::{
    JobLeftovers, base_image, containers_with, docker, docker_ok, networks_with, rank_image,
    unique_name,
};
use crate::helpers::*;

pub(crate) const TOKEN: &str = "docker-launcher-test-token";

/// The server on every address (containers reach it through their network's gateway), with
/// an API token, and a client that sends it.
pub(crate) async fn spawn_reachable_app() -> TestApp {
    let mut app = spawn_app_with(|s| {
        s.bind = "0.0.0.0:0".into();
        s.api_token = Some(TOKEN.into());
    })
    .await;
    app.client = authed_client();
    app
}

pub(crate) fn authed_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A job spec whose ranks run `script` with python3 in a container of the base image.
pub(crate) fn python_job(world: u32, script: &str, extra: Value) -> Value {
    let mut spec = json!({"world_size": world, "launcher": "docker", "image": rank_image(),
                          "command": ["python3", "-u", "-c", script],
                          "heartbeat_timeout_s": 2.0, "backoff_initial_ms": 0});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

/// The Python helpers every script starts with: a heartbeat, as a worker would send it.
pub(crate) const PRELUDE: &str = r#"
import json, os, socket, sys, time, urllib.request
def beat(step):
    req = urllib.request.Request(os.environ["TRAINVISOR_HEARTBEAT_URL"],
        data=json.dumps({"step": step}).encode(),
        headers={"Authorization": "Bearer " + os.environ["TRAINVISOR_TOKEN"],
                 "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=2).read()
rank = int(os.environ["RANK"]); attempt = int(os.environ["RESTART_COUNT"])
"#;

/// The running container of `rank` of job `id`.
pub(crate) async fn container_of(id: &str, rank: u32) -> String {
    wait_for(Duration::from_secs(60), || async {
        let out = docker_ok(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=trainvisor.job={id}"),
            "--filter",
            &format!("label=trainvisor.rank={rank}"),
        ]);
        out.lines().next().map(str::to_string)
    })
    .await
    .unwrap_or_else(|| panic!("no running container for rank {rank} of {id}"))
}

/// Waits for the job to end; if it does not, fails with the end of its log.
pub(crate) async fn finish(app: &TestApp, id: &str, timeout: Duration) -> Value {
    let end = wait_for(timeout, || async {
        let job = app.job(id).await;
        let state = job["state"].as_str().unwrap_or_default().to_string();
        matches!(state.as_str(), "succeeded" | "failed" | "stopped").then_some(job)
    })
    .await;
    match end {
        Some(job) => job,
        None => {
            let lines = lines_of(app, id).await;
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!("job {id} did not end in {timeout:?}; its log ends with:\n{tail}")
        }
    }
}

pub(crate) async fn lines_of(app: &TestApp, id: &str) -> Vec<String> {
    app.log_lines(id)
        .await
        .iter()
        .map(|l| l["line"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[actix_web::test]
async fn ranks_run_as_containers_with_the_worker_contract() {
    let app = spawn_reachable_app().await;
    let script = format!(
        "{PRELUDE}
beat(1)
me = socket.gethostbyname(socket.gethostname())
print('ME', rank, me, os.environ['MASTER_ADDR'], os.environ['WORLD_SIZE'], os.getuid(), flush=True)
if rank == 1:
    for _ in range(100):
        try:
            print('MASTER', socket.gethostbyname(os.environ['MASTER_ADDR']), flush=True); break
        except OSError:
            time.sleep(0.1)
print('SECRET', 'TRAINVISOR_API_TOKEN' in os.environ, flush=True)
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
print('PRIV', status['CapEff'].strip(), status['CapBnd'].strip(), status['NoNewPrivs'].strip(), flush=True)
time.sleep(2)
print('err line', file=sys.stderr)
"
    );
    let id = app
        .create_job(python_job(2, &script, json!({"heartbeat_timeout_s": 30.0})))
        .await;
    let leftovers = JobLeftovers::new(&id);
    let summary = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (running_pids_in(&s).len() == 2).then_some(s)
    })
    .await
    .expect("both ranks running");
    assert_eq!(summary["launcher"], "docker");
    // The pid shown is the container's PID 1 on this host.
    for pid in running_pids_in(&summary) {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    assert_eq!(summary["workers"][1]["node"], "rank-1");
    // The image's HEALTHCHECK is the server's business, not a rank's: none runs.
    let container = container_of(&id, 0).await;
    let health = "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}";
    assert_eq!(docker_ok(&["inspect", "-f", health, &container]), "none");
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let lines = lines_of(&app, &id).await;
    let me = |rank: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("ME {rank} ")))
            .unwrap_or_else(|| panic!("rank {rank} printed its address: {lines:?}"))
            .split(' ')
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (r0, r1) = (me("0"), me("1"));
    assert_eq!(r0[3], "rank-0", "MASTER_ADDR names rank 0's container");
    assert_eq!(r0[4], "2");
    // SAFETY: plain syscall.
    let uid = unsafe { libc::geteuid() };
    // Never root unless the server is told so: a server running as root runs ranks as nobody.
    let expected = if uid == 0 { 65534 } else { uid };
    assert_eq!(r1[5], expected.to_string(), "ranks run as a non-root user");
    // No capabilities, not even in the bounding set, and no way to gain privileges (setuid).
    let privs = lines.iter().find(|l| l.starts_with("PRIV ")).unwrap();
    assert_eq!(privs, "PRIV 0000000000000000 0000000000000000 1", "{privs}");
    let master = lines.iter().find(|l| l.starts_with("MASTER ")).unwrap();
    assert_eq!(
        master.split(' ').nth(1).unwrap(),
        r0[2],
        "MASTER_ADDR resolves to rank 0's address on the job's network"
    );
    assert!(lines.iter().any(|l| l == "SECRET False"));
    let logs = app.log_lines(&id).await;
    assert!(
        logs.iter()
            .any(|l| l["line"] == "err line" && l["stream"] == "stderr"),
        "stderr is streamed as stderr"
    );
    // Nothing of the job is left on the engine, the image's VOLUME included.
    assert!(
        !leftovers.volumes_seen().is_empty(),
        "the image's VOLUME gave the containers anonymous volumes"
    );
    assert_eq!(leftovers.left(), (vec![], vec![], vec![]));
}

#[actix_web::test]
async fn containers_train_exactly_through_a_kill_and_a_partition() {
    let app = spawn_reachable_app().await;
    let data = small_dataset(&app);
    let train = json!({"world_size": 2, "dataset": data, "total_steps": 200,
                       "batch_size": 16, "checkpoint_every": 5, "lr": 0.2, "seed": 3,
                       "sleep_sec": 0.02, "backoff_initial_ms": 0,
                       "checkpoint_dir": app.data_dir.path().join("checkpoints"),
                       "heartbeat_timeout_s": 2.0});
    // The reference: the same training as local processes, without failures.
    let reference = app.create_job(train.clone()).await;
    let done = finish(&app, &reference, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let expected = app.get(&format!("/jobs/{reference}/model")).await;
    let expected = expected.headers()["x-model-sha256"].clone();

    let mut spec = train.clone();
    spec["launcher"] = json!("docker");
    spec["image"] = json!(rank_image());
    let id = app.create_job(spec).await;
    let _cleanup = JobLeftovers::new(&id);
    let step_past = |n: u64| {
        let app = &app;
        let id = id.clone();
        async move {
            wait_for(Duration::from_secs(90), || async {
                let s = app.summary(&id).await;
                (s["step"].as_u64().unwrap_or(0) >= n && running_pids_in(&s).len() == 2)
                    .then_some(())
            })
            .await
            .unwrap_or_else(|| panic!("the job did not reach step {n}"))
        }
    };
    step_past(30).await;
    // A host lost: its container killed by the engine.
    let victim = container_of(&id, 1).await;
    docker_ok(&["kill", &victim]);
    step_past(80).await;
    // A host cut off: rank 0 disconnected from the job's network; only the heartbeat
    // timeout can tell.
    let cut = container_of(&id, 0).await;
    docker_ok(&["network", "disconnect", &format!("trainvisor-{id}"), &cut]);
    let job = finish(&app, &id, Duration::from_secs(180)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let reasons: Vec<String> = app
        .restarts(&id)
        .await
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.first().is_some_and(|r| r == "signal"),
        "the killed container is a signal: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "heartbeat_timeout"),
        "the partition is caught by the heartbeat timeout: {reasons:?}"
    );
    let got = app.get(&format!("/jobs/{id}/model")).await;
    assert_eq!(
        got.headers()["x-model-sha256"],
        expected,
        "the model after a kill and a partition equals the failure-free one"
    );
    let label = format!("trainvisor.job={id}");
    assert!(containers_with(&label).is_empty());
    assert!(networks_with(&label).is_empty());
}

#[actix_web::test]
async fn a_hung_container_is_killed_and_restarted_alone() {
    let app = spawn_reachable_app().await;
    // Rank 1's first incarnation beats once and hangs; the second finishes. Rank 0 never
    // beats, so only its exit supervises it.
    let script = format!(
        "{PRELUDE}
if rank == 1:
    beat(1)
    if attempt == 0:
        time.sleep(3600)
    sys.exit(0)
time.sleep(1)
"
    );
    let id = app
        .create_job(python_job(
            2,
            &script,
            json!({"restart_scope": "worker", "heartbeat_timeout_s": 1.0}),
        ))
        .await;
    let _cleanup = JobLeftovers::new(&id);
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0]["rank"], 1);
    assert_eq!(restarts[0]["reason"], "heartbeat_timeout");
    assert_eq!(restarts[0]["scope"], "worker");
}

#[actix_web::test]
async fn a_killed_pid_restarts_the_whole_group_in_job_scope() {
    let app = spawn_reachable_app().await;
    let script = format!(
        "{PRELUDE}
for step in range(400):
    beat(step)
    if attempt > 0 and step > 3:
        sys.exit(0)
    time.sleep(0.05)
"
    );
    let id = app
        .create_job(python_job(2, &script, json!({"restart_scope": "job"})))
        .await;
    let _cleanup = JobLeftovers::new(&id);
    let pids = app.running_pids(&id, 2).await;
    // kill -9 of the pid the summary shows, from the host.
    kill(pids[0], libc::SIGKILL);
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(restarts[0]["scope"], "job");
    assert_eq!(restarts[0]["reason"], "signal");
    // Seen through the container's host pid (a pidfd), before the engine's wait reported it.
    let lines = lines_of(&app, &id).await;
    assert!(
        lines.iter().any(|l| l.starts_with("rank 0: container ")
            && l.contains(&format!("seen through its host pid {} ", pids[0]))
            && l.ends_with("before the engine reported exit code 137")),
        "{lines:?}"
    );
    let incarnations = app.incarnations(&id).await;
    assert_eq!(
        incarnations.len(),
        4,
        "both ranks ran twice: {incarnations:?}"
    );
}

#[actix_web::test]
async fn stop_ends_every_container_and_the_network() {
    let app = spawn_reachable_app().await;
    let script = format!("{PRELUDE}\nbeat(1)\ntime.sleep(3600)\n");
    let id = app.create_job(python_job(3, &script, json!({}))).await;
    let _cleanup = JobLeftovers::new(&id);
    app.running_pids(&id, 3).await;
    let label = format!("trainvisor.job={id}");
    assert_eq!(containers_with(&label).len(), 3);
    assert_eq!(app.stop(&id).await.status(), 200);
    let job = finish(&app, &id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "stopped");
    assert!(containers_with(&label).is_empty());
    assert!(networks_with(&label).is_empty());
}

#[actix_web::test]
async fn the_oom_killer_is_its_own_restart_reason() {
    let app = spawn_reachable_app().await;
    let script = format!("{PRELUDE}\nbeat(1)\nhog = bytearray(256 * 1024 * 1024)\n");
    let id = app
        .create_job(python_job(
            1,
            &script,
            json!({"memory_mb": 32, "max_restarts": 1}),
        ))
        .await;
    let _cleanup = JobLeftovers::new(&id);
    let job = finish(&app, &id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["reason"].as_str().unwrap().starts_with("oom_killed"),
        "{job}"
    );
    let restarts = app.restarts(&id).await;
    assert_eq!(restarts.len(), 1);
    assert_eq!(restarts[0]["reason"], "oom_killed");
}

/// The next server on the same data dir removes every container and network the killed one
/// left, and none of anyone else's.
#[actix_web::test]
async fn a_server_killed_leaves_nothing_of_its_own_behind() {
    let data_dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
            .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
            .arg(data_dir.path())
            .env("TRAINVISOR_API_TOKEN", TOKEN)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("server starts");
        let url = listening_url(&mut child).replace("0.0.0.0", "127.0.0.1");
        (child, url)
    };
    // Someone else's container that looks like ours, but of another instance.
    let decoy = unique_name("tv-decoy");
    docker_ok(&[
        "create",
        "--name",
        &decoy,
        "--label",
        "trainvisor.instance=someone-else",
        "--label",
        "trainvisor.job=x",
        &base_image(),
        "true",
    ]);
    let (mut server, url) = start();
    let client = authed_client();
    let script = format!("{PRELUDE}\nbeat(1)\ntime.sleep(3600)\n");
    let res = client
        .post(format!("{url}/jobs"))
        .json(&python_job(2, &script, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let _cleanup = JobLeftovers::new(&id);
    let label = format!("trainvisor.job={id}");
    wait_for(Duration::from_secs(60), || async {
        (containers_with(&label).len() == 2).then_some(())
    })
    .await
    .expect("both containers started");
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(
        containers_with(&label).len(),
        2,
        "a kill -9 leaves the containers running"
    );
    let (mut next, url) = start();
    // The resumed job runs new containers; the old ones are gone.
    let old: Vec<String> = wait_for(Duration::from_secs(60), || async {
        let names = docker_ok(&[
            "ps",
            "-a",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("label={label}"),
        ]);
        let names: Vec<String> = names.lines().map(str::to_string).collect();
        (names.len() == 2 && names.iter().all(|n| n.ends_with("-a1"))).then_some(names)
    })
    .await
    .expect("the resumed job's containers, and only those");
    assert!(old.iter().all(|n| n.ends_with("-a1")));
    assert!(
        docker(&["inspect", &decoy]).status.success(),
        "someone else's container is left alone"
    );
    client
        .post(format!("{url}/jobs/{id}/stop"))
        .send()
        .await
        .unwrap();
    next.kill().unwrap();
    next.wait().unwrap();
    // Killed again: the next start cleans up, then nothing is left once the job is stopped.
    let (mut last, url) = start();
    let stopped = wait_for(Duration::from_secs(60), || async {
        let job = try_json(client.get(format!("{url}/jobs/{id}"))).await?;
        if job["state"] == "running" {
            client
                .post(format!("{url}/jobs/{id}/stop"))
                .send()
                .await
                .ok()?;
        }
        (job["state"] == "stopped" && containers_with(&label).is_empty()).then_some(())
    })
    .await;
    let _ = docker(&["rm", "-f", &decoy]);
    last.kill().unwrap();
    last.wait().unwrap();
    assert!(stopped.is_some(), "the job stopped and left no container");
    assert!(networks_with(&label).is_empty());
}

#[actix_web::test]
async fn what_cannot_start_is_refused_at_the_door() {
    let app = spawn_reachable_app().await;
    let script = "print(1)";
    let missing = unique_name("no-such-image");
    let res = app
        .post_json(
            "/jobs",
            &python_job(1, script, json!({"image": format!("{missing}:1")})),
        )
        .await;
    let err = assert_json_error(res, 422).await;
    assert!(
        err["message"].as_str().unwrap().contains(&missing),
        "the missing image is named: {err}"
    );
    let res = app
        .post_json(
            "/jobs",
            &python_job(1, script, json!({"mounts": ["/no/such/dir:/data"]})),
        )
        .await;
    let err = assert_json_error(res, 422).await;
    assert!(err["message"].as_str().unwrap().contains("/no/such/dir"));
    let res = app
        .post_json(
            "/jobs",
            &python_job(1, script, json!({"mounts": ["relative:/data"]})),
        )
        .await;
    assert_json_error(res, 422).await;
    // The host is never a rank's to mount: its root, the kernel's files, the Docker socket
    // (or a directory holding it), the server's data dir — also behind a symlink.
    let sneaky = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/", sneaky.path().join("root")).unwrap();
    let sneaky_root = format!("{}:/host", sneaky.path().join("root").display());
    let data_dir = format!("{}:/d", app.data_dir.path().display());
    let mut refused = vec![
        "/:/host",
        "/etc/..:/host",
        "/proc:/p",
        "/sys/fs:/s",
        "/dev:/d",
        "/run:/r",
        sneaky_root.as_str(),
        data_dir.as_str(),
    ];
    if std::path::Path::new("/var/run/docker.sock").exists() {
        refused.push("/var/run/docker.sock:/var/run/docker.sock");
        refused.push("/var/run:/r");
    }
    for mount in refused {
        let res = app
            .post_json("/jobs", &python_job(1, script, json!({"mounts": [mount]})))
            .await;
        let err = assert_json_error(res, 422).await;
        assert!(
            err["message"].as_str().unwrap().contains("mount"),
            "{mount}: {err}"
        );
    }
    for (field, value) in [("dataset", "/"), ("checkpoint_dir", "/")] {
        let res = app
            .post_json("/jobs", &python_job(1, script, json!({ field: value })))
            .await;
        assert_json_error(res, 422).await;
    }
    // With --allowed-root, a mount source must lie inside one.
    let rooted = spawn_app_with(|s| {
        s.bind = "0.0.0.0:0".into();
        s.api_token = Some(TOKEN.into());
        s.allowed_roots = vec![s.data_dir.clone()];
    })
    .await;
    let outside = tempfile::tempdir().unwrap();
    let mount = format!("{}:/data", outside.path().display());
    let res = test_client()
        .post(rooted.url("/jobs"))
        .bearer_auth(TOKEN)
        .json(&python_job(1, script, json!({ "mounts": [mount] })))
        .send()
        .await
        .unwrap();
    let err = assert_json_error(res, 422).await;
    assert!(
        err["message"].as_str().unwrap().contains("allowed-root"),
        "{err}"
    );
    let res = app
        .post_json(
            "/jobs",
            &python_job(1, script, json!({"dataset": "/no/such/dataset"})),
        )
        .await;
    let err = assert_json_error(res, 422).await;
    assert!(err["message"].as_str().unwrap().contains("dataset"));
    let mut no_image = python_job(1, script, json!({}));
    no_image.as_object_mut().unwrap().remove("image");
    assert_json_error(app.post_json("/jobs", &no_image).await, 422).await;
    let res = app
        .post_json("/jobs", &json!({"world_size": 1, "image": "x"}))
        .await;
    assert_json_error(res, 422).await;
    // A server on loopback cannot be reached from a container.
    let local = spawn_app().await;
    let res = local
        .post_json("/jobs", &python_job(1, script, json!({})))
        .await;
    let err = assert_json_error(res, 422).await;
    assert!(err["message"].as_str().unwrap().contains("--bind"), "{err}");
    let jobs = local.get_json("/jobs").await;
    assert_eq!(jobs.as_array().map(Vec::len).unwrap_or(0), 0, "{jobs}");
}
