"""`near build` and `near plan`: the build from a YAML config, with a progress bar; or only what it would run."""

from pathlib import Path

import click
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from catalogs.keys import ENV_MAP_KIND
from catalogs.planner import plan as plan_work
from pipelines.build import new_run_id, prepare, run_build
from pipelines.build_config import BuildConfig
from pipelines.report import write_report

console = Console(stderr=True)
_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Build YAML.",
)
_retry_option = click.option("--retry-failed", is_flag=True, help="Run failed artifacts again.")


def _counts_table(
    title: str, counts: dict[str, dict[str, int]], computed: dict[str, dict[str, int]] | None = None
) -> Table:
    table = Table(title=title)
    for column in (
        "step",
        "targets",
        "ok",
        "failed",
        "todo",
        *(("computed ok", "computed failed") if computed is not None else ()),
    ):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step, c in counts.items():
        extra = (
            (str(computed.get(step, {}).get("ok", 0)), str(computed.get(step, {}).get("failed", 0)))
            if computed is not None
            else ()
        )
        table.add_row(step, str(c["targets"]), str(c["ok"]), str(c["failed"]), str(c["todo"]), *extra)
    return table


@click.command()
@_config_option
@_retry_option
def plan(config_path: Path, retry_failed: bool) -> None:
    """Print what a build would run, per step, without running it."""
    config = BuildConfig.from_yaml(config_path)
    catalog, table, sources, _ = prepare(config, new_run_id())
    work = plan_work(catalog, table.graph, sources, retry_failed=retry_failed)
    maps = sources.filter(pc.equal(sources["kind"], ENV_MAP_KIND)).num_rows
    title = f"plan over {sources.num_rows - maps} assets ({config.source.kind} source) and {maps} env maps"
    console.print(_counts_table(title, work.counts()))


@click.command()
@_config_option
@_retry_option
def build(config_path: Path, retry_failed: bool) -> None:
    """Build, commit and release the dataset the config describes (local Ray unless RAY_ADDRESS is set)."""
    config = BuildConfig.from_yaml(config_path)
    record = run_with_progress(config, retry_failed=retry_failed)
    if any(f for f in record.failures):
        console.print(f"[yellow]{len(record.failures)} failed artifacts (see the report)")


def run_with_progress(config: BuildConfig, *, retry_failed: bool = False):
    columns = (
        TextColumn("[bold]build"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("build", total=None, current="planning")

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, current=message)

        record = run_build(config, retry_failed=retry_failed, on_progress=progress)
    report = write_report(record, config.data_root)
    console.print(
        _counts_table(
            f"build {record.run_id} ({record.seconds:.0f} s)", record.planned, record.computed_by_step()
        )
    )
    if record.release:
        console.print(
            f"release: {record.release.get('name')} ({record.release.get('num_samples', 'exists')} samples)"
        )
    console.print(f"report: {report}")
    return record
