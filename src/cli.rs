//! The command line: `serve` (the default) and the other subcommands of the one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    /// Write a synthetic classification dataset (shard-00000.jsonl …, test.jsonl).
    MakeDataset {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        shards: usize,
        #[arg(long, default_value_t = 10_000)]
        rows_per_shard: usize,
        #[arg(long, default_value_t = 32)]
        features: usize,
        #[arg(long, default_value_t = 4)]
        classes: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fraction of labels replaced by a random class.
        #[arg(long, default_value_t = 0.03)]
        label_noise: f64,
        #[arg(long, default_value_t = 5_000)]
        test_rows: usize,
    },
    /// Print the accuracy of a model file (GET /jobs/{id}/model) on a JSON-lines file.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
    },
    /// Measure recovery, hang detection, start-up and memory against a fresh server.
    Bench {
        /// Fewer repetitions (for CI and a first look).
        #[arg(long)]
        quick: bool,
        /// Where to write the figures as JSON.
        #[arg(long, default_value = "bench-results/bench.json")]
        out: PathBuf,
    },
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
}

impl ServeArgs {
    fn settings(self) -> anyhow::Result<Settings> {
        let mut settings = Settings::new(self.bind, self.data_dir);
        settings.job_defaults = JobDefaults::from_env(&settings.data_dir)?;
        settings.job_defaults.max_world_size = self.max_world_size;
        settings.kill_grace = Duration::from_millis(self.kill_grace_ms);
        settings.max_body_bytes = self.max_body_bytes;
        settings.http_workers = self.http_workers.max(1);
        Ok(settings)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Worker) => crate::trainer::run(),
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
            make_dataset(&out, &params).map(|()| {
                println!(
                    "wrote {} shards and test.jsonl to {}",
                    shards,
                    out.display()
                )
            })
        }
        Some(Command::Eval { model, data }) => crate::trainer::eval(&model, &data).map(|acc| {
            println!("accuracy {acc:.4}");
        }),
        Some(Command::Bench { quick, out }) => {
            crate::bench::run(crate::bench::BenchArgs { quick, out })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trainvisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init();
    let settings = args.settings()?;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        // One machine-readable line on stdout, for scripts that bind port 0.
        println!("trainvisor listening on http://{}", app.local_addr());
        app.run_until_signal().await
    })
}
