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
use std::sync::OnceLock;
use std::sync::mpsc as std_mpsc;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::oneshot;

/// What to start for one rank.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

struct SpawnRequest {
    launch: Launch,
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
                    let _ = req.reply.send(spawn_here(&req.launch));
                }
            })
            .expect("the spawner thread starts");
        tx
    })
}

fn spawn_here(launch: &Launch) -> io::Result<Child> {
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env_remove("TRAINVISOR_API_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
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
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    exit: ExitWatch,
}

pub struct ExitWatch {
    child: Child,
    pidfd: Option<AsyncFd<OwnedFd>>,
}

/// Spawns `launch` from the spawner thread. Must be called inside a Tokio runtime.
pub async fn spawn(launch: Launch) -> io::Result<Running> {
    let (reply, rx) = oneshot::channel();
    spawner()
        .send(SpawnRequest { launch, reply })
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    let mut child = rx
        .await
        .map_err(|_| io::Error::other("spawner dropped the request"))??;
    let pid = child.id();
    let stdout = child.stdout.take().map(ChildStdout::from_std).transpose()?;
    let stderr = child.stderr.take().map(ChildStderr::from_std).transpose()?;
    Ok(Running {
        pid,
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

/// Exit code or signal of a finished child.
pub fn exit_parts(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
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
    // they are assembled in `line`.
    let mut reader = BufReader::with_capacity(8 * 1024, pipe);
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    while let Ok(chunk) = reader.fill_buf().await {
        if chunk.is_empty() {
            if !line.is_empty() {
                emit(finish_line(&mut line, &mut cut)).await;
            }
            break;
        }
        let (part, consumed, complete) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = max_len.saturating_sub(line.len());
        if part.len() > room {
            cut = true;
        }
        line.extend_from_slice(&part[..part.len().min(room)]);
        reader.consume(consumed);
        if complete {
            emit(finish_line(&mut line, &mut cut)).await;
        }
    }
}

fn finish_line(line: &mut Vec<u8>, cut: &mut bool) -> String {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let mut text = String::from_utf8_lossy(line).into_owned();
    if *cut {
        text.push_str(" …[line truncated by trainvisor]");
    }
    line.clear();
    *cut = false;
    text
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
