"""A plain PyTorch DDP (gloo) script, as written for torchrun: no trainvisor code. The tests
run it unchanged to show that trainvisor observes it (tests/api/observe.rs).

    python ddp_unchanged.py STEP_LOG

Trains TOTAL_STEPS steps (env, default 120), one every STEP_SLEEP seconds, checkpoints with
torch.save into CHECKPOINT_DIR every CKPT_EVERY steps (rank 0) and resumes from there. Its own
step log, one JSON line per event appended to STEP_LOG, is what the test holds trainvisor's
figures against: {"t": unix time, "rank": R, "event": "start" | "resumed" | "step", "step": N,
"loss": L}. With PAUSE_AT, a fresh (not resumed) run stands still for PAUSE_S seconds after
that step, so a test can kill it at a known step.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

LOG = sys.argv[1]
TOTAL = int(os.environ.get("TOTAL_STEPS", 120))
EVERY = int(os.environ.get("CKPT_EVERY", 25))
SLEEP = float(os.environ.get("STEP_SLEEP", 0.1))
PAUSE_AT = int(os.environ.get("PAUSE_AT", 0))
PAUSE_S = float(os.environ.get("PAUSE_S", 0))
CKPT_DIR = os.environ.get("CHECKPOINT_DIR", ".")
CKPT = os.path.join(CKPT_DIR, "ddp.pt")


def log(rank, event, step, loss=None):
    line = json.dumps({"t": time.time(), "rank": rank, "event": event, "step": step, "loss": loss})
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main():
    os.makedirs(CKPT_DIR, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    log(rank, "start", step)
    if os.path.exists(CKPT):
        state = torch.load(CKPT)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(rank, "resumed", step)
    resumed = step > 0
    gen = torch.Generator().manual_seed(rank)
    while step < TOTAL:
        x = torch.randn(32, 16, generator=gen)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        log(rank, "step", step, loss.item())
        if step % EVERY == 0 and rank == 0:
            tmp = CKPT + ".tmp"
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, CKPT)
        if step % EVERY == 0:
            dist.barrier()
        if step == PAUSE_AT and not resumed:
            time.sleep(PAUSE_S)
        time.sleep(SLEEP)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
