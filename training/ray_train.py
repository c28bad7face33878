"""Training on Ray Train: one `TorchTrainer` worker per GPU (DDP), or one CPU worker locally.

The same entry serves `near train ...` on a laptop (a local Ray), on a cluster (`ray_address` or the
`RAY_ADDRESS` that `ray job submit` sets) and inside a submitted job. Checkpoints are written by rank 0 into
the run's `out_dir`, which on several nodes must be shared storage.
"""

import json
import os
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from training.stage1.config import Stage1Config


def _stage1_worker(loop_config: dict[str, Any]) -> None:
    from training.stage1.trainer import Stage1Trainer

    context = ray.train.get_context()
    config = Stage1Config.from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    trainer = Stage1Trainer(
        config, device=device, rank=context.get_world_rank(), world_size=context.get_world_size()
    )
    trainer.run(report=ray.train.report)


def train_stage1(config: Stage1Config) -> dict[str, Any]:
    """Run Stage 1 to `config.steps` through Ray Train; returns the last metrics rank 0 logged (Ray Train 2 keeps
    only checkpointed reports in its result, so they are read from the run's `metrics.jsonl`)."""
    from training.stage1.trainer import METRICS_FILE

    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
    out_dir = Path(config.out_dir).resolve()
    trainer = TorchTrainer(
        _stage1_worker,
        train_loop_config={"config": config.replace(out_dir=str(out_dir)).to_dict()},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name="stage1", storage_path=str(out_dir / "ray")),
    )
    trainer.fit()
    lines = (out_dir / METRICS_FILE).read_text().splitlines() if (out_dir / METRICS_FILE).exists() else []
    return json.loads(lines[-1]) if lines else {}
