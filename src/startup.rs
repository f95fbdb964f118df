//! Builds the application: data dir, database, recorder, actors, HTTP server. Tests and the
//! binary run exactly this; binding port 0 works and `port()` tells which port was chosen.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use actix::{Actor, Addr};
use actix_web::dev::Server;
use actix_web::middleware::ErrorHandlers;
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;

use crate::actors::messages::{Restore, Shutdown};
use crate::actors::{JobManager, Registry, Runtime};
use crate::api::{self, ApiError, AppState};
use crate::bus::{EventBus, LogBus};
use crate::config::Settings;
use crate::store::{self, Recorder};

pub struct Application {
    addr: SocketAddr,
    /// The address the listener is bound to (`0.0.0.0:8000` on every address).
    bound: SocketAddr,
    server: Server,
    manager: Addr<JobManager>,
    _lock: std::fs::File,
}

impl Application {
    /// Must be called inside an actix System (`#[actix_web::main]`, `#[actix_web::test]`).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let data_dir = settings.data_dir.clone();
        prepare_data_dir(&data_dir)?;
        let lock = lock_data_dir(&data_dir)?;
        let instance = instance_id(&data_dir)?;
        let swept = crate::launcher::sweep(&instance).await;
        if swept > 0 {
            tracing::warn!(swept, "killed worker processes left by a previous server");
        }
        let pool = store::open(&data_dir)
            .await
            .context("opening the database")?;
        let bus = Arc::new(LogBus::default());
        let events = Arc::new(EventBus::default());
        let metrics = crate::metrics::Metrics::new();
        let recorder = Recorder::start(
            pool.clone(),
            data_dir.clone(),
            bus.clone(),
            events.clone(),
            settings.max_log_lines_per_job,
            metrics.clone(),
        )
        .await?;

        let listener = TcpListener::bind(&settings.bind).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another server is on that port: pick another with --bind HOST:PORT or \
                 TRAINVISOR_BIND, and point the CLI at it with TRAINVISOR_SERVER)"
            } else {
                ""
            };
            anyhow::anyhow!("binding {}: {e}{hint}", settings.bind)
        })?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && settings.api_token.is_none() {
            anyhow::bail!(
                "refusing to listen on {addr} without an API token: POST /jobs runs commands. \
                 Set --api-token (TRAINVISOR_API_TOKEN) or bind a loopback address"
            );
        }
        if !addr.ip().is_loopback()
            && let Some(token) = &settings.api_token
            && let Some(why) = crate::api_token::weakness(token)
        {
            anyhow::bail!(
                "refusing to listen on {addr} with a weak API token: {why}. On an address other \
                 than loopback a token must have at least {} characters, {} of them different, \
                 and no spaces (e.g. `openssl rand -hex 32`)",
                crate::api_token::MIN_PUBLIC_CHARS,
                crate::api_token::MIN_DISTINCT_CHARS
            );
        }
        let reachable = if addr.ip().is_unspecified() {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        let base_url = settings
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{reachable}"));
        let max_body = settings.max_body_bytes;
        let http_workers = settings.http_workers;
        recorder
            .health()
            .watch_disk(data_dir.clone(), settings.low_disk_bytes);
        let open_files = raise_open_file_limit();
        let max_connections = settings
            .max_connections
            .unwrap_or_else(|| connection_cap(open_files));
        tracing::debug!(open_files, max_connections, "connection limit");
        let http = crate::pressure::HttpPressure::new(max_connections);
        let rt = Arc::new(Runtime {
            pool,
            recorder,
            bus,
            events,
            settings,
            instance,
            base_url,
            registry: Registry::default(),
            metrics,
            sse_streams: Default::default(),
            http: http.clone(),
        });
        let manager = JobManager::new(rt.clone()).start();
        let resumed = manager.send(Restore).await??;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished jobs");
        }
        let state = web::Data::new(AppState {
            rt,
            manager: manager.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(max_body))
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    ApiError::BadRequest(format!("invalid query string: {e}")).into()
                }))
                .app_data(
                    web::PathConfig::default().error_handler(|e, _| {
                        ApiError::NotFound(format!("invalid path: {e}")).into()
                    }),
                )
                .wrap(actix_web::middleware::from_fn(api::auth::require_token))
                .wrap(ErrorHandlers::new().default_handler(api::error::json_errors))
                .wrap(actix_web::middleware::from_fn(api::metrics::count_request))
                .configure(api::routes)
                .default_service(web::to(|| async {
                    Err::<actix_web::HttpResponse, _>(ApiError::NotFound("no such route".into()))
                }))
        })
        // Every connection is counted while open, so a saturated listener is known (and
        // ranks are not declared hung for heartbeats it could not accept).
        .on_connect(move |_, ext| {
            ext.insert(Rc::new(http.connected()));
        })
        .workers(http_workers)
        // The cap is per HTTP worker; past it the listener stops accepting (the kernel's
        // backlog holds new connections) instead of running out of descriptors.
        .max_connections(max_connections.div_ceil(http_workers).max(1))
        // The idle limits: headers must arrive within 5 s, and an idle kept-alive connection
        // is closed after 75 s (longer than most clients' idle pools, so a reused connection
        // is rarely one the server is closing at that very moment). The body has its own
        // deadline (`api::body`).
        .client_request_timeout(std::time::Duration::from_secs(5))
        .keep_alive(std::time::Duration::from_secs(75))
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)?
        .run();
        tracing::info!(%addr, data_dir = %data_dir.display(), "trainvisor listening");
        Ok(Application {
            addr: reachable,
            bound: addr,
            server,
            manager,
            _lock: lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the server listens on, as bound: an unspecified one (`0.0.0.0`) means
    /// every address of the host (or container).
    pub fn bound_addr(&self) -> SocketAddr {
        self.bound
    }

    /// The address clients on this machine reach the server at.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the server is stopped (tests drop the runtime instead).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }

    /// Serves until SIGINT or SIGTERM, then kills the worker groups and flushes the history.
    /// Jobs stay `running` in the database and resume on the next start.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let server = self.server;
        tokio::pin!(server);
        tokio::select! {
            res = &mut server => return Ok(res?),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        let _ = self.manager.send(Shutdown).await;
        // The server future processes the stop command, so keep polling it.
        actix_web::rt::spawn(handle.stop(true));
        server.await?;
        Ok(())
    }
}

/// Descriptors kept out of reach of HTTP connections, for ranks (pipes, pidfds), SQLite and
/// the checkpoint files, so a flood of connections never fails a job.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-file limit to the hard one (the default soft limit of 1024 is what a
/// flood of connections exhausts first) and returns the limit now in force.
fn raise_open_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur as u64
    }
}

/// Concurrent connections for an open-file limit: the limit less a reserve (256, or a
/// quarter of a small limit), never fewer than 16.
pub fn connection_cap(open_files: u64) -> usize {
    let reserve = FD_RESERVE.min(open_files / 4);
    open_files.saturating_sub(reserve).clamp(16, 1 << 20) as usize
}

/// Creates the data dir and proves this process can write in it, or fails with one line that
/// says who cannot write where (in a container, the usual cause is a host directory mounted
/// on /data that the image's non-root user does not own).
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::File::create(&probe)?;
        std::fs::remove_file(&probe)
    });
    result.map_err(|e| {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        anyhow::anyhow!(
            "data dir {} is not writable by uid {uid} gid {gid} ({e}): give that user a \
             directory it can write (in a container: a named volume, e.g. -v tv-data:/data, or \
             a host directory it owns), or choose another with --data-dir",
            dir.display()
        )
    })
}

/// One server per data dir: a second one would fight over the database and the workers.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("trainvisor.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!(
            "data dir {} is in use by another trainvisor server",
            dir.display()
        );
    }
    Ok(file)
}

/// A random id kept in the data dir, keyed to its file's inode (`launcher::siblings`); it marks
/// every worker this data dir's servers start, and no copy of the data dir has the same.
fn instance_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(crate::launcher::siblings::instance(id, &path));
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = dir.join("instance-id.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(crate::launcher::siblings::instance(&id, &path))
}
