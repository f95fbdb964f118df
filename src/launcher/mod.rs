//! How a rank's process is started, watched and stopped: the seam between a `Worker` and
//! where its rank runs. `local` runs ranks as child processes of the server; `slurm` runs each
//! rank as a job step whose `srun` client is such a child (see `slurm`), so exit, output and
//! signals work the same way for both.

pub mod local;
pub mod slurm;

use std::io;

pub use local::Launch;

/// Where one incarnation runs, as its Job decided.
#[derive(Debug, Clone)]
pub enum Placement {
    /// A child process on this host.
    Local,
    /// A Slurm job step on one node of the job's allocation.
    Slurm(slurm::Step),
}

impl Placement {
    /// The node shown in the summary and recorded with the incarnation.
    pub fn node(&self) -> String {
        match self {
            Placement::Local => hostname(),
            Placement::Slurm(step) => step.node.clone(),
        }
    }
}

/// Starts `launch` where `placement` says. The returned child is the rank itself (local) or
/// its srun client (slurm); either way its exit is the rank's exit.
pub async fn start(launch: Launch, placement: &Placement) -> io::Result<local::Running> {
    match placement {
        Placement::Local => local::spawn(launch).await,
        Placement::Slurm(step) => local::spawn(step.wrap(launch)).await,
    }
}

/// After the child was killed: make sure nothing of the incarnation goes on running. For a
/// step, killing srun may leave the step's processes on their node; cancel the step.
pub async fn cleanup_after_kill(placement: &Placement) {
    if let Placement::Slurm(step) = placement {
        slurm::cancel_step(step.conf.as_deref(), step.alloc, &step.name).await;
    }
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
