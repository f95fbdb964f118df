"""The peers' common workload: a small data-parallel loop (torch DDP over gloo, a 32 -> 4
linear model, batch 32, ~20 steps/s) that appends one JSON line per event to EVENTS:

    {"t": <unix time>, "rank": R, "pid": P, "phase": "init" | "ready" | "step", "step": N}

"init" is written just before init_process_group, "ready" once the process group exists, "step"
after every optimizer step, so the bench can tell a group that hangs in rendezvous from one
that trains. Runs until EVENTS.stop
exists (or 15 minutes pass). Written out and run by `trainvisor bench` (src/bench/peers.rs).

    torchrun --standalone --nproc-per-node 4 --max-restarts 3 ddp_loop.py EVENTS   (torchrun)
    a trainvisor job: {"world_size": 4, "command": ["python", "ddp_loop.py", "EVENTS"]}
    ray_train.py imports train() for Ray Train's workers (the process group is Ray's).
"""

import faulthandler
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def report(events, rank, phase, step=0):
    line = json.dumps(
        {"t": time.time(), "rank": rank, "pid": os.getpid(), "phase": phase, "step": step}
    )
    # One write() of a short line with O_APPEND: lines from the 4 ranks never interleave.
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def train(events):
    """The loop proper; the default process group must be initialized."""
    rank = dist.get_rank()
    report(events, rank, "ready")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    deadline = time.time() + 900
    step = 0
    while time.time() < deadline and not os.path.exists(events + ".stop"):
        x = torch.randn(32, 32, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        report(events, rank, "step", step)
        time.sleep(0.05)


def main():
    events = sys.argv[1]
    # `kill -USR1` prints every thread's Python stack to stderr: where a hung rank is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(1)
    report(events, int(os.environ.get("RANK", "-1")), "init")
    dist.init_process_group("gloo")
    train(events)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
