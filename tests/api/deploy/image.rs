//! The images: built from Debian's packages and this repository, with the runtime the
//! Dockerfile promises and a HEALTHCHECK that needs no curl.

use super::*;
use crate::docker_support::base_image;

/// The images build from nothing but Debian's packages (debootstrap) and this repository, and
/// the runtime image is what the Dockerfile promises: python3 for Python workers, tini as PID
/// 1, a non-root user owning /data, port 8000, a curl-free HEALTHCHECK, OCI labels.
#[test]
fn images_build_from_debian_packages_and_this_repo() {
    let base = base_image();
    let image = trainvisor_image();
    let config: Value = serde_json::from_str(&docker_ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config}}",
        &image,
    ]))
    .unwrap();
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert_eq!(
        config["Entrypoint"],
        json!(["/usr/bin/tini", "--", "trainvisor"])
    );
    assert_eq!(config["Cmd"], json!(["serve"]));
    assert!(config["ExposedPorts"]["8000/tcp"].is_object(), "{config}");
    assert!(config["Volumes"]["/data"].is_object(), "{config}");
    assert_eq!(
        config["Healthcheck"]["Test"],
        json!(["CMD", "trainvisor", "health"])
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.title"],
        "trainvisor"
    );
    assert!(config["Labels"]["org.opencontainers.image.version"].is_string());

    // What runs inside: the binary, python3 (stdlib included), tini; as uid 10001, /data its own.
    let out = docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        &image,
        "-c",
        "trainvisor --version && python3 -c 'import json, hashlib, urllib.request; print(\"python ok\")' \
         && tini --version && id -u && stat -c %u /data",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("trainvisor "), "{out}");
    assert_eq!(lines[1], "python ok", "{out}");
    assert!(lines[2].starts_with("tini version"), "{out}");
    assert_eq!(&lines[3..], ["10001", "10001"], "{out}");

    // The base was made here: debootstrap's package database, no registry image behind it.
    let layers = docker_ok(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", &base]);
    assert_eq!(layers, "1", "one imported layer");
    let status = docker_ok(&[
        "run",
        "--rm",
        &base,
        "sh",
        "-c",
        "dpkg-query -W -f '${Package}\\n' python3-minimal tini ca-certificates",
    ]);
    assert_eq!(
        status.lines().collect::<Vec<_>>(),
        ["ca-certificates", "python3-minimal", "tini"]
    );
}

/// `trainvisor health` is the image's HEALTHCHECK: Docker reports the container healthy once
/// the server answers, and the command fails (exit 1, one line) when nothing answers.
#[test]
fn healthcheck_needs_no_curl() {
    let image = trainvisor_image();
    // Checked every second: Docker reports the server healthy within ~1 s of it listening.
    assert_eq!(
        docker_ok(&[
            "image",
            "inspect",
            "-f",
            "{{.Config.Healthcheck.Interval}}",
            &image
        ]),
        "1s"
    );
    let volume = Volume::create("tv-health");
    let c = Container::run(
        "tv-health",
        &[
            "--health-interval",
            "200ms",
            "-v",
            &format!("{}:/data", volume.name),
            &image,
        ],
    );
    let healthy = wait_until(Duration::from_secs(60), || {
        c.inspect("{{.State.Health.Status}}") == "healthy"
    });
    assert!(healthy, "never healthy: {}", c.logs());
    assert!(
        c.exec(&["trainvisor", "health"])
            .starts_with("healthy: trainvisor")
    );
    let fetchers = docker(&[
        "exec",
        &c.name,
        "sh",
        "-c",
        "command -v curl || command -v wget",
    ]);
    assert!(!fetchers.status.success(), "no curl or wget in the image");
    let out = docker(&[
        "exec",
        &c.name,
        "trainvisor",
        "health",
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}
