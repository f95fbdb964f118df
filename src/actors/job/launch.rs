//! Launching a Job's ranks: which ranks, on which MASTER_PORT, with which argv and the
//! worker environment of DESIGN.md.

use actix::prelude::*;
use rand::Rng;

use super::{Job, Phase, RankState};
use crate::actors::hash_token;
use crate::actors::messages::LaunchRank;
use crate::domain::error_file;
use crate::domain::worker_env::{RankEnv, StacksEnv};
use crate::domain::{Outcome, RestartScope};
use crate::launcher::stacks;
use crate::launcher::{Launch, Place, Prepared};
use crate::store::history::HistoryOp;
use crate::store::now;

impl Job {
    pub(super) fn ranks_to_launch(&self) -> Vec<u32> {
        let all_restart = self.spec.restart_scope == RestartScope::Job;
        (0..self.spec.world_size)
            .filter(|&r| all_restart || !self.ranks[r as usize].state.is_succeeded())
            .collect()
    }

    /// Launches every rank that must run, on a fresh MASTER_PORT.
    pub(super) fn launch_group(&mut self, ranks: Vec<u32>, ctx: &mut Context<Job>) {
        self.master_port = free_port();
        self.allreduce.reset();
        self.start_ranks(ranks, ctx);
    }

    /// Launches the next incarnation of each of `ranks` (ascending) through the job's
    /// launcher, once it has places for them (on Slurm, an allocation may take a while).
    pub(super) fn start_ranks(&mut self, ranks: Vec<u32>, ctx: &mut Context<Job>) {
        ctx.spawn(
            self.launcher
                .prepare(ranks)
                .into_actor(self)
                .map(|res, act, ctx| {
                    if act.phase != Phase::Running {
                        // Stopped, failed or restarting as a group meanwhile: nothing to launch.
                        return;
                    }
                    match res {
                        Ok(prepared) => act.launch_prepared(prepared, ctx),
                        Err(e) => act.fail(e, ctx),
                    }
                }),
        );
    }

    fn launch_prepared(&mut self, prepared: Prepared, ctx: &mut Context<Job>) {
        let Prepared {
            master_addr,
            server_url,
            places,
        } = prepared;
        let server_url = server_url.unwrap_or_else(|| self.rt.base_url.clone());
        for (rank, place) in places {
            // A rank that came back to life meanwhile keeps its incarnation.
            if !self.ranks[rank as usize].state.is_live() {
                self.launch(rank, place, &master_addr, &server_url, ctx);
            }
        }
    }

    /// Launches the next incarnation of `rank`. Its row (attempt, MASTER_PORT, token digest)
    /// is committed before the process is spawned, so a server that dies at any instant comes
    /// back knowing every attempt that may have run.
    fn launch(
        &mut self,
        rank: u32,
        place: Place,
        master_addr: &str,
        server_url: &str,
        ctx: &mut Context<Job>,
    ) {
        let token = new_token();
        let slot = &mut self.ranks[rank as usize];
        let attempt = slot.next_attempt;
        slot.next_attempt += 1;
        let token_hash = hash_token(&token);
        self.tokens.issue(rank, attempt, token_hash.clone());
        slot.state = RankState::starting();
        slot.progress.pid = None;
        slot.progress.attempt = attempt;
        let node = place.node.clone();
        self.ranks[rank as usize].progress.node = Some(node.clone());
        let launch = Launch {
            argv: self.argv(),
            env: self.env(rank, &place, attempt, &token, master_addr, server_url),
            cwd: self.spec.working_dir.clone(),
        };
        let recorded = self
            .rt
            .recorder
            .record_acked(HistoryOp::IncarnationStarted {
                job_id: self.id,
                rank,
                attempt,
                pid: None,
                master_port: self.master_port,
                token_hash,
                started_at: now(),
                node: Some(node),
            });
        ctx.spawn(
            async move {
                let _ = recorded.await;
            }
            .into_actor(self)
            .map(move |_, act, ctx| {
                let slot = &mut act.ranks[rank as usize];
                if slot.next_attempt != attempt + 1 {
                    return;
                }
                match slot.state {
                    RankState::Starting { .. } => act.workers[rank as usize].do_send(LaunchRank {
                        attempt,
                        launch,
                        place,
                    }),
                    // Stopped (or the group failed) before the process existed.
                    RankState::Stopping { .. } => {
                        slot.state = RankState::stopped();
                        act.rt.recorder.record(HistoryOp::IncarnationEnded {
                            job_id: act.id,
                            rank,
                            attempt,
                            ended_at: now(),
                            exit_code: None,
                            signal: None,
                            outcome: Outcome::Stopped,
                        });
                        act.after_rank_down(ctx);
                    }
                    _ => {}
                }
            }),
        );
    }

    fn argv(&self) -> Vec<String> {
        match &self.spec.command {
            Some(argv) => argv.clone(),
            None => vec![
                self.rt.settings.trainer_exe.to_string_lossy().into_owned(),
                "worker".to_string(),
            ],
        }
    }

    /// The worker contract of DESIGN.md (`domain::worker_env`): torchrun's names plus
    /// trainvisor's own.
    fn env(
        &self,
        rank: u32,
        place: &Place,
        attempt: u32,
        token: &str,
        master_addr: &str,
        server_url: &str,
    ) -> Vec<(String, String)> {
        let cache_dir = self.rt.settings.data_dir.join("cache");
        // torchrun's error file: where `@record` writes the exception a rank died of, fresh
        // for every incarnation.
        let error_file = error_file::path(&self.rt.settings.data_dir, self.id, rank, attempt);
        if let Some(dir) = error_file.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot make the error-file dir");
        }
        // Ranks on this host: the Python stacks hook (first on PYTHONPATH) and its output file.
        let stacks_file = stacks::path(&self.rt.settings.data_dir, self.id, rank, attempt);
        let hooks_dir = place
            .host_local
            .then(|| stacks::hooks_dir(&self.rt.settings.data_dir));
        let inherited = std::env::var("PYTHONPATH").ok();
        let stacks_file = stacks_file.to_string_lossy();
        let hooks = hooks_dir.as_ref().map(|d| d.to_string_lossy());
        RankEnv {
            job_id: self.id,
            spec: &self.spec,
            rank,
            placement: place.placement,
            attempt,
            token,
            master_addr,
            master_port: self.master_port,
            server_url,
            instance: &self.rt.instance,
            cache_dir: &cache_dir.to_string_lossy(),
            error_file: &error_file.to_string_lossy(),
            s3: &self.rt.settings.s3.worker_env(),
            stacks: hooks.as_deref().map(|hooks_dir| StacksEnv {
                file: &stacks_file,
                hooks_dir,
                inherited_pythonpath: inherited.as_deref(),
            }),
            resume_step: self
                .ranks
                .iter()
                .filter_map(|r| r.progress.saved_step)
                .max(),
        }
        .build()
    }
}

fn new_token() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP port free right now on loopback, for MASTER_PORT.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29500)
}
