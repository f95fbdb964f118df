//! The Slurm part of a job spec: the allocation's shape and extra `srun` arguments, and their
//! checks (only with `"launcher": "slurm"`).

use serde::{Deserialize, Serialize};

use crate::launcher::kind::LauncherKind;
use crate::spec::check::{SpecError, in_range, invalid};

/// The Slurm options of a job (`launcher = slurm`), resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurmSpec {
    /// `salloc --partition`; none means the cluster's default partition.
    pub partition: Option<String>,
    /// Nodes of the allocation (`salloc -N`).
    pub nodes: u32,
    /// Ranks per node (`salloc --ntasks-per-node`); rank r starts on node r / ntasks_per_node.
    pub ntasks_per_node: u32,
    /// `salloc --time`, in Slurm's format (`30`, `2:00:00`, `1-12`); none means the partition's.
    pub time_limit: Option<String>,
    /// Extra arguments for every rank's `srun`, e.g. `["--cpus-per-task=4"]`.
    pub srun_args: Vec<String>,
    /// Failures of the job's ranks on one node after which the node is excluded from the
    /// job's launches; 0 turns the count off (a node Slurm reports down is still excluded).
    #[serde(default = "default_node_failures")]
    pub exclude_after_failures: u32,
}

fn default_node_failures() -> u32 {
    DEFAULT_EXCLUDE_AFTER_FAILURES
}

/// One failure on a node may be the program's fault; a second on the same node points at it.
pub const DEFAULT_EXCLUDE_AFTER_FAILURES: u32 = 2;

pub(crate) struct SlurmRequest {
    pub(crate) partition: Option<String>,
    pub(crate) nodes: Option<i64>,
    pub(crate) ntasks_per_node: Option<i64>,
    pub(crate) time_limit: Option<String>,
    pub(crate) srun_args: Option<Vec<String>>,
    pub(crate) exclude_after_failures: Option<i64>,
}

/// `srun` options trainvisor sets itself for every rank; a job's `srun_args` may not set them.
const RESERVED_SRUN: &[&str] = &[
    "--jobid",
    "-w",
    "--nodelist",
    "-x",
    "--exclude",
    "-N",
    "--nodes",
    "-n",
    "--ntasks",
    "--export",
    "--overlap",
    "-J",
    "--job-name",
    "-o",
    "--output",
    "-e",
    "--error",
    "-i",
    "--input",
    "--pty",
];

pub(crate) fn resolve_slurm(
    launcher: LauncherKind,
    world_size: u32,
    req: SlurmRequest,
) -> Result<Option<SlurmSpec>, SpecError> {
    if launcher != LauncherKind::Slurm {
        let given = [
            ("partition", req.partition.is_some()),
            ("nodes", req.nodes.is_some()),
            ("ntasks_per_node", req.ntasks_per_node.is_some()),
            ("time_limit", req.time_limit.is_some()),
            ("srun_args", req.srun_args.is_some()),
            (
                "exclude_after_failures",
                req.exclude_after_failures.is_some(),
            ),
        ];
        if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
            return Err(invalid(format!(
                "{name} is a Slurm option: it needs \"launcher\": \"slurm\""
            )));
        }
        return Ok(None);
    }
    if let Some(p) = &req.partition
        && (p.is_empty()
            || p.len() > 64
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)))
    {
        return Err(invalid(
            "partition must be 1 to 64 characters of [A-Za-z0-9_.-]",
        ));
    }
    let w = i64::from(world_size);
    let nodes = req.nodes.map(|n| in_range("nodes", n, 1, w)).transpose()?;
    let per_node = req
        .ntasks_per_node
        .map(|n| in_range("ntasks_per_node", n, 1, w))
        .transpose()?;
    let (nodes, per_node) = match (nodes, per_node) {
        (None, None) => (1, w),
        (Some(n), None) => (n, (w + n - 1) / n),
        (None, Some(t)) => ((w + t - 1) / t, t),
        (Some(n), Some(t)) => {
            if n * t < w {
                return Err(invalid(format!(
                    "nodes × ntasks_per_node ({n} × {t}) must be at least world_size ({w})"
                )));
            }
            (n, t)
        }
    };
    if let Some(t) = &req.time_limit {
        let upper = t.to_ascii_uppercase();
        let ok = upper == "UNLIMITED"
            || upper == "INFINITE"
            || (!t.is_empty()
                && t.len() <= 16
                && t.starts_with(|c: char| c.is_ascii_digit())
                && t.ends_with(|c: char| c.is_ascii_digit())
                && t.chars()
                    .all(|c| c.is_ascii_digit() || c == ':' || c == '-')
                && t.matches('-').count() <= 1
                && t.matches(':').count() <= 2);
        if !ok {
            return Err(invalid(format!(
                "time_limit {t:?} is not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS or UNLIMITED)"
            )));
        }
    }
    let srun_args = req.srun_args.unwrap_or_default();
    if srun_args.len() > 64 {
        return Err(invalid("srun_args may hold at most 64 arguments"));
    }
    for arg in &srun_args {
        if arg.is_empty() || arg.contains('\0') || arg.len() > 1024 {
            return Err(invalid(
                "srun_args must be non-empty strings without NUL bytes, at most 1024 bytes each",
            ));
        }
        let name = arg.split('=').next().unwrap_or(arg);
        let short_glued = RESERVED_SRUN
            .iter()
            .any(|r| r.len() == 2 && !arg.starts_with("--") && arg.starts_with(r));
        if RESERVED_SRUN.contains(&name) || short_glued {
            return Err(invalid(format!(
                "srun_args may not set {name}: trainvisor sets it for every rank"
            )));
        }
    }
    Ok(Some(SlurmSpec {
        partition: req.partition,
        nodes: nodes as u32,
        ntasks_per_node: per_node as u32,
        time_limit: req.time_limit,
        srun_args,
        exclude_after_failures: req
            .exclude_after_failures
            .map(|n| in_range("exclude_after_failures", n, 0, 1_000_000))
            .transpose()?
            .map_or(DEFAULT_EXCLUDE_AFTER_FAILURES, |n| n as u32),
    }))
}
