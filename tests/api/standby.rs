//! Warm standby ranks (issue 16) against the real server: a stdlib Python rank whose preload
//! module takes seconds to import. After a `kill -9`, the replacement is the rank's standby:
//! the module was imported before the script started, the script sees its own argv, cwd and
//! environment, the standby is refilled; standbys never outlive their job or their server;
//! a preload that fails leaves the job running cold with one line saying why.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// How long the preload module takes to import.
const SLOW_IMPORT_S: f64 = 3.0;

/// The rank: records how it was started (one JSON file per incarnation), then heartbeats a
/// step every 0.1 s for `--steps` steps.
const RANK: &str = r#"import json, os, sys, time, urllib.request
preloaded = "slow_preload" in sys.modules
t0 = time.time()
import slow_preload
record = {"preloaded": preloaded, "import_s": time.time() - t0, "argv": sys.argv,
          "name": __name__, "cwd": os.getcwd(), "path0": sys.path[0], "pid": os.getpid(),
          "warm": os.environ.get("TRAINVISOR_WARM_START"), "stdin": sys.stdin.read(),
          "restart_count": os.environ["RESTART_COUNT"], "master_port": os.environ["MASTER_PORT"],
          "job_env": os.environ.get("JOB_VAR"), "nice": os.nice(0)}
rank, attempt = os.environ["RANK"], os.environ["RESTART_COUNT"]
with open(os.path.join(os.environ["OUT_DIR"], "r%s-a%s.json" % (rank, attempt)), "w") as f:
    json.dump(record, f)
steps = int(sys.argv[sys.argv.index("--steps") + 1])
for step in range(1, steps + 1):
    req = urllib.request.Request(os.environ["TRAINVISOR_HEARTBEAT_URL"],
                                 data=json.dumps({"step": step}).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + os.environ["TRAINVISOR_TOKEN"],
                                          "Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    if os.environ.get("EXIT") == "%s-%s-%d" % (rank, attempt, step):
        sys.exit(3)
    if os.environ.get("HANG") == "%s-%s-%d" % (rank, attempt, step):
        def hung_in_warm_rank():
            time.sleep(3600)
        hung_in_warm_rank()
    time.sleep(0.1)
"#;

pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("code")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::write(dir.path().join("code/rank.py"), RANK).unwrap();
        std::fs::write(
            dir.path().join("code/slow_preload.py"),
            format!("import time\ntime.sleep({SLOW_IMPORT_S})\n"),
        )
        .unwrap();
        Files { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn spec(&self, world: u32, steps: u32, extra: Value) -> Value {
        let mut spec = json!({
            "world_size": world,
            "command": ["python3", "-u", self.path("code/rank.py"), "--steps", steps.to_string(), "extra arg"],
            "working_dir": self.path("work"),
            "env": {"PYTHONPATH": self.path("code"), "OUT_DIR": self.path("out"), "JOB_VAR": "v"},
            "warm_standby": true,
            "preload": ["slow_preload"],
            "restart_scope": "worker",
            "backoff_initial_ms": 0,
            "heartbeat_timeout_s": 30,
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec
    }

    /// What incarnation `attempt` of `rank` recorded, once it has.
    pub async fn record(&self, rank: u32, attempt: u32) -> Value {
        let file = self.path(&format!("out/r{rank}-a{attempt}.json"));
        wait_for(Duration::from_secs(60), || async {
            let text = std::fs::read_to_string(&file).ok()?;
            serde_json::from_str(&text).ok()
        })
        .await
        .unwrap_or_else(|| panic!("no record {}", file.display()))
    }
}

/// Waits until every rank of the job has a ready standby; returns the summary.
pub async fn standbys_ready(app: &TestApp, id: &str) -> Value {
    wait_for(Duration::from_secs(90), || async {
        let s = app.summary(id).await;
        let ready = s["workers"]
            .as_array()?
            .iter()
            .all(|w| w["standby"]["state"] == "ready");
        ready.then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("job {id}'s standbys never all became ready"))
}

/// Waits until incarnation `attempt` of `rank` is running and has stepped.
pub async fn stepping(app: &TestApp, id: &str, rank: usize, attempt: u64) -> Value {
    wait_for(Duration::from_secs(60), || async {
        let s = app.summary(id).await;
        let w = &s["workers"][rank];
        (w["attempt"] == attempt && w["state"] == "running" && w["step"].as_u64().is_some())
            .then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("rank {rank} attempt {attempt} never stepped"))
}

pub fn check_started_as_written(files: &Files, record: &Value) {
    let script = files.path("code/rank.py");
    assert_eq!(
        record["argv"],
        json!([script, "--steps", record["argv"][2], "extra arg"]),
        "{record}"
    );
    assert_eq!(record["name"], "__main__");
    assert_eq!(record["cwd"], json!(files.path("work")));
    assert_eq!(record["path0"], json!(files.path("code")));
    assert_eq!(record["stdin"], "");
    assert_eq!(record["job_env"], "v");
    // A rank never runs below its peers' priority, warm or cold.
    assert_eq!(record["nice"], 0, "{record}");
}

/// A process's niceness, from /proc.
fn nice_of(pid: u64) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    rest.split_whitespace().nth(16).unwrap().parse().unwrap()
}

/// Whether this process (and so a test server) holds CAP_SYS_NICE.
fn has_cap_sys_nice() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << 23) != 0
}

pub fn instance(app: &TestApp) -> String {
    std::fs::read_to_string(app.data_dir.path().join("instance-id"))
        .unwrap()
        .trim()
        .to_string()
}

pub fn alive(pid: u64) -> bool {
    // Zombies do not count: the standby's parent reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn standby_pids(summary: &Value) -> Vec<u64> {
    summary["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["standby"]["pid"].as_u64())
        .collect()
}

#[actix_web::test]
async fn a_killed_rank_is_replaced_by_its_warm_standby() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = app.create_job(files.spec(2, 100_000, json!({}))).await;
    let s = standbys_ready(&app, &id).await;
    // The cold first incarnations imported the slow module themselves.
    for rank in 0..2 {
        let cold = files.record(rank, 0).await;
        assert_eq!(cold["preloaded"], false, "{cold}");
        assert_eq!(cold["warm"], Value::Null, "{cold}");
        assert!(cold["import_s"].as_f64().unwrap() >= SLOW_IMPORT_S * 0.9);
        check_started_as_written(&files, &cold);
        assert_eq!(s["workers"][rank as usize]["warm_start"], false);
    }
    let standby = s["workers"][1]["standby"]["pid"].as_u64().unwrap();
    let victim = s["workers"][1]["pid"].as_u64().unwrap();
    assert_ne!(standby, victim);
    // Standbys wait at a lower priority (when the server may raise it again).
    if has_cap_sys_nice() {
        assert_eq!(nice_of(standby), 10);
    }
    kill(victim as u32, libc::SIGKILL);

    let s = stepping(&app, &id, 1, 1).await;
    let warm = files.record(1, 1).await;
    // The standby became the rank: same process, module already imported, its own values.
    assert_eq!(warm["pid"], json!(standby), "{warm}");
    assert_eq!(s["workers"][1]["pid"], json!(standby));
    assert_eq!(s["workers"][1]["warm_start"], true);
    assert_eq!(warm["preloaded"], true, "{warm}");
    assert_eq!(warm["warm"], "1");
    assert_eq!(warm["restart_count"], "1");
    check_started_as_written(&files, &warm);
    println!(
        "import in the cold start {:.3} s, in the warm one {:.6} s",
        files.record(1, 0).await["import_s"],
        warm["import_s"]
    );
    // Its heartbeats carry the new incarnation's token (the step above was accepted), and the
    // rank 0 it trains beside was not touched.
    assert_eq!(s["workers"][0]["attempt"], 0);
    assert!(
        !s["workers"][1]
            .get("standby")
            .is_some_and(|v| v["pid"] == json!(standby))
    );

    // Refilled once the group steps again: rank 1 has a new standby.
    let s = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        (s["workers"][1]["standby"]["state"] == "ready").then_some(s)
    })
    .await
    .expect("rank 1's standby is refilled");
    let refilled = s["workers"][1]["standby"]["pid"].as_u64().unwrap();
    assert_ne!(refilled, standby);

    // Stop: ranks and standbys all go.
    let pids = standby_pids(&s);
    assert_eq!(pids.len(), 2);
    app.stop(&id).await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    let gone = wait_for(Duration::from_secs(10), || async {
        (pids.iter().all(|p| !alive(*p)) && marked_processes(&instance(&app)).is_empty())
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "left behind: {:?}",
        marked_processes(&instance(&app))
    );
    let s = app.summary(&id).await;
    assert!(standby_pids(&s).is_empty(), "{s}");
}

#[actix_web::test]
async fn a_group_restart_activates_every_ranks_standby() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = app
        .create_job(files.spec(2, 100_000, json!({"restart_scope": "job"})))
        .await;
    let s = standbys_ready(&app, &id).await;
    let standbys = standby_pids(&s);
    kill(
        s["workers"][0]["pid"].as_u64().unwrap() as u32,
        libc::SIGKILL,
    );
    for (rank, standby) in standbys.iter().enumerate() {
        stepping(&app, &id, rank, 1).await;
        let warm = files.record(rank as u32, 1).await;
        assert_eq!(warm["preloaded"], true, "{warm}");
        assert_eq!(warm["pid"], json!(standby), "{warm}");
        check_started_as_written(&files, &warm);
    }
    // The group's new MASTER_PORT reached both warm ranks.
    assert_eq!(
        files.record(0, 1).await["master_port"],
        files.record(1, 1).await["master_port"]
    );
    assert_ne!(
        files.record(0, 1).await["master_port"],
        files.record(0, 0).await["master_port"]
    );
    app.stop(&id).await;
}

#[actix_web::test]
async fn a_preload_that_fails_leaves_the_job_cold_with_one_line() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = app
        .create_job(files.spec(
            2,
            100,
            json!({"preload": ["no_such_module_for_trainvisor", "slow_preload"]}),
        ))
        .await;
    let s = wait_for(Duration::from_secs(90), || async {
        let s = app.summary(&id).await;
        s["standby_off"].is_string().then_some(s)
    })
    .await
    .expect("the job says standbys are off");
    let off = s["standby_off"].as_str().unwrap();
    assert!(off.contains("no_such_module_for_trainvisor"), "{off}");
    // A rank killed now starts cold, and the job still completes.
    kill(
        s["workers"][0]["pid"].as_u64().unwrap() as u32,
        libc::SIGKILL,
    );
    let job = app.wait_finished(&id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let again = files.record(0, 1).await;
    assert_eq!(again["preloaded"], false, "{again}");
    assert_eq!(again["warm"], Value::Null);
    let lines = app.log_texts(&id).await;
    let said: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("warm standby off"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
}

#[actix_web::test]
async fn standbys_do_not_outlive_a_killed_server() {
    let files = Files::new();
    let data = tempfile::tempdir().unwrap();
    let (mut server, url) = start_server_process(data.path());
    let client = test_client();
    let id = submit_to(&client, &url, None, &files.spec(2, 100_000, json!({}))).await;
    let s = wait_for(Duration::from_secs(90), || async {
        let s = try_json(client.get(format!("{url}/jobs/{id}/summary"))).await?;
        (standby_pids(&s).len() == 2).then_some(s)
    })
    .await
    .expect("both standbys run");
    let instance = std::fs::read_to_string(data.path().join("instance-id")).unwrap();
    kill(server.id(), libc::SIGKILL);
    server.wait_with_output_taken();
    let gone = wait_for(Duration::from_secs(10), || async {
        (standby_pids(&s).iter().all(|p| !alive(*p))
            && marked_processes(instance.trim()).is_empty())
        .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "left behind: {:?}",
        marked_processes(instance.trim())
    );
}

#[actix_web::test]
async fn warm_standby_is_refused_where_it_cannot_work() {
    let app = spawn_app().await;
    for (spec, field) in [
        (
            json!({"world_size": 1, "warm_standby": true}),
            "warm_standby",
        ),
        (
            json!({"world_size": 1, "warm_standby": true, "command": ["sh", "-c", "true"]}),
            "warm_standby",
        ),
        (
            json!({"world_size": 1, "warm_standby": true, "command": ["python3", "-c", "1"]}),
            "warm_standby",
        ),
        (
            json!({"world_size": 1, "preload": ["torch"], "command": ["python3", "x.py"]}),
            "preload",
        ),
        (
            json!({"world_size": 1, "warm_standby": true, "preload": ["not a module"],
                   "command": ["python3", "x.py"]}),
            "preload",
        ),
    ] {
        let res = app.post_json("/jobs", &spec).await;
        let body = assert_json_error(res, 422).await;
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{spec}: {body}"
        );
    }
    // Standbys count against --max-workers: 2 ranks are 4 processes.
    let app = spawn_app_with(|s| s.max_workers = 3).await;
    let files = Files::new();
    let res = app.post_json("/jobs", &files.spec(2, 10, json!({}))).await;
    let body = assert_json_error(res, 429).await;
    assert!(body.to_string().contains("warm standby"), "{body}");
}

/// `trainvisor submit --warm-standby --preload …` and `trainvisor status` with a STANDBY column.
#[actix_web::test]
async fn the_cli_submits_warm_standby_and_shows_the_standbys() {
    use crate::cli::cli;
    let files = Files::new();
    let app = spawn_app().await;
    let spec = files.spec(1, 100_000, json!({}));
    let env = json!({"env": spec["env"], "restart_scope": "worker"}).to_string();
    let script = files.path("code/rank.py");
    let out = cli(
        &app,
        &[
            "submit",
            "--world-size",
            "1",
            "--warm-standby",
            "--preload",
            "slow_preload",
            "--working-dir",
            files.path("work").to_str().unwrap(),
            "--spec",
            &env,
            "--",
            "python3",
            script.to_str().unwrap(),
            "--steps",
            "100000",
            "extra arg",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.lines().next().unwrap().trim().to_string();
    let job = app.job(&id).await;
    assert_eq!(
        job["spec"]["warm_standby"]["preload"],
        json!(["slow_preload"]),
        "{job}"
    );
    let s = standbys_ready(&app, &id).await;
    let pid = s["workers"][0]["standby"]["pid"].as_u64().unwrap();
    let status = cli(&app, &["status", &id]).await;
    assert_eq!(status.code, 0, "{}", status.stderr);
    let header = status
        .stdout
        .lines()
        .find(|l| l.starts_with("RANK"))
        .unwrap();
    assert!(header.trim_end().ends_with("STANDBY"), "{}", status.stdout);
    assert!(
        status.stdout.contains(&format!("ready {pid}")),
        "{}",
        status.stdout
    );
    app.stop(&id).await;
}

/// A 2-rank warm job (spec `extra`, one more variable `env`): once its standbys are ready, rank
/// 1 is killed and its standby becomes attempt 1 (checked). Returns the job's id.
async fn rank_1_warm_after_a_kill(
    app: &TestApp,
    files: &Files,
    extra: Value,
    env: (&str, &str),
) -> String {
    let mut spec = files.spec(2, 100_000, extra);
    spec["env"][env.0] = json!(env.1);
    let id = app.create_job(spec).await;
    let s = standbys_ready(app, &id).await;
    kill(
        s["workers"][1]["pid"].as_u64().unwrap() as u32,
        libc::SIGKILL,
    );
    assert_eq!(files.record(1, 1).await["preloaded"], true);
    id
}

/// A warm rank that hangs has its Python stacks taken like a cold one: the standby pointed
/// the stacks hook at its new incarnation's file when it became the rank.
#[actix_web::test]
async fn a_warm_rank_that_hangs_has_its_stacks_taken() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = rank_1_warm_after_a_kill(
        &app,
        &files,
        json!({"heartbeat_timeout_s": 2}),
        ("HANG", "1-1-3"),
    )
    .await;
    let hang = wait_for(Duration::from_secs(60), || async {
        let all = app.get_json(&format!("/jobs/{id}/incidents")).await;
        all.as_array()?
            .iter()
            .find(|i| i["reason"] == "heartbeat_timeout" && i["rank"] == 1)
            .cloned()
    })
    .await
    .expect("the warm rank's hang is an incident");
    let stacks = hang["stacks"].as_array().expect("stacks kept");
    let of1 = stacks
        .iter()
        .find(|s| s["rank"] == 1)
        .expect("rank 1's stacks");
    assert_eq!(of1["kind"], "python", "{of1}");
    assert_eq!(of1["attempt"], 1, "{of1}");
    let text = of1["text"].as_str().unwrap();
    assert!(text.contains("in hung_in_warm_rank"), "{text}");
    app.stop(&id).await;
}

/// A standby that dies is replaced, and the rank it stood by is not touched.
#[actix_web::test]
async fn a_standby_that_dies_is_replaced() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = app.create_job(files.spec(1, 100_000, json!({}))).await;
    let s = standbys_ready(&app, &id).await;
    let first = s["workers"][0]["standby"]["pid"].as_u64().unwrap();
    let rank = s["workers"][0]["pid"].as_u64().unwrap();
    kill(first as u32, libc::SIGKILL);
    let s = wait_for(Duration::from_secs(60), || async {
        let s = app.summary(&id).await;
        let pid = s["workers"][0]["standby"]["pid"].as_u64();
        (pid.is_some_and(|p| p != first) && s["workers"][0]["standby"]["state"] == "ready")
            .then_some(s)
    })
    .await
    .expect("a new standby replaces the dead one");
    assert_eq!(s["workers"][0]["pid"], json!(rank), "{s}");
    assert_eq!(s["workers"][0]["attempt"], 0, "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert!(s["standby_off"].is_null(), "{s}");
    app.stop(&id).await;
}

/// What a warm rank's process does is its own: its exit code becomes the restart's, and a stop's
/// SIGTERM ends it as a signal, as for a cold rank.
#[actix_web::test]
async fn a_warm_ranks_exit_code_and_signal_are_its_own() {
    let files = Files::new();
    let app = spawn_app().await;
    let id = rank_1_warm_after_a_kill(&app, &files, json!({}), ("EXIT", "1-1-5")).await;
    // Attempt 1 (warm) exits with code 3 at its step 5: restarted for that reason.
    let restarts = wait_for(Duration::from_secs(60), || async {
        let r = app.restarts(&id).await;
        (r.len() >= 2).then_some(r)
    })
    .await
    .expect("the warm rank's exit is a restart");
    assert_eq!(restarts[1]["rank"], 1, "{restarts:?}");
    assert_eq!(restarts[1]["reason"], "exit_code", "{restarts:?}");
    assert_eq!(restarts[1]["exit_code"], 3, "{restarts:?}");
    stepping(&app, &id, 1, 2).await;
    app.stop(&id).await;
    app.wait_finished(&id, Duration::from_secs(30)).await;
    let incs = app.incarnations(&id).await;
    let of = |rank: u64, attempt: u64| {
        incs.iter()
            .find(|i| i["rank"] == rank && i["attempt"] == attempt)
            .unwrap_or_else(|| panic!("no incarnation {rank}/{attempt}: {incs:?}"))
            .clone()
    };
    assert_eq!(of(1, 1)["exit_code"], 3, "{incs:?}");
    // Stopped with SIGTERM, warm or cold alike.
    for (rank, attempt) in [(0, 0), (1, 2)] {
        let i = of(rank, attempt);
        assert_eq!(i["signal"], libc::SIGTERM, "{i}");
        assert_eq!(i["outcome"], "stopped", "{i}");
    }
}
