//! The Slurm launcher: a job's ranks are job steps inside one allocation the job owns.
//!
//! - The allocation: `salloc --no-shell --no-kill -J trainvisor-<job id> -N <nodes>
//!   --ntasks-per-node <n> -O`. `--no-shell` holds the nodes without running anything;
//!   `--no-kill` keeps the allocation when one of its nodes fails, so the ranks of a dead node
//!   are relaunched on the others. The Slurm job's name carries the trainvisor job id, so a
//!   server that restarts finds (and cancels) what its predecessor held.
//! - A rank: `srun --jobid=<alloc> --overlap -N1 -n1 -w <node> -O --export=ALL ... argv`. The
//!   srun client is a local child of the server, spawned like a local rank (the spawner thread,
//!   `PR_SET_PDEATHSIG`, its own process group, pidfd): its exit is the step's exit, its
//!   stdout/stderr are the rank's. The worker environment is set on the srun process and
//!   exported to the step (`--export=ALL`), so the token never appears on a command line.
//! - Every Slurm command gets the server's `SLURM_CONF` when one is configured.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::Launch;
use crate::config::Settings;
use crate::spec::SlurmSpec;

mod job;
pub mod spec;

pub use job::SlurmLauncher;

/// How long a Slurm client command (not salloc, not srun) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// A node of an allocation: its Slurm name and the address its processes are reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: String,
}

/// An allocation a job owns.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub job_id: u64,
    pub nodes: Vec<Node>,
}

/// Where one rank's step runs.
#[derive(Debug, Clone)]
pub struct Step {
    pub conf: Option<PathBuf>,
    pub alloc: u64,
    pub node: String,
    /// The step's name, `trainvisor-<job>-r<rank>-a<attempt>`.
    pub name: String,
    pub srun_args: Vec<String>,
}

/// What a dead server held on Slurm for a job (an allocation, steps still running) goes: the
/// job is relaunched in a new allocation, never next to the old one.
pub async fn forget(job_id: uuid::Uuid, settings: &Settings) {
    if let Err(e) = cancel_named(settings.slurm_conf.as_deref(), &job_name(&job_id)).await {
        tracing::warn!(%job_id, error = %e, "could not cancel the job's old Slurm allocation");
    }
}

/// The Slurm job name of a trainvisor job's allocation.
pub fn job_name(job_id: &uuid::Uuid) -> String {
    format!("trainvisor-{job_id}")
}

fn command(conf: Option<&Path>, program: &str) -> Command {
    let mut cmd = Command::new(program);
    if let Some(conf) = conf {
        cmd.env("SLURM_CONF", conf);
    }
    // Inside an allocation of its own (a server started by sbatch), these would steer the
    // commands to the server's job instead of the trainvisor job's.
    for var in [
        "SLURM_JOB_ID",
        "SLURM_JOBID",
        "SLURM_STEP_ID",
        "SLURM_NODELIST",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs a Slurm client command to completion; its stdout, or an error with its stderr.
async fn run(conf: Option<&Path>, program: &str, args: &[String]) -> io::Result<String> {
    let out = tokio::time::timeout(COMMAND_TIMEOUT, command(conf, program).args(args).output())
        .await
        .map_err(|_| io::Error::other(format!("{program} did not answer in {COMMAND_TIMEOUT:?}")))?
        .map_err(|e| io::Error::other(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asks for an allocation and waits until it is granted (a busy cluster queues it).
pub async fn allocate(
    conf: Option<&Path>,
    name: &str,
    comment: &str,
    spec: &SlurmSpec,
    exclude: &[String],
) -> io::Result<Allocation> {
    let mut args = vec![
        "--no-shell".to_string(),
        "--no-kill".to_string(),
        format!("--job-name={name}"),
        format!("--comment={comment}"),
        format!("--nodes={}", spec.nodes),
        format!("--ntasks-per-node={}", spec.ntasks_per_node),
        "--overcommit".to_string(),
    ];
    if let Some(p) = &spec.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(t) = &spec.time_limit {
        args.push(format!("--time={t}"));
    }
    if !exclude.is_empty() {
        args.push(format!("--exclude={}", exclude.join(",")));
    }
    let out = command(conf, "salloc")
        .args(&args)
        .output()
        .await
        .map_err(|e| io::Error::other(format!("salloc: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let job_id = stderr
        .lines()
        .find_map(|l| l.split("Granted job allocation ").nth(1))
        .and_then(|id| id.trim().parse::<u64>().ok());
    let job_id = match (out.status.success(), job_id) {
        (true, Some(id)) => id,
        _ => {
            return Err(io::Error::other(format!(
                "salloc {}: {}",
                args.join(" "),
                stderr.trim()
            )));
        }
    };
    let nodes = match allocation_nodes(conf, job_id).await {
        Ok(nodes) if !nodes.is_empty() => nodes,
        Ok(_) => {
            cancel_job(conf, job_id).await;
            return Err(io::Error::other(format!(
                "allocation {job_id} has no nodes"
            )));
        }
        Err(e) => {
            cancel_job(conf, job_id).await;
            return Err(e);
        }
    };
    Ok(Allocation { job_id, nodes })
}

/// The nodes of a running allocation, in Slurm's order, with their addresses.
async fn allocation_nodes(conf: Option<&Path>, job_id: u64) -> io::Result<Vec<Node>> {
    let list = run(
        conf,
        "squeue",
        &[
            "-h".into(),
            format!("--jobs={job_id}"),
            "--format=%N".into(),
        ],
    )
    .await?;
    let list = list.trim();
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let names = run(
        conf,
        "scontrol",
        &["show".into(), "hostnames".into(), list.to_string()],
    )
    .await?;
    let addrs = run(
        conf,
        "sinfo",
        &[
            "-h".into(),
            "-N".into(),
            format!("--nodes={list}"),
            "--format=%N %o".into(),
        ],
    )
    .await?;
    let addr_of = |name: &str| {
        addrs
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a.trim().to_string())
            .unwrap_or_else(|| name.to_string())
    };
    Ok(names
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|name| Node {
            name: name.to_string(),
            addr: addr_of(name),
        })
        .collect())
}

/// Nodes among `nodes` that Slurm reports down, failing, drained or not responding.
pub async fn bad_nodes(conf: Option<&Path>, nodes: &[String]) -> io::Result<Vec<(String, String)>> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let out = run(
        conf,
        "sinfo",
        &[
            "-h".into(),
            "-N".into(),
            format!("--nodes={}", nodes.join(",")),
            "--format=%N %t".into(),
        ],
    )
    .await?;
    Ok(parse_bad_nodes(&out))
}

/// `sinfo -N -o "%N %t"` lines → the nodes that cannot run steps, with their state.
fn parse_bad_nodes(out: &str) -> Vec<(String, String)> {
    let mut bad: Vec<(String, String)> = Vec::new();
    for (name, state) in out.lines().filter_map(|l| l.trim().split_once(' ')) {
        let state = state.trim();
        let base = state.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-']);
        let broken = state.ends_with('*')
            || ["down", "drain", "drng", "fail", "failg", "maint", "unk"].contains(&base);
        if broken && !bad.iter().any(|(n, _)| n == name) {
            bad.push((name.to_string(), state.to_string()));
        }
    }
    bad
}

/// Cancels a Slurm job (the allocation and every step in it). Errors are logged only.
pub async fn cancel_job(conf: Option<&Path>, job_id: u64) {
    if let Err(e) = run(conf, "scancel", &[job_id.to_string()]).await {
        tracing::warn!(job_id, error = %e, "scancel failed");
    }
}

/// Cancels every Slurm job named `name` (pending ones too): what a trainvisor job holds.
pub async fn cancel_named(conf: Option<&Path>, name: &str) -> io::Result<()> {
    run(conf, "scancel", &[format!("--name={name}")])
        .await
        .map(|_| ())
}

/// Cancels one step of an allocation by its name (after its srun was killed, the step may
/// still be running on its node).
pub async fn cancel_step(conf: Option<&Path>, alloc: u64, step_name: &str) {
    let Ok(steps) = run(
        conf,
        "squeue",
        &[
            "-h".into(),
            "--steps".into(),
            format!("--jobs={alloc}"),
            "--format=%i %j".into(),
        ],
    )
    .await
    else {
        return;
    };
    for (id, name) in steps.lines().filter_map(|l| l.trim().split_once(' ')) {
        if name.trim() == step_name {
            let _ = run(conf, "scancel", &["--signal=KILL".into(), id.to_string()]).await;
        }
    }
}

impl Step {
    /// The srun command line that runs `launch` as this step; the environment stays on the
    /// srun process (exported to the step), never on the command line.
    pub fn wrap(&self, launch: Launch) -> Launch {
        let mut argv = vec![
            "srun".to_string(),
            format!("--jobid={}", self.alloc),
            "--overlap".to_string(),
            "--nodes=1".to_string(),
            "--ntasks=1".to_string(),
            format!("--nodelist={}", self.node),
            "--overcommit".to_string(),
            "--export=ALL".to_string(),
            format!("--job-name={}", self.name),
        ];
        if let Some(dir) = &launch.cwd {
            argv.push(format!("--chdir={dir}"));
        }
        argv.extend(self.srun_args.iter().cloned());
        argv.extend(launch.argv);
        let mut env = launch.env;
        if let Some(conf) = &self.conf {
            env.push((
                "SLURM_CONF".to_string(),
                conf.to_string_lossy().into_owned(),
            ));
        }
        // srun itself runs in the server's directory; the step in the job's.
        Launch {
            argv,
            env,
            cwd: None,
        }
    }
}

/// What srun prints when the node of its step failed (it may then exit 0), or when the step
/// could not start on its node.
pub fn is_node_failure_line(line: &str) -> bool {
    line.starts_with("srun: error: Node failure")
        || (line.starts_with("srun: error: Task launch for StepId")
            && line.contains("failed on node"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_and_unresponsive_nodes_are_bad() {
        let out = "n1 idle\nn2 mix*\nn3 down*\nn4 drain\nn5 alloc\nn2 mix*\nn6 idle~\n";
        let bad: Vec<String> = parse_bad_nodes(out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(bad, ["n2", "n3", "n4"]);
    }

    #[test]
    fn srun_node_failure_lines_are_recognised() {
        assert!(is_node_failure_line("srun: error: Node failure on n2"));
        assert!(!is_node_failure_line("my program: Node failure on n2"));
    }

    #[test]
    fn the_token_stays_off_the_srun_command_line() {
        let step = Step {
            conf: Some("/etc/slurm/x.conf".into()),
            alloc: 42,
            node: "n2".into(),
            name: "trainvisor-j-r1-a0".into(),
            srun_args: vec!["--cpus-per-task=2".into()],
        };
        let launch = step.wrap(Launch {
            argv: vec!["python".into(), "train.py".into()],
            env: vec![("TRAINVISOR_TOKEN".into(), "secret".into())],
            cwd: None,
        });
        assert_eq!(launch.argv[0], "srun");
        assert!(launch.argv.contains(&"--jobid=42".to_string()));
        assert!(launch.argv.contains(&"--nodelist=n2".to_string()));
        assert!(launch.argv.ends_with(&[
            "--cpus-per-task=2".into(),
            "python".into(),
            "train.py".into()
        ]));
        assert!(!launch.argv.iter().any(|a| a.contains("secret")));
        assert!(
            launch
                .env
                .iter()
                .any(|(k, v)| k == "SLURM_CONF" && v == "/etc/slurm/x.conf")
        );
    }
}
