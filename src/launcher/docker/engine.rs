//! The Docker launcher's dealings with the engine beyond one job's containers: where a
//! container reaches the server, GPU requests, what is checked at submission, and the
//! removal of labelled containers and networks (a job's release, the sweep at boot).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::DeviceRequest;
use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};

use super::{LABEL_INSTANCE, REMOVE_POLL, REMOVE_POLLS, connect, not_found, remove_options};
use crate::config::Settings;
use crate::spec::{JobSpec, parse_mount};

/// The server's URL as a container on a network with this gateway reaches it.
pub(super) fn server_url(
    settings: &Settings,
    base_url: &str,
    gateway: &str,
) -> Result<String, String> {
    if let Some(url) = &settings.advertise_url {
        return Ok(url.clone());
    }
    let bound: std::net::SocketAddr = base_url
        .trim_start_matches("http://")
        .parse()
        .map_err(|_| format!("cannot tell the server's address from {base_url}"))?;
    let listen_ip = settings.bind.rsplit_once(':').and_then(|(host, _)| {
        host.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .ok()
    });
    match listen_ip {
        Some(ip) if ip.is_unspecified() => Ok(format!("http://{gateway}:{}", bound.port())),
        Some(ip) if !ip.is_loopback() => Ok(base_url.to_string()),
        _ => Err(format!(
            "containers cannot reach a server that listens on loopback ({}): start it with \
             --bind 0.0.0.0:PORT (and an API token) or give --advertise-url",
            settings.bind
        )),
    }
}

pub(super) fn gpu_request(gpus: &str) -> Vec<DeviceRequest> {
    let (count, device_ids) = match gpus {
        "all" => (Some(-1), None),
        g => match g.parse::<i64>() {
            Ok(n) if !g.contains(',') => (Some(n), None),
            _ => (None, Some(g.split(',').map(str::to_string).collect())),
        },
    };
    vec![DeviceRequest {
        count,
        device_ids,
        capabilities: Some(vec![vec!["gpu".to_string()]]),
        ..Default::default()
    }]
}

/// Checks at submission that the job can start: the engine answers, the image is present
/// (it is never pulled), the server is reachable from a container, and every bind mount's
/// source exists.
pub async fn admit(spec: &JobSpec, settings: &Settings, base_url: &str) -> Result<(), String> {
    let Some(d) = &spec.docker else {
        return Err("image is required with \"launcher\": \"docker\"".to_string());
    };
    server_url(settings, base_url, "0.0.0.0")?;
    s3_reachable(spec, settings)?;
    // The server's own demo dataset is made on the first job that uses it.
    let demo = settings.job_defaults.dataset.to_string_lossy();
    if !spec.dataset.contains("://")
        && spec.dataset != demo
        && !std::path::Path::new(&spec.dataset).is_dir()
    {
        return Err(format!(
            "dataset: {} is not a directory on this host, so it cannot be mounted into the \
             ranks' containers",
            spec.dataset
        ));
    }
    if !spec.checkpoint_dir.contains("://") && !spec.checkpoint_dir.starts_with('/') {
        return Err(format!(
            "checkpoint_dir: {} must be an absolute path to be mounted into the containers",
            spec.checkpoint_dir
        ));
    }
    for m in &d.mounts {
        let (source, _, _) = parse_mount(m).map_err(|why| format!("mounts: {m:?}: {why}"))?;
        if !std::path::Path::new(source).exists() {
            return Err(format!("mounts: {source} does not exist on this host"));
        }
        super::binds::host_path("mounts", source, settings)?;
    }
    for (what, path) in [
        ("dataset", &spec.dataset),
        ("checkpoint_dir", &spec.checkpoint_dir),
    ] {
        if !path.contains("://") && std::path::Path::new(path).exists() {
            super::binds::host_path(what, path, settings)?;
        }
    }
    let docker = connect().await?;
    match docker.inspect_image(&d.image).await {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Err(format!(
            "image: {} is not present on the Docker engine (trainvisor never pulls: build or \
             load it first)",
            d.image
        )),
        Err(e) => Err(format!("image: inspecting {}: {e}", d.image)),
    }
}

/// A job that keeps its data or checkpoints in S3 needs an endpoint its containers reach: a
/// loopback one (`localhost`, `127.0.0.1`, `::1`) would name each container itself.
fn s3_reachable(spec: &JobSpec, settings: &Settings) -> Result<(), String> {
    let Some(endpoint) = &settings.s3.endpoint else {
        return Ok(());
    };
    let host = reqwest::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()));
    let loopback = host.as_deref().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    for (what, path) in [
        ("dataset", &spec.dataset),
        ("checkpoint_dir", &spec.checkpoint_dir),
    ] {
        if loopback && path.starts_with("s3://") {
            return Err(format!(
                "{what}: {path} is in S3 at {endpoint}, a loopback address, which a rank's \
                 container cannot reach (there it names the container itself): give the server \
                 an S3_ENDPOINT the containers reach (the host's address, a name on their \
                 network), or use a local path"
            ));
        }
    }
    Ok(())
}

/// Removes the containers (with their anonymous volumes) and networks that carry `label` (a
/// `key=value` filter).
pub(super) async fn remove_labelled(docker: &Docker, label: &str) -> usize {
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let mut removed = 0;
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap_or_default();
    let options = remove_options();
    for c in containers {
        if let Some(id) = c.id
            && docker
                .remove_container(&id, Some(options.clone()))
                .await
                .is_ok()
        {
            removed += 1;
        }
    }
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .unwrap_or_default();
    for id in networks.into_iter().filter_map(|n| n.id) {
        // The engine lets go of a removed container's endpoint a moment later.
        for attempt in 1..=REMOVE_POLLS {
            match docker.remove_network(&id).await {
                Ok(()) => {
                    removed += 1;
                    break;
                }
                Err(e) if not_found(&e) => break,
                Err(e) if attempt == REMOVE_POLLS => {
                    tracing::warn!(network = %id, error = %e, "could not remove network");
                }
                Err(_) => tokio::time::sleep(REMOVE_POLL).await,
            }
        }
    }
    removed
}

/// At boot: removes every container and network a previous server on this data dir left.
/// Without a reachable engine there is nothing to remove.
pub async fn sweep(instance: &str) -> usize {
    let Ok(Ok(docker)) = tokio::time::timeout(Duration::from_secs(5), connect()).await else {
        return 0;
    };
    remove_labelled(&docker, &format!("{LABEL_INSTANCE}={instance}")).await
}
