//! What a rank's processes on this host are doing, captured before a hung rank is killed:
//! Python stacks of every thread through `faulthandler` (registered by a `sitecustomize` the
//! ranks get on their `PYTHONPATH`), and for other processes the kernel's view from `/proc`
//! (each thread's name, wait channel and kernel stack where readable). Bounded in size and time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// At most this much text per rank.
pub const MAX_BYTES: usize = 64 * 1024;
/// At most this much of a stacks file read for the hook's registration lines.
const MAX_REGISTRY: usize = 256 * 1024;
/// At most this many processes of a rank described.
const MAX_PROCESSES: usize = 16;

/// Loaded by every Python rank started by the local launcher (it is first on their
/// `PYTHONPATH`): registers `faulthandler` for all threads on a real-time signal, writing to
/// `TRAINVISOR_STACKS_FILE`, and says so in that file with its pid and signal, so only
/// processes that can take the signal get it; observes the optimizer steps of a script that
/// imports torch (`TRAINVISOR_AUTO_HEARTBEAT`, see README "Unchanged PyTorch scripts"). Then
/// it hands over to any other `sitecustomize` further down the path, as if it had not been
/// there.
pub const SITECUSTOMIZE: &str = include_str!("sitecustomize.py");

/// The directory holding [`SITECUSTOMIZE`] under the data dir, written once per data dir
/// and server process.
pub fn hooks_dir(data_dir: &Path) -> PathBuf {
    static WRITTEN: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let dir = data_dir.join("python-hooks");
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    if !written.contains(&dir) {
        let _ = std::fs::create_dir_all(&dir);
        // Written beside and renamed over: a rank (same user) may have replaced the file with a
        // symlink, and writing through it would overwrite whatever it points at.
        let tmp = dir.join(format!(".sitecustomize.py.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written_ok = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, SITECUSTOMIZE.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, dir.join("sitecustomize.py")));
        match written_ok {
            Ok(()) => {
                written.insert(dir.clone());
            }
            Err(e) => tracing::warn!(error = %e, "cannot write the Python hook"),
        }
    }
    dir
}

/// Where incarnation `attempt` of `rank` writes its Python stacks (beside its error file).
pub fn path(data_dir: &Path, job_id: Uuid, rank: u32, attempt: u32) -> PathBuf {
    crate::domain::error_file::incarnation_dir(data_dir, job_id, rank, attempt)
        .join(format!("rank-{rank}-attempt-{attempt}.stacks"))
}

/// The stacks of the processes in process group `pgid`: Python ones through the signal they
/// registered in `file`, the others from `/proc`. Returns within about `limit`.
pub fn capture(pgid: u32, file: &Path, limit: Duration) -> (String, String) {
    let started = Instant::now();
    let procs = group_members(pgid);
    if procs.is_empty() {
        return ("none".into(), "no process left in the rank's group".into());
    }
    let (registered, offset) = registered(file);
    // The hook writes its pid as its own pid namespace numbers it (a container's); the host
    // pid of each member is what gets the signal.
    let python: BTreeMap<u32, i32> = procs
        .iter()
        .filter_map(|&host| Some((host, *registered.get(&namespace_pid(host)?)?)))
        .collect();
    for (&pid, &sig) in &python {
        // SAFETY: signals a pid of the rank's own group that registered this signal itself.
        unsafe { libc::kill(pid as i32, sig) };
    }
    let mut text = String::new();
    if !python.is_empty() {
        text = wait_for_dump(file, offset, started + limit);
    }
    let kind = if text.is_empty() { "native" } else { "python" };
    for &pid in procs
        .iter()
        .filter(|p| !python.contains_key(p))
        .take(MAX_PROCESSES)
    {
        if text.len() >= MAX_BYTES {
            break;
        }
        text.push_str(&native(pid));
    }
    if text.len() > MAX_BYTES {
        let mut cut = MAX_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n… (cut at 64 KiB)");
    }
    (kind.into(), text)
}

/// Pids whose process group is `pgid`, in order.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid pgrp …: comm may hold spaces and parentheses.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The pid of host process `pid` in its own (innermost) pid namespace: itself on the host, its
/// number inside a container (the last field of `NSpid` in its status).
fn namespace_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The (pid, signal) pairs the hook registered in `file`, and the file's length now. The rank
/// controls the file: it is read as [`crate::untrusted`] reads, at most [`MAX_REGISTRY`] bytes.
fn registered(file: &Path) -> (BTreeMap<u32, i32>, u64) {
    let len = crate::untrusted::len(file);
    let bytes = crate::untrusted::read_capped(file, 0, MAX_REGISTRY).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let pairs = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("# trainvisor: faulthandler on signal ")?;
            let (sig, pid) = rest.split_once(" in pid ")?;
            Some((pid.trim().parse().ok()?, sig.trim().parse().ok()?))
        })
        .collect();
    (pairs, len)
}

/// What the signalled processes wrote after `offset`, once it has stopped growing for a
/// moment or `deadline` has passed.
fn wait_for_dump(file: &Path, offset: u64, deadline: Instant) -> String {
    let len = || crate::untrusted::len(file);
    let mut last = offset;
    let mut still_since: Option<Instant> = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = len();
        if now > last {
            last = now;
            still_since = Some(Instant::now());
        } else if still_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(100)) {
            break;
        }
    }
    let bytes = crate::untrusted::read_capped(file, offset, MAX_BYTES).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| !l.starts_with("# trainvisor: "))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// A process as the kernel sees it: its command line, then each thread's name, wait channel
/// and kernel stack (readable by root only; the user-space native stack needs a debugger,
/// which trainvisor does not run).
fn native(pid: u32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut cmdline: String = read(format!("/proc/{pid}/cmdline")).replace('\0', " ");
    if cmdline.chars().count() > 160 {
        cmdline = cmdline.chars().take(160).collect::<String>() + "…";
    }
    let mut out = format!("process {pid}: {}\n", cmdline.trim().replace('\n', " "));
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    for tid in tids.into_iter().take(64) {
        let base = format!("/proc/{pid}/task/{tid}");
        let comm = read(format!("{base}/comm"));
        let wchan = read(format!("{base}/wchan"));
        out.push_str(&format!(
            "  thread {tid} ({}): waiting in {}\n",
            comm.trim(),
            if wchan.trim().is_empty() || wchan.trim() == "0" {
                "- (running)"
            } else {
                wchan.trim()
            }
        ));
        for frame in read(format!("{base}/stack")).lines().take(24) {
            out.push_str(&format!("    {frame}\n"));
        }
    }
    out
}
