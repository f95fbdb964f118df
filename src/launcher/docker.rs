//! The Docker launcher: each rank is a container of the job's image, as Determined runs its
//! trials, driven through the Docker Engine API over its Unix socket (`bollard`).
//!
//! - One user-defined network per job, `trainvisor-<job id>`. Rank r's container carries the
//!   alias `rank-r` on it, and `MASTER_ADDR` is `rank-0`, the address of rank 0's container.
//! - A container reaches the server through its network's gateway (the host), so the server
//!   must listen on an address other than loopback (`--bind 0.0.0.0:PORT`, which needs an API
//!   token) or be given `--advertise-url`; a job is refused at the door otherwise.
//! - Local `dataset` and `checkpoint_dir` are bind-mounted at the same paths, so the worker
//!   contract's paths hold inside the container; the built-in trainer is this binary, mounted
//!   read-only at its own path. The incarnation's own error-file directory is bound too, so
//!   the root cause it writes is read back (`binds::incarnation_bind`), and the Python hook's
//!   directory, read-only, so a hung rank's stacks are taken in its container. What a
//!   container may mount and as whom it runs (not root, no capabilities): `binds.rs`.
//! - `docker-init` is the container's PID 1: it forwards SIGTERM to the rank and reaps what
//!   the rank leaves behind.
//! - Every container and network carries the labels `trainvisor.instance` (the data dir's id)
//!   and `trainvisor.job`: the next server on the same data dir removes what a crashed
//!   predecessor left, and nothing of anyone else's.
//! - The end of a container is seen through its PID 1's pidfd on this host (milliseconds);
//!   the exit code comes from the engine's wait, the OOM killer is read from the container's
//!   state and is its own restart reason (`oom_killed`). Removal takes the container's
//!   anonymous volumes with it, and ranks never run the image's `HEALTHCHECK`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;
use futures_util::future::LocalBoxFuture;

pub mod binds;
mod engine;
pub mod spec;

pub use engine::{admit, sweep};
use engine::{gpu_request, remove_labelled, server_url};

use super::{
    JobContext, JobLauncher, Launch, Line, LineAssembler, LiveRanks, MAX_LINE_BYTES, Place,
    Prepared, RankControl, RankProcess,
};
use crate::domain::worker_env::Placement;
use crate::domain::{Exit, ExitCause};
use crate::spec::DockerSpec;

const LABEL_INSTANCE: &str = "trainvisor.instance";
const LABEL_JOB: &str = "trainvisor.job";
/// How often, and how many times, a removal the engine has not finished is checked again
/// (30 s in all: removing a container on a loaded machine can take seconds).
const REMOVE_POLL: Duration = Duration::from_millis(100);
const REMOVE_POLLS: u32 = 300;
/// How long a container's last lines may take after it exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct DockerLauncher {
    inner: Arc<Inner>,
}

struct Inner {
    cx: JobContext,
    docker: tokio::sync::OnceCell<Docker>,
    /// Held while the job's network is made, so ranks that start together share one.
    network: tokio::sync::Mutex<Option<Network>>,
    live: Arc<LiveRanks>,
    /// Containers of the job that exist now, by name.
    containers: Mutex<HashMap<String, u32>>,
    released: AtomicBool,
}

#[derive(Clone)]
struct Network {
    name: String,
    /// The server's URL as the job's containers reach it.
    server_url: String,
}

impl DockerLauncher {
    pub fn new(cx: JobContext) -> Self {
        DockerLauncher {
            inner: Arc::new(Inner {
                cx,
                docker: tokio::sync::OnceCell::new(),
                network: tokio::sync::Mutex::new(None),
                live: Arc::default(),
                containers: Mutex::new(HashMap::new()),
                released: AtomicBool::new(false),
            }),
        }
    }
}

/// A client of the engine named by `DOCKER_HOST` (the local Unix socket by default), speaking
/// the newest API version both sides know.
pub async fn connect() -> Result<Docker, String> {
    let docker = Docker::connect_with_defaults()
        .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| format!("cannot reach the Docker engine: {e}"))
}

fn job_network(job_id: &uuid::Uuid) -> String {
    format!("trainvisor-{job_id}")
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl Inner {
    fn spec(&self) -> Result<&DockerSpec, String> {
        self.cx
            .spec
            .docker
            .as_ref()
            .ok_or_else(|| "launcher docker without an image".to_string())
    }

    async fn docker(&self) -> Result<Docker, String> {
        self.docker.get_or_try_init(connect).await.cloned()
    }

    /// The job's network, made on first use.
    async fn network(&self) -> Result<Network, String> {
        let mut held = self.network.lock().await;
        if let Some(net) = held.as_ref() {
            return Ok(net.clone());
        }
        let docker = self.docker().await?;
        let name = job_network(&self.cx.job_id);
        let labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), self.cx.instance.clone()),
            (LABEL_JOB.to_string(), self.cx.job_id.to_string()),
        ]);
        let created = docker
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".to_string()),
                labels: Some(labels),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => {}
            // Made by an earlier incarnation of this job on this server: reuse it.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {}
            Err(e) => return Err(format!("creating network {name}: {e}")),
        }
        let inspect = docker
            .inspect_network(&name, None)
            .await
            .map_err(|e| format!("inspecting network {name}: {e}"))?;
        let gateway = inspect
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .ok_or_else(|| format!("network {name} has no gateway"))?;
        let server_url = server_url(&self.cx.settings, &self.cx.base_url, &gateway)?;
        let net = Network { name, server_url };
        *held = Some(net.clone());
        Ok(net)
    }

    fn container_body(
        &self,
        rank: u32,
        attempt: u32,
        launch: Launch,
        network: &str,
    ) -> Result<ContainerCreateBody, String> {
        let spec = self.spec()?;
        let job = &self.cx.spec;
        // Resolved and checked again at every launch: a rank may have swapped a path for a
        // symlink since the job was admitted.
        let mut binds = binds::binds(job, &self.cx.job_id, &self.cx.settings)?;
        let (uid, gid) = binds::rank_user(&self.cx.settings);
        binds.extend(binds::hooks_bind(&launch.env, &self.cx.settings));
        binds.extend(binds::incarnation_bind(
            &launch.env,
            &self.cx.settings,
            (uid, gid),
        ));
        let labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), self.cx.instance.clone()),
            (LABEL_JOB.to_string(), self.cx.job_id.to_string()),
            ("trainvisor.rank".to_string(), rank.to_string()),
            ("trainvisor.attempt".to_string(), attempt.to_string()),
        ]);
        let alias = format!("rank-{rank}");
        Ok(ContainerCreateBody {
            image: Some(spec.image.clone()),
            working_dir: launch.cwd,
            cmd: Some(launch.argv),
            // An image's ENTRYPOINT would wrap the command; the command is the whole argv.
            entrypoint: Some(Vec::new()),
            env: Some(
                launch
                    .env
                    .into_iter()
                    .filter(|(k, _)| k != "TRAINVISOR_API_TOKEN")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            hostname: Some(alias.clone()),
            // The image's HEALTHCHECK is the server's (the project's own image has one), not
            // a rank's: the heartbeat is the rank's health, and a probe would run in its
            // cgroup, under its limits.
            healthcheck: Some(HealthConfig {
                test: Some(vec!["NONE".to_string()]),
                ..Default::default()
            }),
            user: Some(format!("{uid}:{gid}")),
            labels: Some(labels),
            host_config: Some(HostConfig {
                binds: Some(binds),
                network_mode: Some(network.to_string()),
                init: Some(true),
                nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
                memory: spec.memory_mb.map(|m| (m * 1024 * 1024) as i64),
                // Swap as large as memory means none: the limit is the limit.
                memory_swap: spec.memory_mb.map(|m| (m * 1024 * 1024) as i64),
                device_requests: spec.gpus.as_deref().map(gpu_request),
                // A token may start any image and command: the rank gets no way up from it.
                privileged: Some(false),
                cap_drop: Some(vec!["ALL".to_string()]),
                security_opt: Some(vec!["no-new-privileges:true".to_string()]),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.to_string(),
                    EndpointSettings {
                        aliases: Some(vec![alias]),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        })
    }

    /// Creates, starts and follows the container of incarnation `attempt` of `rank`.
    async fn start(
        self: Arc<Self>,
        rank: u32,
        attempt: u32,
        launch: Launch,
    ) -> Result<RankProcess, String> {
        if self.released.load(Ordering::SeqCst) {
            return Err("the job has ended".to_string());
        }
        let docker = self.docker().await?;
        let network = self.network().await?;
        let name = format!("trainvisor-{}-r{rank}-a{attempt}", self.cx.job_id);
        // A bind source that does not exist would be made by the engine, as root.
        if !self.cx.spec.checkpoint_dir.contains("://") {
            binds::prepare_checkpoint_dir(
                &self.cx.spec.job_checkpoint_dir(&self.cx.job_id),
                binds::rank_user(&self.cx.settings),
            )?;
        }
        let body = self.container_body(rank, attempt, launch, &network.name)?;
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| format!("creating container {name}: {e}"))?;
        self.containers.lock().unwrap().insert(name.clone(), rank);
        if let Err(e) = docker.start_container(&name, None).await {
            self.remove(&docker, &name).await;
            return Err(format!("starting container {name}: {e}"));
        }
        let pid = docker
            .inspect_container(&name, None)
            .await
            .ok()
            .and_then(|c| c.state?.pid)
            .unwrap_or(0)
            .max(0) as u32;
        let (tx, lines) = super::line_channel();
        let mut logs = docker.logs(
            &name,
            Some(
                LogsOptionsBuilder::new()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        let forward = tokio::task::spawn_local(async move {
            let mut out = LineAssembler::new(MAX_LINE_BYTES);
            let mut err = LineAssembler::new(MAX_LINE_BYTES);
            while let Some(Ok(chunk)) = logs.next().await {
                let (stream, assembler, bytes) = match chunk {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        ("stdout", &mut out, message)
                    }
                    LogOutput::StdErr { message } => ("stderr", &mut err, message),
                    LogOutput::StdIn { .. } => continue,
                };
                for text in assembler.feed(&bytes) {
                    if tx.send(Line { stream, text }).await.is_err() {
                        return;
                    }
                }
            }
            for (stream, assembler) in [("stdout", &mut out), ("stderr", &mut err)] {
                if let Some(text) = assembler.finish() {
                    let _ = tx.send(Line { stream, text }).await;
                }
            }
        });
        let control = Arc::new(ContainerControl {
            docker: docker.clone(),
            name: name.clone(),
            init_pid: pid,
        });
        self.live.insert(rank, attempt, control.clone());
        // The container's PID 1 is a process of this host: its pidfd is readable the instant
        // it ends, where the engine reports the end a few hundred ms later (containerd's event,
        // then dockerd's). The engine stays the authority on the exit code and the OOM killer.
        let seen = super::process::watch_pid(pid);
        let inner = self.clone();
        let exit = Box::pin(async move {
            let exit = wait_seen(&docker, &name, seen).await;
            if let (Some(seen_at), Some(code @ 1..)) =
                (exit.seen_at, exit.code.or(exit.signal.map(|s| 128 + s)))
            {
                inner.cx.note(format!(
                    "rank {rank}: container {name} ended, seen through its host pid {pid} {} ms \
                     before the engine reported exit code {code}",
                    seen_at.elapsed().as_millis()
                ));
            }
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, forward).await;
            inner.live.remove(rank, attempt);
            // Removing a container takes the engine a while (~0.2 s here): off the path from
            // the exit to the restart decision. `release` waits for what is still there.
            tokio::task::spawn_local(async move { inner.remove(&docker, &name).await });
            exit
        });
        Ok(RankProcess {
            pid,
            lines,
            exit,
            control,
            warm: false,
        })
    }

    /// Removes a container with its anonymous volumes (an image's `VOLUME`s) and waits until
    /// it is gone (another removal of it may be under way: the engine answers 409 to the
    /// second one).
    async fn remove(&self, docker: &Docker, name: &str) {
        let options = remove_options();
        for _ in 0..REMOVE_POLLS {
            match docker.remove_container(name, Some(options.clone())).await {
                Err(e) if !not_found(&e) => {
                    tracing::debug!(container = name, error = %e, "container not removed yet");
                    tokio::time::sleep(REMOVE_POLL).await;
                }
                _ => break,
            }
        }
        self.containers.lock().unwrap().remove(name);
    }

    /// Removes every container of the job, then its network.
    async fn remove_all(&self) {
        let Ok(docker) = self.docker().await else {
            return;
        };
        let names: Vec<String> = self.containers.lock().unwrap().keys().cloned().collect();
        for name in names {
            self.remove(&docker, &name).await;
        }
        let filter = format!("{LABEL_JOB}={}", self.cx.job_id);
        remove_labelled(&docker, &filter).await;
    }
}

/// `docker rm -f -v`: an image that declares a `VOLUME` (the project's own does) gets an
/// anonymous volume with every container, which would outlive it otherwise.
fn remove_options() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build()
}

/// [`wait`], with the instant `seen` (the container's host pid ended) resolved first, if it
/// did.
async fn wait_seen(
    docker: &Docker,
    name: &str,
    seen: Option<impl std::future::Future<Output = ()>>,
) -> Exit {
    let engine = wait(docker, name);
    let Some(seen) = seen else {
        return engine.await;
    };
    tokio::pin!(engine, seen);
    tokio::select! {
        biased;
        exit = &mut engine => exit,
        () = &mut seen => {
            let seen_at = std::time::Instant::now();
            Exit {
                seen_at: Some(seen_at),
                ..engine.await
            }
        }
    }
}

/// Waits for a container to stop; its exit code (a signal for 128 + n), and whether the OOM
/// killer ended it.
async fn wait(docker: &Docker, name: &str) -> Exit {
    let options = WaitContainerOptionsBuilder::new()
        .condition("not-running")
        .build();
    let code = match docker.wait_container(name, Some(options)).next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => {
            return Exit {
                cause: Some(ExitCause::Unobserved(e.to_string())),
                ..Exit::default()
            };
        }
        None => {
            return Exit {
                cause: Some(ExitCause::Unobserved("the engine ended the wait".into())),
                ..Exit::default()
            };
        }
    };
    let oom = docker
        .inspect_container(name, None)
        .await
        .ok()
        .and_then(|c| c.state?.oom_killed)
        .unwrap_or(false);
    let (code, signal) = match code {
        c if (129..=128 + 64).contains(&c) => (None, Some((c - 128) as i32)),
        c => (Some(c as i32), None),
    };
    Exit {
        code,
        signal,
        cause: oom.then_some(ExitCause::OomKilled),
        ..Exit::default()
    }
}

/// A rank's container: signals go to its PID 1 (docker-init), which passes them on.
struct ContainerControl {
    docker: Docker,
    name: String,
    /// docker-init's pid on this host.
    init_pid: u32,
}

/// The process group of the rank under docker-init (`init`'s first child, which docker-init
/// puts in a group of its own), as this host numbers it.
fn rank_group(init: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
    let child: u32 = children.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
    // pid (comm) state ppid pgrp …: comm may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

impl ContainerControl {
    fn signal(&self, signal: &'static str) {
        let (docker, name) = (self.docker.clone(), self.name.clone());
        tokio::task::spawn_local(async move {
            let options = KillContainerOptionsBuilder::new().signal(signal).build();
            // A container that has already stopped answers 409: nothing to do.
            let _ = docker.kill_container(&name, Some(options)).await;
        });
    }
}

impl RankControl for ContainerControl {
    fn terminate(&self) {
        self.signal("SIGTERM");
    }

    fn kill(&self) {
        self.signal("SIGKILL");
    }

    fn host_group(&self) -> Option<u32> {
        rank_group(self.init_pid)
    }
}

impl JobLauncher for DockerLauncher {
    fn prepare(&self, ranks: Vec<u32>) -> LocalBoxFuture<'static, Result<Prepared, String>> {
        let inner = self.inner.clone();
        let world = inner.cx.spec.world_size;
        Box::pin(async move {
            let network = inner.network().await?;
            Ok(Prepared {
                master_addr: "rank-0".to_string(),
                server_url: Some(network.server_url),
                places: ranks
                    .into_iter()
                    .map(|r| {
                        let place = Place {
                            node: format!("rank-{r}"),
                            // One container a rank, but torchrun's view of one node, as before.
                            placement: Placement::in_groups_of(r, world, world),
                            // Its processes are this host's too (one kernel): the stacks hook
                            // is mounted into the container and its stacks are taken from here.
                            host_local: true,
                        };
                        (r, place)
                    })
                    .collect(),
            })
        })
    }

    fn start(
        &self,
        rank: u32,
        attempt: u32,
        _place: Place,
        launch: Launch,
    ) -> LocalBoxFuture<'static, io::Result<RankProcess>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner
                .start(rank, attempt, launch)
                .await
                .map_err(io::Error::other)
        })
    }

    fn release(&self) -> LocalBoxFuture<'static, ()> {
        self.inner.released.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        Box::pin(async move { inner.remove_all().await })
    }

    fn kill_all(&self) -> LocalBoxFuture<'static, ()> {
        self.release()
    }
}
