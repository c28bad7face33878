"""The `near` command line: progress bars and tables live here, nowhere below."""

import collections
import importlib
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from infra.errors import FactoryError
from infra.logs import setup_logging
from pipelines.demo import DemoConfig
from pipelines.local_render import AssetRecord, render_files
from render_jobs.formats import find_asset_files
from render_jobs.protocol import GPU_BACKENDS
from render_jobs.recipes import RECIPE_NAMES, RecipeConfig, recipe_config
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig

console = Console(stderr=True)


class _LazyGroup(click.Group):
    """Loads commands with heavy imports (pyiceberg, zarr, torch) on first use, so `near render` starts light."""

    LAZY = {
        "catalog": "pipelines.catalog_cli:catalog",
        "encode": "pipelines.encode_cli:encode",
        "build": "pipelines.build_cli:build",
        "plan": "pipelines.build_cli:plan",
        "train": "training.train_cli:train",
        "eval": "training.eval_cli:eval_command",
        "relight": "training.relight_cli:relight_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attr = self.LAZY[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> object:
        """Every command's refusals (the project's FactoryError) become one line on stderr and exit status 2."""
        try:
            return super().invoke(ctx)
        except FactoryError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_LazyGroup)
@click.option("-v", "--verbose", count=True, help="-v for progress logs, -vv for debug logs.")
def cli(verbose: int) -> None:
    """NeAR factory: relightable LH-SLAT datasets from 3D assets."""
    setup_logging(verbose)


def _render_with_progress(
    paths: list[Path], recipe: RecipeConfig, out: Path, worker: RenderWorkerConfig, supervisor: RenderSupervisor, label: str
) -> list[AssetRecord]:
    records = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[current]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=len(paths), current="starting the render child")
        for record in render_files(paths, recipe, out, worker=worker, supervisor=supervisor):
            records.append(record)
            mark = "[green]ok" if record.result.is_ok else f"[red]{record.result.reason}"
            bar.update(task, advance=1, current=f"{Path(record.path).name}: {mark}")
    return records


def _summary_table(title: str, records: list[AssetRecord]) -> Table:
    table = Table(title=title)
    table.add_column("status")
    table.add_column("reason")
    table.add_column("assets", justify="right")
    table.add_column("examples")
    groups = collections.defaultdict(list)
    for record in records:
        groups[(record.result.status, record.result.reason or "")].append(Path(record.path).name)
    for (status, reason), names in sorted(groups.items()):
        colour = "green" if status == "ok" else "red"
        table.add_row(f"[{colour}]{status}", reason, str(len(names)), ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))
    return table


def _report(records: list[AssetRecord], recipe: RecipeConfig, supervisor: RenderSupervisor) -> dict:
    counts = collections.Counter(r.result.status for r in records)
    reasons = collections.Counter(r.result.reason for r in records if not r.result.is_ok)
    info = supervisor.info
    return {
        "recipe": recipe.to_dict(),
        "worker": info.__dict__ if info else None,
        "summary": {"ok": counts["ok"], "failed": counts["failed"], "by_reason": dict(reasons)},
        "records": [r.to_dict() for r in records],
    }


def _worker_config(timeout: float, allow_software_gl: bool, gpu_backend: str, render_python: str | None) -> RenderWorkerConfig:
    return RenderWorkerConfig(render_python=render_python, timeout_s=timeout, allow_software_gl=allow_software_gl,
                              gpu_backend=gpu_backend)


_worker_options = [
    click.option("--timeout", type=float, default=600.0, show_default=True, help="Wall-clock limit per asset, seconds."),
    click.option("--allow-software-gl", is_flag=True, help="Accept EEVEE on a CPU rasterizer (Mesa llvmpipe)."),
    click.option("--gpu-backend", type=click.Choice(GPU_BACKENDS), default="opengl", show_default=True,
                 help="Blender's GPU backend; vulkan is faster on NVIDIA data-centre GPUs."),
    click.option("--render-python", default=None, help="Render env interpreter (default: configured by infra/setup.sh)."),
]


def _with_worker_options(fn):
    for option in reversed(_worker_options):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--recipe", "recipe_name", type=click.Choice(RECIPE_NAMES), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--views", type=int, default=None, help="Views per asset [lh 150, input 8, relight 12].")
@click.option("--lightings-per-view", type=int, default=None, help="Env maps per view for relight [16].")
@click.option("--resolution", type=int, default=None, help="Image side in pixels [512].")
@click.option("--samples", type=int, default=None, help="EEVEE samples per frame [16].")
@click.option("--seed", type=int, default=None, help="Seed mixed with each asset's sha256 [0].")
@click.option("--env-maps", type=click.Path(exists=True, file_okay=False), default=None, help="Folder of .exr/.hdr maps.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a JSON report here.")
@_with_worker_options
def render(paths, recipe_name, out, views, lightings_per_view, resolution, samples, seed, env_maps, report, timeout,
           allow_software_gl, gpu_backend, render_python) -> None:
    """Render asset files (or folders of them) with one recipe."""
    try:
        recipe = recipe_config(recipe_name, num_views=views, lightings_per_view=lightings_per_view, resolution_px=resolution,
                               samples=samples, seed=seed, env_maps_dir=env_maps)
        files = find_asset_files(list(paths))
        if not files:
            raise click.UsageError(f"no asset files found in {', '.join(map(str, paths))}")
        out.mkdir(parents=True, exist_ok=True)
        with RenderSupervisor(_worker_config(timeout, allow_software_gl, gpu_backend, render_python)) as supervisor:
            records = _render_with_progress(files, recipe, out, supervisor.cfg, supervisor, f"render {recipe_name}")
            data = _report(records, recipe, supervisor)
    except FactoryError:
        raise
    except ValueError as err:  # a recipe option out of range
        raise click.ClickException(str(err)) from err
    console.print(_summary_table(f"{recipe_name}: {data['summary']['ok']} ok, {data['summary']['failed']} failed", records))
    if report:
        report.write_text(json.dumps(data, indent=1))
        console.print(f"report: {report}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("near-demo"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=int, default=DemoConfig.resolution_px, show_default=True)
@click.option("--samples", type=int, default=DemoConfig.samples, show_default=True)
def demo(out: Path, seed: int, resolution: int, samples: int) -> None:
    """The embedded default job: demo assets and small random-weight models, built on a local Ray into a release.

    Runs anywhere, so software GL is accepted. Writes OUT/build.yaml, an ordinary config for `near build`.
    """
    from pipelines.build_cli import run_with_progress  # heavy imports (ray, torch) only for this command
    from pipelines.build_config import BuildConfig

    out.mkdir(parents=True, exist_ok=True)
    demo_config = DemoConfig(resolution_px=resolution, samples=samples, seed=seed)
    config_path = demo_config.write_build_config(out)
    console.print(f"demo build config: {config_path} (models with random weights: the latents mean nothing)")
    stage1_path = demo_config.write_stage1_config(out)
    stage2_path = demo_config.write_stage2_config(out)
    record = run_with_progress(BuildConfig.from_yaml(config_path))
    if record.failures:
        sys.exit(1)
    console.print(f"train Stage 1 on it: near train stage1 --release demo-seed{seed} --config {stage1_path}")
    console.print(f"train Stage 2 on it: near train stage2 --release demo-seed{seed} --config {stage2_path}")
    console.print(f"then evaluate both: near eval --release demo-seed{seed} --stage1 {out / 'runs' / 'stage1'} "
                  f"--stage2 {out / 'runs' / 'stage2'}")


def main() -> None:
    # transformers draws a bar per model load (DINOv2 in every encoder and evaluator): ours say what runs. Set
    # before any command module is imported (click imports it before the group's callback runs).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    cli()


if __name__ == "__main__":
    main()
