"""What both stages' trainers share: the run folder (atomic checkpoints, `latest`, `metrics.jsonl`), the
per-step batches a prefetching loader reads, seeded per-step randomness, the release pin, and YAML configs.

Checkpoints are written into a temporary folder, renamed, then `latest` is pointed at them: a crash at any
moment leaves the previous checkpoint intact and never a half-written one visible.
"""

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self, runtime_checkable

import torch

from catalogs.errors import check_release_name
from catalogs.release_reader import Release
from infra.config import (
    ConfigFieldError,
    FrozenConfig,
    LocalPath,
    Location,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    check_field,
    load_config_file,
)
from infra.errors import ConfigError

logger = logging.getLogger(__name__)

Precision = Literal["auto", "float32", "bfloat16"]
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META_FILE = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"


class RunFolder:
    """`out_dir` of a run; only rank 0 writes."""

    def __init__(self, out_dir: str | Path, rank: int) -> None:
        self.path, self.rank = Path(out_dir), rank

    def write_checkpoint(self, step: int, write: Callable[[Path], dict[str, Any]]) -> Path | None:
        """`write(folder)` fills a fresh folder and returns the metadata for `checkpoint.json`."""
        if self.rank != 0:
            return None
        folder = self.path / CHECKPOINTS / f"step-{step:08d}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = write(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        latest = self.path / CHECKPOINTS / LATEST
        latest.with_suffix(".tmp").write_text(folder.name + "\n")
        latest.with_suffix(".tmp").replace(latest)
        return folder

    def latest_checkpoint(self) -> Path | None:
        latest = self.path / CHECKPOINTS / LATEST
        return self.path / CHECKPOINTS / latest.read_text().strip() if latest.exists() else None

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        """One JSON line per log step, readable without TensorBoard."""
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / METRICS_FILE, "a") as file:
                file.write(json.dumps(metrics) + "\n")

    def last_metrics(self) -> dict[str, Any]:
        path = self.path / METRICS_FILE
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1]) if lines else {}


def release_pin(release: Release) -> dict[str, str]:
    return {"name": release.info["name"], "manifest_sha256": release.info["manifest_sha256"]}


def check_release_pin(folder: Path, meta: dict[str, Any], release: Release) -> None:
    """Refuse to resume on a release whose manifest changed since the checkpoint."""
    pinned = meta["release"]["manifest_sha256"]
    if pinned != release.info["manifest_sha256"]:
        raise ConfigError(
            f"{folder} was trained on release {meta['release']['name']!r} with manifest {pinned}, but the "
            f"release now has {release.info['manifest_sha256']}: start a new out_dir"
        )


def step_generator(seed: int, step: int, rank: int, purpose: str) -> torch.Generator:
    """The random draws of one (step, rank, purpose): a resumed run repeats them exactly."""
    key = f"{seed}/{step}/{rank}/{purpose}".encode()
    return torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))


def stream_indices(num_items: int, *, seed: int, start: int, count: int) -> list[int]:
    """Items at positions [start, start + count) of the endless stream: epoch e is a permutation seeded by
    (seed, e), so the order depends on (manifest, seed, epoch) only."""
    out, cache = [], {}
    for position in range(start, start + count):
        epoch = position // num_items
        if epoch not in cache:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_items, generator=generator).tolist()
        out.append(cache[epoch][position % num_items])
    return out


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def batch(self, indices: list[int]) -> Any: ...


class StepBatches(torch.utils.data.Dataset):
    """Item s is this rank's batch of step s: a function of the step alone, so loader workers can read ahead."""

    def __init__(self, data: BatchSource, config: "TrainingConfig", *, rank: int, world_size: int) -> None:
        self.data, self.rank = data, rank
        self.steps, self.batch_size, self.seed = config.steps, config.batch_size, config.seed
        self.per_rank = config.batch_size // world_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Any:
        start = step * self.batch_size + self.rank * self.per_rank
        return self.data.batch(
            stream_indices(len(self.data), seed=self.seed, start=start, count=self.per_rank)
        )

    def loader(self, first_step: int, num_workers: int) -> torch.utils.data.DataLoader:
        """The batches of steps [first_step, steps), read ahead by `num_workers` processes."""
        return torch.utils.data.DataLoader(
            self,
            batch_size=None,
            sampler=range(first_step, self.steps),
            num_workers=num_workers,
            prefetch_factor=2 if num_workers else None,
        )


@dataclasses.dataclass(frozen=True)
class TrainingConfig(FrozenConfig):
    """What every stage's run needs: the pinned release, the run folder, the schedule and the Ray Train workers.
    A stage's config adds its own fields; YAML files may give paths relative to themselves."""

    data_root: Location = "near-demo/data"
    release: str = ""
    """One plain release name; empty until the command line's `--release` sets it."""
    release_sha256: str | None = None
    """Pin of the release manifest; None pins whatever the release holds now (recorded in checkpoints)."""
    out_dir: LocalPath = "runs"
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 8
    """Global batch (samples per step over all workers)."""
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.9999
    precision: Precision = "auto"
    data_workers: NonNegativeInt = 2
    """DataLoader processes reading the next steps' batches from the release while this one trains."""
    seed: NonNegativeInt = 0
    log_every: PositiveInt = 10
    val_every: PositiveInt = 500
    checkpoint_every: PositiveInt = 500
    val_samples: PositiveInt = 8
    val_split: str = "val"
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.release:
            check_field("release", check_release_name, self.release)
        if self.batch_size % self.num_workers:
            raise ConfigFieldError(
                "batch_size", f"{self.batch_size} is not divisible by num_workers {self.num_workers}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        """The file's config with `overrides` (command-line values; None: unset) in place of its values.
        Paths in the file are relative to its folder, those in `overrides` to the working directory."""
        config = load_config_file(cls, path)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_dict({**config.to_dict(), **given}) if given else config


class Trainer(Protocol):
    """What `train_loop` drives: each stage's trainer."""

    config: TrainingConfig
    step: int
    rank: int
    world_size: int
    train_data: BatchSource
    run_folder: RunFolder
    writer: Any

    def validate(self) -> dict[str, float]: ...
    def save_checkpoint(self) -> Path | None: ...


def step_batches(trainer: Trainer) -> StepBatches:
    return StepBatches(trainer.train_data, trainer.config, rank=trainer.rank, world_size=trainer.world_size)


@dataclasses.dataclass(frozen=True)
class StepProgress:
    """Where a run stands after one step: what rank 0 tells whoever shows the run (`near train`'s progress bar).
    Plain values only, so it travels between processes as `dataclasses.asdict(progress)`."""

    stage: str
    step: int
    steps: int
    samples_per_step: int
    """The global batch: samples per step over all workers."""
    metrics: dict[str, float]
    """The step's training metrics (`loss`, ...)."""
    validation: dict[str, float] = dataclasses.field(default_factory=dict)
    """`trainer.validate()`'s metrics, without the `val_` prefix, on validation steps; else empty."""
    checkpoint: str | None = None
    """The checkpoint folder written at this step, else None."""


@runtime_checkable
class ProgressReport(Protocol):
    """A `report` (metrics of the logged steps) that also hears rank 0's `StepProgress` after every step."""

    def __call__(self, metrics: dict[str, Any]) -> None: ...
    def step_done(self, progress: StepProgress) -> None: ...


def _format_metrics(metrics: dict[str, Any], *, skip: str) -> str:
    """`loss=0.5701 val_psnr=10.02`: short, where a dict's repr is long and noisy."""
    shown = {k: v for k, v in metrics.items() if k != skip}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def train_loop(
    trainer: Trainer, stage: str, train_step: Callable[[Any], dict[str, float]],
    report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:  # fmt: skip
    """Train up to `config.steps` from the trainer's step on prefetched batches: `train_step(batch)` gives the
    step's metrics; validate, checkpoint, log (`metrics.jsonl`, the log, `report`) on the configured steps.
    A `report` that is a `ProgressReport` also gets rank 0's `StepProgress` after every step."""
    config, metrics = trainer.config, {}
    step_done = report.step_done if isinstance(report, ProgressReport) and trainer.rank == 0 else None
    for batch in step_batches(trainer).loader(trainer.step, config.data_workers):
        step_metrics = train_step(batch)  # advances trainer.step
        metrics = {"step": trainer.step, **step_metrics}
        logged = trainer.step % config.log_every == 0
        validation, checkpoint = {}, None
        if trainer.step % config.val_every == 0 or trainer.step == config.steps:
            validation = trainer.validate()
            metrics.update({f"val_{k}": v for k, v in validation.items()})
            logged = True
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            checkpoint = trainer.save_checkpoint()
        if logged:
            shown = _format_metrics(metrics, skip="step")
            logger.info("%s step %d/%d %s", stage, trainer.step, config.steps, shown)
            trainer.run_folder.append_metrics(metrics)
            report(metrics)
        if step_done is not None:
            progress = StepProgress(
                stage=stage, step=trainer.step, steps=config.steps, samples_per_step=config.batch_size,
                metrics=dict(step_metrics), validation=dict(validation),
                checkpoint=None if checkpoint is None else str(checkpoint),
            )  # fmt: skip
            step_done(progress)
    if trainer.writer is not None:
        trainer.writer.flush()
    return metrics
