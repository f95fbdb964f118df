//! One job's Slurm side: the allocation it owns, where each rank's step goes, node health,
//! and the bad-node quarantine (a node on which the job's ranks keep failing, or that Slurm
//! reports down, is excluded from the job's later launches). The Job sees none of it: it
//! asks for places and gets ranks back.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::LocalBoxFuture;

use super::{Allocation, Step};
use crate::domain::worker_env::Placement;
use crate::domain::{ExitCause, Outcome};
use crate::launcher::process::{self, GroupControl};
use crate::launcher::standby::{self, StandbyHost, Standbys};
use crate::launcher::{
    JobContext, JobLauncher, Launch, LauncherStatus, LiveRanks, Place, Prepared, RankControl,
    RankProcess, line_channel,
};
use crate::store::history::HistoryOp;
use crate::store::now;

/// How often the health of the allocation's nodes is checked (`sinfo`).
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long srun's last lines may take after it exited (a node-failure line comes last).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct SlurmLauncher {
    inner: Arc<Inner>,
    standbys: Option<Arc<Standbys>>,
}

struct Inner {
    cx: JobContext,
    /// Held while an allocation is asked for, so ranks that fail together wait for one.
    allocating: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// The job's live steps, by rank.
    steps: LiveRanks<StepControl>,
}

#[derive(Default)]
struct State {
    alloc: Option<Allocation>,
    excluded: Vec<String>,
    failures: HashMap<String, u32>,
    /// The node of each rank's latest incarnation.
    rank_node: Vec<Option<String>>,
    /// Ranks placed and not yet exited, with their node (what loads a node).
    placed: HashMap<u32, String>,
    /// Steps running now, by rank.
    poller: bool,
    released: bool,
}

/// A running step: its srun client's process group, and how to cancel the step itself.
struct StepControl {
    group: GroupControl,
    conf: Option<PathBuf>,
    alloc: u64,
    name: String,
    node: String,
    attempt: u32,
    node_failed: AtomicBool,
}

impl RankControl for StepControl {
    fn terminate(&self) {
        self.group.terminate();
    }

    /// Killing srun may leave the step's processes on their node: cancel the step too.
    fn kill(&self) {
        self.group.kill();
        let (conf, alloc, name) = (self.conf.clone(), self.alloc, self.name.clone());
        tokio::task::spawn_local(
            async move { super::cancel_step(conf.as_deref(), alloc, &name).await },
        );
    }
}

impl SlurmLauncher {
    pub fn new(cx: JobContext) -> Self {
        let state = State {
            excluded: cx.excluded_nodes.clone(),
            rank_node: vec![None; cx.spec.world_size as usize],
            ..State::default()
        };
        let inner = Arc::new(Inner {
            cx,
            allocating: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
            steps: LiveRanks::default(),
        });
        let host = Box::new(StepStandbys(Arc::downgrade(&inner)));
        SlurmLauncher {
            standbys: Standbys::for_job(&inner.cx, host),
            inner,
        }
    }
}

/// Standbys on Slurm: a step of the job's allocation on the node of the rank it stands by.
struct StepStandbys(std::sync::Weak<Inner>);

impl StandbyHost for StepStandbys {
    fn wrap(&self, rank: u32, seq: u32, node: &str, launch: Launch) -> Option<(Launch, String)> {
        let inner = self.0.upgrade()?;
        inner.state().alloc.as_ref()?;
        let name = format!("trainvisor-{}-r{rank}-s{seq}", inner.cx.job_id);
        let step = inner.step(node, name.clone());
        Some((step.wrap(launch), name))
    }

    fn discard(&self, name: &str) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let (conf, alloc) = (inner.conf(), inner.state().alloc.as_ref().map(|a| a.job_id));
        let name = name.to_string();
        if let Some(alloc) = alloc {
            tokio::task::spawn_local(async move {
                super::cancel_step(conf.as_deref(), alloc, &name).await
            });
        }
    }
}

impl Inner {
    fn conf(&self) -> Option<PathBuf> {
        self.cx.settings.slurm_conf.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// A step named `name` on `node` of the allocation held now.
    fn step(&self, node: &str, name: String) -> Step {
        Step {
            conf: self.conf(),
            alloc: self.state().alloc.as_ref().map_or(0, |a| a.job_id),
            node: node.to_string(),
            name,
            srun_args: self
                .cx
                .spec
                .slurm
                .as_ref()
                .map(|s| s.srun_args.clone())
                .unwrap_or_default(),
        }
    }

    /// Asks Slurm for an allocation (giving up the old one) unless a usable one is held.
    async fn ensure_allocation(self: &Arc<Self>) -> Result<(), String> {
        let _one_at_a_time = self.allocating.lock().await;
        let (old, exclude) = {
            let st = self.state();
            if st.released {
                return Err("the job has ended".to_string());
            }
            if !st.usable().is_empty() {
                return Ok(());
            }
            (st.alloc.clone(), st.excluded.clone())
        };
        let Some(spec) = self.cx.spec.slurm.clone() else {
            return Err("launcher slurm without Slurm options".to_string());
        };
        let conf = self.conf();
        self.cx.note(format!(
            "asking Slurm for {} node(s) × {} task(s){}",
            spec.nodes,
            spec.ntasks_per_node,
            if exclude.is_empty() {
                String::new()
            } else {
                format!(", excluding {}", exclude.join(","))
            }
        ));
        if let Some(old) = old {
            super::cancel_job(conf.as_deref(), old.job_id).await;
        }
        let name = super::job_name(&self.cx.job_id);
        let comment = format!("trainvisor-instance={}", self.cx.instance);
        let notice = super::notice_arg(self.cx.spec.save_grace_s);
        let alloc = super::allocate(conf.as_deref(), &name, &comment, &spec, &exclude, &notice)
            .await
            .map_err(|e| format!("no Slurm allocation: {e}"))?;
        if self.state().released {
            // The job ended while it waited: the allocation is not wanted.
            super::cancel_job(conf.as_deref(), alloc.job_id).await;
            return Err("the job has ended".to_string());
        }
        self.cx.note(format!(
            "Slurm allocation {} on {}",
            alloc.job_id,
            alloc
                .nodes
                .iter()
                .map(|n| format!("{} ({})", n.name, n.addr))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let start_poller = {
            let mut st = self.state();
            st.alloc = Some(alloc);
            !std::mem::replace(&mut st.poller, true)
        };
        if start_poller {
            let inner = self.clone();
            tokio::task::spawn_local(async move { inner.poll_nodes().await });
        }
        Ok(())
    }

    /// Watches the allocation's nodes until the job lets go of it.
    async fn poll_nodes(self: Arc<Self>) {
        let conf = self.conf();
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            let nodes: Vec<String> = {
                let st = self.state();
                if st.released {
                    return;
                }
                st.usable().iter().map(|n| n.name.clone()).collect()
            };
            if nodes.is_empty() {
                continue;
            }
            let bad = match super::bad_nodes(conf.as_deref(), &nodes).await {
                Ok(bad) => bad,
                Err(e) => {
                    tracing::debug!(error = %e, "sinfo failed");
                    continue;
                }
            };
            for (node, state) in bad {
                let detail = format!("Slurm reports node {node} {state}");
                let failures = self.state().failures.get(&node).copied().unwrap_or(0);
                self.exclude(&node, "node_failure", failures, detail.clone());
                // Its ranks cannot stop gracefully: kill their sruns now; their exits are
                // node failures.
                let doomed: Vec<(u32, Arc<StepControl>)> = self
                    .steps
                    .all()
                    .into_iter()
                    .filter(|(_, s)| s.node == node)
                    .collect();
                for (rank, step) in doomed {
                    if step.node_failed.swap(true, Ordering::SeqCst) {
                        continue;
                    }
                    self.cx.recorder.note(
                        self.cx.job_id,
                        Some(rank),
                        Some(step.attempt),
                        format!("rank {rank}: {detail}; killing its srun"),
                    );
                    step.kill();
                }
            }
        }
    }

    fn exclude(&self, node: &str, reason: &'static str, failures: u32, detail: String) {
        let excluded = {
            let mut st = self.state();
            if st.excluded.iter().any(|n| n == node) {
                return;
            }
            st.excluded.push(node.to_string());
            st.excluded.clone()
        };
        let job_id = self.cx.job_id;
        self.cx.recorder.record(HistoryOp::NodeExcluded {
            job_id,
            node: node.to_string(),
            excluded_at: now(),
            failures,
            reason,
            detail: detail.clone(),
        });
        self.cx.note(format!(
            "excluding node {node} from this job's launches ({reason}): {detail}"
        ));
        self.cx.recorder.event(
            "node_excluded",
            job_id,
            serde_json::json!({"node": node, "reason": reason, "detail": detail,
                               "excluded_nodes": excluded}),
        );
    }
}

impl State {
    fn usable(&self) -> Vec<&super::Node> {
        self.alloc
            .iter()
            .flat_map(|a| a.nodes.iter())
            .filter(|n| !self.excluded.contains(&n.name))
            .collect()
    }

    fn addr_of(&self, name: &str) -> Option<String> {
        self.alloc
            .as_ref()?
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.addr.clone())
    }

    /// Nodes for `ranks` (ascending): rank r goes to node r / ntasks_per_node of the
    /// allocation; a rank whose node is excluded goes to the least loaded usable node.
    fn place(&mut self, ranks: &[u32], per: u32) -> Vec<(u32, String)> {
        let usable: Vec<String> = self.usable().iter().map(|n| n.name.clone()).collect();
        let all: Vec<String> = self
            .alloc
            .iter()
            .flat_map(|a| a.nodes.iter().map(|n| n.name.clone()))
            .collect();
        let mut load: HashMap<String, u32> = HashMap::new();
        for (r, node) in &self.placed {
            if !ranks.contains(r) {
                *load.entry(node.clone()).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for &rank in ranks {
            let preferred = all
                .get((rank / per) as usize)
                .filter(|n| usable.contains(n))
                .filter(|n| load.get(*n).copied().unwrap_or(0) < per)
                .cloned();
            let node = preferred.unwrap_or_else(|| {
                usable
                    .iter()
                    .min_by_key(|n| load.get(*n).copied().unwrap_or(0))
                    .cloned()
                    .unwrap_or_default()
            });
            *load.entry(node.clone()).or_default() += 1;
            self.rank_node[rank as usize] = Some(node.clone());
            self.placed.insert(rank, node.clone());
            out.push((rank, node));
        }
        out
    }

    /// MASTER_ADDR: the address of rank 0's node.
    fn master_addr(&self) -> String {
        self.rank_node[0]
            .as_deref()
            .and_then(|n| self.addr_of(n))
            .or_else(|| self.usable().first().map(|n| n.addr.clone()))
            .unwrap_or_else(|| "127.0.0.1".to_string())
    }
}

impl JobLauncher for SlurmLauncher {
    fn prepare(&self, ranks: Vec<u32>) -> LocalBoxFuture<'static, Result<Prepared, String>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.ensure_allocation().await?;
            let per = inner
                .cx
                .spec
                .slurm
                .as_ref()
                .map_or(1, |s| s.ntasks_per_node.max(1));
            let world = inner.cx.spec.world_size;
            let mut st = inner.state();
            let places = st
                .place(&ranks, per)
                .into_iter()
                .map(|(rank, node)| {
                    let place = Place {
                        node,
                        // Ranks r / ntasks_per_node share a node, as torchrun's nodes would.
                        placement: Placement::in_groups_of(rank, world, per),
                        // Its processes run on a compute node: no stacks hook, no host group.
                        host_local: false,
                    };
                    (rank, place)
                })
                .collect();
            Ok(Prepared {
                master_addr: st.master_addr(),
                server_url: None,
                places,
            })
        })
    }

    fn start(
        &self,
        rank: u32,
        attempt: u32,
        place: Place,
        launch: Launch,
    ) -> LocalBoxFuture<'static, io::Result<RankProcess>> {
        let inner = self.inner.clone();
        let standbys = self.standbys.clone();
        Box::pin(async move {
            let step = inner.step(
                &place.node,
                format!("trainvisor-{}-r{rank}-a{attempt}", inner.cx.job_id),
            );
            let (conf, alloc, cold_name) = (step.conf.clone(), step.alloc, step.name.clone());
            let cold = move |launch| {
                Box::pin(process::start_process(step.wrap(launch))) as LocalBoxFuture<'static, _>
            };
            let started =
                standby::start_rank(standbys, rank, attempt, &place.node, launch, cold).await;
            let (process, standby_name) = match started {
                Ok(p) => p,
                Err(e) => {
                    inner.state().placed.remove(&rank);
                    return Err(e);
                }
            };
            let name = standby_name.unwrap_or(cold_name);
            let control = Arc::new(StepControl {
                group: GroupControl { pgid: process.pid },
                conf,
                alloc,
                name,
                node: place.node.clone(),
                attempt,
                node_failed: AtomicBool::new(false),
            });
            inner.steps.insert(rank, attempt, control.clone());
            // srun says so on its output when the step's node failed (it may then exit 0).
            let (tx, lines) = line_channel();
            let mut from_srun = process.lines;
            let flag = control.clone();
            let forward = tokio::task::spawn_local(async move {
                while let Some(line) = from_srun.recv().await {
                    if super::is_node_failure_line(&line.text) {
                        flag.node_failed.store(true, Ordering::SeqCst);
                    }
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
            let inner_exit = process.exit;
            let step_control = control.clone();
            let exit = Box::pin(async move {
                let mut exit = inner_exit.await;
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, forward).await;
                if step_control.node_failed.load(Ordering::SeqCst) {
                    exit.cause = Some(ExitCause::NodeFailure(format!(
                        "its Slurm node {} failed",
                        step_control.node
                    )));
                }
                if inner.steps.remove(rank, attempt) {
                    inner.state().placed.remove(&rank);
                }
                exit
            });
            Ok(RankProcess {
                pid: process.pid,
                lines,
                exit,
                control,
                warm: process.warm,
            })
        })
    }

    /// Counts a failed incarnation against its node; excludes the node at the threshold (at
    /// once for a node failure).
    fn rank_failed(&self, rank: u32, outcome: Outcome, detail: &str) {
        let inner = &self.inner;
        let Some(threshold) = inner
            .cx
            .spec
            .slurm
            .as_ref()
            .map(|s| s.exclude_after_failures)
        else {
            return;
        };
        let (node, n) = {
            let mut st = inner.state();
            let Some(node) = st.rank_node.get(rank as usize).cloned().flatten() else {
                return;
            };
            let n = st.failures.entry(node.clone()).or_default();
            *n += 1;
            (node, *n)
        };
        if outcome == Outcome::NodeFailure {
            inner.exclude(&node, "node_failure", n, format!("rank {rank}: {detail}"));
        } else if threshold > 0 && n >= threshold {
            inner.exclude(
                &node,
                "repeated_failures",
                n,
                format!(
                    "{n} failures of this job's ranks on {node} (threshold {threshold}, exclude_after_failures); last: rank {rank}: {detail}"
                ),
            );
        }
    }

    fn rank_stepping(&self, rank: u32) {
        if let Some(s) = &self.standbys {
            s.stepping(rank);
        }
    }

    /// Nothing of the job stays on Slurm once it has ended: every Slurm job named after it,
    /// pending or running.
    fn release(&self) -> LocalBoxFuture<'static, ()> {
        if let Some(s) = &self.standbys {
            s.close();
        }
        {
            let mut st = self.inner.state();
            st.released = true;
            st.alloc = None;
        }
        let conf = self.inner.conf();
        let name = super::job_name(&self.inner.cx.job_id);
        Box::pin(async move {
            if let Err(e) = super::cancel_named(conf.as_deref(), &name).await {
                tracing::warn!(error = %e, "could not cancel the job's Slurm allocation");
            }
        })
    }

    /// Killing srun leaves the steps running: cancel the allocation too; the next server
    /// relaunches the job in a new one.
    fn kill_all(&self) -> LocalBoxFuture<'static, ()> {
        for (_, step) in self.inner.steps.all() {
            step.group.kill();
        }
        self.release()
    }

    fn status(&self) -> LauncherStatus {
        let st = self.inner.state();
        LauncherStatus {
            handle: st.alloc.as_ref().map(|a| a.job_id.to_string()),
            excluded_nodes: st.excluded.clone(),
            standbys: self
                .standbys
                .as_ref()
                .map(|s| s.status())
                .unwrap_or_default(),
        }
    }
}
