//! The local launcher: ranks as child processes of this server, started, watched and signalled
//! through [`super::process`] (own process group, death signal, pidfd, instance marker).

use std::io;
use std::sync::{Arc, OnceLock};

use futures_util::future::LocalBoxFuture;

use super::process::start_process;
use super::standby::{self, StandbyHost, Standbys};
use super::{
    JobContext, JobLauncher, Launch, LauncherStatus, LiveRanks, Place, Prepared, RankProcess,
};
use crate::domain::worker_env::Placement;

/// The local launcher of one job: every rank a child of this server, MASTER_ADDR loopback.
pub struct LocalLauncher {
    world_size: u32,
    live: Arc<LiveRanks>,
    standbys: Option<Arc<Standbys>>,
}

impl LocalLauncher {
    pub fn new(cx: JobContext) -> Self {
        LocalLauncher {
            world_size: cx.spec.world_size,
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
        let world = self.world_size;
        let places = ranks
            .into_iter()
            .map(|r| {
                let place = Place {
                    node: node.clone(),
                    // Every rank on this host: one group of the whole job.
                    placement: Placement::in_groups_of(r, world, world),
                    host_local: true,
                };
                (r, place)
            })
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
