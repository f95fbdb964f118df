//! Process primitives of ranks that run as children of this server (local ranks, the srun
//! clients of Slurm steps, warm standbys of both): one module that the launchers use, so none
//! of them imports another's.
//!
//! - Every child is spawned from one long-lived thread ("trainvisor-spawner") with
//!   `PR_SET_PDEATHSIG = SIGKILL`: the kernel sends the signal when the *thread* that forked the
//!   child exits, so spawning from a pooled thread would kill workers at random.
//! - Every child leads its own process group, so a rank's whole tree is signalled at once.
//! - Exit is noticed through a pidfd (readable the instant the child exits), not by polling.
//! - Every child carries `TRAINVISOR_INSTANCE=<id of the data dir>`, so the next server on the
//!   same data dir finds and kills what a crashed predecessor left (grandchildren have no
//!   death signal of their own): [`sweep`].

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::oneshot;

use super::{Launch, Line, LineAssembler, MAX_LINE_BYTES, RankControl, RankProcess};
use crate::domain::{Exit, ExitCause};

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

    fn ask_to_save(&self) {
        signal_group(self.pgid, libc::SIGUSR1);
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
                ..Exit::default()
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

/// Resolves when process `pid` (any process of this host, not only a child) has exited: a
/// pidfd, readable the instant it exits. `None` when the pid cannot be watched (it has exited
/// already, or the kernel has no pidfd).
pub fn watch_pid(pid: u32) -> Option<impl std::future::Future<Output = ()>> {
    let fd = pidfd_open(pid)?;
    Some(async move {
        let _ = fd.readable().await;
    })
}

fn pidfd_open(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    if pid == 0 {
        return None;
    }
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

/// Every other process on this host whose environment can be read, with that environment
/// (`NAME=value` entries separated by NUL bytes, as `/proc/<pid>/environ` has it).
pub fn environments() -> impl Iterator<Item = (u32, Vec<u8>)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            if pid == me {
                return None;
            }
            Some((pid, std::fs::read(entry.path().join("environ")).ok()?))
        })
}

/// Kills every process that carries `TRAINVISOR_INSTANCE=<instance>` in its environment:
/// what a previous server on this data dir left behind. Returns how many were signalled.
pub fn sweep(instance: &str) -> usize {
    let marker = format!("TRAINVISOR_INSTANCE={instance}");
    let mut killed = 0;
    for (pid, environ) in environments() {
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
