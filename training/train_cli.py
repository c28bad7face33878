"""`near train stage1|stage2 --release NAME [--config FILE]`."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group()
def train() -> None:
    """Train the NeAR stages from a pinned release."""


def _stage_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--release", required=True, help="Release name (under <data_root>/releases)."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
        click.option(
            "--data-root", type=click.Path(file_okay=False, path_type=Path), help="Overrides the config's."
        ),
        click.option(
            "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (checkpoints, logs)."
        ),
        click.option("--steps", type=int, help="Overrides the config's."),
        click.option("--gpus", type=int, help="One Ray Train worker per GPU; 0 trains one CPU worker."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train(stage: str, release: str, config_file: Path | None, data_root: Path | None, out: Path | None,
           steps: int | None, gpus: int | None) -> None:  # fmt: skip
    from training.ray_train import config_class, train

    overrides: dict[str, Any] = {
        "release": release,
        "data_root": str(data_root) if data_root else None,
        "out_dir": str(out) if out else None,
        "steps": steps,
    }
    if gpus is not None:
        overrides.update(num_workers=max(gpus, 1), use_gpu=gpus > 0)
    cls = config_class(stage)
    if config_file:
        config = cls.from_yaml(config_file, **overrides)
    else:
        config = cls.from_dict({k: v for k, v in overrides.items() if v is not None})
    metrics = train(stage, config)
    click.echo(f"{stage} finished: {metrics}")
    click.echo(f"checkpoints: {Path(config.out_dir) / 'checkpoints'}")


@train.command()
@_stage_options
def stage1(**options: Any) -> None:
    """Stage 1: LoRA rectified flow, (shaded SLAT, input image) -> LH-SLAT."""
    _train("stage1", **options)


@train.command()
@_stage_options
def stage2(**options: Any) -> None:
    """Stage 2: LH-SLAT + camera + environment map -> relightable Gaussians, rendered and compared."""
    _train("stage2", **options)
