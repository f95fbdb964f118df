//! The table of the worker contract's names (what each variable is, which a job's `env` may
//! not set), apart from how an incarnation's values are made: the spec checks a job's `env`
//! against it without importing the environment builder, which reads the spec.

/// One variable of the worker contract.
pub struct EnvVar {
    pub name: &'static str,
    /// Set only for jobs whose `dataset` or `checkpoint_dir` is in object storage.
    pub s3_only: bool,
    /// A default, as torchrun's: a job's `env` may set it, and then wins.
    pub default_only: bool,
    /// Put in front of the value the rank would have had (the job's `env`, else the
    /// server's environment); a job's `env` may set it.
    pub prepends: bool,
    /// Set only on a warm standby that becomes the rank, by its launcher.
    pub warm_only: bool,
}

const fn var(name: &'static str) -> EnvVar {
    EnvVar {
        name,
        s3_only: false,
        default_only: false,
        prepends: false,
        warm_only: false,
    }
}

const fn prepend(name: &'static str) -> EnvVar {
    EnvVar {
        name,
        s3_only: false,
        default_only: false,
        prepends: true,
        warm_only: false,
    }
}

const fn s3(name: &'static str) -> EnvVar {
    EnvVar {
        name,
        s3_only: true,
        default_only: false,
        prepends: false,
        warm_only: false,
    }
}

const fn default(name: &'static str) -> EnvVar {
    EnvVar {
        name,
        s3_only: false,
        default_only: true,
        prepends: false,
        warm_only: false,
    }
}

const fn warm(name: &'static str) -> EnvVar {
    EnvVar {
        name,
        s3_only: false,
        default_only: false,
        prepends: false,
        warm_only: true,
    }
}

/// The signals torchrun's agent forwards to its workers (`--signals-to-handle`).
pub const SIGNALS_TO_HANDLE: &str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT";

/// Every variable trainvisor sets for a rank, in the order it sets them.
pub const WORKER_ENV: &[EnvVar] = &[
    var("RANK"),
    var("WORLD_SIZE"),
    var("LOCAL_RANK"),
    var("LOCAL_WORLD_SIZE"),
    var("MASTER_ADDR"),
    var("MASTER_PORT"),
    var("JOB_ID"),
    var("RESTART_COUNT"),
    var("TORCHELASTIC_RESTART_COUNT"),
    // The rest of torchrun's contract, with the values torchrun would set.
    var("GROUP_RANK"),
    var("GROUP_WORLD_SIZE"),
    var("ROLE_NAME"),
    var("ROLE_RANK"),
    var("ROLE_WORLD_SIZE"),
    var("TORCHELASTIC_RUN_ID"),
    var("TORCHELASTIC_MAX_RESTARTS"),
    var("TORCHELASTIC_ERROR_FILE"),
    var("TORCHELASTIC_SIGNALS_TO_HANDLE"),
    default("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    default("OMP_NUM_THREADS"),
    var("CHECKPOINT_DIR"),
    var("DATASET_DIR"),
    var("CHECKPOINT_EVERY"),
    var("SLEEP_SEC"),
    var("HEARTBEAT_TIMEOUT"),
    var("TRAINVISOR_HEARTBEAT_URL"),
    var("TRAINVISOR_SERVER_URL"),
    var("TRAINVISOR_TOKEN"),
    var("TRAINVISOR_INSTANCE"),
    var("TRAINVISOR_SPEC"),
    // S3 settings and credentials come from the server's environment, never from a spec
    // (which the API echoes).
    s3("S3_REGION"),
    s3("S3_MAX_RETRIES"),
    s3("S3_RETRY_TIMEOUT_S"),
    s3("S3_ENDPOINT"),
    s3("S3_ACCESS_KEY"),
    s3("S3_SECRET_KEY"),
    var("TRAINVISOR_CACHE_DIR"),
    // Ranks on this host (local, Docker): where a Python rank's stacks are written when a hung rank is being
    // diagnosed, and the hook that registers them (see launcher::stacks).
    var("TRAINVISOR_STACKS_FILE"),
    prepend("PYTHONPATH"),
    // Ranks on this host of a job with `auto_heartbeat` (the default): the hook on PYTHONPATH
    // heartbeats a torch script's optimizer steps; and, once a previous incarnation reported
    // a `torch.save` after its steps, the step count the script goes on from when it loads.
    var("TRAINVISOR_AUTO_HEARTBEAT"),
    var("TRAINVISOR_RESUME_STEP"),
    // Set to 1 when the rank is a warm standby that became the rank (see launcher::standby).
    warm(WARM_START),
];

/// The one variable by which a script can tell it was warm-started.
pub const WARM_START: &str = "TRAINVISOR_WARM_START";

/// The names a job's `env` may not set: every name of the contract but torchrun's defaults.
pub fn reserved_names() -> Vec<&'static str> {
    WORKER_ENV
        .iter()
        .filter(|v| !v.default_only && !v.prepends)
        .map(|v| v.name)
        .collect()
}

pub fn is_reserved(name: &str) -> bool {
    WORKER_ENV
        .iter()
        .any(|v| v.name == name && !v.default_only && !v.prepends)
}

/// Every name of the contract, defaults included.
pub fn all_names() -> Vec<&'static str> {
    WORKER_ENV.iter().map(|v| v.name).collect()
}
