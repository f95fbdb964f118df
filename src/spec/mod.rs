//! The job spec: what `POST /jobs` accepts (`JobRequest`), and the resolved, validated
//! `JobSpec` that is stored with the job and drives its actors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::JobDefaults;

pub(crate) mod check;
mod standby;

use crate::launcher::docker::spec::{DockerRequest, resolve_docker};
pub use crate::launcher::docker::spec::{DockerSpec, parse_mount};
pub use crate::launcher::kind::LauncherKind;
pub use crate::launcher::slurm::spec::{DEFAULT_EXCLUDE_AFTER_FAILURES, SlurmSpec};
use crate::launcher::slurm::spec::{SlurmRequest, resolve_slurm};
pub use check::SpecError;
use check::{finite_in, in_range, invalid};
pub use standby::{DEFAULT_PRELOAD, StandbySpec};

pub use crate::domain::restart::RestartScope;

/// How the built-in trainer's ranks exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Synchronous data parallelism: gradients averaged by an all-reduce every step.
    Allreduce,
    /// Independent ranks, no exchange (the seed's mode).
    None,
}

/// The request body of `POST /jobs`. Every field but `world_size` is optional; unknown
/// fields are refused so a typo never silently falls back to a default.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub world_size: Option<i64>,
    pub name: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub working_dir: Option<String>,
    pub dataset: Option<String>,
    pub checkpoint_dir: Option<String>,
    pub checkpoint_every: Option<i64>,
    pub keep_last: Option<i64>,
    pub total_steps: Option<i64>,
    pub epochs: Option<i64>,
    pub heartbeat_timeout_s: Option<f64>,
    pub max_restarts: Option<i64>,
    pub restart_scope: Option<RestartScope>,
    pub backoff_initial_ms: Option<i64>,
    pub backoff_multiplier: Option<f64>,
    pub backoff_max_ms: Option<i64>,
    pub backoff_jitter: Option<f64>,
    pub backoff_reset_s: Option<f64>,
    pub failure_policy: Option<Vec<crate::domain::failure_policy::FailureRule>>,
    pub crash_loop_after: Option<i64>,
    pub straggler_fraction: Option<f64>,
    pub straggler_window_s: Option<f64>,
    pub straggler_action: Option<StragglerAction>,
    pub save_grace_s: Option<f64>,
    pub save_signal: Option<bool>,
    pub batch_size: Option<i64>,
    pub lr: Option<f64>,
    pub seed: Option<i64>,
    pub sync: Option<SyncMode>,
    pub sleep_sec: Option<f64>,
    pub launcher: Option<LauncherKind>,
    pub partition: Option<String>,
    pub nodes: Option<i64>,
    pub ntasks_per_node: Option<i64>,
    pub time_limit: Option<String>,
    pub srun_args: Option<Vec<String>>,
    pub exclude_after_failures: Option<i64>,
    pub image: Option<String>,
    pub cpus: Option<f64>,
    pub memory_mb: Option<i64>,
    pub gpus: Option<String>,
    pub mounts: Option<Vec<String>>,
    pub warm_standby: Option<bool>,
    pub preload: Option<Vec<String>>,
    pub auto_heartbeat: Option<bool>,
}

/// A validated job spec with every default filled in. Stored as JSON in `jobs.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub world_size: u32,
    pub name: Option<String>,
    /// argv of each rank; `None` means the built-in trainer (`trainvisor worker`).
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// The ranks' working directory (absolute); none: the server's. The CLI sends the
    /// caller's when the server is on the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    pub dataset: String,
    pub checkpoint_dir: String,
    pub checkpoint_every: u64,
    pub keep_last: u32,
    pub total_steps: Option<u64>,
    /// Passes over the smallest rank's data, when `total_steps` is not given (built-in trainer).
    #[serde(default)]
    pub epochs: Option<u64>,
    pub heartbeat_timeout_s: f64,
    pub max_restarts: u32,
    pub restart_scope: RestartScope,
    pub backoff_initial_ms: u64,
    pub backoff_multiplier: f64,
    pub backoff_max_ms: u64,
    pub backoff_jitter: f64,
    /// An incarnation that ran this long before failing starts the backoff over.
    #[serde(default = "default_backoff_reset_s")]
    pub backoff_reset_s: f64,
    /// Rules on exit codes and signals: fail the job, ignore, or count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_policy: Vec<crate::domain::failure_policy::FailureRule>,
    /// Failures of one rank in a row, with the same cause and no progress, that end the job
    /// as `crash_loop`; 0 turns the check off.
    #[serde(default = "default_crash_loop_after")]
    pub crash_loop_after: u32,
    /// A rank stepping slower than the job's median by more than this fraction…
    #[serde(default = "default_straggler_fraction")]
    pub straggler_fraction: f64,
    /// …for this long is a straggler: flagged, and restarted with `straggler_action: restart`.
    #[serde(default = "default_straggler_window_s")]
    pub straggler_window_s: f64,
    #[serde(default)]
    pub straggler_action: StragglerAction,
    /// How long the server waits for the ranks' save on notice (stop, SIGTERM, a preemption
    /// signal, a checkpoint request) to commit before it goes on without it.
    #[serde(default = "default_save_grace_s")]
    pub save_grace_s: f64,
    /// A rank that never heartbeated gets SIGUSR1 before a stop or the server's shutdown and
    /// up to `save_grace_s` to save; without it, SIGTERM and the kill grace, as under torchrun.
    #[serde(default)]
    pub save_signal: bool,
    pub batch_size: u32,
    pub lr: f64,
    pub seed: u64,
    pub sync: SyncMode,
    pub sleep_sec: f64,
    /// Where the ranks run; specs stored before launchers existed are `local`.
    #[serde(default)]
    pub launcher: LauncherKind,
    /// The Slurm options, present exactly when `launcher` is `slurm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<SlurmSpec>,
    /// The Docker options, present exactly when `launcher` is `docker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerSpec>,
    /// Warm standby ranks (`warm_standby: true`), with the modules they preload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_standby: Option<StandbySpec>,
    /// Python ranks that import torch heartbeat their optimizer steps and loss by themselves
    /// (trainvisor's `sitecustomize`, local launcher); `false` turns it off.
    #[serde(default = "yes")]
    pub auto_heartbeat: bool,
}

fn yes() -> bool {
    true
}

/// Kubernetes resets a crash-looping container's backoff after it ran 10 minutes.
pub const DEFAULT_BACKOFF_RESET_S: f64 = 600.0;

fn default_backoff_reset_s() -> f64 {
    DEFAULT_BACKOFF_RESET_S
}

/// Three identical failures without progress: the fourth would be the same.
pub const DEFAULT_CRASH_LOOP_AFTER: i64 = 3;

fn default_crash_loop_after() -> u32 {
    DEFAULT_CRASH_LOOP_AFTER as u32
}

/// What is done with a straggler besides flagging it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StragglerAction {
    /// Flag it (summary, page, event, log line) and nothing else.
    #[default]
    None,
    /// Restart it as a failure with reason `straggler`, with the job's `restart_scope`.
    Restart,
}

/// A rank at half the median's speed or slower…
pub const DEFAULT_STRAGGLER_FRACTION: f64 = 0.5;
/// …for a whole minute.
pub const DEFAULT_STRAGGLER_WINDOW_S: f64 = 60.0;

/// Kubernetes' default termination grace, and within a spot instance's warning.
pub const DEFAULT_SAVE_GRACE_S: f64 = 30.0;

fn default_save_grace_s() -> f64 {
    DEFAULT_SAVE_GRACE_S
}

fn default_straggler_fraction() -> f64 {
    DEFAULT_STRAGGLER_FRACTION
}

fn default_straggler_window_s() -> f64 {
    DEFAULT_STRAGGLER_WINDOW_S
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The first restart's backoff when a job does not set `backoff_initial_ms`.
pub const BACKOFF_INITIAL_MS: i64 = 500;
/// The same for a job with `warm_standby`, whose ranks restart in about 0.2 s.
pub const WARM_BACKOFF_INITIAL_MS: i64 = 50;

impl JobRequest {
    /// Checks every field and fills in the server's defaults.
    pub fn resolve(self, defaults: &JobDefaults) -> Result<JobSpec, SpecError> {
        let world_size = match self.world_size.or(defaults.world_size.map(i64::from)) {
            Some(w) => in_range("world_size", w, 1, i64::from(defaults.max_world_size))? as u32,
            None => return Err(invalid("world_size is required")),
        };
        if let Some(name) = &self.name
            && name.chars().count() > 200
        {
            return Err(invalid("name must be at most 200 characters"));
        }
        if let Some(command) = &self.command {
            if command.is_empty() || command[0].is_empty() {
                return Err(invalid(
                    "command must be a non-empty argv array, e.g. [\"python\", \"train.py\"]",
                ));
            }
            if command.iter().any(|arg| arg.contains('\0')) {
                return Err(invalid("command arguments may not contain NUL bytes"));
            }
        }
        let env = self.env.unwrap_or_default();
        for (key, value) in &env {
            if !valid_env_name(key) {
                return Err(invalid(format!(
                    "env name {key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
                )));
            }
            if crate::domain::worker_env::names::is_reserved(key) {
                return Err(invalid(format!(
                    "env name {key} is set by trainvisor for every rank and cannot be overridden"
                )));
            }
            if value.contains('\0') {
                return Err(invalid(format!("env value of {key} contains a NUL byte")));
            }
        }
        let dataset = self
            .dataset
            .unwrap_or_else(|| defaults.dataset.to_string_lossy().into_owned());
        let checkpoint_dir = self
            .checkpoint_dir
            .unwrap_or_else(|| defaults.checkpoint_dir.to_string_lossy().into_owned());
        for (name, value) in [("dataset", &dataset), ("checkpoint_dir", &checkpoint_dir)] {
            if value.is_empty() || value.contains('\0') {
                return Err(invalid(format!("{name} must be a non-empty path or URL")));
            }
            if crate::storage::S3Url::is_s3(value) {
                crate::storage::S3Url::parse(value).map_err(|e| invalid(format!("{name} {e}")))?;
            } else if value.contains("://") && !value.starts_with("file://") {
                return Err(invalid(format!(
                    "{name} {value:?}: expected a local path, a file:// path or s3://bucket/prefix"
                )));
            }
        }
        // The built-in trainer on the demo dataset goes at the demo's pace unless told.
        let default_sleep =
            if self.command.is_none() && dataset == defaults.dataset.to_string_lossy() {
                defaults.demo_sleep_sec
            } else {
                defaults.sleep_sec
            };
        let sync = self.sync.unwrap_or(SyncMode::Allreduce);
        // Synchronous ranks cannot continue without their peers: restart them together.
        let default_scope = if self.command.is_none() && sync == SyncMode::Allreduce {
            RestartScope::Job
        } else {
            RestartScope::Worker
        };
        // A warm standby replaces a rank in a fraction of a second, which the usual first
        // wait would more than double: such jobs start their backoff lower (it still doubles
        // on every failure in a row, so a crash loop still slows down).
        let default_backoff = if self.warm_standby == Some(true) {
            WARM_BACKOFF_INITIAL_MS
        } else {
            BACKOFF_INITIAL_MS
        };
        let backoff_initial_ms = in_range(
            "backoff_initial_ms",
            self.backoff_initial_ms.unwrap_or(default_backoff),
            0,
            3_600_000,
        )? as u64;
        let backoff_max_ms = in_range(
            "backoff_max_ms",
            self.backoff_max_ms.unwrap_or(30_000),
            0,
            3_600_000,
        )? as u64;
        if backoff_max_ms < backoff_initial_ms {
            return Err(invalid(
                "backoff_max_ms must be at least backoff_initial_ms",
            ));
        }
        let launcher = self.launcher.unwrap_or(defaults.launcher);
        let slurm = resolve_slurm(
            launcher,
            world_size,
            SlurmRequest {
                partition: self.partition,
                nodes: self.nodes,
                ntasks_per_node: self.ntasks_per_node,
                time_limit: self.time_limit,
                srun_args: self.srun_args,
                exclude_after_failures: self.exclude_after_failures,
            },
        )?;
        let docker = resolve_docker(
            launcher,
            DockerRequest {
                image: self.image,
                cpus: self.cpus,
                memory_mb: self.memory_mb,
                gpus: self.gpus,
                mounts: self.mounts,
            },
        )?;
        let warm_standby = standby::resolve_standby(
            self.warm_standby,
            self.preload,
            self.command.as_deref(),
            launcher,
        )?;
        Ok(JobSpec {
            world_size,
            name: self.name,
            command: self.command,
            env,
            working_dir: match self.working_dir {
                Some(d) if !d.starts_with('/') || d.contains('\0') => {
                    return Err(invalid(format!(
                        "working_dir must be an absolute path, got {d:?}"
                    )));
                }
                d => d,
            },
            dataset,
            checkpoint_dir,
            checkpoint_every: in_range(
                "checkpoint_every",
                self.checkpoint_every
                    .unwrap_or(defaults.checkpoint_every as i64),
                1,
                i64::MAX,
            )? as u64,
            keep_last: in_range("keep_last", self.keep_last.unwrap_or(3), 1, 1_000_000)? as u32,
            total_steps: self
                .total_steps
                .map(|s| in_range("total_steps", s, 1, i64::MAX).map(|s| s as u64))
                .transpose()?,
            epochs: match (self.epochs, self.total_steps) {
                (Some(_), Some(_)) => return Err(invalid("give total_steps or epochs, not both")),
                (Some(e), None) => Some(in_range("epochs", e, 1, 1_000_000)? as u64),
                (None, _) => None,
            },
            heartbeat_timeout_s: finite_in(
                "heartbeat_timeout_s",
                self.heartbeat_timeout_s
                    .unwrap_or(defaults.heartbeat_timeout_s),
                0.01,
                86_400.0,
            )?,
            max_restarts: in_range(
                "max_restarts",
                self.max_restarts
                    .unwrap_or(i64::from(defaults.max_restarts)),
                0,
                1_000_000,
            )? as u32,
            restart_scope: self.restart_scope.unwrap_or(default_scope),
            backoff_initial_ms,
            backoff_multiplier: finite_in(
                "backoff_multiplier",
                self.backoff_multiplier.unwrap_or(2.0),
                1.0,
                100.0,
            )?,
            backoff_max_ms,
            backoff_jitter: finite_in(
                "backoff_jitter",
                self.backoff_jitter.unwrap_or(0.0),
                0.0,
                1.0,
            )?,
            failure_policy: {
                let rules = self.failure_policy.unwrap_or_default();
                if rules.len() > 16 {
                    return Err(invalid("failure_policy may hold at most 16 rules"));
                }
                if let Some(why) = rules.iter().find_map(|r| r.problem()) {
                    return Err(invalid(why));
                }
                rules
            },
            crash_loop_after: in_range(
                "crash_loop_after",
                self.crash_loop_after.unwrap_or(DEFAULT_CRASH_LOOP_AFTER),
                0,
                1_000_000,
            )? as u32,
            backoff_reset_s: finite_in(
                "backoff_reset_s",
                self.backoff_reset_s.unwrap_or(DEFAULT_BACKOFF_RESET_S),
                0.0,
                86_400.0 * 30.0,
            )?,
            straggler_fraction: finite_in(
                "straggler_fraction",
                self.straggler_fraction
                    .unwrap_or(DEFAULT_STRAGGLER_FRACTION),
                0.01,
                0.99,
            )?,
            straggler_window_s: finite_in(
                "straggler_window_s",
                self.straggler_window_s
                    .unwrap_or(DEFAULT_STRAGGLER_WINDOW_S),
                1.0,
                86_400.0,
            )?,
            straggler_action: self.straggler_action.unwrap_or_default(),
            save_grace_s: finite_in(
                "save_grace_s",
                self.save_grace_s.unwrap_or(DEFAULT_SAVE_GRACE_S),
                0.0,
                3600.0,
            )?,
            save_signal: self.save_signal.unwrap_or(false),
            batch_size: in_range("batch_size", self.batch_size.unwrap_or(32), 1, 1_000_000)? as u32,
            lr: finite_in("lr", self.lr.unwrap_or(0.1), 0.0, 1e6)?,
            seed: in_range("seed", self.seed.unwrap_or(0), 0, i64::MAX)? as u64,
            sync,
            sleep_sec: finite_in(
                "sleep_sec",
                self.sleep_sec.unwrap_or(default_sleep),
                0.0,
                3600.0,
            )?,
            launcher,
            slurm,
            docker,
            warm_standby,
            auto_heartbeat: self.auto_heartbeat.unwrap_or(true),
        })
    }
}

impl JobSpec {
    /// With allowed roots configured, local `dataset` and `checkpoint_dir` must be absolute,
    /// free of `..`, and inside one of them (checked on the path as written; symlinks inside
    /// a root are the operator's business).
    pub fn check_roots(&self, roots: &[PathBuf]) -> Result<(), SpecError> {
        if roots.is_empty() {
            return Ok(());
        }
        for (name, value) in [
            ("dataset", &self.dataset),
            ("checkpoint_dir", &self.checkpoint_dir),
        ] {
            // Object storage is bounded by the server's credentials, not by local roots.
            if crate::storage::S3Url::is_s3(value) {
                continue;
            }
            let path = std::path::Path::new(value.strip_prefix("file://").unwrap_or(value));
            let clean = path.is_absolute()
                && path
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir));
            if !clean || !roots.iter().any(|r| path.starts_with(r)) {
                return Err(invalid(format!(
                    "{name} {value:?} is not inside an allowed root ({})",
                    roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// When a rank is a straggler.
    pub fn straggler_policy(&self) -> crate::domain::straggler::StragglerPolicy {
        crate::domain::straggler::StragglerPolicy {
            fraction: self.straggler_fraction,
            window: std::time::Duration::from_secs_f64(self.straggler_window_s),
            restart: self.straggler_action == StragglerAction::Restart,
        }
    }

    /// Processes the job keeps on its hosts at most: its ranks, and as many standbys with
    /// warm standby. What `--max-workers` counts.
    pub fn processes(&self) -> usize {
        self.world_size as usize * if self.warm_standby.is_some() { 2 } else { 1 }
    }

    /// The job's restart policy.
    pub fn restart_policy(&self) -> crate::domain::restart::RestartPolicy {
        crate::domain::restart::RestartPolicy {
            scope: self.restart_scope,
            max_restarts: self.max_restarts,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_multiplier: self.backoff_multiplier,
            backoff_max_ms: self.backoff_max_ms,
            backoff_jitter: self.backoff_jitter,
            backoff_reset_s: self.backoff_reset_s,
        }
    }

    /// The checkpoint directory of one job: `<checkpoint_dir>/<job_id>`.
    pub fn job_checkpoint_dir(&self, job_id: &uuid::Uuid) -> String {
        if self.checkpoint_dir.contains("://") {
            format!("{}/{job_id}", self.checkpoint_dir.trim_end_matches('/'))
        } else {
            PathBuf::from(&self.checkpoint_dir)
                .join(job_id.to_string())
                .to_string_lossy()
                .into_owned()
        }
    }
}

#[cfg(test)]
mod tests;
