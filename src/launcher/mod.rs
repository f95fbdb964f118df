//! Where a rank runs: the seam between a Job and its Workers on one side and the place its
//! ranks' processes live on the other (child processes of this server, Slurm job steps,
//! Docker containers). A Job gets one [`JobLauncher`] for its life; a Worker sees only the
//! [`RankProcess`] handle it starts: output lines, an exit, terminate with grace, kill.
//! A new place to run ranks is a new folder here (its launcher, its spec fields and their
//! checks), its kind and capabilities in [`kind`], and its arms in [`for_job`], [`admit`] and
//! [`sweep`]; everything else asks a launcher what it placed ([`Place`]) or can do.

pub mod docker;
pub mod kind;
pub mod local;
pub mod process;
pub mod siblings;
pub mod slurm;
pub mod stacks;
pub mod standby;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use futures_util::future::LocalBoxFuture;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::Settings;
use crate::domain::worker_env::Placement;
use crate::domain::{Exit, Outcome};
use crate::spec::JobSpec;
use crate::store::Recorder;
use kind::LauncherKind;

/// What to start for one rank: its argv and its environment (the worker contract).
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The working directory (the job's `working_dir`); none: the server's.
    pub cwd: Option<String>,
}

/// Where one rank goes, as its launcher placed it: the facts the worker environment is made
/// of, so that nothing outside `launcher/` needs to know which launcher placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The node shown in the summary and recorded with the incarnation.
    pub node: String,
    /// Its local rank and group (torchrun's node) among the job's ranks.
    pub placement: Placement,
    /// The rank runs on this host (a container of the local engine too: one kernel), where
    /// host-local hooks apply: the Python stacks hook on its `PYTHONPATH`, its stacks taken
    /// from its process group (see [`stacks`]).
    pub host_local: bool,
}

/// The outcome of [`JobLauncher::prepare`]: where each rank goes and how they find each other.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `MASTER_ADDR`: the address rank 0 is reached at by the others.
    pub master_addr: String,
    /// The server as the ranks reach it, when that is not the server's own base URL (a
    /// container reaches the host through its network's gateway).
    pub server_url: Option<String>,
    pub places: Vec<(u32, Place)>,
}

/// One line a rank printed.
#[derive(Debug, Clone)]
pub struct Line {
    pub stream: &'static str,
    pub text: String,
}

/// Longest stored log line, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Lines in flight between a launcher's readers and the Worker: small, so a rank that prints
/// faster than the history is written waits on its pipe instead of filling memory.
const LINE_CHANNEL: usize = 64;

/// Stops a running rank. Both calls return at once; the exit arrives through the handle.
pub trait RankControl: Send + Sync {
    /// Ask the rank to stop (SIGTERM or what stands for it).
    fn terminate(&self);
    /// Stop it now, with everything it started.
    fn kill(&self);
    /// Ask it to checkpoint (SIGUSR1 where the rank's processes can be signalled); nothing
    /// where they cannot.
    fn ask_to_save(&self) {}
    /// The process group of the rank's processes when they run on this host, where their
    /// stacks can be taken before a hung rank is killed; none elsewhere.
    fn host_group(&self) -> Option<u32> {
        None
    }
}

/// A rank's process as its Worker holds it.
pub struct RankProcess {
    /// The host pid of the rank's process (its srun client on Slurm, the container's main
    /// process for Docker): what the summary shows and `kill -9` takes.
    pub pid: u32,
    /// Its output, line by line, stdout and stderr interleaved as they come; closed when the
    /// process and everything that held its output are gone.
    pub lines: mpsc::Receiver<Line>,
    /// Resolves once, when the process has exited (and was reaped).
    pub exit: LocalBoxFuture<'static, Exit>,
    pub control: Arc<dyn RankControl>,
    /// A warm standby became this rank (`warm_standby`), rather than a cold start.
    pub warm: bool,
}

/// What a launcher reports for the summary.
#[derive(Debug, Clone, Default)]
pub struct LauncherStatus {
    /// The launcher's own handle on what holds the job's ranks, while there is one (the Slurm
    /// job id of their allocation); the summary shows it with the launcher's kind.
    pub handle: Option<String>,
    /// Places excluded from the job's launches (bad-node quarantine), in order.
    pub excluded_nodes: Vec<String>,
    /// The job's warm standbys, by rank.
    pub standbys: standby::StandbyStatus,
}

/// One job's place to run ranks, for the job's whole life.
pub trait JobLauncher: Send + Sync {
    /// Gets ready to run `ranks` (ascending): an allocation, a network. Resolves to where each
    /// goes; an error fails the job with its text.
    fn prepare(&self, ranks: Vec<u32>) -> LocalBoxFuture<'static, Result<Prepared, String>>;

    /// Starts incarnation `attempt` of `rank` at `place`.
    fn start(
        &self,
        rank: u32,
        attempt: u32,
        place: Place,
        launch: Launch,
    ) -> LocalBoxFuture<'static, io::Result<RankProcess>>;

    /// An incarnation of `rank` ended with a failure the Job is about to act on (before it
    /// decides the restart, so a launcher that tracks its places' health can avoid a bad one).
    fn rank_failed(&self, _rank: u32, _outcome: Outcome, _detail: &str) {}

    /// The current incarnation of `rank` reported a step (warm standbys are refilled only
    /// while every rank is stepping).
    fn rank_stepping(&self, _rank: u32) {}

    /// The job has ended: give back whatever the launcher holds for it.
    fn release(&self) -> LocalBoxFuture<'static, ()>;

    /// Server shutdown: kill every live rank now and release; the next server resumes the job.
    fn kill_all(&self) -> LocalBoxFuture<'static, ()>;

    fn status(&self) -> LauncherStatus {
        LauncherStatus::default()
    }
}

/// What a job's launcher may use of the server.
#[derive(Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    pub spec: Arc<JobSpec>,
    pub settings: Settings,
    /// Marks everything the job starts as this data dir's (see `process::sweep`).
    pub instance: String,
    /// The server's own URL (what local ranks reach it at).
    pub base_url: String,
    pub recorder: Recorder,
    /// Nodes excluded from the job's launches so far (restored from the history).
    pub excluded_nodes: Vec<String>,
}

impl JobContext {
    /// A line in the job's log, from the launcher.
    pub fn note(&self, line: String) {
        self.recorder.note(self.job_id, None, None, line);
    }
}

/// The launcher of a job, from its spec.
pub fn for_job(cx: JobContext) -> Arc<dyn JobLauncher> {
    match cx.spec.launcher {
        LauncherKind::Local => Arc::new(local::LocalLauncher::new(cx)),
        LauncherKind::Slurm => Arc::new(slurm::SlurmLauncher::new(cx)),
        LauncherKind::Docker => Arc::new(docker::DockerLauncher::new(cx)),
    }
}

/// Checks at submission what is knowable then (the dataset has shards, the checkpoint dir
/// can be written, the command exists, an image is present), so a job that could never start
/// is refused with a 422 naming the field, and nothing is created.
pub async fn admit(spec: &JobSpec, settings: &Settings, base_url: &str) -> Result<(), String> {
    check_locations(spec, settings)?;
    match spec.launcher {
        LauncherKind::Local => {
            if let Some(dir) = &spec.working_dir
                && !std::path::Path::new(dir).is_dir()
            {
                return Err(format!(
                    "working_dir: {dir} is not a directory on the server"
                ));
            }
            local::admit(spec)
        }
        LauncherKind::Slurm => Ok(()),
        LauncherKind::Docker => docker::admit(spec, settings, base_url).await,
    }
}

/// The built-in trainer gives every rank at least one shard (round-robin): a rank without
/// one could only fail, on every restart.
fn too_many_ranks(spec: &JobSpec, shards: usize) -> Result<(), String> {
    if spec.world_size as usize > shards {
        return Err(format!(
            "dataset: world_size {} is more than the {shards} shard files of {}: the built-in \
             trainer gives every rank at least one",
            spec.world_size, spec.dataset
        ));
    }
    Ok(())
}

/// The built-in trainer's dataset must hold shard files; a local checkpoint dir must be
/// creatable and writable. (The server's own demo dataset is made on first use.)
fn check_locations(spec: &JobSpec, settings: &Settings) -> Result<(), String> {
    use std::path::Path;
    let demo = settings.job_defaults.dataset.to_string_lossy();
    if spec.command.is_none() && spec.dataset == demo {
        too_many_ranks(spec, crate::trainer::data::DatasetParams::default().shards)?;
    }
    if spec.command.is_none() && !spec.dataset.contains("://") && spec.dataset != demo {
        let dir = Path::new(&spec.dataset);
        if !dir.is_dir() {
            return Err(format!(
                "dataset: {} is not a directory on the server",
                spec.dataset
            ));
        }
        match crate::trainer::data::shard_files(dir) {
            Ok(shards) if !shards.is_empty() => too_many_ranks(spec, shards.len())?,
            _ => {
                return Err(format!(
                    "dataset: {} holds no shard files (shard-*.jsonl) for the built-in trainer \
                     (trainvisor make-dataset makes some)",
                    spec.dataset
                ));
            }
        }
    }
    if !spec.checkpoint_dir.contains("://") {
        // The nearest directory that exists must be one the server can write into.
        let mut dir = Path::new(&spec.checkpoint_dir);
        while !dir.exists() {
            match dir.parent() {
                Some(parent) => dir = parent,
                None => break,
            }
        }
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
            format!(
                "checkpoint_dir: {} is not a usable path",
                spec.checkpoint_dir
            )
        })?;
        // SAFETY: access(2) on a NUL-terminated path we own.
        let writable = dir.is_dir() && unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0;
        if !writable {
            return Err(format!(
                "checkpoint_dir: {} cannot be created or written by the server ({} is not a \
                 writable directory)",
                spec.checkpoint_dir,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// At boot: ends whatever a previous server on this data dir left running (processes,
/// containers), before any job is resumed.
pub async fn sweep(instance: &str) -> usize {
    process::sweep(instance) + docker::sweep(instance).await
}

/// Before a job is resumed after a server restart: drops what the dead server held for it
/// (a Slurm allocation), so the job is relaunched afresh, never next to its old ranks.
pub async fn forget(spec: &JobSpec, job_id: Uuid, settings: &Settings) {
    if spec.launcher == LauncherKind::Slurm {
        slurm::forget(job_id, settings).await;
    }
}

/// The live ranks of a job's launcher, so it can reach every one of them at once: each rank's
/// current attempt and control, kept by every launcher in this one shape (a launcher whose
/// controls carry more, like Slurm's steps with their node, keeps its own control type).
pub struct LiveRanks<C: ?Sized = dyn RankControl> {
    ranks: Mutex<HashMap<u32, (u32, Arc<C>)>>,
}

impl<C: ?Sized> Default for LiveRanks<C> {
    fn default() -> Self {
        LiveRanks {
            ranks: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: ?Sized + RankControl> LiveRanks<C> {
    pub fn insert(&self, rank: u32, attempt: u32, control: Arc<C>) {
        self.ranks.lock().unwrap().insert(rank, (attempt, control));
    }

    /// Forgets incarnation `attempt` of `rank` (a newer one stays); whether it was there.
    pub fn remove(&self, rank: u32, attempt: u32) -> bool {
        let mut ranks = self.ranks.lock().unwrap();
        let current = ranks.get(&rank).is_some_and(|(a, _)| *a == attempt);
        if current {
            ranks.remove(&rank);
        }
        current
    }

    /// Every live rank and its control.
    pub fn all(&self) -> Vec<(u32, Arc<C>)> {
        let ranks = self.ranks.lock().unwrap();
        ranks.iter().map(|(r, (_, c))| (*r, c.clone())).collect()
    }

    pub fn kill_all(&self) {
        for (_, control) in self.all() {
            control.kill();
        }
    }
}

/// Wraps `exit` so that the rank leaves `live` when it exits.
pub fn leave_on_exit(
    live: Arc<LiveRanks>,
    rank: u32,
    attempt: u32,
    exit: LocalBoxFuture<'static, Exit>,
) -> LocalBoxFuture<'static, Exit> {
    Box::pin(async move {
        let exit = exit.await;
        live.remove(rank, attempt);
        exit
    })
}

/// Cuts a byte stream into lines: lines longer than `max_len` bytes are cut and marked,
/// a trailing `\r` is dropped, invalid UTF-8 is replaced, never an error.
pub struct LineAssembler {
    line: Vec<u8>,
    cut: bool,
    max_len: usize,
}

impl LineAssembler {
    pub fn new(max_len: usize) -> Self {
        LineAssembler {
            line: Vec::new(),
            cut: false,
            max_len,
        }
    }

    /// Takes bytes from `chunk` up to and including its first newline. Returns how many
    /// bytes it took and the line they completed, if any.
    pub fn feed_one(&mut self, chunk: &[u8]) -> (usize, Option<String>) {
        let (part, consumed, complete) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = self.max_len.saturating_sub(self.line.len());
        if part.len() > room {
            self.cut = true;
        }
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        (consumed, complete.then(|| self.take()))
    }

    /// Every line `chunk` completes.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            let (consumed, line) = self.feed_one(chunk);
            out.extend(line);
            chunk = &chunk[consumed..];
        }
        out
    }

    /// The last line, if the stream ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty() || self.cut).then(|| self.take())
    }

    fn take(&mut self) -> String {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let mut text = String::from_utf8_lossy(&self.line).into_owned();
        if self.cut {
            text.push_str(" …[line truncated by trainvisor]");
        }
        self.line.clear();
        self.cut = false;
        text
    }
}

/// A channel for a rank's lines.
pub fn line_channel() -> (mpsc::Sender<Line>, mpsc::Receiver<Line>) {
    mpsc::channel(LINE_CHANNEL)
}

/// This host's short name.
pub fn hostname() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return "localhost".to_string();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).into_owned();
        name.split('.').next().unwrap_or("localhost").to_string()
    })
    .clone()
}
