"""Training on Ray Train: one `TorchTrainer` worker per GPU (DDP), or one CPU worker locally.

The same entry serves `near train stage1|stage2` on a laptop (a local Ray), on a cluster (`ray_address` or the
`RAY_ADDRESS` that `ray job submit` sets) and inside a submitted job. Checkpoints are written by rank 0 into
the run's `out_dir`, which on several nodes must be shared storage.
"""

import importlib
import os
from pathlib import Path
from typing import Any, Literal

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from catalogs.release_reader import Release
from training.run import RunFolder

Stage = Literal["stage1", "stage2"]
STAGES: dict[str, tuple[str, str, str]] = {
    "stage1": ("training.stage1.config", "Stage1Config", "training.stage1.trainer.Stage1Trainer"),
    "stage2": ("training.stage2.config", "Stage2Config", "training.stage2.trainer.Stage2Trainer"),
}
"""Stage -> (config module, config class, trainer class path); trainers are imported inside the workers."""


def config_class(stage: Stage) -> type:
    module, name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def _worker(loop_config: dict[str, Any]) -> None:
    stage = loop_config["stage"]
    module, _, trainer_name = STAGES[stage][2].rpartition(".")
    trainer_class = getattr(importlib.import_module(module), trainer_name)
    context = ray.train.get_context()
    config = config_class(stage).from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    trainer = trainer_class(
        config, device=device, rank=context.get_world_rank(), world_size=context.get_world_size()
    )
    trainer.run(report=ray.train.report)


def train(stage: Stage, config: Any) -> dict[str, Any]:
    """Run `stage` to `config.steps` through Ray Train; returns the last metrics rank 0 logged (Ray Train 2 keeps
    only checkpointed reports in its result, so they are read from the run's `metrics.jsonl`).

    Raises:
        ReleaseNotFound, ReleaseIntegrityError: before any worker starts, when the pinned release cannot serve.
    """
    Release.open(config.data_root, config.release, config.release_sha256)
    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
    out_dir = Path(config.out_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "config": config.replace(out_dir=str(out_dir)).to_dict()},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name=stage, storage_path=str(out_dir / "ray")),
    )
    trainer.fit()
    return RunFolder(out_dir, rank=0).last_metrics()
