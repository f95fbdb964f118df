//! The ways users deploy, run for real under Docker with images built here from Debian's
//! packages and this repository (no registry): `docker run` of the image, Compose with an S3
//! server, and the Kubernetes manifests (validated offline, and their container spec run under
//! Docker). Every container, network and volume has a unique name and is removed by a guard.

use std::time::Duration;

use serde_json::{Value, json};

use crate::docker_support::{
    ComposeProject, Container, Network, Volume, base_image, docker, docker_ok, repo_root,
    s3s_image, trainvisor_image,
};
use crate::helpers::{SseReader, TestApp, test_client, wait_for};

/// The images build from nothing but Debian's packages (debootstrap) and this repository, and
/// the runtime image is what the Dockerfile promises: python3 for Python workers, tini as PID
/// 1, a non-root user owning /data, port 8000, a curl-free HEALTHCHECK, OCI labels.
#[test]
fn images_build_from_debian_packages_and_this_repo() {
    let base = base_image();
    let image = trainvisor_image();
    let config: Value = serde_json::from_str(&docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config}}",
        &image,
    ]))
    .unwrap();
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/bin/tini", "--", "trainvisor"])
    );
    assert_eq!(config["Cmd"], json!(["serve"]));
    assert!(config["ExposedPorts"]["8000/tcp"].is_object(), "{config}");
    assert!(config["Volumes"]["/data"].is_object(), "{config}");
    assert_eq!(
        config["Healthcheck"]["Test"],
        json!(["CMD", "trainvisor", "health"])
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.title"],
        "trainvisor"
    );
    assert!(config["Labels"]["org.opencontainers.image.version"].is_string());

    // What runs inside: the binary, python3 (stdlib included), tini; as uid 10001, /data its own.
    let out = docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        &image,
        "-c",
        "trainvisor --version && python3 -c 'import json, hashlib, urllib.request; print(\"python ok\")' \
         && tini --version && id -u && stat -c %u /data",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("trainvisor "), "{out}");
    assert_eq!(lines[1], "python ok", "{out}");
    assert!(lines[2].starts_with("tini version"), "{out}");
    assert_eq!(&lines[3..], ["10001", "10001"], "{out}");

    // The base was made here: debootstrap's package database, no registry image behind it.
    let layers = docker_ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", &base]);
    assert_eq!(layers, "1", "one imported layer");
    let status = docker_ok(&[
        "run",
        "--rm",
        &base,
        "sh",
        "-c",
        "dpkg-query -W -f '${Package}\\n' python3-minimal tini ca-certificates",
    ]);
    assert_eq!(
        status.lines().collect::<Vec<_>>(),
        ["ca-certificates", "python3-minimal", "tini"]
    );
}

/// `trainvisor health` is the image's HEALTHCHECK: Docker reports the container healthy once
/// the server answers, and the command fails (exit 1, one line) when nothing answers.
#[test]
fn healthcheck_needs_no_curl() {
    let image = trainvisor_image();
    let volume = Volume::create("tv-health");
    let c = Container::run(
        "tv-health",
        &[
            "--health-interval",
            "200ms",
            "-v",
            &format!("{}:/data", volume.name),
            &image,
        ],
    );
    let healthy = wait_until(Duration::from_secs(60), || {
        c.inspect("{{.State.Health.Status}}") == "healthy"
    });
    assert!(healthy, "never healthy: {}", c.logs());
    assert!(
        c.exec(&["trainvisor", "health"])
            .starts_with("healthy: trainvisor")
    );
    let fetchers = docker(&[
        "exec",
        &c.name,
        "sh",
        "-c",
        "command -v curl || command -v wget",
    ]);
    assert!(!fetchers.status.success(), "no curl or wget in the image");
    let out = docker(&[
        "exec",
        &c.name,
        "trainvisor",
        "health",
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// Polls `check` every 100 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A container serving on a published loopback port, and a client for it (with its token).
struct Served {
    container: Container,
    app: TestApp,
}

/// `docker run -d -p 127.0.0.1::8000 ARGS <image>`; waits until the API answers on the host.
async fn serve(prefix: &str, args: &[&str]) -> Served {
    let image = trainvisor_image();
    let mut full = vec!["-p", "127.0.0.1::8000"];
    full.extend_from_slice(args);
    full.push(&image);
    let container = Container::run(prefix, &full);
    let app = connect(&container).await;
    Served { container, app }
}

/// Waits for the server in `c` to answer /health on its published port, and returns a client
/// that sends the token the log printed when it was generated (or none if it was given).
async fn connect(c: &Container) -> TestApp {
    let address = format!("http://{}", c.host_port(8000));
    wait_ok(c, &format!("{address}/health")).await;
    client_for(address, generated_token(&c.logs()).as_deref())
}

/// Waits (generously) until `url` answers 200; panics with the container's log if it never does.
async fn wait_ok(c: &Container, url: &str) {
    let probe = test_client();
    let up = wait_for(Duration::from_secs(90), || async {
        let res = probe.get(url).send().await.ok()?;
        res.status().is_success().then_some(())
    })
    .await;
    assert!(
        up.is_some(),
        "{} never answered {url}:\n{}",
        c.name,
        c.logs()
    );
}

/// A test client for a server at `address` that sends `token`.
fn client_for(address: String, token: Option<&str>) -> TestApp {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
    }
    TestApp {
        address,
        client: reqwest::Client::builder()
            .default_headers(headers)
            .pool_idle_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
        data_dir: tempfile::tempdir().unwrap(),
    }
}

/// The token a server printed when it generated it (`TRAINVISOR_API_TOKEN=…` in its log).
fn generated_token(logs: &str) -> Option<String> {
    logs.lines()
        .find_map(|l| l.trim().strip_prefix("TRAINVISOR_API_TOKEN="))
        .map(str::to_string)
}

/// A small dataset in the container's volume (4 shards × 400 rows), made by the image's binary.
fn small_dataset_in(c: &Container) -> &'static str {
    c.exec(&[
        "trainvisor",
        "make-dataset",
        "--out",
        "/data/small",
        "--shards",
        "4",
        "--rows-per-shard",
        "400",
        "--features",
        "8",
        "--classes",
        "3",
        "--seed",
        "7",
        "--test-rows",
        "100",
    ]);
    "/data/small"
}

/// The built-in trainer on the small dataset: long enough (sleep_sec) to be killed in flight.
fn trainer_spec(dataset: &str) -> Value {
    json!({"world_size": 2, "dataset": dataset, "total_steps": 120, "batch_size": 16,
           "checkpoint_every": 5, "lr": 0.2, "seed": 3, "sleep_sec": 0.05,
           "backoff_initial_ms": 0, "max_restarts": 20})
}

/// The final model's SHA-256 (checked against the bytes served).
async fn model_sha(app: &TestApp, id: &str) -> String {
    let res = app.get(&format!("/jobs/{id}/model")).await;
    assert_eq!(res.status(), 200, "no model for {id}");
    let sha = res.headers()["x-model-sha256"]
        .to_str()
        .unwrap()
        .to_string();
    let bytes = res.bytes().await.unwrap();
    assert_eq!(trainvisor::checkpoint::sha256_hex(&bytes), sha);
    sha
}

async fn committed_checkpoints(app: &TestApp, id: &str) -> usize {
    app.get_json(&format!("/jobs/{id}/checkpoints"))
        .await
        .as_array()
        .map_or(0, Vec::len)
}

async fn wait_checkpoints(app: &TestApp, id: &str, n: usize) {
    wait_for(Duration::from_secs(120), || async {
        (committed_checkpoints(app, id).await >= n).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{n} checkpoints are not committed"));
}

/// (pid, state, command) of every process in the container, read from its /proc. Not
/// `docker top`: it lists the container's cgroup, which a zombie has already left, so it never
/// shows one.
fn processes(c: &Container) -> Vec<(String, String, String)> {
    let script = r#"for p in /proc/[0-9]*/stat; do cat "$p" 2>/dev/null; echo; done"#;
    c.exec(&["sh", "-c", script])
        .lines()
        .filter_map(|l| {
            // pid (comm) state ppid ...; comm may hold spaces, so split around the parentheses.
            let (pid, rest) = l.split_once(" (")?;
            let (comm, rest) = rest.rsplit_once(") ")?;
            let state = rest.split_whitespace().next()?;
            Some((pid.to_string(), state.to_string(), comm.to_string()))
        })
        .collect()
}

fn zombies(c: &Container) -> Vec<(String, String, String)> {
    processes(c)
        .into_iter()
        .filter(|(_, stat, _)| stat.starts_with('Z'))
        .collect()
}

/// The seed's quick start against `docker run -p 8000:8000 -v tv-data:/data <image>`: a token
/// is generated on first start (0600 in the volume, printed once), the curl walk-through
/// works with it, a restart reads it back without printing it, a given token wins, and a rank
/// killed with kill -9 inside the container is restarted.
#[actix_web::test]
async fn docker_run_quick_start_with_a_generated_token() {
    let volume = Volume::create("tv-data");
    let data = format!("{}:/data", volume.name);
    let Served { container: c, app } = serve("tv-quick", &["-v", &data]).await;
    let logs = c.logs();
    let token = generated_token(&logs).unwrap_or_else(|| panic!("no token in the log:\n{logs}"));
    assert_eq!(token.len(), 64);
    assert_eq!(
        c.exec(&["stat", "-c", "%a %u", "/data/api-token"]),
        "600 10001"
    );
    assert_eq!(c.exec(&["cat", "/data/api-token"]), token);

    // Open: /health. Closed without the token: everything else.
    let bare = test_client();
    let res = bare.get(app.url("/jobs")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(app.get("/health").await.status(), 200);

    // The walk-through: create, summary, logs, SSE stream, checkpoints, model.
    let id = app
        .create_job(json!({"world_size": 4, "total_steps": 40, "checkpoint_every": 10}))
        .await;
    let stream = app
        .client
        .get(app.url(&format!("/jobs/{id}/logs/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let events = SseReader::new(stream).until_end().await;
    assert!(events.iter().any(|e| e.event == "log"), "{events:?}");
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let summary = app.summary(&id).await;
    assert_eq!(summary["step"], 40, "{summary}");
    assert!(!app.log_lines(&id).await.is_empty());
    assert_eq!(committed_checkpoints(&app, &id).await.min(1), 1);
    model_sha(&app, &id).await;

    // A Python worker: the image's python3 runs it, its heartbeat reaches the server.
    let script = "import json, os, urllib.request\n\
        req = urllib.request.Request(os.environ['TRAINVISOR_HEARTBEAT_URL'], \
        data=json.dumps({'step': 7}).encode(), method='POST', headers={'Authorization': \
        'Bearer ' + os.environ['TRAINVISOR_TOKEN'], 'Content-Type': 'application/json'})\n\
        urllib.request.urlopen(req).read()\n\
        print('python rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n";
    let id = app
        .create_job(json!({"world_size": 2, "command": ["python3", "-c", script]}))
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let lines = app.log_lines(&id).await;
    assert!(
        lines.iter().any(|l| l["line"] == "python rank 1 of 2"),
        "{lines:?}"
    );
    assert_eq!(app.summary(&id).await["step"], 7);

    // kill -9 of a rank inside the container: the rank comes back, the job ends well.
    let dataset = small_dataset_in(&c);
    let id = app.create_job(trainer_spec(dataset)).await;
    let pids = app.running_pids(&id, 2).await;
    c.exec(&["sh", "-c", &format!("kill -9 {}", pids[0])]);
    let restarted = wait_for(Duration::from_secs(60), || async {
        (!app.restarts(&id).await.is_empty()).then_some(())
    })
    .await;
    assert!(restarted.is_some(), "the killed rank was not restarted");
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");

    // A restart reads the token back and does not print it again.
    docker_ok(&["restart", "-t", "30", &c.name]);
    let again = connect(&c).await;
    let logs = c.logs();
    assert_eq!(
        logs.matches(&token).count(),
        1,
        "the token is printed once:\n{logs}"
    );
    assert!(
        logs.contains("API token read from /data/api-token"),
        "{logs}"
    );
    let mut app = app;
    app.address = again.address;
    assert_eq!(app.get("/jobs").await.status(), 200);

    // A given TRAINVISOR_API_TOKEN wins: nothing generated, nothing written.
    let other = Volume::create("tv-data");
    let given = "a-token-given-by-the-operator";
    let Served { container: c2, .. } = serve(
        "tv-given",
        &[
            "-v",
            &format!("{}:/data", other.name),
            "-e",
            &format!("TRAINVISOR_API_TOKEN={given}"),
        ],
    )
    .await;
    assert!(generated_token(&c2.logs()).is_none(), "{}", c2.logs());
    let out = docker(&["exec", &c2.name, "test", "-e", "/data/api-token"]);
    assert!(!out.status.success(), "no token file when one is given");
    let address = format!("http://{}/jobs", c2.host_port(8000));
    let res = bare.get(&address).bearer_auth(given).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

/// `docker kill` (SIGKILL to the whole container) in the middle of training, then
/// `docker start`: the job resumes from the volume; then `docker stop`: graceful (the server's
/// own exit, code 0, well within the timeout), and the next start resumes again. The final
/// model is bit-identical to a failure-free run's.
#[actix_web::test]
async fn docker_kill_and_docker_stop_resume_exactly_from_the_volume() {
    let volume = Volume::create("tv-data");
    let data = format!("{}:/data", volume.name);
    let Served {
        container: c,
        mut app,
    } = serve("tv-resume", &["-v", &data]).await;
    let dataset = small_dataset_in(&c);
    let reference = app.create_job(trainer_spec(dataset)).await;
    let job = app
        .wait_finished(&reference, Duration::from_secs(300))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let reference = model_sha(&app, &reference).await;

    let id = app.create_job(trainer_spec(dataset)).await;
    wait_checkpoints(&app, &id, 2).await;
    docker_ok(&["kill", &c.name]);
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "137");
    docker_ok(&["start", &c.name]);
    app.address = connect(&c).await.address;
    let resumed = wait_for(Duration::from_secs(60), || async {
        let restarts = app.restarts(&id).await;
        restarts
            .iter()
            .any(|r| r["reason"] == "server_restart")
            .then_some(())
    })
    .await;
    assert!(
        resumed.is_some(),
        "the job did not resume after docker start"
    );
    let before_stop = committed_checkpoints(&app, &id).await;
    wait_checkpoints(&app, &id, before_stop + 1).await;

    let started = std::time::Instant::now();
    docker_ok(&["stop", "-t", "60", &c.name]);
    let took = started.elapsed();
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "docker stop: the server exits by itself, not by SIGKILL:\n{}",
        c.logs()
    );
    assert!(took < Duration::from_secs(60), "stopped at the timeout");
    assert!(c.logs().contains("SIGTERM: shutting down"), "{}", c.logs());

    docker_ok(&["start", &c.name]);
    app.address = connect(&c).await.address;
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let server_restarts = app
        .restarts(&id)
        .await
        .iter()
        .filter(|r| r["reason"] == "server_restart")
        .count();
    assert!(server_restarts >= 2, "resumed after each start");
    assert_eq!(
        model_sha(&app, &id).await,
        reference,
        "the run through docker kill and docker stop is not exact"
    );
}

/// Ranks that leave orphans behind leave no zombie: tini, PID 1, reaps them (one orphan is
/// killed with the rank's group when the rank exits, one left the group with setsid and
/// exits later by itself). The same job with the server as PID 1 (no init) does leave
/// zombies, which is why the image has tini.
#[actix_web::test]
async fn orphans_of_ranks_are_reaped_no_zombies() {
    let orphans = json!({"world_size": 2,
        "command": ["sh", "-c", "setsid sleep 1 & sleep 30 & echo spawned; sleep 0.5; exit 0"]});
    for init in [true, false] {
        let volume = Volume::create("tv-data");
        let data = format!("{}:/data", volume.name);
        let mut args = vec!["-v", data.as_str()];
        if !init {
            args.extend(["--entrypoint", "trainvisor"]);
        }
        let Served { container: c, app } = serve("tv-reap", &args).await;
        for _ in 0..3 {
            let id = app.create_job(orphans.clone()).await;
            let job = app.wait_finished(&id, Duration::from_secs(60)).await;
            assert_eq!(job["state"], "succeeded", "{job}");
        }
        // The orphans: gone once reaped; left as zombies ("Z") when nothing reaps them.
        let sleeps = || {
            processes(&c)
                .into_iter()
                .filter(|p| p.2 == "sleep")
                .collect::<Vec<_>>()
        };
        let settled = wait_for(Duration::from_secs(30), || async {
            let s = sleeps();
            let all_exited = s.iter().all(|p| p.1 == "Z");
            (if init {
                s.is_empty()
            } else {
                !s.is_empty() && all_exited
            })
            .then_some(s)
        })
        .await;
        let pid1 = processes(&c)
            .into_iter()
            .find(|p| p.0 == "1")
            .map(|p| p.2)
            .unwrap_or_default();
        if init {
            assert_eq!(pid1, "tini", "tini is PID 1");
            assert!(settled.is_some(), "orphans not reaped: {:?}", sleeps());
            assert!(zombies(&c).is_empty(), "{:?}", zombies(&c));
        } else {
            assert_eq!(pid1, "trainvisor");
            let zombies = settled.expect("without an init, the orphans stay zombies");
            // Two orphans per rank (one killed with its group, one exited on its own), two
            // ranks, three jobs.
            assert_eq!(zombies.len(), 12, "{zombies:?}");
        }
    }
}

/// `deploy/compose.yaml` as users run it, with the S3 server image built here from s3s-fs:
/// the server creates the bucket at start; a trainer job reads its dataset from the bucket and
/// writes its checkpoints there (nothing in the server's volume); the S3 container is killed
/// while checkpoints are being written and started again; the job ends with the model of a
/// failure-free run.
#[actix_web::test]
async fn compose_with_s3_keeps_data_and_checkpoints_in_the_bucket() {
    let image = trainvisor_image();
    let s3_image = s3s_image();
    let key = format!("AK{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let bucket = "training-data";
    let project = ComposeProject::new(
        "tv-compose",
        &repo_root().join("deploy/compose.yaml"),
        &[
            ("TRAINVISOR_IMAGE", &image),
            ("S3_IMAGE", &s3_image),
            ("TRAINVISOR_PUBLISH", "127.0.0.1:"),
            ("S3_ACCESS_KEY", &key),
            ("S3_SECRET_KEY", &secret),
            ("S3_BUCKET", bucket),
        ],
    );
    project.ok(&["up", "-d", "--no-build"]);
    let tv = project.container("trainvisor");
    let s3 = project.container("s3");
    let mut app = connect(&tv).await;
    let logs = tv.logs();
    assert!(
        s3.exec(&["test", "-d", &format!("/data/{bucket}")])
            .is_empty(),
        "the bucket is made at start"
    );
    assert!(logs.contains("S3 bucket ready"), "{logs}");

    // The dataset goes into the bucket with the image's own binary and the service's S3_* env.
    let dataset = format!("s3://{bucket}/datasets/small");
    tv.exec(&[
        "trainvisor",
        "make-dataset",
        "--out",
        &dataset,
        "--shards",
        "4",
        "--rows-per-shard",
        "400",
        "--features",
        "8",
        "--classes",
        "3",
        "--seed",
        "7",
        "--test-rows",
        "100",
    ]);
    let reference = app.create_job(trainer_spec(&dataset)).await;
    let job = app
        .wait_finished(&reference, Duration::from_secs(300))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["spec"]["checkpoint_dir"],
        format!("s3://{bucket}/checkpoints"),
        "USE_S3 puts checkpoints in the bucket"
    );
    let reference = model_sha(&app, &reference).await;

    let id = app.create_job(trainer_spec(&dataset)).await;
    wait_checkpoints(&app, &id, 2).await;
    docker_ok(&["kill", &s3.name]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s3.inspect("{{.State.Running}}"), "false", "S3 stays down");
    let during = committed_checkpoints(&app, &id).await;
    docker_ok(&["start", &s3.name]);
    wait_checkpoints(&app, &id, during + 1).await;
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        model_sha(&app, &id).await,
        reference,
        "the run through an S3 outage is not exact"
    );

    // Where things are: the checkpoints as objects in the S3 server's directory, none in the
    // trainvisor volume.
    let objects = s3.exec(&["ls", &format!("/data/{bucket}/checkpoints/{id}")]);
    assert!(objects.lines().any(|l| l.starts_with("step-")), "{objects}");
    assert!(objects.lines().any(|l| l == "LATEST"), "{objects}");
    let local = docker(&["exec", &tv.name, "test", "-e", "/data/checkpoints"]);
    assert!(
        !local.status.success(),
        "no checkpoint in the server's volume"
    );
    let shards = s3.exec(&["ls", &format!("/data/{bucket}/datasets/small")]);
    assert!(shards.contains("shard-00000.jsonl"), "{shards}");

    // The seed's commands work on the project.
    app.address = connect(&tv).await.address;
    let out = project.ok(&["logs", "--no-color", "trainvisor"]);
    assert!(out.contains("trainvisor listening on"), "{out}");
}

/// Waits until a container has exited and returns its exit code.
fn exit_code(c: &Container) -> i64 {
    let exited = wait_until(Duration::from_secs(120), || {
        c.inspect("{{.State.Status}}") == "exited"
    });
    assert!(exited, "{} is still running:\n{}", c.name, c.logs());
    c.inspect("{{.State.ExitCode}}").parse().unwrap()
}

/// What a configuration error must look like in `docker logs`: one line from trainvisor that
/// says what is wrong, no panic, no backtrace.
fn assert_one_clear_line(logs: &str, says: &str) {
    assert!(
        !logs.contains("panicked") && !logs.contains("backtrace"),
        "{logs}"
    );
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.starts_with("trainvisor: "))
        .collect();
    assert_eq!(errors.len(), 1, "one line:\n{logs}");
    assert!(errors[0].contains(says), "{logs}");
}

/// Bad input stops the container with one clear line in `docker logs` and a non-zero exit: a
/// /data the image's user cannot write (a host directory owned by root), and an S3 key the S3
/// server refuses (the secret is not echoed).
#[test]
fn bad_input_is_one_clear_line_and_a_non_zero_exit() {
    let image = trainvisor_image();
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        host_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mount = format!("{}:/data", host_dir.path().display());
    let c = Container::run("tv-rodata", &["-v", &mount, &image]);
    assert_eq!(exit_code(&c), 1);
    let logs = c.logs();
    assert_one_clear_line(&logs, "data dir /data is not writable by uid 10001");
    assert_eq!(logs.trim().lines().count(), 1, "{logs}");

    let network = Network::create("tv-net");
    let key = "AKTESTKEY";
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let _s3 = Container::run(
        "tv-s3",
        &[
            "--network",
            &network.name,
            "--network-alias",
            "s3",
            "-e",
            &format!("S3_ACCESS_KEY={key}"),
            "-e",
            &format!("S3_SECRET_KEY={secret}"),
            &s3s_image(),
        ],
    );
    let volume = Volume::create("tv-data");
    let wrong = "not-the-secret-key";
    let c = Container::run(
        "tv-badkey",
        &[
            "--network",
            &network.name,
            "-v",
            &format!("{}:/data", volume.name),
            "-e",
            "USE_S3=true",
            "-e",
            "S3_ENDPOINT=http://s3:9000",
            "-e",
            "S3_BUCKET=training-data",
            "-e",
            &format!("S3_ACCESS_KEY={key}"),
            "-e",
            &format!("S3_SECRET_KEY={wrong}"),
            "-e",
            "TRAINVISOR_API_TOKEN=a-given-token-of-the-operator",
            &image,
        ],
    );
    assert_eq!(exit_code(&c), 1);
    let logs = c.logs();
    assert_one_clear_line(&logs, "refused the credentials for bucket training-data");
    assert!(
        logs.contains("check S3_ACCESS_KEY and S3_SECRET_KEY"),
        "{logs}"
    );
    assert!(!logs.contains(wrong) && !logs.contains(&secret), "{logs}");
}

/// A tool of the test venv (tests/run installs it), by the variable tests/run exports or at
/// the venv's default place.
pub fn venv_tool(var: &str, name: &str) -> std::path::PathBuf {
    let path = std::env::var_os(var)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/venv-tests/bin").join(name));
    assert!(
        path.exists(),
        "{} is missing: tests/run installs it (kubernetes-validate and PyYAML in the test venv)",
        path.display()
    );
    path
}

/// The manifest files, in the order deploy/k8s/kustomization.yaml lists them.
fn manifest_files() -> Vec<std::path::PathBuf> {
    let dir = repo_root().join("deploy/k8s");
    let kustomization = yaml_documents(&[dir.join("kustomization.yaml")]);
    kustomization[0]["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| dir.join(r.as_str().unwrap()))
        .collect()
}

/// Every document of YAML files, as JSON (read by PyYAML from the test venv).
fn yaml_documents(files: &[std::path::PathBuf]) -> Vec<Value> {
    let out = std::process::Command::new(venv_tool("TRAINVISOR_TEST_PYTHON", "python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        ])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// `kubernetes-validate --strict` on files: Ok(output) if they all validate.
fn k8s_validate(files: &[std::path::PathBuf]) -> Result<String, String> {
    let out =
        std::process::Command::new(venv_tool("TRAINVISOR_K8S_VALIDATE", "kubernetes-validate"))
            .arg("--strict")
            .args(files)
            .output()
            .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The manifests validate offline against the official Kubernetes schemas (strict: no unknown
/// field), alone and as `kubectl kustomize` renders them where kubectl is installed; and they
/// keep the promises the README makes: one replica replaced with Recreate, readiness on /ready and liveness on /health,
/// a restrictive securityContext, a Role that grants nothing (the server calls no Kubernetes
/// API) bound to a ServiceAccount whose token is not mounted, network policies for both pods.
#[test]
fn kubernetes_manifests_validate_offline() {
    let files = manifest_files();
    let report = k8s_validate(&files).unwrap_or_else(|e| panic!("invalid manifests:\n{e}"));
    let docs = yaml_documents(&files);
    assert_eq!(
        report.matches(" passed for resource ").count(),
        docs.len(),
        "{report}"
    );
    // The validator does reject what the API server would.
    let broken = tempfile::tempdir().unwrap();
    let bad = broken.path().join("bad.yaml");
    let text = std::fs::read_to_string(&files[2]).unwrap();
    std::fs::write(&bad, text.replace("replicas: 1", "replicas: one")).unwrap();
    assert!(
        k8s_validate(&[bad]).is_err(),
        "a broken Deployment validated"
    );

    if std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_root().join("deploy/k8s"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = broken.path().join("rendered.yaml");
        std::fs::write(&rendered, &out.stdout).unwrap();
        k8s_validate(std::slice::from_ref(&rendered))
            .unwrap_or_else(|e| panic!("kustomize output invalid:\n{e}"));
        let all = yaml_documents(&[rendered]);
        assert_eq!(all.len(), docs.len());
        for doc in all.iter().filter(|d| d["kind"] != "Namespace") {
            assert_eq!(doc["metadata"]["namespace"], "training-system", "{doc}");
        }
    } else {
        eprintln!("kubectl is not installed: kustomize rendering not checked");
    }

    let deployment = find(&docs, "Deployment", "trainvisor");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trainvisor");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(find(&docs, "Role", "trainvisor")["rules"], json!([]));
    let binding = find(&docs, "RoleBinding", "trainvisor");
    assert_eq!(binding["roleRef"]["name"], "trainvisor");
    assert_eq!(binding["subjects"][0]["name"], "trainvisor");
    assert_eq!(
        find(&docs, "ServiceAccount", "trainvisor")["automountServiceAccountToken"],
        false
    );
    find(&docs, "NetworkPolicy", "trainvisor");
    find(&docs, "NetworkPolicy", "s3");
    find(&docs, "StatefulSet", "s3");
}

/// A container's environment as Kubernetes would set it: `envFrom` ConfigMaps, then `env`
/// values and references to ConfigMap and Secret keys, all resolved from the manifests.
fn resolve_env(docs: &[Value], container: &Value) -> Vec<(String, String)> {
    let data = |kind: &str, name: &str| -> Value {
        let doc = find(docs, kind, name);
        if kind == "Secret" {
            doc["stringData"].clone()
        } else {
            doc["data"].clone()
        }
    };
    let mut env = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let map = data("ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in map.as_object().unwrap() {
            env.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
            data("Secret", r["name"].as_str().unwrap())[r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            let r = &var["valueFrom"]["configMapKeyRef"];
            data("ConfigMap", r["name"].as_str().unwrap())[r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_string()
        };
        env.push((name, value));
    }
    env
}

/// `docker run` arguments for a pod's container as the manifests describe it: its user and
/// groups, securityContext, environment, ports, volumes (PVC: a named volume; emptyDir: a
/// tmpfs) and command/args. Returns them with the volumes to keep alive.
fn docker_args_for(docs: &[Value], pod: &Value, image: &str) -> (Vec<String>, Vec<Volume>) {
    let container = &pod["containers"][0];
    let mut args: Vec<String> = Vec::new();
    let psc = &pod["securityContext"];
    if let Some(uid) = psc["runAsUser"].as_u64() {
        let gid = psc["runAsGroup"].as_u64().unwrap_or(uid);
        args.extend(["--user".into(), format!("{uid}:{gid}")]);
    }
    if let Some(fs_group) = psc["fsGroup"].as_u64() {
        args.extend(["--group-add".into(), fs_group.to_string()]);
    }
    let sc = &container["securityContext"];
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
        args.extend(["--cap-drop".into(), cap.as_str().unwrap().into()]);
    }
    for (k, v) in resolve_env(docs, container) {
        args.extend(["-e".into(), format!("{k}={v}")]);
    }
    for port in container["ports"].as_array().into_iter().flatten() {
        args.extend([
            "-p".into(),
            format!("127.0.0.1::{}", port["containerPort"].as_u64().unwrap()),
        ]);
    }
    let mut volumes = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let path = mount["mountPath"].as_str().unwrap();
        let source = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"]);
        match source {
            Some(v) if v.get("emptyDir").is_some() => {
                args.extend(["--tmpfs".into(), path.into()]);
            }
            // A PersistentVolumeClaim (or a StatefulSet's volumeClaimTemplate): a named volume.
            _ => {
                let volume = Volume::create("tv-pvc");
                args.extend(["-v".into(), format!("{}:{path}", volume.name)]);
                volumes.push(volume);
            }
        }
    }
    let command = container["command"].as_array().cloned().unwrap_or_default();
    if let Some(entry) = command.first() {
        args.extend(["--entrypoint".into(), entry.as_str().unwrap().into()]);
    }
    args.push(image.into());
    for a in command
        .iter()
        .skip(1)
        .chain(container["args"].as_array().into_iter().flatten())
    {
        args.push(a.as_str().unwrap().into());
    }
    (args, volumes)
}

/// The manifests proven against the real image: the S3 StatefulSet's container (the s3s image
/// standing in for MinIO) and trainvisor's Deployment container run under Docker with the
/// command, arguments, environment (ConfigMap and Secret), ports, volume paths and security
/// context read from the manifests, on a network where the Service names resolve. The
/// readiness and liveness probes answer, the Secret's token opens the API, and a trainer job
/// runs with its data and checkpoints in the bucket the ConfigMap names.
#[actix_web::test]
async fn kubernetes_pod_specs_run_under_docker() {
    let docs = yaml_documents(&manifest_files());
    let network = Network::create("tv-k8s");

    let s3_set = find(&docs, "StatefulSet", "s3");
    let s3_service = find(&docs, "Service", "s3");
    let s3_pod = &s3_set["spec"]["template"]["spec"];
    let (mut s3_args, _s3_volumes) = docker_args_for(&docs, s3_pod, &s3s_image());
    // The Service's name resolves to the pod; the s3s image serves on 9000, like MinIO here.
    assert_eq!(s3_service["spec"]["ports"][0]["port"], 9000);
    assert_eq!(s3_pod["containers"][0]["ports"][0]["containerPort"], 9000);
    let s3_name = s3_service["metadata"]["name"].as_str().unwrap().to_string();
    let mut prefix = vec!["--network".to_string(), network.name.clone()];
    prefix.extend(["--network-alias".into(), s3_name]);
    s3_args.splice(0..0, prefix);
    let refs: Vec<&str> = s3_args.iter().map(String::as_str).collect();
    let _s3 = Container::run("tv-k8s-s3", &refs);

    let deployment = find(&docs, "Deployment", "trainvisor");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let (mut args, _volumes) = docker_args_for(&docs, pod, &trainvisor_image());
    args.splice(0..0, ["--network".to_string(), network.name.clone()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Container::run("tv-k8s", &refs);

    let port_of = |name: &Value| -> u16 {
        let ports = container["ports"].as_array().unwrap();
        let port = ports
            .iter()
            .find(|p| p["name"] == *name || p["containerPort"] == *name)
            .unwrap_or_else(|| panic!("probe port {name} is not a container port"));
        port["containerPort"].as_u64().unwrap() as u16
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = port_of(&get["port"]);
        let url = format!(
            "http://{}{}",
            c.host_port(port),
            get["path"].as_str().unwrap()
        );
        wait_ok(&c, &url).await;
    }

    let env = resolve_env(&docs, container);
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} is not set in the manifests"))
    };
    let api_port = port_of(&json!("http"));
    let app = client_for(
        format!("http://{}", c.host_port(api_port)),
        Some(&var("TRAINVISOR_API_TOKEN")),
    );
    let bare = test_client().get(app.url("/jobs")).send().await.unwrap();
    assert_eq!(bare.status(), 401, "the Secret's token is required");
    assert!(
        generated_token(&c.logs()).is_none(),
        "the Secret's token is used"
    );

    let bucket = var("S3_BUCKET");
    let dataset = format!("s3://{bucket}/datasets/small");
    c.exec(&[
        "trainvisor",
        "make-dataset",
        "--out",
        &dataset,
        "--shards",
        "2",
        "--rows-per-shard",
        "200",
        "--features",
        "8",
        "--classes",
        "3",
        "--test-rows",
        "50",
    ]);
    let mut spec = trainer_spec(&dataset);
    spec["total_steps"] = json!(40);
    let id = app.create_job(spec).await;
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["spec"]["checkpoint_dir"],
        format!("s3://{bucket}/checkpoints")
    );
    assert!(committed_checkpoints(&app, &id).await >= 1);
}
