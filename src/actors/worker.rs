//! Worker: one per rank. Owns at most one incarnation at a time: starts it through the job's
//! launcher, streams its output to the recorder, learns of its exit, runs the heartbeat
//! watchdog, stops it on request. It reports to its Job and never decides restarts; it does
//! not know where its rank runs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use super::Runtime;
use super::messages::{
    AskToSave, Beat, CaptureStacks, JobInbox, KillHung, LaunchRank, RankHung, RestartStraggler,
    StopActor, Terminate, WorkerExited, WorkerStarted,
};
use crate::domain::error_file::{self, RootCause};
use crate::domain::incident::RankStacks;
use crate::domain::liveness::{self, Watch};
use crate::domain::{Ending, Exit, Outcome};
use crate::launcher::{JobLauncher, RankControl, RankProcess, stacks};
use crate::store::recorder::NewLine;

pub use crate::launcher::MAX_LINE_BYTES;

/// Lines of output kept to explain a failure.
const TAIL_LINES: usize = 20;
/// How long output may keep flowing after the process exited (escaped grandchildren).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a rank's stacks may take to capture; a hung rank is killed after this at most
/// even if the Job never answers.
pub const STACKS_LIMIT: Duration = Duration::from_secs(1);

pub struct Worker {
    job: JobInbox,
    job_id: Uuid,
    rank: u32,
    rt: Arc<Runtime>,
    launcher: Arc<dyn JobLauncher>,
    heartbeat_timeout: Duration,
    current: Option<Incarnation>,
}

struct Incarnation {
    attempt: u32,
    /// None until the launcher has started the process.
    control: Option<Arc<dyn RankControl>>,
    pid: u32,
    /// SIGTERM (or what stands for it) has been sent.
    signalled: bool,
    last_beat: Option<Instant>,
    watchdog_armed: bool,
    ending: Ending,
}

impl Worker {
    pub fn new(
        job: JobInbox,
        job_id: Uuid,
        rank: u32,
        rt: Arc<Runtime>,
        launcher: Arc<dyn JobLauncher>,
        heartbeat_timeout: Duration,
    ) -> Self {
        Worker {
            job,
            job_id,
            rank,
            rt,
            launcher,
            heartbeat_timeout,
            current: None,
        }
    }

    fn current_mut(&mut self, attempt: u32) -> Option<&mut Incarnation> {
        self.current.as_mut().filter(|inc| inc.attempt == attempt)
    }

    fn on_started(&mut self, attempt: u32, process: RankProcess, ctx: &mut Context<Self>) {
        let RankProcess {
            pid,
            mut lines,
            exit,
            control,
            warm,
        } = process;
        let Some(inc) = self.current_mut(attempt) else {
            // Superseded while starting: nothing wants this process.
            control.kill();
            return;
        };
        inc.control = Some(control.clone());
        inc.pid = pid;
        if inc.ending != Ending::Natural {
            control.kill();
        }
        self.job.started.do_send(WorkerStarted {
            rank: self.rank,
            attempt,
            pid,
            warm,
        });
        let addr = ctx.address();
        let recorder = self.rt.recorder.clone();
        let (job_id, rank) = (self.job_id, self.rank);
        let error_file = error_file::path(&self.rt.settings.data_dir, job_id, rank, attempt);
        actix::spawn(async move {
            let reader = actix::spawn(async move {
                let mut tail = VecDeque::with_capacity(TAIL_LINES);
                while let Some(line) = lines.recv().await {
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.text.clone());
                    recorder
                        .log(NewLine {
                            job_id,
                            rank: Some(rank),
                            attempt: Some(attempt),
                            stream: line.stream,
                            line: line.text,
                        })
                        .await;
                }
                tail
            });
            let exit = exit.await;
            let ended = exit.seen_at.unwrap_or_else(Instant::now);
            let tail = match tokio::time::timeout(DRAIN_TIMEOUT, reader).await {
                Ok(Ok(tail)) => tail.into_iter().collect(),
                _ => Vec::new(),
            };
            // What the rank said it died of, if it wrote torchrun's error file.
            let root_cause = match exit.code {
                Some(0) => None,
                _ => tokio::task::spawn_blocking(move || error_file::read(&error_file))
                    .await
                    .ok()
                    .flatten(),
            };
            addr.do_send(ProcessExited {
                attempt,
                ended,
                exit,
                tail,
                root_cause,
            });
        });
    }

    fn terminate(&mut self, ctx: &mut Context<Self>) {
        let grace = self.rt.settings.kill_grace;
        let Some(inc) = self.current.as_mut() else {
            return;
        };
        if inc.ending == Ending::Natural {
            inc.ending = Ending::Terminated;
        } else if inc.control.is_some() && inc.signalled {
            return;
        }
        let attempt = inc.attempt;
        if let Some(control) = inc.control.clone() {
            inc.signalled = true;
            control.terminate();
            ctx.run_later(grace, move |act, _| {
                if act.current_mut(attempt).is_some() {
                    control.kill();
                }
            });
        }
    }

    fn arm_watchdog(&mut self, attempt: u32, after: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(after, move |act, ctx| {
            let timeout = act.heartbeat_timeout;
            let saturated = act.rt.http.saturated_ago();
            let Some(inc) = act.current_mut(attempt) else {
                return;
            };
            let silent = inc.last_beat.map(|t| t.elapsed()).unwrap_or_default();
            if let Watch::Recheck(after) = liveness::watch(silent, timeout, saturated) {
                act.arm_watchdog(attempt, after, ctx);
                return;
            }
            if inc.ending != Ending::Natural {
                return;
            }
            inc.ending = Ending::Hung;
            act.rt.recorder.note(
                act.job_id,
                Some(act.rank),
                Some(attempt),
                format!(
                    "rank {} sent no heartbeat for {:.3}s (timeout {:.3}s): taking every rank's \
                     stacks, then killing its process group",
                    act.rank,
                    silent.as_secs_f64(),
                    timeout.as_secs_f64()
                ),
            );
            // The Job takes every rank's stacks first and then answers with KillHung; it is
            // killed after the capture limit whatever happens.
            act.job.hung.do_send(RankHung {
                rank: act.rank,
                attempt,
            });
            ctx.run_later(STACKS_LIMIT * 2, move |act, ctx| {
                act.kill_hung(attempt, ctx)
            });
        });
    }

    fn kill_hung(&mut self, attempt: u32, ctx: &mut Context<Self>) {
        if self.current_mut(attempt).is_some() {
            self.terminate(ctx);
        }
    }
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<LaunchRank> for Worker {
    type Result = ();

    fn handle(&mut self, msg: LaunchRank, ctx: &mut Context<Self>) {
        let attempt = msg.attempt;
        self.current = Some(Incarnation {
            attempt,
            control: None,
            pid: 0,
            signalled: false,
            last_beat: None,
            watchdog_armed: false,
            ending: Ending::Natural,
        });
        ctx.spawn(
            self.launcher
                .start(self.rank, attempt, msg.place, msg.launch)
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(process) => act.on_started(attempt, process, ctx),
                    Err(e) => {
                        if act.current_mut(attempt).is_some() {
                            act.current = None;
                        }
                        act.job.exited.do_send(WorkerExited {
                            rank: act.rank,
                            attempt,
                            ended: Instant::now(),
                            outcome: Outcome::SpawnError,
                            exit: Exit::default(),
                            detail: format!("spawn failed: {e}"),
                            tail: Vec::new(),
                        });
                    }
                }),
        );
    }
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

impl Handler<CaptureStacks> for Worker {
    type Result = ResponseFuture<Option<RankStacks>>;

    fn handle(&mut self, _: CaptureStacks, _: &mut Context<Self>) -> Self::Result {
        let target = self.current.as_ref().and_then(|inc| {
            let group = inc.control.as_ref()?.host_group()?;
            Some((inc.attempt, inc.pid, group))
        });
        let (data_dir, job_id, rank) = (self.rt.settings.data_dir.clone(), self.job_id, self.rank);
        Box::pin(async move {
            let (attempt, pid, group) = target?;
            let file = stacks::path(&data_dir, job_id, rank, attempt);
            let (kind, text) =
                tokio::task::spawn_blocking(move || stacks::capture(group, &file, STACKS_LIMIT))
                    .await
                    .ok()?;
            Some(RankStacks {
                rank,
                attempt,
                pid,
                kind,
                text,
            })
        })
    }
}

impl Handler<AskToSave> for Worker {
    type Result = ();

    /// Sent only when the rank is about to be ended anyway: a process that does not handle
    /// the signal dies of it, and that counts as stopped, as the SIGTERM that follows would.
    fn handle(&mut self, _: AskToSave, _: &mut Context<Self>) {
        let Some(inc) = self.current.as_mut() else {
            return;
        };
        if let Some(control) = inc.control.clone() {
            if inc.ending == Ending::Natural {
                inc.ending = Ending::Terminated;
            }
            control.ask_to_save();
        }
    }
}

impl Handler<KillHung> for Worker {
    type Result = ();

    fn handle(&mut self, msg: KillHung, ctx: &mut Context<Self>) {
        self.kill_hung(msg.attempt, ctx);
    }
}

impl Handler<RestartStraggler> for Worker {
    type Result = ();

    fn handle(&mut self, msg: RestartStraggler, ctx: &mut Context<Self>) {
        let Some(inc) = self.current_mut(msg.attempt) else {
            return;
        };
        if inc.ending == Ending::Natural {
            inc.ending = Ending::Straggler;
            self.terminate(ctx);
        }
    }
}

impl Handler<Terminate> for Worker {
    type Result = ();

    fn handle(&mut self, _: Terminate, ctx: &mut Context<Self>) {
        self.terminate(ctx);
    }
}

impl Handler<StopActor> for Worker {
    type Result = ();

    fn handle(&mut self, _: StopActor, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// The process of incarnation `attempt` has exited and its output is drained.
#[derive(Message)]
#[rtype(result = "()")]
struct ProcessExited {
    attempt: u32,
    ended: Instant,
    exit: Exit,
    tail: Vec<String>,
    root_cause: Option<RootCause>,
}

impl Handler<ProcessExited> for Worker {
    type Result = ();

    fn handle(&mut self, msg: ProcessExited, _: &mut Context<Self>) {
        let Some(inc) = self.current_mut(msg.attempt) else {
            return;
        };
        let outcome = msg.exit.outcome(inc.ending);
        self.current = None;
        let mut detail = msg
            .exit
            .describe(outcome, self.heartbeat_timeout.as_secs_f64());
        // The exception the rank recorded is the root cause; its traceback says more than
        // the last lines of output.
        let mut tail = msg.tail;
        if let Some(cause) = msg.root_cause {
            detail = format!("{detail}: {}", cause.message);
            if let Some(tb) = cause.traceback {
                tail = tb.lines().map(str::to_string).collect();
                let skip = tail.len().saturating_sub(TAIL_LINES);
                tail.drain(..skip);
            }
        }
        self.job.exited.do_send(WorkerExited {
            rank: self.rank,
            attempt: msg.attempt,
            ended: msg.ended,
            outcome,
            exit: msg.exit,
            detail,
            tail,
        });
    }
}
