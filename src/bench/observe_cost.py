"""The cost of trainvisor's Python hook per optimizer step: a small CPU training loop (a
64 -> 64 -> 1 MLP, batch 32, SGD) run as a trainvisor rank, with automatic heartbeats on or
off (the job's `auto_heartbeat`); each step timed alone (wall), and the process's CPU time
over the loop (every thread: the heartbeat thread's work included, time waiting for a core on
a loaded machine not). Written out and run by `trainvisor bench --only observe`
(src/bench/observe.rs).

    python observe_cost.py OUT STEPS

Writes {"auto": bool, "hook": bool, "step_ns": [...], "cpu_ns_per_step": float,
"hook_calls_ns": float or null} to OUT.
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



def step():
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(200):  # warm-up; the first step also starts the heartbeat thread
    step()
times = []
cpu = time.process_time_ns()
for _ in range(steps):
    t = time.perf_counter_ns()
    step()
    times.append(time.perf_counter_ns() - t)
cpu = (time.process_time_ns() - cpu) / steps

# The hook's own work on the training thread, alone: its step hook and its record of the
# loss (what each optimizer step adds to the loop, besides one Python frame for the wrapped
# `backward`), timed over many calls where a single step's share is below the clock's noise.
calls_ns = None
observer = getattr(sys, "_trainvisor_observer", None)
if observer is not None:
    loss = (model(x) - y).pow(2).mean()
    n = 200_000
    t = time.perf_counter_ns()
    for _ in range(n):
        observer.on_step(opt, (), {})
        observer.on_backward(loss)
    calls_ns = (time.perf_counter_ns() - t) / n
with open(out, "w") as f:
    json.dump(
        {
            "auto": os.environ.get("TRAINVISOR_AUTO_HEARTBEAT") == "1",
            "hook": getattr(sys, "_trainvisor_observer", None) is not None,
            "step_ns": times,
            "cpu_ns_per_step": cpu,
            "hook_calls_ns": calls_ns,
        },
        f,
    )
