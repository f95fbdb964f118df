//! The Docker part of a job spec (`"launcher": "docker"`): the image every rank runs, its
//! resources (CPUs, memory, GPUs) and extra bind mounts.

use serde::{Deserialize, Serialize};

use crate::launcher::kind::LauncherKind;
use crate::spec::check::{SpecError, finite_in, in_range, invalid};

/// The Docker options of a job (`launcher = docker`), resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerSpec {
    /// The image of every rank's container; it must be present on the engine (never pulled).
    pub image: String,
    /// CPU limit per rank (`docker run --cpus`).
    pub cpus: Option<f64>,
    /// Memory limit per rank in MiB (`--memory`, swap off), past which the OOM killer ends it.
    pub memory_mb: Option<u64>,
    /// GPUs per rank (`--gpus`): `all`, a count, or device ids such as `0,1`.
    pub gpus: Option<String>,
    /// Extra bind mounts, `SOURCE:TARGET` or `SOURCE:TARGET:ro`, absolute paths.
    pub mounts: Vec<String>,
}

pub(crate) struct DockerRequest {
    pub(crate) image: Option<String>,
    pub(crate) cpus: Option<f64>,
    pub(crate) memory_mb: Option<i64>,
    pub(crate) gpus: Option<String>,
    pub(crate) mounts: Option<Vec<String>>,
}

pub(crate) fn resolve_docker(
    launcher: LauncherKind,
    req: DockerRequest,
) -> Result<Option<DockerSpec>, SpecError> {
    if launcher != LauncherKind::Docker {
        let given = [
            ("image", req.image.is_some()),
            ("cpus", req.cpus.is_some()),
            ("memory_mb", req.memory_mb.is_some()),
            ("gpus", req.gpus.is_some()),
            ("mounts", req.mounts.is_some()),
        ];
        if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
            return Err(invalid(format!(
                "{name} is a Docker option: it needs \"launcher\": \"docker\""
            )));
        }
        return Ok(None);
    }
    let Some(image) = req.image else {
        return Err(invalid(
            "image is required with \"launcher\": \"docker\" (the image every rank runs)",
        ));
    };
    if image.is_empty()
        || image.len() > 256
        || !image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:/@".contains(c))
    {
        return Err(invalid(
            "image must be 1 to 256 characters of [A-Za-z0-9_.:/@-], e.g. \"my-trainer:1.0\"",
        ));
    }
    let cpus = req
        .cpus
        .map(|c| finite_in("cpus", c, 0.01, 1024.0))
        .transpose()?;
    let memory_mb = req
        .memory_mb
        .map(|m| in_range("memory_mb", m, 6, 16 * 1024 * 1024))
        .transpose()?
        .map(|m| m as u64);
    if let Some(g) = &req.gpus {
        let ok = g == "all"
            || (!g.is_empty()
                && g.len() <= 64
                && g.split(',')
                    .all(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric())));
        if !ok {
            return Err(invalid(
                "gpus must be \"all\", a count such as \"2\", or device ids such as \"0,1\"",
            ));
        }
    }
    let mounts = req.mounts.unwrap_or_default();
    if mounts.len() > 32 {
        return Err(invalid("mounts may hold at most 32 entries"));
    }
    for m in &mounts {
        parse_mount(m).map_err(|why| invalid(format!("mounts: {m:?}: {why}")))?;
    }
    Ok(Some(DockerSpec {
        image,
        cpus,
        memory_mb,
        gpus: req.gpus,
        mounts,
    }))
}

/// A bind mount `SOURCE:TARGET[:ro|:rw]`: its source, its target, and whether it is
/// read-only.
pub fn parse_mount(m: &str) -> Result<(&str, &str, bool), &'static str> {
    let parts: Vec<&str> = m.split(':').collect();
    let (source, target, ro) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        _ => return Err("must be SOURCE:TARGET or SOURCE:TARGET:ro"),
    };
    if !source.starts_with('/') || !target.starts_with('/') {
        return Err("source and target must be absolute paths");
    }
    if source.contains('\0') || target.contains('\0') || source.contains("..") {
        return Err("paths may not contain NUL bytes or ..");
    }
    Ok((source, target, ro))
}
