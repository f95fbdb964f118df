//! A Job's Slurm side: the allocation it owns, where each rank's step goes, node health, and
//! the bad-node quarantine (a node on which the job's ranks keep failing, or that Slurm
//! reports down, is excluded from the job's later launches).

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::{Job, Phase};
use crate::actors::worker::NodeDown;
use crate::launcher::slurm::{self, Allocation};
use crate::store::history::{HistoryOp, Outcome};
use crate::store::now;

/// How often the health of the allocation's nodes is checked (`sinfo`).
const POLL_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct SlurmState {
    pub alloc: Option<Allocation>,
    allocating: bool,
    /// Ranks waiting for an allocation before they can launch.
    waiting: Vec<u32>,
    pub excluded: Vec<String>,
    failures: HashMap<String, u32>,
    /// The node of each rank's latest incarnation.
    pub rank_node: Vec<Option<String>>,
    polling: bool,
    poller: bool,
}

impl SlurmState {
    pub fn new(world_size: u32, excluded: Vec<String>) -> Self {
        SlurmState {
            excluded,
            rank_node: vec![None; world_size as usize],
            ..Default::default()
        }
    }

    fn usable(&self) -> Vec<&slurm::Node> {
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
}

impl Job {
    fn conf(&self) -> Option<std::path::PathBuf> {
        self.rt.settings.slurm_conf.clone()
    }

    /// Whether ranks can be placed now; if not, `ranks` wait for a (new) allocation.
    pub(super) fn slurm_ready_or_wait(&mut self, ranks: &[u32], ctx: &mut Context<Job>) -> bool {
        if !self.slurm.usable().is_empty() {
            return true;
        }
        for &r in ranks {
            if !self.slurm.waiting.contains(&r) {
                self.slurm.waiting.push(r);
            }
        }
        self.allocate(ctx);
        false
    }

    /// Nodes for `ranks` (ascending): rank r goes to node r / ntasks_per_node of the
    /// allocation; a rank whose node is excluded goes to the least loaded usable node.
    pub(super) fn place(&mut self, ranks: &[u32]) -> Vec<(u32, String)> {
        let per = self
            .spec
            .slurm
            .as_ref()
            .map_or(1, |s| s.ntasks_per_node.max(1));
        let usable: Vec<String> = self.slurm.usable().iter().map(|n| n.name.clone()).collect();
        let all: Vec<String> = self
            .slurm
            .alloc
            .iter()
            .flat_map(|a| a.nodes.iter().map(|n| n.name.clone()))
            .collect();
        let mut load: HashMap<String, u32> = HashMap::new();
        for (r, node) in self.slurm.rank_node.iter().enumerate() {
            if let Some(node) = node
                && !ranks.contains(&(r as u32))
                && self.ranks[r].state.is_live()
            {
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
            self.slurm.rank_node[rank as usize] = Some(node.clone());
            out.push((rank, node));
        }
        out
    }

    /// MASTER_ADDR: the address of rank 0's node.
    pub(super) fn slurm_master_addr(&self) -> String {
        self.slurm.rank_node[0]
            .as_deref()
            .and_then(|n| self.slurm.addr_of(n))
            .or_else(|| self.slurm.usable().first().map(|n| n.addr.clone()))
            .unwrap_or_else(|| "127.0.0.1".to_string())
    }

    pub(super) fn step(&self, rank: u32, attempt: u32, node: String) -> slurm::Step {
        slurm::Step {
            conf: self.conf(),
            alloc: self.slurm.alloc.as_ref().map_or(0, |a| a.job_id),
            node,
            name: format!("trainvisor-{}-r{rank}-a{attempt}", self.id),
            srun_args: self
                .spec
                .slurm
                .as_ref()
                .map(|s| s.srun_args.clone())
                .unwrap_or_default(),
        }
    }

    /// Asks Slurm for an allocation (giving up the old one), then launches the waiting ranks.
    fn allocate(&mut self, ctx: &mut Context<Job>) {
        if self.slurm.allocating {
            return;
        }
        let Some(spec) = self.spec.slurm.clone() else {
            self.fail("launcher slurm without Slurm options".to_string(), ctx);
            return;
        };
        self.slurm.allocating = true;
        let old = self.slurm.alloc.take();
        let conf = self.conf();
        let name = slurm::job_name(&self.id);
        let comment = format!("trainvisor-instance={}", self.rt.instance);
        let exclude = self.slurm.excluded.clone();
        self.note(
            None,
            None,
            format!(
                "asking Slurm for {} node(s) × {} task(s){}",
                spec.nodes,
                spec.ntasks_per_node,
                if exclude.is_empty() {
                    String::new()
                } else {
                    format!(", excluding {}", exclude.join(","))
                }
            ),
        );
        ctx.spawn(
            async move {
                if let Some(old) = old {
                    slurm::cancel_job(conf.as_deref(), old.job_id).await;
                }
                slurm::allocate(conf.as_deref(), &name, &comment, &spec, &exclude).await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                act.slurm.allocating = false;
                if matches!(act.phase, Phase::Done | Phase::Stopping | Phase::Failing) {
                    // The job ended while it waited: the allocation (if any) is not wanted.
                    if let Ok(alloc) = res {
                        let conf = act.conf();
                        actix::spawn(async move {
                            slurm::cancel_job(conf.as_deref(), alloc.job_id).await
                        });
                    }
                    return;
                }
                match res {
                    Ok(alloc) => {
                        act.note(
                            None,
                            None,
                            format!(
                                "Slurm allocation {} on {}",
                                alloc.job_id,
                                alloc
                                    .nodes
                                    .iter()
                                    .map(|n| format!("{} ({})", n.name, n.addr))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                        act.slurm.alloc = Some(alloc);
                        act.start_node_poller(ctx);
                        let mut ranks = std::mem::take(&mut act.slurm.waiting);
                        ranks.sort_unstable();
                        ranks.retain(|&r| !act.ranks[r as usize].state.is_live());
                        if !ranks.is_empty() {
                            act.start_ranks(ranks, ctx);
                        }
                    }
                    Err(e) => {
                        act.slurm.waiting.clear();
                        act.fail(format!("no Slurm allocation: {e}"), ctx);
                    }
                }
            }),
        );
    }

    fn start_node_poller(&mut self, ctx: &mut Context<Job>) {
        if self.slurm.poller {
            return;
        }
        self.slurm.poller = true;
        ctx.run_interval(POLL_EVERY, |act, ctx| act.poll_nodes(ctx));
    }

    fn poll_nodes(&mut self, ctx: &mut Context<Job>) {
        if self.slurm.polling || self.phase == Phase::Done {
            return;
        }
        let nodes: Vec<String> = self.slurm.usable().iter().map(|n| n.name.clone()).collect();
        if nodes.is_empty() {
            return;
        }
        self.slurm.polling = true;
        let conf = self.conf();
        ctx.spawn(
            async move { slurm::bad_nodes(conf.as_deref(), &nodes).await }
                .into_actor(self)
                .map(|res, act, _| {
                    act.slurm.polling = false;
                    let bad = match res {
                        Ok(bad) => bad,
                        Err(e) => {
                            tracing::debug!(error = %e, "sinfo failed");
                            return;
                        }
                    };
                    if act.phase == Phase::Done {
                        return;
                    }
                    for (node, state) in bad {
                        let detail = format!("Slurm reports node {node} {state}");
                        let failures = act.slurm.failures.get(&node).copied().unwrap_or(0);
                        act.exclude(&node, "node_failure", failures, detail.clone());
                        for r in 0..act.spec.world_size {
                            let slot = &act.ranks[r as usize];
                            if slot.state.is_live()
                                && act.slurm.rank_node[r as usize].as_deref() == Some(&node)
                            {
                                act.workers[r as usize].do_send(NodeDown {
                                    attempt: slot.next_attempt.saturating_sub(1),
                                    detail: detail.clone(),
                                });
                            }
                        }
                    }
                }),
        );
    }

    /// Counts a failed incarnation against its node; excludes the node at the threshold (at
    /// once for a node failure). Runs before the restart decision, so relaunches avoid it.
    pub(super) fn count_node_failure(&mut self, rank: u32, outcome: Outcome, detail: &str) {
        let Some(threshold) = self.spec.slurm.as_ref().map(|s| s.exclude_after_failures) else {
            return;
        };
        if matches!(outcome, Outcome::Succeeded | Outcome::Stopped) {
            return;
        }
        let Some(node) = self.slurm.rank_node[rank as usize].clone() else {
            return;
        };
        let n = {
            let n = self.slurm.failures.entry(node.clone()).or_default();
            *n += 1;
            *n
        };
        if outcome == Outcome::NodeFailure {
            self.exclude(&node, "node_failure", n, format!("rank {rank}: {detail}"));
        } else if threshold > 0 && n >= threshold {
            self.exclude(
                &node,
                "repeated_failures",
                n,
                format!(
                    "{n} failures of this job's ranks on {node} (threshold {threshold}, exclude_after_failures); last: rank {rank}: {detail}"
                ),
            );
        }
    }

    fn exclude(&mut self, node: &str, reason: &'static str, failures: u32, detail: String) {
        if self.slurm.excluded.iter().any(|n| n == node) {
            return;
        }
        self.slurm.excluded.push(node.to_string());
        self.rt.recorder.record(HistoryOp::NodeExcluded {
            job_id: self.id,
            node: node.to_string(),
            excluded_at: now(),
            failures,
            reason,
            detail: detail.clone(),
        });
        self.note(
            None,
            None,
            format!("excluding node {node} from this job's launches ({reason}): {detail}"),
        );
        self.rt.recorder.event(
            "node_excluded",
            self.id,
            serde_json::json!({"node": node, "reason": reason, "detail": detail,
                               "excluded_nodes": self.slurm.excluded}),
        );
    }

    /// What ends the job's hold on Slurm: every Slurm job named after it, pending or running.
    pub(super) fn slurm_release(&mut self) -> Option<impl Future<Output = ()> + 'static> {
        self.spec.slurm.as_ref()?;
        self.slurm.alloc = None;
        let conf = self.conf();
        let name = slurm::job_name(&self.id);
        Some(async move {
            if let Err(e) = slurm::cancel_named(conf.as_deref(), &name).await {
                tracing::warn!(error = %e, "could not cancel the job's Slurm allocation");
            }
        })
    }

    /// Server shutdown: cancel the allocation now (blocking; scancel only sends a request).
    pub(super) fn slurm_release_blocking(&mut self) {
        if self.spec.slurm.is_none() {
            return;
        }
        let mut cmd = std::process::Command::new("scancel");
        cmd.arg(format!("--name={}", slurm::job_name(&self.id)));
        if let Some(conf) = self.conf() {
            cmd.env("SLURM_CONF", conf);
        }
        let _ = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
