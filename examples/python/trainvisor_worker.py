"""trainvisor_worker: the worker side of trainvisor, in one standard-library-only file.

Copy this file next to a training script (or put its directory on PYTHONPATH) and use it from a
rank launched by trainvisor:

    from trainvisor_worker import Context

    ctx = Context.from_env()
    state = {"step": 0}
    ctx.start_heartbeats(1.0, lambda: {"step": state["step"]})
    resumed = ctx.load_latest()            # (step, my_part_bytes, manifest) or None
    ...
    ctx.save_part(step, my_bytes, shard_idx=s, line_idx=l, metrics={"loss": loss})
    mean = ctx.allreduce(step, grads)      # synchronous data parallelism through the server
    ...
    if ctx.rank == 0:
        ctx.save_final_model(model_bytes)

What it implements (see DESIGN.md, "Worker contract" and "Checkpoint plane"):

* the environment trainvisor gives each rank (torchrun's names plus ``JOB_ID``,
  ``RESTART_COUNT``, ``CHECKPOINT_DIR``, ``DATASET_DIR``, ``TRAINVISOR_*``);
* heartbeats (``POST $TRAINVISOR_HEARTBEAT_URL``) from a background thread;
* the checkpoint layout ``CHECKPOINT_DIR/step-NNNNNNNNNN/rank-RRRRR.part`` written atomically
  and durably (temp file, fsync, rename, directory fsync), then registered with the server,
  which writes ``manifest.json`` once every rank's part is in and moves ``LATEST``;
* resume: ``LATEST`` first (a hint), then every ``step-*`` directory newest first; the first
  whose manifest is complete and whose every part has the listed size and sha256 wins, so all
  ranks of a synchronous job pick the same step;
* the server-side all-reduce (element-wise mean, summed in rank order);
* the final model, ``CHECKPOINT_DIR/model.bin``, written atomically by rank 0.

Stale incarnations: whenever the server answers 409 (this process was replaced, or the job has
ended) the process exits at once with status 3 (``os._exit``), as the contract requires. Pass
``exit_on_stale=False`` to ``Context.from_env`` to get a ``StaleIncarnation`` exception instead
(the background heartbeat thread always exits the process).

Works with Python 3.8+; tested with 3.11. No third-party packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request

__all__ = [
    "Context",
    "TrainvisorError",
    "StaleIncarnation",
    "Unauthorized",
    "step_dir_name",
    "part_name",
    "atomic_write",
]

STALE_EXIT_CODE = 3
_STEP_DIR_RE = re.compile(r"^step-(\d{10})$")


class TrainvisorError(RuntimeError):
    """The server refused a request or could not be reached."""

    def __init__(self, message, status=None, body=None):
        super().__init__(message)
        self.status = status
        self.body = body


class StaleIncarnation(TrainvisorError):
    """409: this incarnation was replaced or its job ended; the process must exit."""


class Unauthorized(TrainvisorError):
    """401: the token is not valid for this job and rank."""


def step_dir_name(step: int) -> str:
    """``step-NNNNNNNNNN``: the directory of one checkpoint step (10-digit, zero-padded)."""
    return "step-%010d" % int(step)


def part_name(rank: int) -> str:
    """``rank-RRRRR.part``: the file name of one rank's part (5-digit, zero-padded)."""
    return "rank-%05d.part" % int(rank)


def _fsync_dir(path: str) -> None:
    """fsync a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """Create ``path`` and any missing parents, fsyncing each parent after its mkdir."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            # Another rank created it concurrently; it may not be durable yet, so fsync anyway.
            if not os.path.isdir(d):
                raise
        _fsync_dir(os.path.dirname(d))


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temp name in the same directory (``.NAME.tmp-PID``), are flushed and
    fsynced, renamed over ``path``, and then the directory is fsynced. Missing directories are
    created (and their parents fsynced). Readers see either the old file or the whole new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    _makedirs_durable(directory)
    tmp = os.path.join(directory, ".%s.tmp-%d" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _sha256_file(path: str, limit: int | None = None):
    """(size, hex sha256) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if limit is not None and size > limit:
                return size, None
            h.update(chunk)
    return size, h.hexdigest()


def _finite(obj):
    """``obj`` with non-finite floats (NaN, inf) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _env_int(env, name, default=None):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TrainvisorError("environment variable %s=%r is not an integer" % (name, raw))


def _env_float(env, name, default=None):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise TrainvisorError("environment variable %s=%r is not a number" % (name, raw))


class Heartbeater:
    """A background thread that heartbeats every ``interval_s`` seconds (see
    ``Context.start_heartbeats``). ``stop()`` ends it."""

    def __init__(self, ctx: "Context", interval_s: float, state_fn):
        self._ctx = ctx
        self._interval = max(0.01, float(interval_s))
        self._state_fn = state_fn
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="trainvisor-heartbeat", daemon=True
        )
        self._last_warning = 0.0
        # Set to beat at once (a save request is being held, or SIGUSR1 arrived).
        self.wake = threading.Event()

    def start(self) -> "Heartbeater":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread (waiting at most ``timeout`` seconds for an in-flight beat)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _warn(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            print("trainvisor_worker: heartbeat failed: %s" % msg, file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fields = self._state_fn() if self._state_fn is not None else {}
            except Exception as e:  # a broken state function must not stop the beats
                self._warn("state function raised %r" % (e,))
                fields = {}
            fields = dict(fields or {})
            self._ctx._notice_fields(fields)
            try:
                answer = self._ctx._post(self._ctx.heartbeat_url, _finite(fields), timeout=10.0)
                self._ctx._heard(answer)
            except StaleIncarnation as e:
                _die("heartbeat refused (409): %s" % e)
            except Unauthorized as e:
                _die("heartbeat refused (401): %s" % e)
            except TrainvisorError as e:
                self._warn(str(e))
            # While a save is asked for, beat every 50 ms: a held rank learns at once.
            asked = self._ctx._save_request is not None
            self.wake.wait(min(self._interval, 0.05) if asked else self._interval)
            self.wake.clear()


def _die(message: str) -> None:
    """Exit the whole process at once (from any thread) with STALE_EXIT_CODE."""
    try:
        print("trainvisor_worker: %s; exiting" % message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(STALE_EXIT_CODE)


class Context:
    """One rank's view of its job, read from the environment trainvisor sets.

    Attributes: ``rank``, ``world_size``, ``local_rank``, ``local_world_size``,
    ``master_addr``, ``master_port``, ``job_id``, ``restart_count``, ``checkpoint_dir``,
    ``dataset_dir``, ``checkpoint_every``, ``sleep_sec``, ``heartbeat_timeout``,
    ``heartbeat_url``, ``server_url``, ``token`` and ``spec`` (the job spec, a dict).
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        job_id: str,
        checkpoint_dir: str,
        dataset_dir: str = "",
        restart_count: int = 0,
        spec: dict | None = None,
        server_url: str = "",
        heartbeat_url: str = "",
        token: str = "",
        local_rank: int | None = None,
        local_world_size: int | None = None,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        checkpoint_every: int | None = None,
        sleep_sec: float = 0.0,
        heartbeat_timeout: float | None = None,
        exit_on_stale: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise TrainvisorError("RANK=%d is outside WORLD_SIZE=%d" % (rank, world_size))
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.local_world_size = world_size if local_world_size is None else local_world_size
        self.master_addr = master_addr
        self.master_port = master_port
        self.job_id = job_id
        self.restart_count = restart_count
        self.checkpoint_dir = checkpoint_dir
        self.dataset_dir = dataset_dir
        self.spec = dict(spec or {})
        self.server_url = server_url.rstrip("/")
        self.heartbeat_url = heartbeat_url or (
            "%s/jobs/%s/workers/%d/heartbeat" % (self.server_url, job_id, rank)
        )
        self.token = token
        self.checkpoint_every = checkpoint_every
        self.sleep_sec = sleep_sec
        self.heartbeat_timeout = heartbeat_timeout
        self.exit_on_stale = exit_on_stale
        self._heartbeater = None
        # Save on notice: the request as last heard, how many answers were heard, the last
        # step a part was begun for, and a SIGUSR1 not yet told to the server.
        self._save_request = None
        self._round_save = None
        self._answers = 0
        self._saved_step = None
        self._signalled = None
        # Talk to the server directly: an http_proxy from the environment must not intercept
        # loopback calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_env(cls, env=None, exit_on_stale: bool = True) -> "Context":
        """Read the worker contract from ``os.environ`` (or ``env``).

        Required: RANK, WORLD_SIZE, JOB_ID, CHECKPOINT_DIR, TRAINVISOR_SERVER_URL,
        TRAINVISOR_TOKEN. Everything else has a default. Raises ``TrainvisorError`` naming the
        missing variables.
        """
        env = os.environ if env is None else env
        required = [
            "RANK",
            "WORLD_SIZE",
            "JOB_ID",
            "CHECKPOINT_DIR",
            "TRAINVISOR_SERVER_URL",
            "TRAINVISOR_TOKEN",
        ]
        missing = [n for n in required if not env.get(n)]
        if missing:
            raise TrainvisorError(
                "not running under trainvisor: missing environment variable(s) %s"
                % ", ".join(missing)
            )
        spec = {}
        raw_spec = env.get("TRAINVISOR_SPEC")
        if raw_spec:
            try:
                spec = json.loads(raw_spec)
            except ValueError as e:
                raise TrainvisorError("TRAINVISOR_SPEC is not valid JSON: %s" % e)
            if not isinstance(spec, dict):
                raise TrainvisorError("TRAINVISOR_SPEC is not a JSON object")
        return cls(
            rank=_env_int(env, "RANK"),
            world_size=_env_int(env, "WORLD_SIZE"),
            local_rank=_env_int(env, "LOCAL_RANK"),
            local_world_size=_env_int(env, "LOCAL_WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_env_int(env, "MASTER_PORT"),
            job_id=env["JOB_ID"],
            restart_count=_env_int(
                env, "RESTART_COUNT", _env_int(env, "TORCHELASTIC_RESTART_COUNT", 0)
            ),
            checkpoint_dir=env["CHECKPOINT_DIR"],
            dataset_dir=env.get("DATASET_DIR", ""),
            checkpoint_every=_env_int(env, "CHECKPOINT_EVERY", spec.get("checkpoint_every")),
            sleep_sec=_env_float(env, "SLEEP_SEC", spec.get("sleep_sec") or 0.0),
            heartbeat_timeout=_env_float(
                env, "HEARTBEAT_TIMEOUT", spec.get("heartbeat_timeout_s")
            ),
            server_url=env["TRAINVISOR_SERVER_URL"],
            heartbeat_url=env.get("TRAINVISOR_HEARTBEAT_URL", ""),
            token=env["TRAINVISOR_TOKEN"],
            spec=spec,
            exit_on_stale=exit_on_stale,
        )

    # ----------------------------------------------------------------------------------------
    # HTTP

    def _worker_url(self, what: str) -> str:
        return "%s/jobs/%s/workers/%d/%s" % (self.server_url, self.job_id, self.rank, what)

    def _post(self, url: str, body: dict, timeout: float | None = 30.0, retries: int = 0):
        """POST JSON with the bearer token; return the decoded JSON answer.

        Raises StaleIncarnation (409), Unauthorized (401) or TrainvisorError (anything else).
        ``retries`` retries a refused connection (the request never reached the server)."""
        try:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
        except ValueError as e:
            raise TrainvisorError("POST %s: body is not valid JSON: %s" % (url, e))
        attempt = 0
        while True:
            req = urllib.request.Request(
                url,
                data=data,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "Authorization": "Bearer %s" % self.token,
                },
            )
            try:
                if timeout is None:
                    resp = self._opener.open(req)
                else:
                    resp = self._opener.open(req, timeout=timeout)
                with resp:
                    raw = resp.read()
                if not raw:
                    return {}
                try:
                    return json.loads(raw)
                except ValueError:
                    raise TrainvisorError(
                        "POST %s: answer is not JSON: %r" % (url, raw[:200]), resp.status, raw
                    )
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace")
                try:
                    msg = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    msg = text
                if e.code == 409:
                    raise StaleIncarnation(msg, 409, text)
                if e.code == 401:
                    raise Unauthorized(msg, 401, text)
                raise TrainvisorError("POST %s: HTTP %d: %s" % (url, e.code, msg), e.code, text)
            except urllib.error.URLError as e:
                refused = isinstance(e.reason, ConnectionRefusedError)
                if refused and attempt < retries:
                    attempt += 1
                    time.sleep(min(2.0, 0.05 * (2 ** attempt)))
                    continue
                raise TrainvisorError("POST %s: %s" % (url, e.reason))
            except OSError as e:  # timeouts, resets
                raise TrainvisorError("POST %s: %s" % (url, e))

    def _call(self, url: str, body: dict, timeout: float | None, retries: int = 5):
        """_post for the main thread: a 409 exits the process unless exit_on_stale is off."""
        try:
            return self._post(url, body, timeout=timeout, retries=retries)
        except StaleIncarnation as e:
            if self.exit_on_stale:
                _die("server answered 409 (stale incarnation): %s" % e)
            raise

    # ----------------------------------------------------------------------------------------
    # Heartbeats

    def heartbeat(self, **fields) -> dict:
        """Send one heartbeat now, e.g. ``heartbeat(step=120, metrics={"loss": 0.41})``.

        Every field is optional; ``None`` values are left out. A 409 exits the process."""
        body = _finite({k: v for k, v in fields.items() if v is not None})
        return self._call(self.heartbeat_url, body, timeout=10.0, retries=0)

    def start_heartbeats(self, interval_s: float | None = None, state_fn=None) -> Heartbeater:
        """Heartbeat from a daemon thread every ``interval_s`` seconds until the process ends.

        ``state_fn()`` is called before each beat and returns the body fields (a dict such as
        ``{"step": 3, "shard_idx": 1, "line_idx": 40, "metrics": {"loss": 0.5}}``); keep it
        cheap and thread-safe (reading a few variables is fine). On 409 (stale incarnation or
        job ended) or 401 the thread ends the whole process with ``os._exit(3)``. Other errors
        are reported on stderr (at most every 10 s) and the beats go on.

        The default interval is a quarter of HEARTBEAT_TIMEOUT, at most 1 s. Remember that once
        a rank has sent one heartbeat, silence longer than the timeout counts as hung.
        Returns the ``Heartbeater``; calling again replaces the previous thread.
        """
        if interval_s is None:
            timeout = self.heartbeat_timeout or 10.0
            interval_s = max(0.05, min(1.0, timeout / 4.0))
        if self._heartbeater is not None:
            self._heartbeater.stop()
        self._heartbeater = Heartbeater(self, interval_s, state_fn).start()
        if threading.current_thread() is threading.main_thread():
            self.handle_sigusr1()
        return self._heartbeater

    # ----------------------------------------------------------------------------------------
    # Save on notice (see the README's "Save on notice")

    def _heard(self, answer) -> None:
        save = answer.get("save") if isinstance(answer, dict) else None
        self._save_request = save if isinstance(save, dict) and "by_step" in save else None
        self._answers += 1

    def _notice_fields(self, fields: dict) -> None:
        # Tells the server this rank saves when asked, so a stop waits for its save.
        fields["saves_on_notice"] = True
        if self._saved_step is not None:
            fields["saved_step"] = self._saved_step
        if self._signalled is not None:
            fields["notice"] = self._signalled
            self._signalled = None

    def handle_sigusr1(self) -> None:
        """Take SIGUSR1 (Slurm's ``--signal``, or the server asking a rank that never
        heartbeated) as a request to save: the next heartbeat tells the server, which asks the
        whole job. Without heartbeats ``save_requested`` is true at the next step. Called by
        ``start_heartbeats`` (from the main thread only, where Python allows handlers)."""
        import signal

        def on_usr1(signum, frame):
            self._signalled = "SIGUSR1"
            if self._heartbeater is not None:
                self._heartbeater.wake.set()

        signal.signal(signal.SIGUSR1, on_usr1)

    def save_requested(self, step: int) -> bool:
        """Whether to save this rank's part right after finishing ``step``: the server asked
        for ``by_step`` <= ``step`` and no part has been begun for it since (or, without
        heartbeats, SIGUSR1 arrived). Call it after each step; then ``save_part(step, ...)``,
        then ``hold_if_asked(step)``. A DDP script all-reduces the answer (MAX) so that every
        rank saves at the same step even if one heard the request late."""
        req = self._round_save or self._save_request
        if req is not None:
            by = int(req["by_step"])
            return step >= by and (self._saved_step is None or self._saved_step < by)
        return self._heartbeater is None and self._signalled is not None

    def hold_if_asked(self, step: int, poll_s: float = 0.01) -> None:
        """After saving ``step`` on a request that halts (a stop, the server's shutdown, a
        preemption signal): train no further until a heartbeat answer sent after this call no
        longer holds the rank there. The server ends the rank meanwhile, or releases it."""
        if self._heartbeater is None:
            self._signalled = None
            return
        entered = self._answers
        self._heartbeater.wake.set()
        while True:
            req = self._save_request
            held = (
                req is not None
                and req.get("halt")
                and self._saved_step == step
                and int(req["by_step"]) <= step
            )
            if self._answers >= entered + 2 and not held:
                return
            time.sleep(poll_s)

    def stop_heartbeats(self) -> None:
        """Stop the background heartbeat thread, if any."""
        if self._heartbeater is not None:
            self._heartbeater.stop()
            self._heartbeater = None

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint ``step``: ``CHECKPOINT_DIR/step-NNNNNNNNNN``."""
        return os.path.join(self.checkpoint_dir, step_dir_name(step))

    def save_part(
        self,
        step: int,
        data: bytes,
        shard_idx: int | None = None,
        line_idx: int | None = None,
        metrics: dict | None = None,
    ) -> dict:
        """Write this rank's part of checkpoint ``step`` and register it with the server.

        The part goes to ``CHECKPOINT_DIR/step-NNNNNNNNNN/rank-RRRRR.part`` atomically and
        durably (temp file, fsync, rename, directory fsync); then ``POST
        .../workers/RANK/checkpoint`` tells the server its size and sha256 (and the data cursor
        and metrics, which end up in the manifest). The server commits the step (writes
        ``manifest.json``, moves ``LATEST``) once every rank's part is registered.

        Returns the server's answer, ``{"ok": true}``: the server commits the step
        asynchronously, once every rank's part is registered. A 409 exits the process.
        Writing the same step again (after a restart) replaces the part; a deterministic
        trainer writes the same bytes.
        """
        if step < 0:
            raise ValueError("step must be non-negative")
        data = bytes(data)
        name = part_name(self.rank)
        self._saved_step = int(step)
        atomic_write(os.path.join(self.step_dir(step), name), data)
        body = {
            "step": int(step),
            "part": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if shard_idx is not None:
            body["shard_idx"] = int(shard_idx)
        if line_idx is not None:
            body["line_idx"] = int(line_idx)
        if metrics is not None:
            body["metrics"] = _finite(metrics)
        return self._call(self._worker_url("checkpoint"), body, timeout=60.0)

    def _candidates(self):
        """Step directory names to try, LATEST's first, then every step dir newest first."""
        names = []
        try:
            with open(os.path.join(self.checkpoint_dir, "LATEST"), "rb") as f:
                hint = f.read(256).decode("utf-8", "replace").strip()
            if _STEP_DIR_RE.match(hint):
                names.append(hint)
        except OSError:
            pass
        try:
            entries = os.listdir(self.checkpoint_dir)
        except OSError:
            entries = []
        steps = sorted(
            (int(m.group(1)), e) for e in entries for m in [_STEP_DIR_RE.match(e)] if m
        )
        for _, e in reversed(steps):
            if e not in names:
                names.append(e)
        return names

    def _check_step(self, dirname: str):
        """(manifest, own part bytes) when step dir ``dirname`` is a complete, intact
        checkpoint for this world size; otherwise (None, reason)."""
        step_path = os.path.join(self.checkpoint_dir, dirname)
        try:
            with open(os.path.join(step_path, "manifest.json"), "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return None, "no manifest (not committed)"
        except (OSError, ValueError) as e:
            return None, "unreadable manifest: %s" % e
        if not isinstance(manifest, dict):
            return None, "manifest is not an object"
        if manifest.get("world_size") != self.world_size:
            return None, "world_size %r != %d" % (manifest.get("world_size"), self.world_size)
        if manifest.get("step") != int(_STEP_DIR_RE.match(dirname).group(1)):
            return None, "manifest step %r does not match" % (manifest.get("step"),)
        parts = manifest.get("parts")
        if not isinstance(parts, list):
            return None, "manifest has no parts list"
        by_rank = {}
        for p in parts:
            if not isinstance(p, dict) or not isinstance(p.get("rank"), int):
                return None, "malformed part entry"
            by_rank[p["rank"]] = p
        if sorted(by_rank) != list(range(self.world_size)) or len(parts) != self.world_size:
            return None, "parts do not cover ranks 0..%d exactly once" % (self.world_size - 1)
        own = None
        for rank in range(self.world_size):
            p = by_rank[rank]
            name, size, digest = p.get("name"), p.get("bytes"), p.get("sha256")
            if (
                not isinstance(name, str)
                or not name
                or "/" in name
                or "\\" in name
                or name in (".", "..")
                or not isinstance(size, int)
                or not isinstance(digest, str)
            ):
                return None, "malformed entry for rank %d" % rank
            path = os.path.join(step_path, name)
            try:
                if rank == self.rank:
                    with open(path, "rb") as f:
                        data = f.read(size + 1)
                    got_size, got = len(data), hashlib.sha256(data).hexdigest()
                else:
                    got_size, got = _sha256_file(path, limit=size)
            except OSError as e:
                return None, "part of rank %d unreadable: %s" % (rank, e)
            if got_size != size:
                return None, "part of rank %d has %d bytes, manifest says %d" % (
                    rank,
                    got_size,
                    size,
                )
            if got != digest.lower():
                return None, "part of rank %d fails its sha256" % rank
            if rank == self.rank:
                own = data
        return manifest, own

    def load_latest(self, verbose: bool = True):
        """Find the newest valid committed checkpoint and return ``(step, part_bytes,
        manifest)`` for this rank, or ``None`` when there is nothing to resume from.

        Candidates: the step named by ``LATEST`` (a hint: it may be missing, stale or point at
        garbage), then every ``step-*`` directory, newest first. A candidate is valid when its
        ``manifest.json`` parses, its ``world_size`` equals WORLD_SIZE and every listed part
        (every rank's, not only this one's) exists with the listed size and sha256, so every
        rank of a synchronous job picks the same step. Rejected candidates are reported on
        stderr when ``verbose``.
        """
        for dirname in self._candidates():
            manifest, own = self._check_step(dirname)
            if manifest is not None:
                return int(manifest["step"]), own, manifest
            if verbose:
                print(
                    "trainvisor_worker: skipping checkpoint %s: %s" % (dirname, own),
                    file=sys.stderr,
                    flush=True,
                )
        return None

    def save_final_model(self, data: bytes, name: str = "model.bin") -> str:
        """Write the trained model to ``CHECKPOINT_DIR/model.bin`` atomically and durably.

        Call it from rank 0 only, once training is done and before exiting 0; the server
        serves the file at ``GET /jobs/{job_id}/model``. Returns the path written."""
        path = os.path.join(self.checkpoint_dir, name)
        atomic_write(path, bytes(data))
        return path

    # ----------------------------------------------------------------------------------------
    # Collective

    def allreduce(self, step: int, values, timeout: float | None = None) -> list:
        """Average ``values`` (a list of floats) over every rank, through the server.

        Blocks until every rank has sent ``step``; returns the element-wise mean (summed in
        rank order, so every rank gets bit-identical floats). Every rank must send the same
        number of values for the same step. ``timeout`` (seconds, default none) bounds the
        wait; a peer that dies makes the server restart the job, which ends this process.
        A 409 exits the process."""
        body = {"step": int(step), "values": [float(v) for v in values]}
        answer = self._call(self._worker_url("allreduce"), body, timeout=timeout)
        if answer.get("step") != int(step) or not isinstance(answer.get("values"), list):
            raise TrainvisorError("allreduce: unexpected answer %r" % (answer,))
        out = answer["values"]
        save = answer.get("save")
        # The round fixes the step of a save request for every rank at once (kept apart: a
        # heartbeat answer sent before the round must not take it back).
        self._round_save = save if isinstance(save, dict) and "by_step" in save else None
        if len(out) != len(body["values"]):
            raise TrainvisorError(
                "allreduce: sent %d values, got %d back" % (len(body["values"]), len(out))
            )
        return [float(v) for v in out]

    # ----------------------------------------------------------------------------------------
    # Data

    def all_shards(self) -> list:
        """Every ``shard-*.jsonl`` file under DATASET_DIR, sorted by name (local paths only)."""
        d = self.dataset_dir
        if not d:
            raise TrainvisorError("DATASET_DIR is not set")
        if "://" in d:
            raise TrainvisorError(
                "DATASET_DIR=%s is not a local directory; this helper reads local shards only" % d
            )
        try:
            names = sorted(
                n for n in os.listdir(d) if n.startswith("shard-") and n.endswith(".jsonl")
            )
        except OSError as e:
            raise TrainvisorError("cannot list DATASET_DIR=%s: %s" % (d, e))
        return [os.path.join(d, n) for n in names]

    def indexed_shards(self) -> list:
        """This rank's shards as ``(global_index, path)``: shard ``i`` of the sorted list
        belongs to rank ``i % WORLD_SIZE`` (round-robin, as in DESIGN.md)."""
        return [
            (i, p) for i, p in enumerate(self.all_shards()) if i % self.world_size == self.rank
        ]

    def shards(self) -> list:
        """This rank's shard files: the sorted ``shard-*.jsonl`` of DATASET_DIR whose index
        ``i`` satisfies ``i % WORLD_SIZE == RANK``. Entry ``k`` is global shard
        ``RANK + k * WORLD_SIZE``."""
        return [p for _, p in self.indexed_shards()]

    def __repr__(self) -> str:
        return "Context(job_id=%r, rank=%d, world_size=%d, restart_count=%d)" % (
            self.job_id,
            self.rank,
            self.world_size,
            self.restart_count,
        )
