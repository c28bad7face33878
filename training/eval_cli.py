"""`near eval --release NAME --stage1 RUN --stage2 RUN`: the paper's four tasks on a release's test split."""

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from training.progress import TrainingProgress

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # whole task names in a log


@click.command("eval")
@click.option("--release", required=True, help="Release name (under <data_root>/releases).")
@click.option("--stage1", "stage1_run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Stage 1 run folder (its newest checkpoint's EMA weights).")
@click.option("--stage2", "stage2_run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Stage 2 run folder (its newest checkpoint's EMA weights).")
@click.option("--data-root", help="A folder or a URL (default: the Stage 2 run's data root).")
@click.option("--split", default="test", show_default=True, help="test, or train / val to compare.")
@click.option("--tasks", default=None, help="Comma-separated subset of the four tasks (default: all).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: <stage2 run>/eval/<release>-<split>).")
@click.option("--gpus", type=int, default=0, show_default=True, help="One Ray evaluator actor per GPU.")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU evaluator actors on Ray (>1).")
@click.option("--lpips-vgg", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="torchvision's vgg16 weights for LPIPS (default: the Stage 2 run's).")
def eval_command(release: str, stage1_run: Path, stage2_run: Path, data_root: str | None, split: str,
                 tasks: str | None, out: Path | None, gpus: int, workers: int, lpips_vgg: Path | None) -> None:
    """Evaluate Stage 1 and Stage 2 on the paper's four tasks with the decoder-input ablations: PSNR, SSIM
    and LPIPS on AgX images; writes metrics.json, metrics.csv and report.html."""
    from training.eval.runner import EvalSettings, evaluate
    from training.eval.tasks import TASKS
    from training.inference import RunCheckpoint

    stage2_meta = RunCheckpoint.latest(stage2_run).meta
    root = data_root or stage2_meta["config"]["data_root"]
    out = out or stage2_run / "eval" / f"{release}-{split}"
    settings = EvalSettings(
        data_root=root, release=release, stage1_run=str(stage1_run), stage2_run=str(stage2_run),
        out_dir=str(out), split=split, tasks=tuple(tasks.split(",")) if tasks else TASKS,
        lpips_vgg=str(lpips_vgg) if lpips_vgg else None,
    )
    console.print(f"evaluating release [bold]{release}[/] ({split}) -> {out}")
    with TrainingProgress(None, "eval", unit="assets", starting="loading both stages", console=console) as bar:
        summary = evaluate(settings, gpus=gpus, workers=workers,
                           on_asset=lambda asset, done, total: bar.update(done, status=asset, total=total))
    Console(width=console.width).print(summary_table(summary))
    console.print(f"report: {out / 'report.html'}")


def summary_table(summary: dict[str, Any]) -> Table:
    """Task x decoder input: masked and full-frame PSNR / SSIM / LPIPS means (95 % interval half-widths)."""
    table = Table(title="NeAR evaluation (AgX images on black; masked = inside the union of alphas)")
    metrics = ("psnr_masked", "ssim_masked", "lpips_masked", "psnr", "ssim", "lpips")
    for name in ("task", "input", "assets", *metrics):
        table.add_column(name, justify="left" if name in ("task", "input") else "right")
    for task, inputs in summary.items():
        for decoder_input, values in inputs.items():
            cells = []
            for metric in metrics:
                stat = values.get(metric)
                cells.append("-" if not stat or stat.get("mean") is None else _cell(stat))
            assets = next((v.get("assets") for v in values.values() if isinstance(v, dict)), 0)
            table.add_row(task, decoder_input, str(assets), *cells)
    return table


def _cell(stat: dict[str, Any]) -> str:
    mean, low, high = stat["mean"], stat.get("low"), stat.get("high")
    if low is None or high is None or low == high:  # one asset: no interval
        return f"{mean:.3f}"
    return f"{mean:.3f} ±{(high - low) / 2:.3f}"

