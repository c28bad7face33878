"""`near train stage1 --release NAME [--config FILE]`."""

from pathlib import Path

import click

from infra.errors import ConfigError


@click.group()
def train() -> None:
    """Train the NeAR stages from a pinned release."""


@train.command()
@click.option("--release", required=True, help="Release name (under <data_root>/releases).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), help="Overrides the config's.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (checkpoints, logs)."
)
@click.option("--steps", type=int, help="Overrides the config's.")
@click.option("--gpus", type=int, help="One Ray Train worker per GPU; 0 trains one CPU worker.")
def stage1(
    release: str, config_file: Path | None, data_root: Path | None, out: Path | None, steps: int | None,
    gpus: int | None,
) -> None:  # fmt: skip
    """Stage 1: LoRA rectified flow, (shaded SLAT, input image) -> LH-SLAT."""
    from training.ray_train import train_stage1
    from training.stage1.config import Stage1Config

    overrides = {
        "release": release,
        "data_root": str(data_root) if data_root else None,
        "out_dir": str(out) if out else None,
        "steps": steps,
    }
    if gpus is not None:
        overrides.update(num_workers=max(gpus, 1), use_gpu=gpus > 0)
    try:
        if config_file:
            config = Stage1Config.from_yaml(config_file, **overrides)
        else:
            config = Stage1Config.from_dict({k: v for k, v in overrides.items() if v is not None})
        metrics = train_stage1(config)
    except (ConfigError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"stage 1 finished: {metrics}")
    click.echo(f"checkpoints: {Path(config.out_dir) / 'checkpoints'}")
