#!/usr/bin/env python3
"""Deploy figures for the README: the runtime image's size, container start -> healthy, and
`docker kill` -> the job training again after `docker start` (the seed's Docker restart: ~2 s).

    deploy/bench.py [--out bench-results/deploy.json] [--binary target/release/trainvisor] [--runs 5]

Builds the image as the tests do (deploy/base-image.sh, then deploy/Dockerfile's `prebuilt`
target around the stripped binary; build the binary with `cargo build --release` first) and
writes the figures as JSON. Standard library only; needs docker and the base image's tools.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "deploy-bench-token"


def run(*args, check=True):
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {out.returncode}\n{out.stderr}")
    return out.stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, method="GET", body=None, timeout=2.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as res:
        return json.loads(res.read() or b"null")


def healthy(base):
    try:
        return http(f"{base}/health", timeout=0.5)["status"] == "ok"
    except OSError:
        return False


def poll(check, timeout, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout} s")


def build_image(binary):
    base = run(os.path.join(ROOT, "deploy/base-image.sh")).splitlines()[-1]
    ctx = tempfile.mkdtemp(prefix="trainvisor-bench-")
    try:
        shutil.copy(binary, os.path.join(ctx, "trainvisor"))
        run("strip", os.path.join(ctx, "trainvisor"))
        stripped = os.path.getsize(os.path.join(ctx, "trainvisor"))
        with open(os.path.join(ctx, "trainvisor"), "rb") as f:
            tag = "trainvisor-bench:" + hashlib.sha256(f.read()).hexdigest()[:16]
        run("docker", "build", "-q", "-f", os.path.join(ROOT, "deploy/Dockerfile"),
            "--target", "prebuilt", "--build-arg", f"RUNTIME_IMAGE={base}", "-t", tag, ctx)
    finally:
        shutil.rmtree(ctx)
    return base, tag, stripped


def median_ms(xs):
    return round(statistics.median(xs) * 1000, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "bench-results/deploy.json"))
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/trainvisor"))
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()

    base, image, stripped = build_image(args.binary)
    size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", image))
    base_size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", base))

    suffix = hashlib.sha256(os.urandom(8)).hexdigest()[:10]
    name, volume = f"tv-bench-{suffix}", f"tv-bench-{suffix}"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    run("docker", "volume", "create", volume)
    try:
        run("docker", "create", "--name", name, "-p", f"127.0.0.1:{port}:8000",
            "-v", f"{volume}:/data", "-e", f"TRAINVISOR_API_TOKEN={TOKEN}", image)

        # Container start -> /health answers on the published port (an idle data dir).
        start_to_healthy, start_cmd, stop_graceful = [], [], []
        for _ in range(args.runs):
            t0 = time.monotonic()
            run("docker", "start", name)
            start_cmd.append(time.monotonic() - t0)
            poll(lambda: healthy(base_url), 60)
            start_to_healthy.append(time.monotonic() - t0)
            t0 = time.monotonic()
            run("docker", "stop", "-t", "30", name)
            stop_graceful.append(time.monotonic() - t0)

        # docker kill in the middle of a job -> docker start -> the job trains again (a rank
        # reports a step past the checkpoint it resumed from).
        run("docker", "start", name)
        poll(lambda: healthy(base_url), 60)
        run("docker", "exec", name, "trainvisor", "make-dataset", "--out", "/data/small",
            "--shards", "4", "--rows-per-shard", "2000", "--features", "8", "--classes", "3")
        job = http(f"{base_url}/jobs", "POST", {
            "world_size": 2, "dataset": "/data/small", "total_steps": 1_000_000,
            "checkpoint_every": 5, "sleep_sec": 0.02, "batch_size": 16, "max_restarts": 1000})
        jid = job["job_id"]
        kill_to_training, kill_to_healthy = [], []
        for _ in range(args.runs):
            poll(lambda: len(http(f"{base_url}/jobs/{jid}/checkpoints")) >= 1, 120, 0.05)
            time.sleep(1.0)
            run("docker", "kill", name)
            t0 = time.monotonic()
            run("docker", "start", name)
            poll(lambda: healthy(base_url), 60)
            kill_to_healthy.append(time.monotonic() - t0)
            # What it resumes from: the newest committed checkpoint.
            resumed = max(c["step"] for c in http(f"{base_url}/jobs/{jid}/checkpoints"))

            def training():
                try:
                    s = http(f"{base_url}/jobs/{jid}/summary")
                except OSError:
                    return False
                ws = s.get("workers") or []
                return (s.get("state") == "running" and len(ws) == 2
                        and (s.get("step") or 0) > resumed
                        and all(w.get("state") == "running" for w in ws))

            poll(training, 120)
            kill_to_training.append(time.monotonic() - t0)
        http(f"{base_url}/jobs/{jid}/stop", "POST")
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)

    load = os.getloadavg()
    result = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cores": os.cpu_count(), "kernel": platform.release(),
            "loadavg_1m_at_end": round(load[0], 2),
            "docker": run("docker", "version", "-f", "{{.Server.Version}}"),
            "storage_driver": run("docker", "info", "-f", "{{.Driver}}"),
        },
        "runs": args.runs,
        "figures": {
            "image_size_mb": round(size / 1e6, 1),
            "base_image_size_mb": round(base_size / 1e6, 1),
            "binary_stripped_mb": round(stripped / 1e6, 1),
            "start_to_healthy_p50_ms": median_ms(start_to_healthy),
            "start_to_healthy_max_ms": round(max(start_to_healthy) * 1000, 1),
            # Of which the engine: `docker start` returning (runc, network, storage driver).
            "docker_start_command_p50_ms": median_ms(start_cmd),
            # The rest: the server's own start-up until /health answers.
            "server_after_docker_start_p50_ms": median_ms(
                [h - c for h, c in zip(start_to_healthy, start_cmd)]),
            "docker_stop_idle_p50_ms": median_ms(stop_graceful),
            "docker_kill_start_to_healthy_p50_ms": median_ms(kill_to_healthy),
            "docker_kill_start_to_training_p50_ms": median_ms(kill_to_training),
            "docker_kill_start_to_training_max_ms": round(max(kill_to_training) * 1000, 1),
        },
        "seed": {"docker_restart_s": 2.0},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
