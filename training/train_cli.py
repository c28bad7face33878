"""`near train stage1|stage2 --release NAME [--config FILE]`: the run folder and the TensorBoard command
first, then a progress bar (step, loss, samples/s, ETA) with one line per validation, and a closing table of
the final metrics with the checkpoint's path (on stdout; everything else goes to stderr)."""

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from training.progress import TrainingProgress
    from training.run import StepProgress


@click.group()
def train() -> None:
    """Train the NeAR stages from a pinned release."""


def _stage_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--release", required=True, help="Release name (under <data_root>/releases)."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
        click.option("--data-root", help="A folder or a URL such as s3://bucket/prefix; overrides the config's."),
        click.option(
            "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (checkpoints, logs)."
        ),
        click.option("--steps", type=int, help="Overrides the config's."),
        click.option("--gpus", type=int, help="One Ray Train worker per GPU; 0 trains one CPU worker."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _train(stage: str, release: str, config_file: Path | None, data_root: str | None, out: Path | None,
           steps: int | None, gpus: int | None) -> None:  # fmt: skip
    from training.ray_train import config_class

    overrides: dict[str, Any] = {
        "release": release,
        "data_root": data_root,
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
    _train_with_progress(stage, config)


def _show(display: "TrainingProgress", progress: "StepProgress") -> None:
    """Rank 0's step on the bar: the loss (or the step's first metric), a line per validation, and the step of
    the last checkpoint in the status (`ckpt 500`)."""
    metrics = progress.metrics
    headline = {"loss": metrics["loss"]} if "loss" in metrics else dict(list(metrics.items())[:1])
    status = f"ckpt {progress.step}" if progress.checkpoint else None
    display.update(progress.step, headline, status=status)
    if progress.validation:
        display.validation(progress.step, progress.validation)


def _train_with_progress(stage: str, config: Any) -> None:
    from rich.console import Console

    from training.progress import TrainingProgress, summary_table
    from training.ray_train import train
    from training.run import RunFolder

    console = Console(stderr=True)
    out_dir = Path(config.out_dir).resolve()
    console.print(f"run folder: {out_dir}", soft_wrap=True)
    console.print(f"TensorBoard: tensorboard --logdir {out_dir / 'tensorboard'}", soft_wrap=True)
    started_s = time.monotonic()
    display = TrainingProgress(
        config.steps, stage, samples_per_step=config.batch_size, starting="starting Ray Train",
        console=console,
    )  # fmt: skip
    with display:
        metrics = train(stage, config, on_progress=lambda progress: _show(display, progress))
    elapsed = datetime.timedelta(seconds=round(time.monotonic() - started_s))
    results = Console()
    title = f"{stage} finished: step {metrics.get('step')}/{config.steps} in {elapsed}"
    results.print(summary_table(title, metrics))
    results.print(f"checkpoint: {RunFolder(out_dir, rank=0).latest_checkpoint()}", soft_wrap=True)


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
