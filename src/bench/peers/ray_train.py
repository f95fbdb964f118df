"""Ray Train side of the peers comparison: the same loop (ddp_loop.train) on 4 workers of a
DataParallelTrainer with the torch backend (gloo) and FailureConfig(max_failures=3), on a
local Ray cluster started by ray.init(). Written out and run by `trainvisor bench`.

    PYTHONPATH=. python ray_train.py EVENTS STORAGE_DIR
"""

import os
import sys

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def loop(config):
    import torch

    import ddp_loop

    torch.set_num_threads(1)
    ddp_loop.train(config["events"])


def main():
    events, storage = sys.argv[1], sys.argv[2]
    ray.init()
    trainer = DataParallelTrainer(
        loop,
        train_loop_config={"events": events},
        backend_config=TorchConfig(backend="gloo"),
        # 2 cores: a quarter of a CPU each so the 4 workers fit next to Train's controller.
        scaling_config=ScalingConfig(num_workers=4, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(
            name="trainvisor-bench-peer",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=3),
        ),
    )
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    main()
