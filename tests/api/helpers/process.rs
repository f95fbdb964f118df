//! Processes the tests start or watch: the real server binary as a child process, signals,
//! process groups, and the processes a data dir's server marked as its own.

use std::time::Duration;

use super::wait_for;

/// A server child process that is killed when dropped, so a test that panics leaves no server
/// behind (one would hold the test harness's output open and hang the run).
pub struct ServerProcess(pub std::process::Child);

impl std::ops::Deref for ServerProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ServerProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl ServerProcess {
    /// Waits for the (killed) server and returns what it wrote on its piped stderr.
    pub fn wait_with_output_taken(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        let _ = self.0.wait();
        text
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The real binary as a child process serving `data_dir` on a free loopback port; returns it
/// and its base URL (read from its first stdout line).
pub fn start_server_process(data_dir: &std::path::Path) -> (ServerProcess, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trainvisor"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--kill-grace-ms",
            "300",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let url = listening_url(&mut child);
    (ServerProcess(child), url)
}

/// The base URL a server child process prints on its first stdout line (piped); a server on
/// every address (`0.0.0.0`) is reached on loopback.
pub fn listening_url(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("the server's stdout is piped"))
        .read_line(&mut first)
        .unwrap();
    first
        .trim()
        .strip_prefix("trainvisor listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .replace("://0.0.0.0:", "://127.0.0.1:")
}

pub fn kill(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Whether a process group still has members.
pub fn group_alive(pgid: u32) -> bool {
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

/// Waits (up to 5 s: killed orphans are reaped by init asynchronously) until a group is gone.
pub async fn group_gone(pgid: u32) -> bool {
    wait_for(Duration::from_secs(5), || async {
        (!group_alive(pgid)).then_some(())
    })
    .await
    .is_some()
}

/// Pids of live processes carrying `TRAINVISOR_INSTANCE=<instance>` (the workers of a data dir).
pub fn marked_processes(instance: &str) -> Vec<u32> {
    let marker = format!("TRAINVISOR_INSTANCE={instance}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Zombies still show their environ; skip processes that are no longer running.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        if let Ok(env) = std::fs::read(entry.path().join("environ"))
            && env.split(|&b| b == 0).any(|v| {
                // The marker is the data dir's id keyed to its file's inode: `<id>.<key>`.
                v == marker.as_bytes() || v.starts_with(format!("{marker}.").as_bytes())
            })
        {
            out.push(pid);
        }
    }
    out
}
