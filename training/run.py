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
from typing import Any, ClassVar, Literal, Protocol, Self

import torch
import yaml

from catalogs.release_reader import Release
from infra.config import FrozenConfig
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


def coerce_floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """YAML reads `1e-4` (no dot) as a string: convert the float fields of `cls`, saying which one is bad."""
    data = dict(data)
    for field in dataclasses.fields(cls):
        if field.type is float and isinstance(data.get(field.name), str):
            try:
                data[field.name] = float(data[field.name])
            except ValueError:
                raise ConfigError(f"{field.name} must be a number, got {data[field.name]!r}") from None
    return data


def read_yaml_config(
    path: str | Path, *, folders: tuple[str, ...], models: tuple[str, ...] = ()
) -> dict[str, Any]:  # fmt: skip
    """A config file's mapping with `folders` (and `models` that name an existing file) made absolute against
    the file's own folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    base = path.parent
    for key in folders:
        if isinstance(data.get(key), str):
            data[key] = str((base / data[key]).resolve())
        elif isinstance(data.get(key), list):
            data[key] = [str((base / item).resolve()) for item in data[key]]
    for key in models:
        local = base / str(data.get(key, ""))
        if key in data and (local.exists() or local.with_suffix(".safetensors").exists()):
            data[key] = str(local.resolve())
    return data


@dataclasses.dataclass(frozen=True)
class TrainingConfig(FrozenConfig):
    """What every stage's run needs: the pinned release, the run folder, the schedule and the Ray Train workers.
    A stage's config adds its own fields; YAML files may give paths relative to themselves."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = ("data_root", "out_dir")
    MODEL_KEYS: ClassVar[tuple[str, ...]] = ()
    """Keys naming a model: made absolute when they name a file beside the YAML, else kept (a hub id)."""

    data_root: str = "near-demo/data"
    release: str = ""
    release_sha256: str | None = None
    """Pin of the release manifest; None pins whatever the release holds now (recorded in checkpoints)."""
    out_dir: str = "runs"
    steps: int = 1000
    batch_size: int = 8
    """Global batch (samples per step over all workers)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    precision: Precision = "auto"
    data_workers: int = 2
    """DataLoader processes reading the next steps' batches from the release while this one trains."""
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    val_samples: int = 8
    val_split: str = "val"
    num_workers: int = 1
    use_gpu: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.num_workers) < 1:
            raise ConfigError(f"steps, batch_size and num_workers must be >= 1: {self!r}")
        if self.batch_size % self.num_workers:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Turn a stage's nested mappings into their configs (the stage overrides this)."""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}")
        try:
            return cls(**cls.nested(coerce_floats(cls, data)))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid {cls.__name__}: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        data = read_yaml_config(path, folders=cls.PATH_KEYS, models=cls.MODEL_KEYS)
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})


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


def train_loop(
    trainer: Trainer, stage: str, train_step: Callable[[Any], dict[str, float]],
    report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:  # fmt: skip
    """Train up to `config.steps` from the trainer's step on prefetched batches: `train_step(batch)` gives the
    step's metrics; validate, checkpoint, log (`metrics.jsonl`, the log, `report`) on the configured steps."""
    config, metrics = trainer.config, {}
    for batch in step_batches(trainer).loader(trainer.step, config.data_workers):
        step_metrics = train_step(batch)  # advances trainer.step
        metrics = {"step": trainer.step, **step_metrics}
        logged = trainer.step % config.log_every == 0
        if trainer.step % config.val_every == 0 or trainer.step == config.steps:
            metrics.update({f"val_{k}": v for k, v in trainer.validate().items()})
            logged = True
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            trainer.save_checkpoint()
        if logged:
            logger.info("%s step %d/%d %s", stage, trainer.step, config.steps, metrics)
            trainer.run_folder.append_metrics(metrics)
            report(metrics)
    if trainer.writer is not None:
        trainer.writer.flush()
    return metrics
