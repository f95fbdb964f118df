//! Warm standby ranks (`warm_standby: true`): beside each running rank, a Python process that
//! has started the interpreter and imported the job's `preload` modules, waiting. A rank that
//! must be replaced becomes its standby instead of a cold process: the standby is told the
//! incarnation's environment, working directory, script or module and arguments on its stdin
//! and runs the script as `__main__` (the program is [`PROGRAM`], shipped in this binary).
//!
//! - One standby per rank, started with that rank's environment (so imports that read it see
//!   its values) by the rank's own launcher, where the rank runs: a child of this server
//!   (local) or a step on the rank's node (Slurm). It is a process of the job like a rank:
//!   same process group rules, death signal, instance marker, output pipes.
//! - Standbys are started one at a time, and only while every rank of the job has stepped since
//!   its latest start (a heartbeat with a step, or [`SETTLE`] of running for a rank that sends
//!   none): refilling never competes with a recovery.
//! - A standby that dies is replaced; after [`FAILURES_BEFORE_COLD`] standbys in a row died
//!   before they were ready (a preload that raises), the job runs cold and says why, once.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::LocalBoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, oneshot};

use super::{JobContext, Launch, Line, RankProcess, process};
use crate::domain::progress::StandbyView;
use crate::domain::python_command::{PythonCommand, PythonMain};
use crate::domain::worker_env::WARM_START;
use crate::domain::{Exit, ExitCause};

/// The Python side: stdlib only, run with `python -c`.
pub const PROGRAM: &str = include_str!("standby.py");

/// What a standby prints on stdout once its preloads are imported (never passed on).
pub const READY_LINE: &str = "\u{1e}trainvisor-standby-ready";

/// Standbys in a row that die before they are ready, after which the job runs cold.
pub const FAILURES_BEFORE_COLD: u32 = 3;

/// A rank that sends no step in its heartbeats (a torchrun script left as it was) counts as
/// stepping once it has run this long.
pub const SETTLE: Duration = Duration::from_secs(20);

/// Lines of a failed standby's output quoted in the job's log.
const QUOTED_LINES: usize = 3;

/// The place-specific part of standbys: where a launcher runs one and how it discards one.
pub trait StandbyHost: Send + Sync {
    /// The command that runs `launch` (already a standby's) as standby `seq` of `rank` on
    /// `node`, and the standby's name there; none when it cannot be placed now.
    fn wrap(&self, rank: u32, seq: u32, node: &str, launch: Launch) -> Option<(Launch, String)>;

    /// Ends a standby that will not be activated (its local process group is killed already).
    fn discard(&self, _name: &str) {}

    /// How much to add to a standby's niceness while it imports (0: none).
    fn nice(&self) -> i32 {
        0
    }

    /// A standby (local process `pid`) was told to become its rank.
    fn activated(&self, _pid: u32) {}
}

/// What a launcher reports of its standbys.
#[derive(Debug, Clone, Default)]
pub struct StandbyStatus {
    pub by_rank: HashMap<u32, StandbyView>,
    /// Why the job runs cold, once standbys kept failing.
    pub off: Option<String>,
}

/// A standby activated as a rank.
pub struct Activated {
    pub process: RankProcess,
    /// Its name where it runs (the Slurm step's name).
    pub name: String,
}

/// One job's standbys.
pub struct Standbys {
    cx: JobContext,
    preload: Vec<String>,
    host: Box<dyn StandbyHost>,
    state: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    /// Each rank's latest launch (the rank's environment for its next standby) and node.
    templates: HashMap<u32, (String, Launch)>,
    /// Ranks whose latest incarnation runs (its attempt and start), and those of them that
    /// have stepped.
    running: HashMap<u32, (u32, std::time::Instant)>,
    stepping: HashSet<u32>,
    standbys: HashMap<u32, Standby>,
    seq: u32,
    /// A standby is being started (one at a time).
    starting: bool,
    failures: u32,
    off: Option<String>,
    closed: bool,
}

struct Standby {
    seq: u32,
    pid: u32,
    node: String,
    name: String,
    ready: bool,
    since: DateTime<Utc>,
    /// The environment it was started with (what activation takes away).
    env: Vec<(String, String)>,
    stdin: Option<ChildStdin>,
    lines: Option<mpsc::Receiver<Line>>,
    exit: Option<oneshot::Receiver<Exit>>,
}

impl Standbys {
    /// The standbys of a job with `warm_standby`; none without.
    pub fn for_job(cx: &JobContext, host: Box<dyn StandbyHost>) -> Option<Arc<Standbys>> {
        let preload = cx.spec.warm_standby.as_ref()?.preload.clone();
        Some(Arc::new(Standbys {
            cx: cx.clone(),
            preload,
            host,
            state: Mutex::new(Pool::default()),
        }))
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `rank`'s ready standby on `node` and makes it incarnation `launch` (the rank's
    /// own command line and environment, as a cold start would get them). None: start cold.
    async fn activate(
        self: &Arc<Self>,
        rank: u32,
        node: &str,
        launch: &Launch,
    ) -> Option<Activated> {
        let mut standby = {
            let mut pool = self.pool();
            match pool.standbys.get(&rank) {
                Some(s) if s.ready && s.node == node => pool.standbys.remove(&rank)?,
                Some(s) if s.node != node => {
                    // The rank moves (its node was excluded): its standby goes, a new one
                    // follows it once it runs.
                    let s = pool.standbys.remove(&rank)?;
                    drop(pool);
                    self.discard(s);
                    return None;
                }
                _ => return None,
            }
        };
        let message = activation(launch, &standby.env)?;
        let mut stdin = standby.stdin.take()?;
        // Its priority back first: the rank never runs below its peers.
        self.host.activated(standby.pid);
        let written = async {
            stdin.write_all(message.as_bytes()).await?;
            stdin.shutdown().await
        }
        .await;
        if let Err(e) = written {
            tracing::warn!(job_id = %self.cx.job_id, rank, error = %e, "standby activation failed; starting cold");
            self.discard(standby);
            return None;
        }
        let exit = standby.exit.take()?;
        let pid = standby.pid;
        Some(Activated {
            process: RankProcess {
                pid,
                lines: standby.lines.take()?,
                exit: Box::pin(async move {
                    exit.await.unwrap_or_else(|_| Exit {
                        cause: Some(ExitCause::Unobserved("the standby's exit was lost".into())),
                        ..Exit::default()
                    })
                }),
                control: Arc::new(process::GroupControl { pgid: pid }),
                warm: true,
            },
            name: standby.name,
        })
    }

    /// Starts incarnation `attempt` of `rank` on `node`: its standby when one is ready there,
    /// else `cold`. The incarnation's exit is followed, and its environment is the next
    /// standby's. Returns the process and, for a standby, its name.
    async fn start(
        self: &Arc<Self>,
        rank: u32,
        attempt: u32,
        node: &str,
        launch: Launch,
        cold: impl FnOnce(Launch) -> LocalBoxFuture<'static, io::Result<RankProcess>>,
    ) -> io::Result<(RankProcess, Option<String>)> {
        let warm = self.activate(rank, node, &launch).await;
        self.started(rank, attempt, node, &launch);
        self.settle_later();
        let (mut process, name) = match warm {
            Some(a) => (a.process, Some(a.name)),
            None => match cold(launch).await {
                Ok(p) => (p, None),
                Err(e) => {
                    self.exited(rank, attempt);
                    return Err(e);
                }
            },
        };
        let (this, exit) = (self.clone(), process.exit);
        process.exit = Box::pin(async move {
            let exit = exit.await;
            this.exited(rank, attempt);
            exit
        });
        Ok((process, name))
    }

    /// Incarnation `attempt` of `rank` was started on `node` with `launch`: its standby will
    /// get that environment.
    fn started(&self, rank: u32, attempt: u32, node: &str, launch: &Launch) {
        let mut pool = self.pool();
        pool.templates
            .insert(rank, (node.to_string(), launch.clone()));
        pool.running
            .insert(rank, (attempt, std::time::Instant::now()));
        pool.stepping.remove(&rank);
    }

    /// After [`SETTLE`], a rank that never reported a step counts as stepping.
    fn settle_later(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(SETTLE).await;
            if let Some(this) = this.upgrade() {
                this.refill();
            }
        });
    }

    /// Incarnation `attempt` of `rank` exited.
    fn exited(&self, rank: u32, attempt: u32) {
        let mut pool = self.pool();
        if pool.running.get(&rank).is_some_and(|(a, _)| *a == attempt) {
            pool.running.remove(&rank);
            pool.stepping.remove(&rank);
        }
    }

    /// `rank` reported a step: once every running rank has, a standby may be started.
    pub fn stepping(self: &Arc<Self>, rank: u32) {
        let newly = {
            let mut pool = self.pool();
            pool.running.contains_key(&rank) && pool.stepping.insert(rank)
        };
        if newly {
            self.refill();
        }
    }

    /// Starts the next missing standby, if the job is stepping and none is being started.
    fn refill(self: &Arc<Self>) {
        let (rank, seq, node, launch) = {
            let mut pool = self.pool();
            if pool.closed || pool.off.is_some() || pool.starting {
                return;
            }
            let all_stepping = !pool.running.is_empty()
                && pool
                    .running
                    .iter()
                    .all(|(r, (_, t))| pool.stepping.contains(r) || t.elapsed() >= SETTLE);
            if !all_stepping {
                return;
            }
            let Some(rank) = pool
                .running
                .keys()
                .copied()
                .filter(|r| !pool.standbys.contains_key(r))
                .min()
            else {
                return;
            };
            let Some((node, launch)) = pool.templates.get(&rank).cloned() else {
                return;
            };
            pool.starting = true;
            pool.seq += 1;
            (rank, pool.seq, node, launch)
        };
        let this = self.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = this.start_one(rank, seq, &node, launch).await {
                let mut pool = this.pool();
                pool.starting = false;
                drop(pool);
                this.failed(rank, format!("could not be started: {e}"));
            }
        });
    }

    async fn start_one(
        self: &Arc<Self>,
        rank: u32,
        seq: u32,
        node: &str,
        rank_launch: Launch,
    ) -> io::Result<()> {
        let Ok(cmd) = PythonCommand::parse(&rank_launch.argv) else {
            return Err(io::Error::other(
                "the command is not a Python script or module",
            ));
        };
        let mut argv = cmd.interpreter;
        argv.push("-c".into());
        argv.push(PROGRAM.into());
        argv.extend(self.preload.iter().cloned());
        let env = rank_launch.env.clone();
        let launch = Launch {
            argv,
            env: env.clone(),
            cwd: rank_launch.cwd.clone(),
        };
        let Some((launch, name)) = self.host.wrap(rank, seq, node, launch) else {
            self.pool().starting = false;
            return Ok(());
        };
        let nice = self.host.nice();
        let mut running = process::spawn_standby(launch, process::Standby { nice }).await?;
        let stdin = running.stdin.take();
        let (tell, ready) = oneshot::channel();
        let process = process::into_rank(running, Some((READY_LINE, tell)));
        let pid = process.pid;
        let (exit_tx, exit_rx) = oneshot::channel();
        {
            let mut pool = self.pool();
            if pool.closed {
                drop(pool);
                process.control.kill();
                self.host.discard(&name);
                return Ok(());
            }
            pool.standbys.insert(
                rank,
                Standby {
                    seq,
                    pid,
                    node: node.to_string(),
                    name: name.clone(),
                    ready: false,
                    since: Utc::now(),
                    env,
                    stdin,
                    lines: Some(process.lines),
                    exit: Some(exit_rx),
                },
            );
        }
        // Its exit: handed to the rank once activated; before that, a standby lost.
        let this = self.clone();
        let exit = process.exit;
        tokio::task::spawn_local(async move {
            let exit = exit.await;
            let lost = {
                let mut pool = this.pool();
                match pool.standbys.get(&rank) {
                    Some(s) if s.seq == seq => pool.standbys.remove(&rank),
                    _ => None,
                }
            };
            match lost {
                Some(mut s) => {
                    // What it printed, to its last line (the pipes may lag behind the exit).
                    let mut printed = Vec::new();
                    if let Some(lines) = s.lines.as_mut().filter(|_| !s.ready) {
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(line) = lines.recv().await {
                                printed.push(line.text);
                            }
                        })
                        .await;
                    }
                    this.lost(rank, s, &exit, &printed)
                }
                None => {
                    let _ = exit_tx.send(exit);
                }
            }
        });
        // Ready, or killed after the timeout (its exit then counts it as lost).
        // (`--standby-ready-timeout-s`: a preload that hangs holds its slot no longer.)
        let this = self.clone();
        let control = process.control;
        let limit = self.cx.settings.standby_ready_timeout;
        tokio::task::spawn_local(async move {
            let ready = tokio::time::timeout(limit, ready).await;
            let mut pool = this.pool();
            let mine = pool.standbys.get_mut(&rank).filter(|s| s.seq == seq);
            match (ready, mine) {
                (Ok(Ok(())), Some(s)) => {
                    s.ready = true;
                    s.since = Utc::now();
                    pool.failures = 0;
                    pool.starting = false;
                    drop(pool);
                    this.refill();
                }
                (Err(_), Some(_)) => {
                    drop(pool);
                    control.kill();
                }
                _ => {}
            }
        });
        Ok(())
    }

    /// A standby died or was killed before it was activated.
    fn lost(self: &Arc<Self>, rank: u32, s: Standby, exit: &Exit, printed: &[String]) {
        self.host.discard(&s.name);
        if s.ready {
            tracing::info!(job_id = %self.cx.job_id, rank, pid = s.pid, "a warm standby died; replacing it");
            self.refill();
            return;
        }
        self.pool().starting = false;
        let tail = printed[printed.len().saturating_sub(QUOTED_LINES)..].join(" | ");
        let how = match (exit.code, exit.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(sig)) => format!("signal {sig}"),
            _ => "an unobserved exit".to_string(),
        };
        self.failed(
            rank,
            format!(
                "died before it was ready ({how}){}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ),
        );
    }

    /// A standby of `rank` failed to start: counted; at the limit, the job runs cold.
    fn failed(self: &Arc<Self>, rank: u32, why: String) {
        let off = {
            let mut pool = self.pool();
            if pool.closed || pool.off.is_some() {
                return;
            }
            pool.failures += 1;
            if pool.failures >= FAILURES_BEFORE_COLD {
                let off = format!(
                    "warm standby off: {} standbys in a row failed to start (preload: {}); the \
                     last, of rank {rank}, {why}. Ranks start cold.",
                    pool.failures,
                    self.preload.join(", ")
                );
                pool.off = Some(off.clone());
                Some(off)
            } else {
                None
            }
        };
        match off {
            Some(off) => {
                tracing::warn!(job_id = %self.cx.job_id, "{off}");
                self.cx.note(off);
            }
            None => self.refill(),
        }
    }

    fn discard(&self, s: Standby) {
        process::signal_group(s.pid, libc::SIGKILL);
        self.host.discard(&s.name);
    }

    /// The job has ended or the server stops: every standby goes, and no new one comes.
    pub fn close(&self) {
        let standbys: Vec<Standby> = {
            let mut pool = self.pool();
            pool.closed = true;
            pool.standbys.drain().map(|(_, s)| s).collect()
        };
        for s in standbys {
            self.discard(s);
        }
    }

    pub fn status(&self) -> StandbyStatus {
        let pool = self.pool();
        StandbyStatus {
            by_rank: pool
                .standbys
                .iter()
                .map(|(rank, s)| {
                    (
                        *rank,
                        StandbyView {
                            pid: s.pid,
                            node: s.node.clone(),
                            state: if s.ready { "ready" } else { "starting" }.to_string(),
                            since: crate::domain::ts(s.since),
                        },
                    )
                })
                .collect(),
            off: pool.off.clone(),
        }
    }
}

/// Starts incarnation `attempt` of `rank` on `node`, as a launcher does: through the job's
/// standbys when it has them ([`Standbys::start`]), else `cold`. Returns the process and, when
/// a standby became it, the standby's name.
pub async fn start_rank(
    standbys: Option<Arc<Standbys>>,
    rank: u32,
    attempt: u32,
    node: &str,
    launch: Launch,
    cold: impl FnOnce(Launch) -> LocalBoxFuture<'static, io::Result<RankProcess>>,
) -> io::Result<(RankProcess, Option<String>)> {
    match standbys {
        Some(s) => s.start(rank, attempt, node, launch, cold).await,
        None => cold(launch).await.map(|p| (p, None)),
    }
}

/// The activation line for a standby becoming `launch`: its whole environment (with the
/// warm-start marker), what to unset of the standby's own, its working directory, and the
/// script or module with its arguments.
fn activation(launch: &Launch, standby_env: &[(String, String)]) -> Option<String> {
    let cmd = PythonCommand::parse(&launch.argv).ok()?;
    let mut env: serde_json::Map<String, serde_json::Value> = launch
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    env.insert(WARM_START.into(), "1".into());
    let unset: Vec<&str> = standby_env
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !env.contains_key(*k))
        .collect();
    let (script, module) = match cmd.main {
        PythonMain::Script(s) => (Some(s), None),
        PythonMain::Module(m) => (None, Some(m)),
    };
    let mut line = serde_json::json!({
        "env": env,
        "unset": unset,
        "cwd": launch.cwd,
        "script": script,
        "module": module,
        "argv": cmd.args,
    })
    .to_string();
    line.push('\n');
    Some(line)
}
