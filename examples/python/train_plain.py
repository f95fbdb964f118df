#!/usr/bin/env python3
"""A small plain-Python trainer for trainvisor: online softmax regression over JSON lines.

Each rank reads its own shards (``shard-*.jsonl`` under DATASET_DIR, shard ``i`` belongs to
rank ``i % WORLD_SIZE``), one example per line: ``{"x": [floats], "y": class}``. Every step
consumes ``batch_size`` lines (wrapping around to the first shard after the last one) and
takes one gradient step on the cross-entropy loss.

* Independent ranks (default): every rank trains its own model; rank 0's is the final model.
* ``--sync``: synchronous data parallelism; the gradients (and the loss) are averaged over all
  ranks with the server's all-reduce every step, so every rank holds the same model. Run it
  with ``"restart_scope": "job"``.

Every CHECKPOINT_EVERY steps each rank saves a part holding its model, its data cursor
(shard index, line index, epoch) and the step, with every float stored as ``float.hex()`` so it
round-trips exactly. On start it resumes from the newest valid committed checkpoint. Training
is deterministic, so a job that crashed and resumed ends with a ``model.bin`` byte-identical to
one that never failed. Heartbeats go out from a background thread; SLEEP_SEC (or the spec's
``sleep_sec``) adds a pause per step to make runs slow enough to watch (or to kill).

Spec fields used (``TRAINVISOR_SPEC``): ``total_steps`` (default 100), ``batch_size`` (32),
``lr`` (0.1), ``seed`` (0); command-line flags override them.

    python3 train_plain.py [--sync] [--classes N] [--features D] [--total-steps N]
                           [--batch-size B] [--lr LR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainvisor_worker import Context, TrainvisorError  # noqa: E402

FORMAT = "trainvisor-plain-softmax-v1"


def log(ctx, msg):
    print("[rank %d] %s" % (ctx.rank, msg), flush=True)


def fail(msg):
    print("train_plain: error: %s" % msg, file=sys.stderr, flush=True)
    sys.exit(2)


class Stream:
    """This rank's examples in order, from a cursor ``(shard_idx, line_idx, epoch)``.

    ``shard_idx`` is the global index of the current shard, ``line_idx`` the number of its
    lines already consumed; after the last shard the stream starts over (``epoch + 1``)."""

    def __init__(self, shards, features, classes, shard_idx=None, line_idx=0, epoch=0):
        if not shards:
            raise ValueError("no shards")
        self.shards = shards  # [(global index, path)]
        self.features = features
        self.classes = classes
        self.k = 0
        if shard_idx is not None:
            ks = [k for k, (i, _) in enumerate(shards) if i == shard_idx]
            if not ks:
                raise ValueError("checkpoint cursor names shard %d, not one of this rank's" % shard_idx)
            self.k = ks[0]
        self.line_idx = line_idx
        self.epoch = epoch
        self.f = None
        self._open()

    def _open(self):
        if self.f is not None:
            self.f.close()
        self.f = open(self.shards[self.k][1], "r", encoding="utf-8")
        for n in range(self.line_idx):
            if not self.f.readline():
                raise ValueError(
                    "shard %s has only %d lines, the cursor says %d"
                    % (self.shards[self.k][1], n, self.line_idx)
                )

    def _advance_shard(self):
        self.k += 1
        if self.k == len(self.shards):
            self.k = 0
            self.epoch += 1
        self.line_idx = 0
        self._open()

    def cursor(self):
        return self.shards[self.k][0], self.line_idx, self.epoch

    def next(self):
        """The next (x, y) example."""
        empty_passes = 0
        while True:
            line = self.f.readline()
            if not line:
                empty_passes += 1
                if empty_passes > len(self.shards):
                    raise ValueError("this rank's shards hold no examples")
                self._advance_shard()
                continue
            self.line_idx += 1
            if not line.strip():
                continue
            empty_passes = 0
            where = "%s line %d" % (self.shards[self.k][1], self.line_idx)
            try:
                rec = json.loads(line)
                x = [float(v) for v in rec["x"]]
                y = int(rec["y"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError("%s: not an example {\"x\": [...], \"y\": k}: %s" % (where, e))
            if len(x) != self.features:
                raise ValueError("%s: %d features, expected %d" % (where, len(x), self.features))
            if not 0 <= y < self.classes:
                raise ValueError("%s: class %d outside 0..%d (see --classes)" % (where, y, self.classes - 1))
            return x, y


class Model:
    """Softmax regression: logits = W x + b, W is classes x features."""

    def __init__(self, classes, features, seed):
        rng = random.Random(seed)
        self.W = [[rng.uniform(-0.01, 0.01) for _ in range(features)] for _ in range(classes)]
        self.b = [0.0] * classes

    def gradients(self, batch):
        """(mean gradient of W, of b, mean loss) over ``batch``."""
        K, D = len(self.W), len(self.W[0])
        gW = [[0.0] * D for _ in range(K)]
        gb = [0.0] * K
        loss = 0.0
        for x, y in batch:
            logits = [self.b[k] + sum(w * v for w, v in zip(self.W[k], x)) for k in range(K)]
            m = max(logits)
            exps = [math.exp(z - m) for z in logits]
            z = sum(exps)
            loss += math.log(z) - (logits[y] - m)
            for k in range(K):
                d = exps[k] / z - (1.0 if k == y else 0.0)
                gb[k] += d
                row = gW[k]
                for j in range(D):
                    row[j] += d * x[j]
        n = float(len(batch))
        gW = [[g / n for g in row] for row in gW]
        gb = [g / n for g in gb]
        return gW, gb, loss / n

    def apply(self, gW, gb, lr):
        for k, row in enumerate(gW):
            wk = self.W[k]
            for j, g in enumerate(row):
                wk[j] -= lr * g
            self.b[k] -= lr * gb[k]

    def to_state(self):
        return {
            "W": [[w.hex() for w in row] for row in self.W],
            "b": [v.hex() for v in self.b],
        }

    def load_state(self, state):
        self.W = [[float.fromhex(w) for w in row] for row in state["W"]]
        self.b = [float.fromhex(v) for v in state["b"]]


def dumps(obj) -> bytes:
    """Canonical JSON bytes: the same state always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def flatten(gW, gb):
    return [g for row in gW for g in row] + list(gb)


def unflatten(flat, classes, features):
    gW = [flat[k * features:(k + 1) * features] for k in range(classes)]
    gb = flat[classes * features:classes * features + classes]
    return gW, gb


def infer_features(ctx):
    """The feature count from the first example of the first shard (the same for every rank)."""
    with open(ctx.all_shards()[0], "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return len(json.loads(line)["x"])
    fail("the first shard holds no examples; pass --features")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sync", action="store_true", help="average gradients with all-reduce every step")
    ap.add_argument("--classes", type=int, default=2, help="number of classes (default 2)")
    ap.add_argument("--features", type=int, default=None, help="feature count (default: from the data)")
    ap.add_argument("--total-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args(argv)

    ctx = Context.from_env()
    spec = ctx.spec
    total_steps = args.total_steps or spec.get("total_steps") or 100
    batch_size = args.batch_size or spec.get("batch_size") or 32
    lr = args.lr if args.lr is not None else float(spec.get("lr", 0.1))
    seed = int(spec.get("seed") or 0)
    every = ctx.checkpoint_every or spec.get("checkpoint_every") or 5
    sleep_sec = ctx.sleep_sec or 0.0
    if args.classes < 2:
        fail("--classes must be at least 2")

    if not ctx.all_shards():
        fail("no shard-*.jsonl files in DATASET_DIR=%s" % ctx.dataset_dir)
    shards = ctx.indexed_shards()
    if not shards:
        fail(
            "rank %d has no shard: DATASET_DIR=%s holds %d shard(s) for %d ranks"
            % (ctx.rank, ctx.dataset_dir, len(ctx.all_shards()), ctx.world_size)
        )
    features = args.features or infer_features(ctx)
    classes = args.classes

    model = Model(classes, features, seed)
    step, cursor = 0, (None, 0, 0)
    resumed = ctx.load_latest()
    if resumed is not None:
        step, part, manifest = resumed
        state = json.loads(part)
        if state.get("format") != FORMAT:
            fail("checkpoint step %d was not written by this trainer" % step)
        if (state["classes"], state["features"], state["sync"]) != (classes, features, args.sync):
            fail(
                "checkpoint step %d has classes=%s features=%s sync=%s; this run has %s %s %s"
                % (step, state["classes"], state["features"], state["sync"], classes, features, args.sync)
            )
        model.load_state(state["model"])
        c = state["cursor"]
        cursor = (c["shard_idx"], c["line_idx"], c["epoch"])
        log(ctx, "resumed from step %d (shard %d, line %d, epoch %d), restart %d"
            % (step, cursor[0], cursor[1], cursor[2], ctx.restart_count))
    else:
        log(ctx, "starting fresh (restart %d), %d shard(s), %s mode"
            % (ctx.restart_count, len(shards), "sync" if args.sync else "independent"))

    stream = Stream(shards, features, classes, *cursor)
    s, l, _ = stream.cursor()
    # The heartbeat thread reads this holder; the main loop swaps in a new dict each step.
    progress = [{"step": step, "shard_idx": s, "line_idx": l}]
    ctx.start_heartbeats(None, lambda: progress[0])

    loss = float("nan")
    while step < total_steps:
        batch = [stream.next() for _ in range(batch_size)]
        gW, gb, loss = model.gradients(batch)
        if args.sync:
            avg = ctx.allreduce(step + 1, flatten(gW, gb) + [loss])
            gW, gb = unflatten(avg, classes, features)
            loss = avg[-1]
        model.apply(gW, gb, lr)
        step += 1
        s, l, epoch = stream.cursor()
        metrics = {"loss": loss}
        progress[0] = {"step": step, "shard_idx": s, "line_idx": l, "metrics": metrics}
        # A save on notice (a stop, the server's SIGTERM, a preemption signal) at this step.
        asked = ctx.save_requested(step)
        if step % every == 0 or step == total_steps or asked:
            part = dumps({
                "format": FORMAT,
                "step": step,
                "rank": ctx.rank,
                "classes": classes,
                "features": features,
                "sync": args.sync,
                "cursor": {"shard_idx": s, "line_idx": l, "epoch": epoch},
                "model": model.to_state(),
            })
            ctx.save_part(step, part, shard_idx=s, line_idx=l, metrics=metrics)
            log(ctx, "step %d loss %.6f checkpoint registered" % (step, loss))
        if asked:
            ctx.hold_if_asked(step)
        if sleep_sec > 0:
            time.sleep(sleep_sec)

    # A last beat with the final step (a 409 here exits before anything is written: a stale
    # incarnation must not publish a model).
    ctx.stop_heartbeats()
    try:
        ctx.heartbeat(step=step, metrics={"loss": loss})
    except TrainvisorError as e:
        log(ctx, "final heartbeat failed: %s" % e)
    if ctx.rank == 0:
        data = dumps({
            "format": FORMAT,
            "steps": total_steps,
            "classes": classes,
            "features": features,
            "model": model.to_state(),
        })
        ctx.save_final_model(data)
        log(ctx, "wrote model.bin (%d bytes, sha256 %s)" % (len(data), hashlib.sha256(data).hexdigest()))
    log(ctx, "done at step %d, loss %.6f" % (step, loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
