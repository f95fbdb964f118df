//! Worker: one per rank. Owns at most one incarnation (process) at a time: spawns it, streams
//! its output to the recorder, learns of its exit from the pidfd, runs the heartbeat watchdog,
//! kills its process group on request. It reports to its Job and never decides restarts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use super::Runtime;
use super::job::Job;
use crate::launcher::local::{self, Launch};
use crate::launcher::{self, Placement};
use crate::store::history::Outcome;
use crate::store::recorder::NewLine;

/// Longest stored log line, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines of output kept to explain a failure.
const TAIL_LINES: usize = 20;
/// How long output may keep flowing after the process exited (escaped grandchildren).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Worker {
    job: Addr<Job>,
    job_id: Uuid,
    rank: u32,
    rt: Arc<Runtime>,
    heartbeat_timeout: Duration,
    current: Option<Incarnation>,
}

struct Incarnation {
    attempt: u32,
    pid: Option<u32>,
    last_beat: Option<Instant>,
    watchdog_armed: bool,
    hung: bool,
    terminating: bool,
    placement: Placement,
    /// Its Slurm node failed (srun said so, or the Job saw the node down).
    node_failed: bool,
}

impl Worker {
    pub fn new(
        job: Addr<Job>,
        job_id: Uuid,
        rank: u32,
        rt: Arc<Runtime>,
        heartbeat_timeout: Duration,
    ) -> Self {
        Worker {
            job,
            job_id,
            rank,
            rt,
            heartbeat_timeout,
            current: None,
        }
    }

    fn current_mut(&mut self, attempt: u32) -> Option<&mut Incarnation> {
        self.current.as_mut().filter(|inc| inc.attempt == attempt)
    }

    fn on_spawned(&mut self, attempt: u32, running: local::Running, ctx: &mut Context<Self>) {
        let pid = running.pid;
        let Some(inc) = self.current_mut(attempt) else {
            // Superseded while spawning: nothing wants this process.
            local::signal_group(pid, libc::SIGKILL);
            return;
        };
        inc.pid = Some(pid);
        let watch_srun = matches!(inc.placement, Placement::Slurm(_));
        if inc.terminating {
            local::signal_group(pid, libc::SIGKILL);
        }
        self.job.do_send(WorkerStarted {
            rank: self.rank,
            attempt,
            pid,
        });
        let addr = ctx.address();
        let recorder = self.rt.recorder.clone();
        let (job_id, rank) = (self.job_id, self.rank);
        let node_failed = Arc::new(AtomicBool::new(false));
        actix::spawn(async move {
            let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
            let mut readers = Vec::new();
            let mut running = running;
            let pipes: [(&'static str, Option<Box<dyn tokio::io::AsyncRead + Unpin>>); 2] = [
                ("stdout", running.stdout.take().map(|p| Box::new(p) as _)),
                ("stderr", running.stderr.take().map(|p| Box::new(p) as _)),
            ];
            for (stream, pipe) in pipes {
                let Some(pipe) = pipe else { continue };
                let (recorder, tail) = (recorder.clone(), tail.clone());
                let node_failed = node_failed.clone();
                readers.push(actix::spawn(async move {
                    local::read_lines(pipe, MAX_LINE_BYTES, |line| {
                        if watch_srun && launcher::slurm::is_node_failure_line(&line) {
                            node_failed.store(true, Ordering::SeqCst);
                        }
                        {
                            let mut tail = tail.lock().unwrap();
                            if tail.len() == TAIL_LINES {
                                tail.pop_front();
                            }
                            tail.push_back(line.clone());
                        }
                        let recorder = recorder.clone();
                        async move {
                            recorder
                                .log(NewLine {
                                    job_id,
                                    rank: Some(rank),
                                    attempt: Some(attempt),
                                    stream,
                                    line,
                                })
                                .await
                        }
                    })
                    .await
                }));
            }
            let status = running.into_exit().wait().await;
            // The rank's leader is gone; so is everything it left in its group.
            local::signal_group(pid, libc::SIGKILL);
            let _ =
                tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join_all(readers)).await;
            let tail = tail.lock().unwrap().iter().cloned().collect();
            addr.do_send(ChildExited {
                attempt,
                status,
                tail,
                node_failed: node_failed.load(Ordering::SeqCst),
            });
        });
    }

    fn terminate(&mut self, ctx: &mut Context<Self>) {
        let grace = self.rt.settings.kill_grace;
        let Some(inc) = self.current.as_mut() else {
            return;
        };
        if inc.terminating && inc.pid.is_some() {
            return;
        }
        inc.terminating = true;
        let attempt = inc.attempt;
        if let Some(pid) = inc.pid {
            local::signal_group(pid, libc::SIGTERM);
            ctx.run_later(grace, move |act, _| {
                if let Some(inc) = act.current_mut(attempt)
                    && let Some(pid) = inc.pid
                {
                    local::signal_group(pid, libc::SIGKILL);
                    let placement = inc.placement.clone();
                    actix::spawn(async move { launcher::cleanup_after_kill(&placement).await });
                }
            });
        }
    }

    fn arm_watchdog(&mut self, attempt: u32, after: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(after, move |act, ctx| {
            let timeout = act.heartbeat_timeout;
            let Some(inc) = act.current_mut(attempt) else { return };
            let silent = inc.last_beat.map(|t| t.elapsed()).unwrap_or_default();
            if silent < timeout {
                act.arm_watchdog(attempt, timeout - silent, ctx);
                return;
            }
            if inc.hung || inc.terminating {
                return;
            }
            inc.hung = true;
            act.rt.recorder.note(
                act.job_id,
                Some(act.rank),
                Some(attempt),
                format!(
                    "rank {} sent no heartbeat for {:.3}s (timeout {:.3}s): killing its process group",
                    act.rank,
                    silent.as_secs_f64(),
                    timeout.as_secs_f64()
                ),
            );
            act.terminate(ctx);
        });
    }
}

impl Actor for Worker {
    type Context = Context<Self>;
}

/// Start incarnation `attempt` of this rank.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LaunchRank {
    pub attempt: u32,
    pub launch: Launch,
    pub placement: Placement,
}

impl Handler<LaunchRank> for Worker {
    type Result = ();

    fn handle(&mut self, msg: LaunchRank, ctx: &mut Context<Self>) {
        let attempt = msg.attempt;
        self.current = Some(Incarnation {
            attempt,
            pid: None,
            last_beat: None,
            watchdog_armed: false,
            hung: false,
            terminating: false,
            placement: msg.placement.clone(),
            node_failed: false,
        });
        let placement = msg.placement;
        ctx.spawn(
            async move { launcher::start(msg.launch, &placement).await }
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(running) => act.on_spawned(attempt, running, ctx),
                    Err(e) => {
                        if act.current_mut(attempt).is_some() {
                            act.current = None;
                        }
                        act.job.do_send(WorkerExited {
                            rank: act.rank,
                            attempt,
                            outcome: Outcome::SpawnError,
                            exit_code: None,
                            signal: None,
                            detail: format!("spawn failed: {e}"),
                            tail: Vec::new(),
                        });
                    }
                }),
        );
    }
}

/// A valid heartbeat of incarnation `attempt` arrived (the Job checked the token).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Beat {
    pub attempt: u32,
}

impl Handler<Beat> for Worker {
    type Result = ();

    fn handle(&mut self, msg: Beat, ctx: &mut Context<Self>) {
        let timeout = self.heartbeat_timeout;
        let Some(inc) = self.current_mut(msg.attempt) else {
            return;
        };
        inc.last_beat = Some(Instant::now());
        if !inc.watchdog_armed {
            inc.watchdog_armed = true;
            self.arm_watchdog(msg.attempt, timeout, ctx);
        }
    }
}

/// Stop the current incarnation: SIGTERM to its group, SIGKILL after the grace period.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Terminate;

impl Handler<Terminate> for Worker {
    type Result = ();

    fn handle(&mut self, _: Terminate, ctx: &mut Context<Self>) {
        self.terminate(ctx);
    }
}

/// The Slurm node of incarnation `attempt` is down: kill its srun now (no grace: the node
/// cannot run a graceful stop) and cancel the step; the exit is a node failure.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeDown {
    pub attempt: u32,
    pub detail: String,
}

impl Handler<NodeDown> for Worker {
    type Result = ();

    fn handle(&mut self, msg: NodeDown, _: &mut Context<Self>) {
        let (job_id, rank) = (self.job_id, self.rank);
        let Some(inc) = self.current_mut(msg.attempt) else {
            return;
        };
        if inc.terminating || inc.node_failed {
            return;
        }
        inc.node_failed = true;
        inc.terminating = true;
        if let Some(pid) = inc.pid {
            local::signal_group(pid, libc::SIGKILL);
        }
        let placement = inc.placement.clone();
        self.rt.recorder.note(
            job_id,
            Some(rank),
            Some(msg.attempt),
            format!("rank {rank}: {}; killing its srun", msg.detail),
        );
        actix::spawn(async move { launcher::cleanup_after_kill(&placement).await });
    }
}

/// The job is over: stop this actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Worker {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ChildExited {
    attempt: u32,
    status: std::io::Result<std::process::ExitStatus>,
    tail: Vec<String>,
    node_failed: bool,
}

impl Handler<ChildExited> for Worker {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, _: &mut Context<Self>) {
        let Some(inc) = self.current_mut(msg.attempt) else {
            return;
        };
        let (hung, terminating) = (inc.hung, inc.terminating);
        let node_failed = inc.node_failed || msg.node_failed;
        let node = inc.placement.node();
        self.current = None;
        let (exit_code, signal, wait_error) = match &msg.status {
            Ok(status) => {
                let (code, signal) = local::exit_parts(*status);
                (code, signal, None)
            }
            Err(e) => (None, None, Some(e.to_string())),
        };
        let outcome = if hung {
            Outcome::HeartbeatTimeout
        } else if node_failed {
            Outcome::NodeFailure
        } else if terminating {
            Outcome::Stopped
        } else if exit_code == Some(0) {
            Outcome::Succeeded
        } else if signal.is_some() {
            Outcome::Signal
        } else {
            Outcome::ExitCode
        };
        let detail = match (outcome, exit_code, signal, wait_error) {
            (_, _, _, Some(e)) => format!("could not wait for the process: {e}"),
            (Outcome::NodeFailure, ..) => format!("its Slurm node {node} failed"),
            (Outcome::HeartbeatTimeout, ..) => format!(
                "no heartbeat for {:.3}s (heartbeat_timeout_s)",
                self.heartbeat_timeout.as_secs_f64()
            ),
            (_, _, Some(sig), _) => format!("killed by signal {sig} ({})", signal_name(sig)),
            (_, Some(code), _, _) => format!("exited with code {code}"),
            _ => "exited".to_string(),
        };
        self.job.do_send(WorkerExited {
            rank: self.rank,
            attempt: msg.attempt,
            outcome,
            exit_code,
            signal,
            detail,
            tail: msg.tail,
        });
    }
}

/// Sent to the Job: incarnation `attempt` of `rank` is running as `pid`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerStarted {
    pub rank: u32,
    pub attempt: u32,
    pub pid: u32,
}

/// Sent to the Job: incarnation `attempt` of `rank` ended (or never started).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WorkerExited {
    pub rank: u32,
    pub attempt: u32,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub detail: String,
    pub tail: Vec<String>,
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
