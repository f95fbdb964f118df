//! Container recovery: kill -9 of a rank whose process is a Docker container → its
//! replacement running, next to the same worker as a local process, on one server in one run.

use anyhow::Context;
use serde_json::json;

use super::{Client, Figures, Notes, Server, recovery};

/// A worker that heartbeats once with step `RESTART_COUNT + 1` and then waits to be killed,
/// in Python's standard library (the base image has no curl).
const BEAT_THEN_WAIT: &str = "import json, os, time, urllib.request
req = urllib.request.Request(os.environ['TRAINVISOR_HEARTBEAT_URL'],
    data=json.dumps({'step': int(os.environ['RESTART_COUNT']) + 1}).encode(),
    headers={'Authorization': 'Bearer ' + os.environ['TRAINVISOR_TOKEN']})
urllib.request.urlopen(req, timeout=10).read()
time.sleep(100000)
";

/// The image of the container ranks: `TRAINVISOR_BENCH_IMAGE`, else the registry-free base
/// that `deploy/base-image.sh` builds.
fn image() -> String {
    std::env::var("TRAINVISOR_BENCH_IMAGE").unwrap_or_else(|_| "trainvisor-base:bookworm".into())
}

pub async fn recovery(
    dir: &std::path::Path,
    kills: usize,
    figures: &mut Figures,
    notes: &mut Notes,
) -> anyhow::Result<()> {
    let image = image();
    let present = match crate::launcher::docker::connect().await {
        Ok(docker) => docker.inspect_image(&image).await.is_ok(),
        Err(_) => false,
    };
    if !present {
        let why = format!(
            "skipped: no Docker engine, or no image {image} on it (deploy/base-image.sh builds it)"
        );
        eprintln!("bench: docker {why}");
        notes.insert("docker".into(), why);
        return Ok(());
    }
    // Containers reach the server through their network's gateway: it listens on every
    // address, which needs a token.
    let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let server = Server::start(&dir.join("docker"), "0.0.0.0:0", Some(&token))?;
    let client = Client::new(&server.url, Some(&token));
    let command = json!(["python3", "-u", "-c", BEAT_THEN_WAIT]);
    recovery::kill_and_replace(
        &client,
        json!({"world_size": 1, "command": command}),
        kills,
        "local_python",
        figures,
    )
    .await
    .context("local ranks")?;
    recovery::kill_and_replace(
        &client,
        json!({"world_size": 1, "command": command, "launcher": "docker", "image": image}),
        kills,
        "docker",
        figures,
    )
    .await
    .context("container ranks")?;
    notes.insert("docker_image".into(), image);
    Ok(())
}
