"""The cost of trainvisor's Python hook per optimizer step: a small CPU training loop (a
64 -> 64 -> 1 MLP, batch 32, SGD) run as a trainvisor rank, with automatic heartbeats on or
off (the job's `auto_heartbeat`); each step timed alone. Written out and run by
`trainvisor bench --only observe` (src/bench/observe.rs).

    python observe_cost.py OUT STEPS

Writes {"auto": bool, "step_ns": [...], "hook": bool} to OUT.
"""

import json
import os
import sys
import time

import torch

out, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 64), torch.randn(32, 1)
times = []
for i in range(steps + 200):
    t = time.perf_counter_ns()
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i >= 200:  # after the warm-up
        times.append(time.perf_counter_ns() - t)
with open(out, "w") as f:
    json.dump(
        {
            "auto": os.environ.get("TRAINVISOR_AUTO_HEARTBEAT") == "1",
            "hook": getattr(sys, "_trainvisor_observer", None) is not None,
            "step_ns": times,
        },
        f,
    )
