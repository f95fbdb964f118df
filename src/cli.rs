//! The command line: `serve` (the default) and the other subcommands of the one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client;
use crate::config::{JobDefaults, Settings};
use crate::startup::Application;
use crate::trainer::data::{DatasetParams, make_dataset};

#[derive(Parser)]
#[command(
    name = "trainvisor",
    version,
    about = "Fault-tolerant runtime for distributed training jobs"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// The built-in trainer: run as a job's rank (a job's default command).
    Worker,
    /// Write a synthetic classification dataset (shard-00000.jsonl …, test.jsonl) to a
    /// directory or to s3://bucket/prefix (with the S3_* environment).
    MakeDataset {
        /// The directory (or s3://bucket/prefix) to write the shards to.
        #[arg(long)]
        out: PathBuf,
        /// Shard files: each rank of a job reads shards round-robin, so at least world_size.
        #[arg(long, default_value_t = 8)]
        shards: usize,
        /// Records in each shard file.
        #[arg(long, default_value_t = 10_000)]
        rows_per_shard: usize,
        /// Features of each record.
        #[arg(long, default_value_t = 32)]
        features: usize,
        /// Classes the records fall into.
        #[arg(long, default_value_t = 4)]
        classes: usize,
        /// Random seed: the same seed writes the same dataset.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fraction of labels replaced by a random class.
        #[arg(long, default_value_t = 0.03)]
        label_noise: f64,
        /// Records in test.jsonl (what `eval` measures accuracy on).
        #[arg(long, default_value_t = 5_000)]
        test_rows: usize,
    },
    /// Print the accuracy of a model file (GET /jobs/{id}/model) on a JSON-lines file.
    Eval {
        /// The model file, as GET /jobs/{id}/model returns it.
        #[arg(long)]
        model: PathBuf,
        /// A JSON-lines file of records, such as the dataset's test.jsonl.
        #[arg(long)]
        data: PathBuf,
    },
    /// Submit a job: the built-in trainer, or the command after `--`.
    Submit {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        submit: client::Submit,
    },
    /// List jobs.
    Jobs {
        #[command(flatten)]
        server: ServerArgs,
        /// Only jobs in this state: queued, pending, running, succeeded, failed or stopped.
        #[arg(long)]
        state: Option<String>,
    },
    /// A job's summary: state, progress, per-rank table.
    Status {
        #[command(flatten)]
        server: ServerArgs,
        /// The job's id, or any unique start of it (such as the 8 characters the page shows).
        job: String,
    },
    /// Print a job's logs; -f follows them until the job ends.
    Logs {
        #[command(flatten)]
        server: ServerArgs,
        /// The job's id, or any unique start of it (such as the 8 characters the page shows).
        job: String,
        /// Keep printing new lines as they come, until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Only this rank's lines.
        #[arg(long)]
        rank: Option<u32>,
        /// How many of the last lines to print first.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Leave out each line's time (when the server received it, UTC).
        #[arg(long)]
        no_timestamps: bool,
    },
    /// Stop a job.
    Stop {
        #[command(flatten)]
        server: ServerArgs,
        /// The job's id, or any unique start of it (such as the 8 characters the page shows).
        job: String,
    },
    /// Show a progress bar until the job ends; exit 0 if it succeeded, 1 if it failed, 2 if stopped.
    Wait {
        #[command(flatten)]
        server: ServerArgs,
        /// The job's id, or any unique start of it (such as the 8 characters the page shows).
        job: String,
    },
    /// Exit 0 if the server answers GET /health, 1 if not (the container's HEALTHCHECK: no
    /// curl needed).
    Health {
        /// The server's base URL.
        #[arg(
            long,
            env = "TRAINVISOR_SERVER",
            default_value = "http://127.0.0.1:8000"
        )]
        server: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Check an installation end to end: a small job, a rank killed and restarted from its
    /// checkpoint with the exact model, the SSE stream and the history. Exit 0 if all pass.
    Validate {
        /// A running server to check; without it, one is started on a temp data dir.
        #[arg(long, env = "TRAINVISOR_SERVER")]
        server: Option<String>,
        /// The server's API token, if it has one.
        #[arg(long, env = "TRAINVISOR_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the results as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure recovery, hang detection, start-up and memory against a fresh server.
    Bench {
        /// Fewer repetitions (for CI and a first look).
        #[arg(long)]
        quick: bool,
        /// Where to write the figures as JSON.
        #[arg(long, default_value = "bench-results/bench.json")]
        out: PathBuf,
        /// Run only these scenarios (comma-separated): recovery, hang, api, sse, scale, accounting,
        /// training, checkpoint, notice, slurm, docker, peers, observe, s3.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Leave out the Ray Train and torchrun comparison (it needs PyPI the first time).
        #[arg(long)]
        no_peers: bool,
        /// Where the peers' venv (Ray Train, torch), scripts and logs live; reused across runs.
        /// Default: $XDG_CACHE_HOME/trainvisor/bench-peers or ~/.cache/trainvisor/bench-peers.
        #[arg(long)]
        peers_dir: Option<PathBuf>,
        /// Launches (each with one kill -9) per peer and for trainvisor on the same workload.
        #[arg(long, default_value_t = 3)]
        peer_trials: usize,
    },
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// The server's base URL.
    #[arg(
        long,
        env = "TRAINVISOR_SERVER",
        default_value = "http://127.0.0.1:8000"
    )]
    server: String,
    /// The server's API token, if it has one.
    #[arg(long, env = "TRAINVISOR_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "TRAINVISOR_BIND", default_value = "127.0.0.1:8000")]
    bind: String,
    /// Directory for the database, default checkpoints and the demo dataset.
    #[arg(long, env = "TRAINVISOR_DATA_DIR", default_value = "./trainvisor-data")]
    data_dir: PathBuf,
    /// Largest world_size a job may ask for.
    #[arg(long, env = "TRAINVISOR_MAX_WORLD_SIZE", default_value_t = 1024)]
    max_world_size: u32,
    /// Milliseconds between SIGTERM and SIGKILL when stopping a worker's process group.
    #[arg(long, env = "TRAINVISOR_KILL_GRACE_MS", default_value_t = 3000)]
    kill_grace_ms: u64,
    /// Largest request body in bytes.
    #[arg(long, env = "TRAINVISOR_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// HTTP worker threads.
    #[arg(long, env = "TRAINVISOR_HTTP_WORKERS", default_value_t = 2)]
    http_workers: usize,
    /// Token the admin API requires (required when binding a non-loopback address).
    #[arg(long, env = "TRAINVISOR_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File with the API token: read if it exists, else a token is generated, written there
    /// (mode 0600) and shown once in the log. --api-token wins. The container image sets
    /// /data/api-token.
    #[arg(long, env = "TRAINVISOR_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Live jobs at once.
    #[arg(long, env = "TRAINVISOR_MAX_JOBS", default_value_t = 256)]
    max_jobs: usize,
    /// Ranks of live jobs at once.
    #[arg(long, env = "TRAINVISOR_MAX_WORKERS", default_value_t = 4096)]
    max_workers: usize,
    /// Open SSE streams at once.
    #[arg(long, env = "TRAINVISOR_MAX_SSE_SUBSCRIBERS", default_value_t = 4096)]
    max_sse_subscribers: usize,
    /// Directory local dataset and checkpoint paths must lie in (repeatable; default: anywhere).
    #[arg(
        long = "allowed-root",
        env = "TRAINVISOR_ALLOWED_ROOTS",
        value_delimiter = ':'
    )]
    allowed_roots: Vec<PathBuf>,
    /// Log lines kept per job; the oldest are dropped (and counted) beyond it.
    #[arg(
        long,
        env = "TRAINVISOR_MAX_LOG_LINES_PER_JOB",
        default_value_t = 1_000_000
    )]
    max_log_lines_per_job: u64,
    /// Where ranks run when a job does not say: `local` (child processes) or `slurm`.
    #[arg(long, env = "TRAINVISOR_LAUNCHER", default_value = "local", value_parser = parse_launcher)]
    launcher: crate::spec::LauncherKind,
    /// The URL ranks reach this server at (heartbeats, checkpoints), e.g.
    /// http://10.0.0.5:8000 when Slurm nodes run the ranks. Default: derived from --bind.
    #[arg(long, env = "TRAINVISOR_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// slurm.conf for the Slurm commands the server runs (default: Slurm's own lookup).
    #[arg(long, env = "SLURM_CONF")]
    slurm_conf: Option<PathBuf>,
    /// Warn (and /health says disk_low) when the data dir has less free space than this.
    #[arg(long, env = "TRAINVISOR_LOW_DISK_MB", default_value_t = 512)]
    low_disk_mb: u64,
    /// Milliseconds a request body may take to arrive whole; slower ones get 408 and are closed.
    #[arg(long, env = "TRAINVISOR_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    body_timeout_ms: u64,
    /// Concurrent HTTP connections (default: the open-file limit less a reserve for ranks and
    /// SQLite).
    #[arg(long, env = "TRAINVISOR_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Keep no incidents, straggler flags or progress samples (for measuring what they cost).
    #[arg(long, env = "TRAINVISOR_NO_ACCOUNTING")]
    no_accounting: bool,
    /// The server's log lines on stderr: `text` (colour only on a terminal) or `json` (one
    /// object per line, for log collectors).
    #[arg(
        long,
        env = "TRAINVISOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: crate::telemetry::LogFormat,
    /// UID:GID that Docker ranks run as (default: the server's own; `65534:65534`, nobody,
    /// when the server runs as root). `0:0` runs them as root, which a token then is.
    #[arg(long, env = "TRAINVISOR_DOCKER_USER", value_parser = crate::launcher::docker::binds::parse_user)]
    docker_user: Option<(u32, u32)>,
    /// Seconds a warm standby may take to import its preloads before it is killed and counted
    /// as a failed standby.
    #[arg(
        long,
        env = "TRAINVISOR_STANDBY_READY_TIMEOUT_S",
        default_value_t = 600
    )]
    standby_ready_timeout_s: u64,
}

fn parse_launcher(s: &str) -> Result<crate::spec::LauncherKind, String> {
    s.parse()
}

impl ServeArgs {
    fn settings(self) -> anyhow::Result<Settings> {
        // Absolute, so the paths handed to workers and checked against roots are unambiguous.
        let data_dir = std::path::absolute(&self.data_dir)?;
        let mut settings = Settings::new(self.bind, data_dir);
        settings.job_defaults = JobDefaults::from_env(&settings.data_dir)?;
        settings.s3 = crate::storage::S3Config::from_env()?;
        settings.job_defaults.max_world_size = self.max_world_size;
        settings.kill_grace = Duration::from_millis(self.kill_grace_ms);
        settings.max_body_bytes = self.max_body_bytes;
        settings.http_workers = self.http_workers.max(1);
        settings.api_token = self.api_token.filter(|t| !t.is_empty());
        settings.max_jobs = self.max_jobs;
        settings.max_workers = self.max_workers;
        settings.max_sse_subscribers = self.max_sse_subscribers;
        settings.allowed_roots = self.allowed_roots;
        settings.max_log_lines_per_job = self.max_log_lines_per_job.max(1);
        settings.job_defaults.launcher = self.launcher;
        settings.advertise_url = self
            .advertise_url
            .filter(|u| !u.is_empty())
            .map(|u| u.trim_end_matches('/').to_string());
        settings.slurm_conf = self.slurm_conf.filter(|p| !p.as_os_str().is_empty());
        settings.low_disk_bytes = self.low_disk_mb.saturating_mul(1 << 20);
        settings.body_timeout = Duration::from_millis(self.body_timeout_ms.max(1));
        settings.max_connections = self.max_connections.map(|n| n.max(1));
        settings.accounting = !self.no_accounting;
        settings.docker_user = self.docker_user;
        settings.standby_ready_timeout = Duration::from_secs(self.standby_ready_timeout_s.max(1));
        if !settings.allowed_roots.is_empty() {
            // The defaults live in the data dir, so it is always allowed.
            settings.allowed_roots.push(settings.data_dir.clone());
        }
        Ok(settings)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Worker) => match crate::trainer::run() {
            // A configuration error ends with its own exit code, which fails the job at once.
            Err(e) if e.downcast_ref::<crate::trainer::ConfigError>().is_some() => {
                eprintln!("trainvisor worker: {e:#}");
                std::process::exit(crate::domain::failure_policy::EXIT_CONFIG);
            }
            other => other,
        },
        Some(Command::MakeDataset {
            out,
            shards,
            rows_per_shard,
            features,
            classes,
            seed,
            label_noise,
            test_rows,
        }) => {
            let params = DatasetParams {
                shards,
                rows_per_shard,
                features,
                classes,
                seed,
                label_noise,
                test_rows,
            };
            let target = out.to_string_lossy().into_owned();
            if crate::storage::S3Url::is_s3(&target) {
                make_dataset_in_bucket(&target, &params)
                    .map(|()| println!("wrote {shards} shards and test.jsonl to {target}"))
            } else {
                make_dataset(&out, &params).map(|()| {
                    println!(
                        "wrote {} shards and test.jsonl to {}",
                        shards,
                        out.display()
                    )
                })
            }
        }
        Some(Command::Eval { model, data }) => crate::trainer::eval(&model, &data).map(|acc| {
            println!("accuracy {acc:.4}");
        }),
        Some(Command::Submit { server, submit }) => with_client(&server, |c| async move {
            client::submit(&c, submit).await.map(|()| 0)
        }),
        Some(Command::Jobs { server, state }) => with_client(&server, |c| async move {
            client::jobs(&c, state).await.map(|()| 0)
        }),
        Some(Command::Status { server, job }) => with_client(&server, |c| async move {
            client::status(&c, &job).await.map(|()| 0)
        }),
        Some(Command::Logs {
            server,
            job,
            follow,
            rank,
            tail,
            no_timestamps,
        }) => with_client(&server, |c| async move {
            let args = client::LogsArgs {
                follow,
                rank,
                tail,
                timestamps: !no_timestamps,
            };
            client::logs(&c, &job, args).await.map(|()| 0)
        }),
        Some(Command::Stop { server, job }) => with_client(&server, |c| async move {
            client::stop(&c, &job).await.map(|()| 0)
        }),
        Some(Command::Wait { server, job }) => {
            with_client(&server, |c| async move { client::wait(&c, &job).await })
        }
        Some(Command::Health { server, timeout }) => {
            quiet_on_closed_pipe();
            let c = client::Client::new(&server, None, false);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(client::health(&c, Duration::from_secs_f64(timeout))))
                .map(|version| {
                    let line = format!("healthy: trainvisor {version} at {server}");
                    println!("{}", client::output::printable(&line))
                })
        }
        Some(Command::Validate {
            server,
            token,
            json,
        }) => match crate::validate::run(crate::validate::ValidateArgs {
            server,
            token,
            json,
        }) {
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Some(Command::Bench {
            quick,
            out,
            only,
            no_peers,
            peers_dir,
            peer_trials,
        }) => crate::bench::run(crate::bench::BenchArgs {
            quick,
            out,
            only,
            no_peers,
            peers: crate::bench::peers::PeersArgs {
                dir: peers_dir.unwrap_or_else(crate::bench::peers::default_dir),
                trials: peer_trials.max(1),
            },
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, so `docker logs` of a container that cannot start says why at a glance;
            // escaped, since it may quote a rank's output.
            let message = format!("{e:#}");
            eprintln!(
                "trainvisor: {}",
                client::output::printable(
                    &message.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command; its number becomes the process's exit code.
fn with_client<F, Fut>(args: &ServerArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(client::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<i32>>,
{
    quiet_on_closed_pipe();
    let c = client::Client::new(&args.server, args.api_token.as_deref(), args.json);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(f(c))?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// A client command whose reader goes away (`trainvisor status JOB | head -3`) ends quietly
/// on SIGPIPE, as `cat` does, instead of panicking on the failed write. Only the client
/// commands: the server must outlive any one closed pipe.
fn quiet_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init(args.log_format);
    if std::env::args().any(|a| a == "--api-token" || a.starts_with("--api-token=")) {
        eprintln!(
            "trainvisor: warning: --api-token is visible to every user of this machine in \
             /proc/<pid>/cmdline and `ps`; prefer TRAINVISOR_API_TOKEN or --api-token-file"
        );
    }
    let token_file = args
        .api_token_file
        .clone()
        .filter(|p| !p.as_os_str().is_empty());
    let mut settings = args.settings()?;
    // Read; now out of reach of the ranks (they run as this user and could read
    // /proc/<server>/environ otherwise).
    crate::api_token::scrub_from_environment("TRAINVISOR_API_TOKEN");
    crate::startup::prepare_data_dir(&settings.data_dir)?;
    if let (None, Some(path)) = (&settings.api_token, token_file) {
        let (token, source) = crate::api_token::load_or_create(&path)?;
        eprintln!("{}", crate::api_token::announce(&path, &token, &source));
        settings.api_token = Some(token);
    }
    actix_web::rt::System::new().block_on(async move {
        prepare_buckets(&settings).await?;
        let app = Application::build(settings).await?;
        // One machine-readable line on stdout, for scripts that bind port 0: the address as
        // bound, so a server on every address (a container's) does not claim loopback only.
        println!("trainvisor listening on http://{}", app.bound_addr());
        app.run_until_signal().await
    })
}

/// The server's default `s3://` locations (`USE_S3`, `DATASET_DIR`, `CHECKPOINT_DIR`) are
/// checked before it serves: reachable with its credentials, the bucket created if missing.
async fn prepare_buckets(settings: &Settings) -> anyhow::Result<()> {
    let defaults = &settings.job_defaults;
    let mut seen = Vec::new();
    for location in [&defaults.dataset, &defaults.checkpoint_dir] {
        let location = location.to_string_lossy().into_owned();
        let Ok(url) = crate::storage::S3Url::parse(&location) else {
            continue;
        };
        if seen.contains(&url.bucket) {
            continue;
        }
        let prepared = crate::storage::bucket::prepare(&location, &settings.s3).await?;
        tracing::info!(bucket = %url.bucket, ?prepared, "S3 bucket ready");
        seen.push(url.bucket);
    }
    Ok(())
}

/// `make-dataset --out s3://...`: made in a temp dir, then uploaded.
fn make_dataset_in_bucket(target: &str, params: &DatasetParams) -> anyhow::Result<()> {
    let store = crate::storage::BlobStore::open(target)?;
    let tmp = tempfile_dir()?;
    let result = make_dataset(&tmp, params).and_then(|()| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(crate::trainer::data::upload_dir(&tmp, &store))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trainvisor-dataset-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests;
