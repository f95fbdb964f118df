//! What a Docker job's containers may see of the host, and as whom they run. An API token can
//! ask for any mount, so every bind source is resolved (symlinks included) and checked each
//! time a container is made: never `/`, `/proc`, `/sys`, `/dev`, the Docker socket or a
//! directory holding it, nor the server's data dir or what holds it (its database and token);
//! inside `--allowed-root` when roots are set. Ranks run as a non-root user unless the server
//! is told otherwise (`--docker-user`), with no capabilities and `no-new-privileges`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::Settings;
use crate::spec::{JobSpec, parse_mount};

/// The user ranks run as when the server runs as root and is not told otherwise: `nobody`.
pub const DEFAULT_ROOTLESS_USER: (u32, u32) = (65534, 65534);

/// Paths no container may mount, nor any directory above them.
const NEVER: [&str; 4] = ["/proc", "/sys", "/dev", "/boot"];

/// The uid and gid of every rank's container.
pub fn rank_user(settings: &Settings) -> (u32, u32) {
    if let Some(user) = settings.docker_user {
        return user;
    }
    // SAFETY: plain syscalls without arguments.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        DEFAULT_ROOTLESS_USER
    } else {
        (uid, gid)
    }
}

/// Parses `UID:GID` (numbers), as `--docker-user` takes it.
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected UID:GID, e.g. 1000:1000"))?;
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{s:?}: UID and GID must be numbers"))
    };
    Ok((num(u)?, num(g)?))
}

/// The Docker sockets of this host (the default paths and `DOCKER_HOST`), resolved.
fn docker_sockets() -> Vec<PathBuf> {
    let mut paths = vec![
        PathBuf::from("/var/run/docker.sock"),
        PathBuf::from("/run/docker.sock"),
    ];
    if let Ok(host) = std::env::var("DOCKER_HOST")
        && let Some(p) = host.strip_prefix("unix://")
    {
        paths.push(PathBuf::from(p));
    }
    let mut resolved: Vec<PathBuf> = paths
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    resolved.extend(paths);
    resolved
}

/// Resolves `raw` (a bind source, a dataset or checkpoint dir) and checks that a container may
/// mount it. Returns the resolved path, which is what gets mounted.
pub fn host_path(what: &str, raw: &str, settings: &Settings) -> Result<PathBuf, String> {
    let path =
        std::fs::canonicalize(raw).map_err(|e| format!("{what}: {raw} cannot be mounted: {e}"))?;
    let refuse = |why: &str| {
        Err(format!(
            "{what}: {raw} cannot be mounted into a rank: {why}"
        ))
    };
    if path == Path::new("/") {
        return refuse("it is the host's root");
    }
    if NEVER.iter().any(|n| path.starts_with(n)) {
        return refuse("/proc, /sys, /dev and /boot are never mounted");
    }
    let meta = std::fs::metadata(&path).map_err(|e| format!("{what}: {raw}: {e}"))?;
    if meta.file_type().is_socket()
        || meta.file_type().is_block_device()
        || meta.file_type().is_char_device()
    {
        return refuse("sockets and devices are never mounted");
    }
    if docker_sockets().iter().any(|s| s.starts_with(&path)) {
        return refuse("it is or holds the Docker socket, which would give the rank the host");
    }
    let data_dir =
        std::fs::canonicalize(&settings.data_dir).unwrap_or_else(|_| settings.data_dir.clone());
    if data_dir.starts_with(&path) {
        return refuse("it is or holds the server's data dir (its database and API token)");
    }
    if path.parent() == Some(data_dir.as_path()) && !meta.is_dir() {
        return refuse("the server's own files are never mounted");
    }
    if !settings.allowed_roots.is_empty()
        && !settings.allowed_roots.iter().any(|r| {
            let r = std::fs::canonicalize(r).unwrap_or_else(|_| r.clone());
            path.starts_with(r)
        })
    {
        return refuse("it is not inside an --allowed-root");
    }
    Ok(path)
}

/// Every bind of a rank's container: the job's dataset (read-only) and its own checkpoint
/// directory, the built-in trainer when there is no command, then the job's `mounts`, each
/// resolved and checked by [`host_path`]. Mounted at the paths the job named, so the worker
/// contract's paths hold inside the container.
pub fn binds(
    spec: &JobSpec,
    job_id: &uuid::Uuid,
    settings: &Settings,
) -> Result<Vec<String>, String> {
    let mut binds = Vec::new();
    // A dataset that is not there (the demo one, when no job has made it yet) is not mounted:
    // the engine would make an empty directory of that name on the host, as root.
    if !spec.dataset.contains("://") && Path::new(&spec.dataset).exists() {
        let source = host_path("dataset", &spec.dataset, settings)?;
        binds.push(format!("{}:{}:ro", source.display(), spec.dataset));
    }
    if !spec.checkpoint_dir.contains("://") {
        let mine = spec.job_checkpoint_dir(job_id);
        let source = host_path("checkpoint_dir", &mine, settings)?;
        binds.push(format!("{}:{mine}", source.display()));
    }
    if spec.command.is_none() {
        let exe = settings.trainer_exe.to_string_lossy().into_owned();
        binds.push(format!("{exe}:{exe}:ro"));
    }
    if let Some(d) = &spec.docker {
        for m in &d.mounts {
            let (source, target, ro) =
                parse_mount(m).map_err(|why| format!("mounts: {m:?}: {why}"))?;
            let source = host_path("mounts", source, settings)?;
            let mode = if ro { ":ro" } else { "" };
            binds.push(format!("{}:{target}{mode}", source.display()));
        }
    }
    Ok(binds)
}

/// Makes the job's checkpoint directory, owned by the ranks' user when the server made it
/// (a directory that was there already keeps its owner: the server never hands over a path it
/// did not create).
pub fn prepare_checkpoint_dir(dir: &str, user: (u32, u32)) -> Result<(), String> {
    let path = Path::new(dir);
    let existed = path.exists();
    std::fs::create_dir_all(path).map_err(|e| format!("creating checkpoint_dir {dir}: {e}"))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("checkpoint_dir {dir}: {e}"))?;
    if !existed && meta.is_dir() && (meta.uid(), meta.gid()) != user {
        std::os::unix::fs::lchown(path, Some(user.0), Some(user.1))
            .map_err(|e| format!("handing checkpoint_dir {dir} to the ranks' user: {e}"))?;
    }
    Ok(())
}

/// The Python stacks hook (a `sitecustomize` in the server's data dir, first on the rank's
/// `PYTHONPATH` when the job asks for stacks), bound read-only at the same path so a Python
/// rank's stacks can be taken before it is killed for a hang, as a local rank's.
pub fn hooks_bind(env: &[(String, String)], settings: &Settings) -> Option<String> {
    env.iter().find(|(k, _)| k == "TRAINVISOR_STACKS_FILE")?;
    let hooks = crate::launcher::stacks::hooks_dir(&settings.data_dir);
    let meta = std::fs::symlink_metadata(&hooks).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let hooks = hooks.display();
    Some(format!("{hooks}:{hooks}:ro"))
}

/// The incarnation's own directory for its error file and Python stacks
/// (`TORCHELASTIC_ERROR_FILE`'s directory, which the server has just made under its data dir):
/// handed to the ranks' user and bound at the same path, so the worker contract's path holds
/// inside the container and the server reads the file back as it does for a local rank. The
/// only part of the data dir a container ever sees; none if the variable is missing or names
/// anything else.
pub fn incarnation_bind(
    env: &[(String, String)],
    settings: &Settings,
    user: (u32, u32),
) -> Option<String> {
    let file = env
        .iter()
        .find(|(k, _)| k == "TORCHELASTIC_ERROR_FILE")
        .map(|(_, v)| Path::new(v))?;
    let dir = file.parent()?;
    let errors = settings.data_dir.join("errors");
    let meta = std::fs::symlink_metadata(dir).ok()?;
    if !dir.starts_with(&errors)
        || !meta.is_dir()
        || dir.components().any(|c| c.as_os_str() == "..")
    {
        return None;
    }
    if (meta.uid(), meta.gid()) != user
        && let Err(e) = std::os::unix::fs::lchown(dir, Some(user.0), Some(user.1))
    {
        // A non-root server cannot hand it to another --docker-user: the rank then cannot
        // write its error file, and a failure is explained by its exit and last lines alone.
        tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "cannot hand the error-file dir to the ranks' user"
        );
    }
    let dir = dir.display();
    Some(format!("{dir}:{dir}"))
}
