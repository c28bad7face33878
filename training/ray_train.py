"""Training on Ray Train: one `TorchTrainer` worker per GPU (DDP), or one CPU worker locally.

The same entry serves `near train stage1|stage2` on a laptop (a local Ray), on a cluster (`ray_address` or the
`RAY_ADDRESS` that `ray job submit` sets) and inside a submitted job. Checkpoints are written by rank 0 into
the run's `out_dir`, which on several nodes must be shared storage.

The workers log at the driver's level (the command line's `-v`); Ray's own INFO lines (the local Ray's start,
Ray Train's worker group and each `report`) show only at DEBUG (`-vv`). A local Ray is started quiet: see
`_start_ray`.
"""

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import ray
import torch
from ray.train import LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from catalogs.release_reader import Release
from training.run import RunFolder, StepProgress

Stage = Literal["stage1", "stage2"]
STAGES: dict[str, tuple[str, str, str]] = {
    "stage1": ("training.stage1.config", "Stage1Config", "training.stage1.trainer.Stage1Trainer"),
    "stage2": ("training.stage2.config", "Stage2Config", "training.stage2.trainer.Stage2Trainer"),
}
"""Stage -> (config module, config class, trainer class path); trainers are imported inside the workers."""

PROGRESS_INTERVAL_S = 0.5
"""Rank 0 sends its step progress to the driver at most this often; validations, checkpoints and the last step
always."""
PROGRESS_POLL_S = 0.25
"""How long the driver waits on the progress queue before it looks whether training has ended."""
LOCAL_RAY_RUNTIME_ENV = {
    "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    "worker_process_setup_hook": "training.ray_worker_setup.setup_local_worker",
}
"""The job's runtime env on a local Ray. No preemption watcher: one local node is never drained, and the
watcher actor's creation logs a core_worker.cc error line (ray-project/ray#53727). The setup hook keeps Ray
Train's PlacementGroupCleaner from logging a warning every second or a traceback (see
`training.ray_worker_setup`)."""
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Logs, at every new local cluster, that token authentication is on (Ray's default since 2.59)."""


def config_class(stage: Stage) -> type:
    module, name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), name)


class _WorkerReport:
    """The `report` a worker hands its trainer (a `training.run.ProgressReport`): the logged steps' metrics
    go to `ray.train.report` on every rank (a collective call); rank 0's `StepProgress` goes to the driver's
    queue."""

    def __init__(self, progress: Queue | None) -> None:
        self.progress, self.last_sent_s = progress, -math.inf

    def __call__(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)

    def step_done(self, progress: StepProgress) -> None:
        now_s = time.monotonic()
        is_last = progress.step == progress.steps
        is_news = bool(progress.validation) or progress.checkpoint is not None or is_last
        if self.progress is not None and (is_news or now_s - self.last_sent_s >= PROGRESS_INTERVAL_S):
            self.progress.put(dataclasses.asdict(progress))  # waits for the queue: the last step arrives
            self.last_sent_s = now_s


def _worker(loop_config: dict[str, Any]) -> None:
    logging.getLogger().setLevel(loop_config["log_level"])  # Ray Train sets INFO; the driver's level wins
    stage = loop_config["stage"]
    module, _, trainer_name = STAGES[stage][2].rpartition(".")
    trainer_class = getattr(importlib.import_module(module), trainer_name)
    context = ray.train.get_context()
    config = config_class(stage).from_dict(loop_config["config"])
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    rank = context.get_world_rank()
    trainer = trainer_class(config, device=device, rank=rank, world_size=context.get_world_size())
    trainer.run(report=_WorkerReport(loop_config["progress"] if rank == 0 else None))


def _level_name(level: int) -> str:
    """The standard level name at or above `level` (Ray Train's LoggingConfig takes names only)."""
    names = ["DEBUG", "INFO", "WARNING", "ERROR"]
    return next((name for name in names if level <= logging.getLevelNamesMapping()[name]), "CRITICAL")


def _start_ray(address: str | None, log_level: int) -> None:
    """Connect to the cluster at `address`, or start a local Ray: `address` None or "local" (None joins a
    cluster that `ray start` left on this host, as `ray.init` does; these settings then apply to this job).

    A local Ray runs without its dashboard, with `LOCAL_RAY_RUNTIME_ENV`, and its driver-side notice that
    token authentication is on (Ray's secure default, nothing to act on) is not shown.
    """
    if address not in (None, "local"):
        ray.init(address=address, include_dashboard=False, logging_level=log_level)
        return
    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    ray.init(
        address=address, include_dashboard=False, logging_level=log_level, runtime_env=LOCAL_RAY_RUNTIME_ENV
    )


def _forward(progress: Queue, on_progress: Callable[[StepProgress], None], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            item = progress.get(timeout=PROGRESS_POLL_S)
        except Empty:
            continue
        on_progress(StepProgress(**item))


@contextlib.contextmanager
def _progress_queue(on_progress: Callable[[StepProgress], None] | None) -> Iterator[Queue | None]:
    """A queue rank 0 puts its `StepProgress` into, read by a driver thread that calls `on_progress`; None
    without `on_progress`."""
    if on_progress is None:
        yield None
        return
    progress = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    reader = threading.Thread(
        target=_forward, args=(progress, on_progress, stop), name="train-progress", daemon=True
    )
    reader.start()
    try:
        yield progress
        stop.set()
        reader.join()
        for item in progress.get_nowait_batch(progress.qsize()):  # sent after the reader's last look
            on_progress(StepProgress(**item))
    finally:
        stop.set()
        reader.join()
        progress.shutdown(force=True)


def train(
    stage: Stage, config: Any, *, on_progress: Callable[[StepProgress], None] | None = None
) -> dict[str, Any]:
    """Run `stage` to `config.steps` through Ray Train; returns the last metrics rank 0 logged (Ray Train 2
    keeps only checkpointed reports in its result, so they are read from the run's `metrics.jsonl`).

    Args:
        stage: "stage1" or "stage2".
        config: the stage's config (`config_class(stage)`).
        on_progress: called with rank 0's `StepProgress` while the run goes: at least every
            `PROGRESS_INTERVAL_S`, and at each validation, checkpoint and the last step. It runs on a thread
            of this process (not the caller's), in step order.

    Raises:
        ReleaseNotFound, ReleaseIntegrityError: before any worker starts, when the pinned release cannot
            serve.
    """
    Release.open(config.data_root, config.release, config.release_sha256)
    log_level = logging.getLogger().getEffectiveLevel()
    ray_log_level = logging.INFO if log_level <= logging.DEBUG else max(log_level, logging.WARNING)
    if not ray.is_initialized():
        _start_ray(config.ray_address or os.environ.get("RAY_ADDRESS"), ray_log_level)
    out_dir = Path(config.out_dir).resolve()
    with _progress_queue(on_progress) as progress:
        loop_config = {
            "stage": stage,
            "config": config.replace(out_dir=str(out_dir)).to_dict(),
            "log_level": log_level,
            "progress": progress,
        }
        trainer = TorchTrainer(
            _worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
            run_config=RunConfig(
                name=stage,
                storage_path=str(out_dir / "ray"),
                logging_config=LoggingConfig(log_level=_level_name(ray_log_level)),
            ),
        )
        trainer.fit()
    return RunFolder(out_dir, rank=0).last_metrics()
