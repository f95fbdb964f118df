//! The Slurm launcher against a real two-node Slurm cluster on this machine (Debian's
//! slurm-wlm and munge; `tests/run` installs them). Each test starts its own hermetic
//! cluster with `tests/slurm-cluster` (its own munged, slurmctld, slurmd n1 and n2, free
//! ports, everything in a temp dir) and stops it when done. Without Slurm these tests fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::*;

struct Cluster {
    dir: TempDir,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slurm-cluster")
}

impl Cluster {
    fn start() -> Cluster {
        // Short path: munged's socket path must fit in a sockaddr_un.
        let dir = tempfile::Builder::new()
            .prefix("tvslurm")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let out = Command::new(script())
            .arg("up")
            .arg(dir.path())
            .output()
            .expect("tests/slurm-cluster runs");
        assert!(
            out.status.success(),
            "could not start a Slurm cluster (tests/run installs slurm-wlm and munge): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.path().join("slurm.conf");
        Cluster { dir, conf }
    }

    fn cmd(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Slurm jobs and steps whose name belongs to trainvisor job `id`.
    fn of_job(&self, id: &str) -> Vec<String> {
        let jobs = self.cmd("squeue", &["-h", "-o", "%i %j %T"]);
        let steps = self.cmd("squeue", &["-h", "-s", "-o", "%i %j"]);
        jobs.lines()
            .chain(steps.lines())
            .filter(|l| l.contains(&format!("trainvisor-{id}")))
            .map(str::to_string)
            .collect()
    }

    async fn wait_nothing_of(&self, id: &str) {
        let left = wait_for(Duration::from_secs(30), || async {
            self.of_job(id).is_empty().then_some(())
        })
        .await;
        assert!(
            left.is_some(),
            "Slurm still holds job {id}: {:?}",
            self.of_job(id)
        );
    }

    /// The node goes down: its slurmd is killed (the steps it started keep running, as they
    /// would not on a real dead node; their stale heartbeats are refused).
    fn stop_slurmd(&self, node: &str) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("slurmd-{node}.pid")))
            .expect("slurmd pid file");
        kill(pid.trim().parse().unwrap(), libc::SIGKILL);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

async fn app_on(cluster: &Cluster) -> TestApp {
    let conf = cluster.conf.clone();
    spawn_app_with(move |s| s.slurm_conf = Some(conf)).await
}

fn trainer_spec(dataset: &Path, steps: u64, sleep: f64, slurm: bool) -> Value {
    let mut spec = json!({"world_size": 4, "dataset": dataset, "total_steps": steps,
                          "batch_size": 16, "checkpoint_every": 5, "lr": 0.2, "seed": 3,
                          "backoff_initial_ms": 0, "sleep_sec": sleep});
    if slurm {
        spec["launcher"] = json!("slurm");
        spec["nodes"] = json!(2);
        spec["ntasks_per_node"] = json!(2);
    }
    spec
}

fn instance(app: &TestApp) -> String {
    std::fs::read_to_string(app.data_dir.path().join("instance-id"))
        .unwrap()
        .trim()
        .to_string()
}

/// The pid of rank `rank`'s own process (not its srun client): carries the data dir's
/// marker and `RANK=<rank>` and is not srun.
fn rank_process(instance: &str, rank: u32) -> Option<u32> {
    let want = format!("RANK={rank}");
    marked_processes(instance).into_iter().find(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        comm.trim() != "srun"
            && !comm.trim().is_empty()
            && env.split(|&b| b == 0).any(|v| v == want.as_bytes())
    })
}

/// Waits until every rank runs and the job is past `step`; returns the summary.
async fn running_past(app: &TestApp, id: &str, step: u64) -> Value {
    wait_for(Duration::from_secs(90), || async {
        let s = app.summary(id).await;
        let all = s["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["state"] == "running"));
        (all && s["step"].as_u64().is_some_and(|x| x >= step)).then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("job {id} never ran past step {step}"))
}

fn nodes_of(summary: &Value) -> Vec<String> {
    summary["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["node"].as_str().unwrap_or("").to_string())
        .collect()
}

#[actix_web::test]
async fn a_trainer_job_across_two_nodes_matches_the_local_run() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let data = small_dataset(&app);
    let local = run_to_end(&app, trainer_spec(&data, 60, 0.0, false)).await;
    let id = app.create_job(trainer_spec(&data, 60, 0.02, true)).await;
    let summary = running_past(&app, &id, 1).await;
    assert_eq!(summary["launcher"], "slurm");
    assert_eq!(summary["launcher_ref"]["kind"], "slurm", "{summary}");
    assert!(slurm_job_of(&summary).is_some(), "{summary}");
    assert_eq!(nodes_of(&summary), ["n1", "n1", "n2", "n2"]);
    assert!(!cluster.of_job(&id).is_empty(), "no Slurm job for {id}");
    let job = app.wait_finished(&id, Duration::from_secs(240)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        model_sha(&app, &id).await,
        model_sha(&app, &local).await,
        "the Slurm run and the local run trained different models"
    );
    // The history has the node of every incarnation; the local run's is this host.
    let incs = app.incarnations(&id).await;
    let nodes: Vec<&str> = incs.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["n1", "n1", "n2", "n2"]);
    let host = trainvisor::launcher::hostname();
    assert!(
        app.incarnations(&local)
            .await
            .iter()
            .all(|i| i["node"] == host.as_str())
    );
    assert_eq!(nodes_of(&app.summary(&local).await), vec![host; 4]);
    // Completion leaves nothing on Slurm.
    cluster.wait_nothing_of(&id).await;
}

#[actix_web::test]
async fn a_rank_killed_on_its_node_is_restarted() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let data = small_dataset(&app);
    let id = app.create_job(trainer_spec(&data, 120, 0.03, true)).await;
    running_past(&app, &id, 10).await;
    let pid = rank_process(&instance(&app), 3).expect("rank 3's process");
    kill(pid, libc::SIGKILL);
    let job = app.wait_finished(&id, Duration::from_secs(240)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let restarts = app.restarts(&id).await;
    assert!(
        restarts
            .iter()
            .any(|r| r["rank"] == 3 && r["restarted_at"].is_string()),
        "{restarts:?}"
    );
    // One failure on n2 is below the quarantine threshold: n2 is still used.
    assert_eq!(job["excluded_nodes"], json!([]));
    let incs = app.incarnations(&id).await;
    assert!(
        incs.iter()
            .any(|i| i["rank"] == 3 && i["attempt"] == 1 && i["node"] == "n2"),
        "{incs:?}"
    );
    let local = run_to_end(&app, trainer_spec(&data, 120, 0.0, false)).await;
    assert_eq!(model_sha(&app, &id).await, model_sha(&app, &local).await);
    cluster.wait_nothing_of(&id).await;
}

#[actix_web::test]
async fn ranks_of_a_node_that_goes_down_move_to_the_other_node() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let data = small_dataset(&app);
    let id = app.create_job(trainer_spec(&data, 150, 0.1, true)).await;
    let summary = running_past(&app, &id, 5).await;
    assert_eq!(nodes_of(&summary), ["n1", "n1", "n2", "n2"]);
    cluster.stop_slurmd("n2");
    let job = app.wait_finished(&id, Duration::from_secs(300)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["excluded_nodes"], json!(["n2"]), "{job}");
    let summary = app.summary(&id).await;
    assert_eq!(summary["excluded_nodes"], json!(["n2"]));
    let rows = app.get_json(&format!("/jobs/{id}/excluded_nodes")).await;
    assert_eq!(rows[0]["node"], "n2", "{rows}");
    assert_eq!(rows[0]["reason"], "node_failure", "{rows}");
    let restarts = app.restarts(&id).await;
    assert!(
        restarts.iter().any(|r| r["reason"] == "node_failure"),
        "{restarts:?}"
    );
    // Every rank's last incarnation ran on n1.
    let incs = app.incarnations(&id).await;
    for rank in 0..4 {
        let last = incs.iter().rfind(|i| i["rank"] == rank).unwrap();
        assert_eq!(last["node"], "n1", "rank {rank}: {incs:?}");
        assert_eq!(last["outcome"], "succeeded");
    }
    let local = run_to_end(&app, trainer_spec(&data, 150, 0.0, false)).await;
    assert_eq!(model_sha(&app, &id).await, model_sha(&app, &local).await);
}

#[actix_web::test]
async fn stop_leaves_nothing_on_slurm() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let id = app
        .create_job(json!({"world_size": 3, "launcher": "slurm", "nodes": 2,
                           "command": sh("echo on $SLURMD_NODENAME as $RANK/$WORLD_SIZE master $MASTER_ADDR:$MASTER_PORT; exec sleep 300")}))
        .await;
    let summary = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (running_pids_in(&s).len() == 3).then_some(s)
    })
    .await
    .expect("3 ranks running");
    assert_eq!(nodes_of(&summary), ["n1", "n1", "n2"]);
    let lines = wait_for(Duration::from_secs(30), || async {
        let lines: Vec<String> = app
            .log_lines(&id)
            .await
            .iter()
            .filter(|l| l["stream"] == "stdout")
            .map(|l| l["line"].as_str().unwrap().to_string())
            .collect();
        (lines.len() == 3).then_some(lines)
    })
    .await
    .expect("every rank printed its line");
    let port = app.incarnations(&id).await[0]["master_port"].clone();
    for (rank, node) in [(0, "n1"), (1, "n1"), (2, "n2")] {
        let want = format!("on {node} as {rank}/3 master 127.0.0.1:{port}");
        assert!(lines.contains(&want), "{want:?} not in {lines:?}");
    }
    assert!(!cluster.of_job(&id).is_empty());
    // The token is in the step's environment, never on a command line.
    for pid in marked_processes(&instance(&app)) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains("TRAINVISOR_TOKEN"));
    }
    assert_eq!(app.stop(&id).await.status(), 200);
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "stopped");
    cluster.wait_nothing_of(&id).await;
    let gone = wait_for(Duration::from_secs(10), || async {
        marked_processes(&instance(&app)).is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "rank processes left after stop");
    // An allocation Slurm refuses fails the job with Slurm's reason.
    let id = app
        .create_job(
            json!({"world_size": 2, "launcher": "slurm", "partition": "nosuch",
                           "command": sh("true")}),
        )
        .await;
    let job = app.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("no Slurm allocation") && reason.contains("partition"),
        "{reason}"
    );
    // One Slurm queues (3 nodes of 2): the job stays pending; stopping it withdraws the request.
    let id = app
        .create_job(json!({"world_size": 3, "launcher": "slurm", "nodes": 3,
                           "command": sh("true")}))
        .await;
    let queued = wait_for(Duration::from_secs(30), || async {
        (!cluster.of_job(&id).is_empty()).then_some(())
    })
    .await;
    assert!(queued.is_some(), "the allocation was never queued");
    assert_eq!(app.job(&id).await["state"], "pending");
    assert_eq!(app.stop(&id).await.status(), 200);
    assert_eq!(app.job(&id).await["state"], "stopped");
    cluster.wait_nothing_of(&id).await;
}

#[actix_web::test]
async fn slurm_options_are_validated() {
    let app = spawn_app().await;
    let bad = [
        json!({"world_size": 2, "partition": "debug"}),
        json!({"world_size": 2, "launcher": "local", "nodes": 2}),
        json!({"world_size": 2, "launcher": "slurm", "nodes": 0}),
        json!({"world_size": 2, "launcher": "slurm", "nodes": 3}),
        json!({"world_size": 4, "launcher": "slurm", "nodes": 1, "ntasks_per_node": 2}),
        json!({"world_size": 2, "launcher": "slurm", "partition": "a b"}),
        json!({"world_size": 2, "launcher": "slurm", "time_limit": "soon"}),
        json!({"world_size": 2, "launcher": "slurm", "srun_args": ["--jobid=7"]}),
        json!({"world_size": 2, "launcher": "slurm", "srun_args": ["-wn1"]}),
        json!({"world_size": 2, "launcher": "slurm", "srun_args": [""]}),
    ];
    for spec in bad {
        let res = app.post_json("/jobs", &spec).await;
        let body = assert_json_error(res, 422).await;
        assert!(!body["message"].as_str().unwrap().is_empty(), "{spec}");
    }
    let res = app
        .post_json("/jobs", &json!({"world_size": 2, "launcher": "kubernetes"}))
        .await;
    assert_json_error(res, 400).await;
    assert!(
        app.get_json("/jobs").await.as_array().unwrap().is_empty(),
        "a refused spec created a job"
    );
}

/// The real binary serving `data_dir` with the cluster's slurm.conf; returns it and its URL.
fn start_server(data_dir: &Path, conf: &Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args(["serve", "--bind", "127.0.0.1:0", "--kill-grace-ms", "300"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--slurm-conf")
        .arg(conf)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let url = listening_url(&mut child);
    (child, url)
}

/// The Slurm job id of a summary's allocation (`launcher_ref`).
fn slurm_job_of(summary: &Value) -> Option<u64> {
    summary["launcher_ref"]["id"].as_str()?.parse().ok()
}

/// Waits until both ranks run; returns the job's Slurm allocation.
async fn both_running(app: &TestApp, id: &str) -> u64 {
    wait_for(Duration::from_secs(60), || async {
        let s = app.summary(id).await;
        (running_pids_in(&s).len() == 2)
            .then(|| slurm_job_of(&s))
            .flatten()
    })
    .await
    .expect("both ranks running")
}

/// Slurm job ids (not steps) named after trainvisor job `id`.
fn allocations(cluster: &Cluster, id: &str) -> Vec<u64> {
    cluster
        .cmd("squeue", &["-h", "-o", "%i %j"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, name)| name.trim() == format!("trainvisor-{id}"))
        .filter_map(|(job, _)| job.parse().ok())
        .collect()
}

#[actix_web::test]
async fn after_a_server_crash_the_job_runs_in_one_new_allocation() {
    let cluster = Cluster::start();
    let data_dir = tempfile::tempdir().unwrap();
    let (mut server, url) = start_server(data_dir.path(), &cluster.conf);
    let app = TestApp {
        address: url,
        client: test_client(),
        data_dir,
    };
    let id = app
        .create_job(json!({"world_size": 2, "launcher": "slurm", "nodes": 2,
                           "command": sh("exec sleep 300")}))
        .await;
    let first = both_running(&app, &id).await;
    assert_eq!(allocations(&cluster, &id), [first]);
    kill(server.id(), libc::SIGKILL);
    server.wait().unwrap();
    let (mut server, url) = start_server(app.data_dir.path(), &cluster.conf);
    let app = TestApp {
        address: url,
        client: test_client(),
        data_dir: app.data_dir,
    };
    let second = both_running(&app, &id).await;
    assert_ne!(first, second, "the job kept the dead server's allocation");
    // The old allocation was cancelled: one allocation, never two.
    let one = wait_for(Duration::from_secs(30), || async {
        (allocations(&cluster, &id) == [second]).then_some(())
    })
    .await;
    assert!(
        one.is_some(),
        "allocations: {:?}",
        allocations(&cluster, &id)
    );
    let restarts = app.restarts(&id).await;
    assert!(
        restarts.iter().any(|r| r["reason"] == "server_restart"),
        "{restarts:?}"
    );
    assert_eq!(app.stop(&id).await.status(), 200);
    cluster.wait_nothing_of(&id).await;
    kill(server.id(), libc::SIGTERM);
    server.wait().unwrap();
}

/// torchrun's node is a Slurm node: 4 ranks over 2 nodes × 2 tasks get GROUP_RANK 0, 0, 1, 1
/// and the per-node LOCAL_* values, as torchrun on each node would set them.
#[actix_web::test]
async fn torchruns_variables_follow_the_nodes() {
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let script = "import json, os\nprint('ENV ' + json.dumps(dict(os.environ)), flush=True)";
    let id = run_to_end(
        &app,
        json!({"world_size": 4, "launcher": "slurm", "nodes": 2, "ntasks_per_node": 2,
               "command": ["python3", "-c", script]}),
    )
    .await;
    let lines = app.log_lines(&id).await;
    for rank in 0..4u64 {
        let line = lines
            .iter()
            .find(|l| l["rank"] == rank && l["line"].as_str().unwrap().starts_with("ENV "))
            .unwrap_or_else(|| panic!("rank {rank} printed its environment"));
        let env: Value = serde_json::from_str(&line["line"].as_str().unwrap()[4..]).unwrap();
        assert_eq!(env["GROUP_RANK"], (rank / 2).to_string(), "rank {rank}");
        assert_eq!(env["GROUP_WORLD_SIZE"], "2");
        assert_eq!(env["LOCAL_RANK"], (rank % 2).to_string());
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["ROLE_RANK"], rank.to_string());
        assert_eq!(env["TORCHELASTIC_RUN_ID"], id.as_str());
    }
    cluster.wait_nothing_of(&id).await;
}

/// The process of `rank` on its node that runs the standby tests' `rank.py` itself: a cold
/// start (a standby's command line is the standby program), not its srun client.
fn cold_rank_process(instance: &str, rank: u32) -> Option<u32> {
    let want = format!("RANK={rank}");
    marked_processes(instance).into_iter().find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        comm.trim() != "srun"
            && cmdline.windows(7).any(|w| w == b"rank.py")
            && env.split(|&b| b == 0).any(|v| v == want.as_bytes())
    })
}

/// The standby tests' 2-rank warm job, one rank per node of two, with `extra`.
fn warm_on_two_nodes(files: &crate::standby::Files, extra: Value) -> Value {
    let mut spec = files.spec(
        2,
        100_000,
        json!({"launcher": "slurm", "nodes": 2, "ntasks_per_node": 1}),
    );
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

/// Warm standby on Slurm (issue 16): each standby is a step on its rank's node; a rank killed
/// on its node is replaced by its standby there, and nothing is left on Slurm after stop.
#[actix_web::test]
async fn a_rank_killed_on_its_node_becomes_its_standby_there() {
    use crate::standby::*;
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let files = Files::new();
    let id = app.create_job(warm_on_two_nodes(&files, json!({}))).await;
    let s = standbys_ready(&app, &id).await;
    let nodes = nodes_of(&s);
    for (rank, node) in nodes.iter().enumerate() {
        assert_eq!(&s["workers"][rank]["standby"]["node"], node, "{s}");
    }
    let steps = cluster.of_job(&id);
    assert!(
        steps
            .iter()
            .any(|l| l.contains(&format!("trainvisor-{id}-r1-s"))),
        "no standby step on Slurm: {steps:?}"
    );
    let victim = cold_rank_process(&instance(&app), 1).expect("rank 1's process");
    kill(victim, libc::SIGKILL);
    let s = stepping(&app, &id, 1, 1).await;
    let warm = files.record(1, 1).await;
    assert_eq!(warm["preloaded"], true, "{warm}");
    assert_eq!(warm["warm"], "1");
    check_started_as_written(&files, &warm);
    assert_eq!(s["workers"][1]["warm_start"], true);
    assert_eq!(s["workers"][1]["node"], json!(nodes[1]));
    app.stop(&id).await;
    app.wait_finished(&id, Duration::from_secs(60)).await;
    cluster.wait_nothing_of(&id).await;
}

/// Warm standby on Slurm when a node is excluded: rank 1's standby was on the excluded node,
/// so rank 1 starts cold on the other node, its old standby step goes, and its next standby is
/// started beside it there.
#[actix_web::test]
async fn a_standby_moves_with_its_rank_off_an_excluded_node() {
    use crate::standby::*;
    let cluster = Cluster::start();
    let app = app_on(&cluster).await;
    let files = Files::new();
    let id = app
        .create_job(warm_on_two_nodes(
            &files,
            json!({"exclude_after_failures": 1}),
        ))
        .await;
    let s = standbys_ready(&app, &id).await;
    assert_eq!(nodes_of(&s), ["n1", "n2"]);
    assert_eq!(s["workers"][1]["standby"]["node"], "n2");
    let old_standby = s["workers"][1]["standby"]["pid"].as_u64().unwrap();
    let victim = cold_rank_process(&instance(&app), 1).expect("rank 1's process");
    kill(victim, libc::SIGKILL);
    let s = stepping(&app, &id, 1, 1).await;
    assert_eq!(s["excluded_nodes"], json!(["n2"]), "{s}");
    assert_eq!(s["workers"][1]["node"], "n1", "{s}");
    assert_eq!(s["workers"][1]["warm_start"], false, "{s}");
    assert_eq!(files.record(1, 1).await["preloaded"], false);
    // The standby on n2 is gone (its step too), and a new one stands by on n1.
    let s = wait_for(Duration::from_secs(90), || async {
        let s = app.summary(&id).await;
        (s["workers"][1]["standby"]["state"] == "ready").then_some(s)
    })
    .await
    .expect("rank 1 gets a standby again");
    assert_eq!(s["workers"][1]["standby"]["node"], "n1", "{s}");
    assert!(!alive(old_standby), "the standby on n2 is still running");
    // One standby step of rank 1 is left on Slurm: the new one.
    let one = wait_for(Duration::from_secs(30), || async {
        let steps = cluster.of_job(&id);
        let r1: Vec<&String> = steps
            .iter()
            .filter(|l| l.contains(&format!("trainvisor-{id}-r1-s")))
            .collect();
        (r1.len() == 1).then_some(())
    })
    .await;
    assert!(one.is_some(), "{:?}", cluster.of_job(&id));
    app.stop(&id).await;
    app.wait_finished(&id, Duration::from_secs(60)).await;
    cluster.wait_nothing_of(&id).await;
}
