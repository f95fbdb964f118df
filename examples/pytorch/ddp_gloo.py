#!/usr/bin/env python3
"""PyTorch DistributedDataParallel on CPU (gloo), written exactly as for torchrun.

The script reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT through
``init_process_group(init_method="env://")``, checkpoints with ``torch.save`` into
CHECKPOINT_DIR and resumes from it, so the same file runs under torchrun and under trainvisor.

Under torchrun:

    CHECKPOINT_DIR=/tmp/ddp torchrun --nproc-per-node 2 examples/pytorch/ddp_gloo.py

Under trainvisor (a synchronous job: when one rank dies every rank must restart from the last
checkpoint, as torchrun does, hence ``"restart_scope": "job"``; the command's relative path is
resolved in the server's working directory):

    curl -s -X POST http://127.0.0.1:8000/jobs -H 'Content-Type: application/json' -d '{
          "world_size": 2,
          "command": ["python", "examples/pytorch/ddp_gloo.py"],
          "restart_scope": "job",
          "total_steps": 200, "checkpoint_every": 20
        }'
    curl -s http://127.0.0.1:8000/jobs/$JOB_ID/summary      # steps, restarts, per-rank pids
    curl -s http://127.0.0.1:8000/jobs/$JOB_ID/model -o model.bin

trainvisor sets CHECKPOINT_DIR to the job's own directory, RESTART_COUNT (also
TORCHELASTIC_RESTART_COUNT) and, for every launch of the job, a fresh MASTER_PORT. If the
helper ``examples/python/trainvisor_worker.py`` is found, the script also heartbeats so a hung
rank is detected (optional: without it, trainvisor's Python hook still reports the optimizer
steps and loss of a local rank, see the README's "Unchanged PyTorch scripts"), and it saves on
notice: when trainvisor asks (a stop, its SIGTERM, Slurm's ``--signal``), the ranks agree on the
step with one tiny all-reduce per step, rank 0 writes ``ddp.pt`` there, and every rank registers
a part of that step so trainvisor commits it; then they hold until ended. This example is not
run in CI; tests/scripts/ddp_unchanged.py, a plainer DDP script, is (tests/api/observe.rs).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

SPEC = json.loads(os.environ.get("TRAINVISOR_SPEC") or "{}")
TOTAL_STEPS = int(SPEC.get("total_steps") or os.environ.get("TOTAL_STEPS", 200))
CKPT_EVERY = int(os.environ.get("CHECKPOINT_EVERY", 20))
BATCH = int(SPEC.get("batch_size") or 32)
LR = float(SPEC.get("lr") or 0.05)
SEED = int(SPEC.get("seed") or 0)
CKPT_DIR = os.environ.get("CHECKPOINT_DIR", "./checkpoints")
CKPT = os.path.join(CKPT_DIR, "ddp.pt")


def save_atomic(obj, path):
    """torch.save to a temp file, fsync, rename: a crash never leaves a torn checkpoint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def batch_for(step, rank, world):
    """A deterministic batch per (step, rank): resuming at any step sees the same data."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + step * world + rank)
    x = torch.randn(BATCH, 8, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) - x[:, 4:].sum(dim=1, keepdim=True)).tanh()
    return x, y


def main():
    dist.init_process_group(backend="gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    step = 0
    if os.path.exists(CKPT):
        state = torch.load(CKPT, map_location="cpu")
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"[rank {rank}] resumed from step {step}", flush=True)

    progress = {"step": step, "metrics": {}}
    ctx = None
    try:  # optional trainvisor heartbeats and save on notice
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from trainvisor_worker import Context

        if "TRAINVISOR_HEARTBEAT_URL" in os.environ:
            ctx = Context.from_env()
            ctx.start_heartbeats(None, lambda: dict(progress))
    except ImportError:
        pass

    loss_fn = nn.MSELoss()
    while step < TOTAL_STEPS:
        x, y = batch_for(step, rank, world)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        step += 1
        progress.update(step=step, metrics={"loss": loss.item()})
        # Save on notice: one rank may hear the request a step late, so the ranks agree (MAX).
        asked = torch.tensor([int(ctx is not None and ctx.save_requested(step))])
        if ctx is not None:
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        if step % CKPT_EVERY == 0 or step == TOTAL_STEPS or asked.item():
            # Every rank holds the same weights; rank 0 writes, the others wait for it.
            if rank == 0:
                save_atomic(
                    {"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step},
                    CKPT,
                )
                print(f"[rank 0] step {step} loss {loss.item():.5f} checkpointed", flush=True)
            dist.barrier()
            if asked.item():
                # ddp.pt now holds this step: every rank's part tells trainvisor so.
                ctx.save_part(step, json.dumps({"step": step, "checkpoint": CKPT}).encode())
                ctx.hold_if_asked(step)

    if rank == 0:
        save_atomic(model.module.state_dict(), os.path.join(CKPT_DIR, "model.bin"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
