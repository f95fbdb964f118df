//! The local launcher: ranks as child processes of this server.
//!
//! - Every child is spawned from one long-lived thread ("trainvisor-spawner") with
//!   `PR_SET_PDEATHSIG = SIGKILL`: the kernel sends the signal when the *thread* that forked the
//!   child exits, so spawning from a pooled thread would kill workers at random.
//! - Every child leads its own process group, so a rank's whole tree is signalled at once.
//! - Exit is noticed through a pidfd (readable the instant the child exits), not by polling.
//! - Every child carries `TRAINVISOR_INSTANCE=<id of the data dir>`, so the next server on the
//!   same data dir finds and kills what a crashed predecessor left (grandchildren have no
//!   death signal of their own).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};

use futures_util::future::LocalBoxFuture;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::oneshot;

use super::standby::{self, StandbyHost, Standbys};
use super::{
    JobContext, JobLauncher, Launch, LauncherStatus, Line, LineAssembler, LiveRanks,
    MAX_LINE_BYTES, Place, Prepared, RankControl, RankProcess,
};
use crate::domain::{Exit, ExitCause};

/// The local launcher of one job: every rank a child of this server, MASTER_ADDR loopback.
pub struct LocalLauncher {
    live: Arc<LiveRanks>,
    standbys: Option<Arc<Standbys>>,
}

impl LocalLauncher {
    pub fn new(cx: JobContext) -> Self {
        LocalLauncher {
            live: Arc::default(),
            standbys: Standbys::for_job(&cx, Box::new(HostStandbys)),
        }
    }
}

/// Standbys of local ranks: children of this server, like the ranks.
struct HostStandbys;

impl StandbyHost for HostStandbys {
    fn wrap(&self, rank: u32, seq: u32, _node: &str, launch: Launch) -> Option<(Launch, String)> {
        Some((launch, format!("standby-r{rank}-s{seq}")))
    }

    /// Lower priority while importing, when this server may raise it again at activation
    /// (`CAP_SYS_NICE`): a rank must never run below its peers.
    fn nice(&self) -> i32 {
        if can_raise_priority() {
            STANDBY_NICE
        } else {
            0
        }
    }

    /// Back to the server's own priority, every thread of it.
    fn activated(&self, pid: u32) {
        // SAFETY: getpriority(2) on this process.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for tid in tasks.into_iter().flatten().flatten() {
            if let Some(tid) = tid.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) {
                // SAFETY: setpriority(2) on a thread of a process this server started.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, tid, own);
                }
            }
        }
    }
}

/// How much lower a local standby runs while it imports its preloads.
const STANDBY_NICE: i32 = 10;

/// Whether this process holds `CAP_SYS_NICE` (bit 23 of its effective capabilities); read
/// once.
fn can_raise_priority() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))?
                    .trim()
                    .to_string();
                u64::from_str_radix(&hex, 16).ok()
            })
            .is_some_and(|caps| caps & (1 << 23) != 0)
    })
}

impl JobLauncher for LocalLauncher {
    fn prepare(&self, ranks: Vec<u32>) -> LocalBoxFuture<'static, Result<Prepared, String>> {
        let node = super::hostname();
        let places = ranks
            .into_iter()
            .map(|r| (r, Place { node: node.clone() }))
            .collect();
        Box::pin(std::future::ready(Ok(Prepared {
            master_addr: "127.0.0.1".to_string(),
            server_url: None,
            places,
        })))
    }

    fn start(
        &self,
        rank: u32,
        attempt: u32,
        place: Place,
        launch: Launch,
    ) -> LocalBoxFuture<'static, io::Result<RankProcess>> {
        let live = self.live.clone();
        let standbys = self.standbys.clone();
        Box::pin(async move {
            let cold = |launch| Box::pin(start_process(launch)) as LocalBoxFuture<'static, _>;
            let (mut process, _) =
                standby::start_rank(standbys, rank, attempt, &place.node, launch, cold).await?;
            live.insert(rank, attempt, process.control.clone());
            process.exit = super::leave_on_exit(live, rank, attempt, process.exit);
            Ok(process)
        })
    }

    fn rank_stepping(&self, rank: u32) {
        if let Some(s) = &self.standbys {
            s.stepping(rank);
        }
    }

    fn release(&self) -> LocalBoxFuture<'static, ()> {
        if let Some(s) = &self.standbys {
            s.close();
        }
        Box::pin(std::future::ready(()))
    }

    fn kill_all(&self) -> LocalBoxFuture<'static, ()> {
        if let Some(s) = &self.standbys {
            s.close();
        }
        self.live.kill_all();
        Box::pin(std::future::ready(()))
    }

    fn status(&self) -> LauncherStatus {
        LauncherStatus {
            standbys: self
                .standbys
                .as_ref()
                .map(|s| s.status())
                .unwrap_or_default(),
            ..LauncherStatus::default()
        }
    }
}

/// A local job's command must name a program the server can run: a path to an executable
/// file, or a name found on the server's `PATH`.
pub fn admit(spec: &crate::spec::JobSpec) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(program) = spec.command.as_ref().and_then(|c| c.first()) else {
        return Ok(());
    };
    let executable = |p: &std::path::Path| {
        p.is_file()
            && p.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(program))))
    };
    if !found {
        return Err(format!(
            "command: {program} is not an executable file{} on the server",
            if program.contains('/') {
                ""
            } else {
                " found on the PATH"
            }
        ));
    }
    python_script_exists(spec)
}

/// `python train.py` without a `train.py` where the ranks start would fail every rank at once
/// and then the job through the crash-loop rule: refused at the door instead. The directory
/// is the job's `working_dir`, else the server's own (where its ranks start).
fn python_script_exists(spec: &crate::spec::JobSpec) -> Result<(), String> {
    use crate::domain::python_command::{PythonCommand, PythonMain};
    let Some(Ok(PythonCommand {
        main: PythonMain::Script(script),
        ..
    })) = spec.command.as_deref().map(PythonCommand::parse)
    else {
        return Ok(());
    };
    let dir = match &spec.working_dir {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::current_dir().map_err(|e| format!("working_dir: {e}"))?,
    };
    let path = dir.join(&script);
    if path.is_file() {
        return Ok(());
    }
    Err(format!(
        "command: the script {script} is not a file in {} on the server{}",
        dir.display(),
        if path.exists() { "" } else { " (no such file)" }
    ))
}

/// A rank that is a child process of this server: its process group is signalled whole.
pub struct GroupControl {
    pub pgid: u32,
}

impl RankControl for GroupControl {
    fn terminate(&self) {
        signal_group(self.pgid, libc::SIGTERM);
    }

    fn kill(&self) {
        signal_group(self.pgid, libc::SIGKILL);
    }

    fn host_group(&self) -> Option<u32> {
        Some(self.pgid)
    }
}

/// Spawns `launch` as a child of this server and hands it over as a rank.
pub async fn start_process(launch: Launch) -> io::Result<RankProcess> {
    Ok(into_rank(spawn(launch).await?, None))
}

/// Hands a spawned child over as a rank: its two pipes read into one line channel, its exit
/// from the pidfd, after which what is left of its process group is killed. With `ready`,
/// the first stdout line equal to its text is not passed on but told (a warm standby's).
pub fn into_rank(
    mut running: Running,
    ready: Option<(&'static str, oneshot::Sender<()>)>,
) -> RankProcess {
    let pid = running.pid;
    let (tx, lines) = super::line_channel();
    let pipes: [(&'static str, Option<Box<dyn AsyncRead + Unpin>>); 2] = [
        ("stdout", running.stdout.take().map(|p| Box::new(p) as _)),
        ("stderr", running.stderr.take().map(|p| Box::new(p) as _)),
    ];
    let mut ready = ready;
    for (stream, pipe) in pipes {
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        let mut ready = if stream == "stdout" {
            ready.take()
        } else {
            None
        };
        tokio::task::spawn_local(async move {
            read_lines(pipe, MAX_LINE_BYTES, |text| {
                let told = match ready.take() {
                    Some((line, tell)) if text == line => {
                        let _ = tell.send(());
                        true
                    }
                    other => {
                        ready = other;
                        false
                    }
                };
                let tx = tx.clone();
                async move {
                    if !told {
                        let _ = tx.send(Line { stream, text }).await;
                    }
                }
            })
            .await
        });
    }
    let watch = running.into_exit();
    let exit = Box::pin(async move {
        let status = watch.wait().await;
        // The rank's leader is gone; so is everything it left in its group.
        signal_group(pid, libc::SIGKILL);
        match status {
            Ok(status) => Exit {
                code: status.code(),
                signal: status.signal(),
                cause: None,
            },
            Err(e) => Exit {
                cause: Some(ExitCause::Unobserved(e.to_string())),
                ..Exit::default()
            },
        }
    });
    RankProcess {
        pid,
        lines,
        exit,
        control: Arc::new(GroupControl { pgid: pid }),
        warm: false,
    }
}

struct SpawnRequest {
    launch: Launch,
    standby: Option<Standby>,
    reply: oneshot::Sender<io::Result<Child>>,
}

fn spawner() -> &'static std_mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<std_mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("trainvisor-spawner".into())
            .spawn(move || {
                for req in rx {
                    let _ = req.reply.send(spawn_here(&req.launch, req.standby));
                }
            })
            .expect("the spawner thread starts");
        tx
    })
}

fn spawn_here(launch: &Launch, standby: Option<Standby>) -> io::Result<Child> {
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env_remove("TRAINVISOR_API_TOKEN")
        .stdin(if standby.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &launch.cwd {
        cmd.current_dir(dir);
    }
    let nice = standby.map_or(0, |s| s.nice);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A standby imports at a lower priority than the ranks it stands by.
            if nice != 0 {
                libc::nice(nice);
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The server died between fork and prctl: the death signal would never come.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A running child: its pid (= its process group id), its output pipes and its exit.
pub struct Running {
    pub pid: u32,
    /// A pipe to its stdin, when it was spawned with one ([`spawn_standby`]).
    pub stdin: Option<tokio::process::ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    exit: ExitWatch,
}

pub struct ExitWatch {
    child: Child,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

/// Spawns `launch` from the spawner thread, its stdin `/dev/null`. Must be called inside a
/// Tokio runtime.
pub async fn spawn(launch: Launch) -> io::Result<Running> {
    spawn_from_thread(launch, None).await
}

/// How a warm standby is spawned: with a pipe to its stdin (it reads its activation there),
/// and `nice` added to its niceness while it imports.
#[derive(Debug, Clone, Copy)]
pub struct Standby {
    pub nice: i32,
}

/// As [`spawn`], for a warm standby.
pub async fn spawn_standby(launch: Launch, standby: Standby) -> io::Result<Running> {
    spawn_from_thread(launch, Some(standby)).await
}

async fn spawn_from_thread(launch: Launch, standby: Option<Standby>) -> io::Result<Running> {
    let (reply, rx) = oneshot::channel();
    spawner()
        .send(SpawnRequest {
            launch,
            standby,
            reply,
        })
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    let mut child = rx
        .await
        .map_err(|_| io::Error::other("spawner dropped the request"))??;
    let pid = child.id();
    let stdin = child
        .stdin
        .take()
        .map(tokio::process::ChildStdin::from_std)
        .transpose()?;
    let stdout = child.stdout.take().map(ChildStdout::from_std).transpose()?;
    let stderr = child.stderr.take().map(ChildStderr::from_std).transpose()?;
    Ok(Running {
        pid,
        stdin,
        stdout,
        stderr,
        exit: ExitWatch {
            child,
            pidfd: pidfd_open(pid),
        },
    })
}

fn pidfd_open(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the returned descriptor is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: OwnedFd keeps the descriptor open and unchanged for the AsyncFd's lifetime.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
}

impl Running {
    /// Splits off the exit watch so output readers and the exit can be awaited apart.
    pub fn into_exit(self) -> ExitWatch {
        self.exit
    }
}

impl ExitWatch {
    /// Resolves when the child has exited, and reaps it.
    pub async fn wait(mut self) -> io::Result<ExitStatus> {
        match self.pidfd.take() {
            Some(fd) => {
                let _ready = fd.readable().await?;
                loop {
                    if let Some(status) = self.child.try_wait()? {
                        return Ok(status);
                    }
                    // Readable means exited; this only runs if the kernel says so early.
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            // Kernels before 5.3 have no pidfd: a blocking wait on a pool thread.
            None => tokio::task::spawn_blocking(move || self.child.wait())
                .await
                .map_err(io::Error::other)?,
        }
    }
}

/// Signals a whole process group. Errors (the group is gone) are ignored.
pub fn signal_group(pgid: u32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid targets the process group.
        unsafe {
            libc::kill(-(pgid as libc::pid_t), signal);
        }
    }
}

/// Reads lines from a child's pipe until EOF, calling `emit` for each. Lines longer than
/// `max_len` bytes are cut and marked; invalid UTF-8 is replaced, never an error.
pub async fn read_lines<R, F, Fut>(pipe: R, max_len: usize, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Small buffers: a thousand ranks means two thousand of them. Longer lines still work,
    // they are assembled in the assembler.
    let mut reader = BufReader::with_capacity(8 * 1024, pipe);
    let mut lines = LineAssembler::new(max_len);
    while let Ok(chunk) = reader.fill_buf().await {
        if chunk.is_empty() {
            break;
        }
        let (consumed, line) = lines.feed_one(chunk);
        reader.consume(consumed);
        if let Some(line) = line {
            emit(line).await;
        }
    }
    if let Some(line) = lines.finish() {
        emit(line).await;
    }
}

/// Kills every process that carries `TRAINVISOR_INSTANCE=<instance>` in its environment:
/// what a previous server on this data dir left behind. Returns how many were signalled.
pub fn sweep(instance: &str) -> usize {
    let marker = format!("TRAINVISOR_INSTANCE={instance}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == marker.as_bytes())
        {
            // SAFETY: kill(2) on a pid we just matched.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_marked() {
        let input: &[u8] = b"short\nabcdefghij\r\nlast-without-newline";
        let mut got = Vec::new();
        read_lines(input, 5, |l| {
            got.push(l);
            async {}
        })
        .await;
        assert_eq!(got[0], "short");
        assert!(got[1].starts_with("abcde …[line truncated"));
        assert!(got[2].starts_with("last-"));
    }
}
