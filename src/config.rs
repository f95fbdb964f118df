//! Server settings (flags with env fallbacks) and the seed's environment names, which are
//! the defaults of new jobs.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Defaults for fields a job spec leaves out. Read from the seed's environment names.
#[derive(Debug, Clone)]
pub struct JobDefaults {
    pub world_size: Option<u32>,
    pub max_world_size: u32,
    pub dataset: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_every: u64,
    pub sleep_sec: f64,
    /// The pace of the built-in trainer on the demo dataset when a job does not set
    /// `sleep_sec`: slow enough to watch (the quick start's job runs about a minute).
    pub demo_sleep_sec: f64,
    pub heartbeat_timeout_s: f64,
    pub max_restarts: u32,
    /// Where ranks of jobs that do not say run (`--launcher`, `TRAINVISOR_LAUNCHER`).
    pub launcher: crate::launcher::kind::LauncherKind,
}

/// The demo's pace (seconds a built-in trainer rank sleeps per step): 4 ranks take about a
/// minute over the demo dataset, time to follow the job with curl and the page.
pub const DEMO_SLEEP_SEC: f64 = 0.1;

impl JobDefaults {
    /// Defaults that depend on nothing but the data dir (what tests use).
    pub fn for_data_dir(data_dir: &Path) -> Self {
        JobDefaults {
            world_size: None,
            max_world_size: 1024,
            dataset: data_dir.join("datasets").join("demo"),
            checkpoint_dir: data_dir.join("checkpoints"),
            checkpoint_every: 5,
            sleep_sec: 0.0,
            demo_sleep_sec: 0.0,
            heartbeat_timeout_s: 10.0,
            max_restarts: 50,
            launcher: Default::default(),
        }
    }

    /// Defaults with the seed's environment names applied over `for_data_dir`.
    /// A variable that is set but does not parse is an error, not silently ignored.
    pub fn from_env(data_dir: &Path) -> anyhow::Result<Self> {
        Self::from_vars(data_dir, |name| std::env::var(name).ok())
    }

    /// `from_env` over any source of variables (`var` answers a name's value).
    fn from_vars(data_dir: &Path, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let vars = Vars(&var);
        let mut d = Self::for_data_dir(data_dir);
        d.demo_sleep_sec = DEMO_SLEEP_SEC;
        if let Some(v) = vars.parse::<u32>("WORLD_SIZE")? {
            d.world_size = Some(v);
        }
        // USE_S3 makes the bucket the default for whatever DATASET_DIR / CHECKPOINT_DIR leave
        // unset; an explicit path or s3:// URL in them still wins.
        if vars.flag("USE_S3")? {
            let bucket = vars
                .string("S3_BUCKET")
                .ok_or_else(|| anyhow::anyhow!("USE_S3 is set but S3_BUCKET is not"))?;
            crate::storage::S3Url::parse(&format!("s3://{bucket}"))
                .map_err(|e| anyhow::anyhow!("S3_BUCKET: {e}"))?;
            d.dataset = PathBuf::from(format!("s3://{bucket}/datasets/demo"));
            d.checkpoint_dir = PathBuf::from(format!("s3://{bucket}/checkpoints"));
        }
        if let Some(v) = vars.string("DATASET_DIR") {
            d.dataset = PathBuf::from(v);
            // The user's own data trains at full speed: the demo's pace is only for the
            // demo dataset the server makes in its data dir (or bucket).
            d.demo_sleep_sec = d.sleep_sec;
        }
        if let Some(v) = vars.string("CHECKPOINT_DIR") {
            d.checkpoint_dir = PathBuf::from(v);
        }
        if let Some(v) = vars.parse("CHECKPOINT_EVERY")? {
            d.checkpoint_every = v;
        }
        if let Some(v) = vars.parse("SLEEP_SEC")? {
            d.sleep_sec = v;
            d.demo_sleep_sec = v;
        }
        if let Some(v) = vars.parse("HEARTBEAT_TIMEOUT")? {
            d.heartbeat_timeout_s = v;
        }
        if let Some(v) = vars.parse("MAX_RESTARTS")? {
            d.max_restarts = v;
        }
        Ok(d)
    }
}

/// The seed's variables, read through a lookup (the process environment, or a test's map).
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    fn string(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.is_empty())
    }

    /// A boolean variable: 1/true/yes/on or 0/false/no/off (unset is false).
    fn flag(&self, name: &str) -> anyhow::Result<bool> {
        match self.string(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(false),
            Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
            Some(v) => anyhow::bail!("environment variable {name}={v:?}: expected true or false"),
        }
    }

    fn parse<T: std::str::FromStr>(&self, name: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.string(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("environment variable {name}={v:?}: {e}")),
        }
    }
}

/// Everything `Application::build` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to listen on; port 0 picks a free port.
    pub bind: String,
    /// Holds `trainvisor.db`, the default checkpoint dir and the demo dataset.
    pub data_dir: PathBuf,
    pub job_defaults: JobDefaults,
    /// Time between SIGTERM and SIGKILL when a worker's process group is stopped.
    pub kill_grace: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// The program whose `worker` subcommand is the built-in trainer.
    pub trainer_exe: PathBuf,
    /// When set, the admin API needs it (see `api::auth`).
    pub api_token: Option<String>,
    /// Live jobs at once; more are refused with 429.
    pub max_jobs: usize,
    /// Ranks of live jobs at once; more are refused with 429.
    pub max_workers: usize,
    /// Open SSE streams at once (logs and events together); more are refused with 429.
    pub max_sse_subscribers: usize,
    /// If non-empty, local `dataset` and `checkpoint_dir` paths must lie inside one of these.
    pub allowed_roots: Vec<PathBuf>,
    /// Log lines kept per job; older ones are dropped and counted.
    pub max_log_lines_per_job: u64,
    /// The base URL ranks reach the server at; by default derived from `bind` (loopback for
    /// an unspecified address). Slurm nodes need an address of this host they can route to.
    pub advertise_url: Option<String>,
    /// `SLURM_CONF` for the Slurm commands the server runs (salloc, srun, squeue, scancel,
    /// sinfo); none means theirs (the environment's `SLURM_CONF` or `/etc/slurm/slurm.conf`).
    pub slurm_conf: Option<PathBuf>,
    /// Free space on the data dir's file system under which the server warns (and `/health`
    /// says `disk_low`).
    pub low_disk_bytes: u64,
    /// A request body must arrive whole within this; slower ones get 408 and are closed.
    pub body_timeout: Duration,
    /// Incidents, stragglers and progress samples are kept (off only to measure their cost).
    pub accounting: bool,
    /// How long the page's session cookie is good for.
    pub session_ttl: Duration,
    /// Concurrent HTTP connections; none: derived from the open-file limit, keeping a reserve
    /// of descriptors for ranks and SQLite (`startup::connection_cap`).
    pub max_connections: Option<usize>,
    /// How to reach `s3://` locations (the seed's `S3_*` env); workers of jobs that use S3 get
    /// the same settings, credentials included, through their environment only.
    pub s3: crate::storage::S3Config,
    /// The uid and gid of Docker ranks; none: the server's own, or `nobody` (65534) when the
    /// server runs as root (`launcher::docker::binds::rank_user`).
    pub docker_user: Option<(u32, u32)>,
    /// A warm standby whose preloads have not finished importing after this long is killed
    /// (and counted as a failed standby).
    pub standby_ready_timeout: Duration,
}

impl Settings {
    /// Settings with every default, for a given data dir and bind address.
    pub fn new(bind: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Settings {
            bind: bind.into(),
            job_defaults: JobDefaults::for_data_dir(&data_dir),
            data_dir,
            kill_grace: Duration::from_secs(3),
            max_body_bytes: 1 << 20,
            http_workers: 2,
            trainer_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("trainvisor")),
            api_token: None,
            max_jobs: 256,
            max_workers: 4096,
            max_sse_subscribers: 4096,
            allowed_roots: Vec::new(),
            max_log_lines_per_job: 1_000_000,
            advertise_url: None,
            slurm_conf: None,
            low_disk_bytes: 512 << 20,
            body_timeout: Duration::from_secs(10),
            accounting: true,
            max_connections: None,
            session_ttl: Duration::from_secs(12 * 3600),
            s3: crate::storage::S3Config::default(),
            docker_user: None,
            standby_ready_timeout: Duration::from_secs(600),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(vars: &[(&str, &str)]) -> JobDefaults {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        JobDefaults::from_vars(Path::new("/data"), |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .unwrap()
    }

    /// Issue 29, point 7: the demo's pace only for the demo dataset the server makes.
    #[test]
    fn the_demo_pace_is_for_the_servers_own_demo_dataset_only() {
        let own = defaults(&[]);
        assert_eq!(own.dataset, Path::new("/data/datasets/demo"));
        assert_eq!((own.demo_sleep_sec, own.sleep_sec), (DEMO_SLEEP_SEC, 0.0));
        let bucket = defaults(&[("USE_S3", "1"), ("S3_BUCKET", "demo-bucket")]);
        assert_eq!(bucket.demo_sleep_sec, DEMO_SLEEP_SEC, "made in the bucket");
        let real = defaults(&[("DATASET_DIR", "/datasets/imagenet-shards")]);
        assert_eq!((real.demo_sleep_sec, real.sleep_sec), (0.0, 0.0));
        let told = defaults(&[("DATASET_DIR", "/d"), ("SLEEP_SEC", "0.5")]);
        assert_eq!((told.demo_sleep_sec, told.sleep_sec), (0.5, 0.5));
    }
}
