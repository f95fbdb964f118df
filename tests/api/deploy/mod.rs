//! The ways users deploy, run for real under Docker with images built here from Debian's
//! packages and this repository (no registry): `docker run` of the image, Compose with an S3
//! server, and the Kubernetes manifests (validated offline, and their container spec run under
//! Docker). Every container, network and volume has a unique name and is removed by a guard.

use std::time::Duration;

use serde_json::{Value, json};

use crate::docker_support::{
    ComposeProject, Container, Network, Volume, docker, docker_ok, repo_root, s3s_image,
    trainvisor_image,
};
use crate::helpers::{SseReader, TestApp, model_sha, test_client, wait_for};

mod image;
mod kubernetes;

pub use kubernetes::venv_tool;

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
    make_small_dataset(c, "/data/small");
    "/data/small"
}

/// The image's binary makes the tests' small dataset (4 shards × 400 rows) at `out`, a path in
/// the container or an `s3://` URL its S3_* env reaches.
fn make_small_dataset(c: &Container, out: &str) {
    c.exec(&[
        "trainvisor",
        "make-dataset",
        "--out",
        out,
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
}

/// The built-in trainer on the small dataset: long enough (sleep_sec) to be killed in flight.
fn trainer_spec(dataset: &str) -> Value {
    json!({"world_size": 2, "dataset": dataset, "total_steps": 120, "batch_size": 16,
           "checkpoint_every": 5, "lr": 0.2, "seed": 3, "sleep_sec": 0.05,
           "backoff_initial_ms": 0, "max_restarts": 20})
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
    make_small_dataset(&tv, &dataset);
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
    // It names the address it is bound to: every address of its container.
    assert!(
        out.contains("trainvisor listening on http://0.0.0.0:8000"),
        "{out}"
    );
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
