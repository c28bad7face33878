"""The command line's view of a run of steps (`near train`; made to serve `near eval` too): a live progress
bar, one printed line per validation, and a closing table of the final metrics.

Command-line code only (STYLE rule 6): a `*_cli` module builds the display, and the library loop it drives
reports plain values (`training.run.StepProgress` for training) through a callback. The bar and the lines go
to stderr; the closing table is a result, printed on stdout by the caller.

Examples:
    >>> import io
    >>> from rich.console import Console
    >>> quiet = Console(file=io.StringIO())
    >>> with TrainingProgress(40, "stage2", samples_per_step=2, console=quiet) as progress:
    ...     progress.update(10, {"loss": 0.57})
    ...     progress.validation(20, {"psnr": 10.02, "ssim": 0.358})
    >>> summary_table("stage2 finished", {"step": 40, "loss": 0.5}).row_count
    2
"""

import datetime
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Column, Table
from rich.text import Text

__all__ = ["TrainingProgress", "format_value", "summary_table"]

WIDE_COLUMNS = 100
"""Consoles at least this wide also show the status column (the last checkpoint)."""


def format_value(value: Any) -> str:
    """A metric as a short string: floats to 4 significant digits, anything else as `str`."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


class _Throughput(ProgressColumn):
    """Samples per second (the bar's steps per second times the samples in a step), or `unit`s per second."""

    def __init__(self, samples_per_step: int | None, unit: str) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.samples_per_step, self.unit = samples_per_step, unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        if self.samples_per_step is None:
            return Text(f"{_rate(speed)} {self.unit}/s", style="progress.data.speed")
        return Text(f"{_rate(speed * self.samples_per_step)} samples/s", style="progress.data.speed")


class _TimeRemaining(ProgressColumn):
    """`ETA 0:12:03` from the bar's speed; `ETA -:--:--` until there is one."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        seconds = task.time_remaining
        left = "-:--:--" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))
        return Text(f"ETA {left}", style="progress.remaining")


class TrainingProgress:
    """A live bar over `total` steps: `description`, the bar, step/total, the headline metrics (`starting`
    before the first step), samples/s and ETA; on consoles of `WIDE_COLUMNS` or more also a status text.

    Use it as a context manager around the loop; `update`, `validation` and `note` may be called from any
    thread. The bar's clock starts at the first `update`, so start-up time (Ray, model loading) is not in the
    speed or the ETA.

    Args:
        total: number of steps (None: unknown, the bar pulses).
        description: the bar's label, e.g. "stage2" or "eval".
        samples_per_step: samples in one step (the global batch) for the samples/s column; None shows
            `unit`s per second.
        unit: what the bar counts, plural ("steps", "assets").
        starting: what the bar says until the first `update` (e.g. "starting Ray Train").
        console: where the bar and the printed lines go (default: stderr).

    Examples:
        >>> with TrainingProgress(100, "eval", samples_per_step=8, starting="loading the model") as progress:
        ...     for step in range(1, 101):
        ...         progress.update(step, {"mse": 0.1})
    """

    def __init__(
        self, total: int | None, description: str, *, samples_per_step: int | None = None,
        unit: str = "steps", starting: str = "", console: Console | None = None,
    ) -> None:  # fmt: skip
        self.total, self.description = total, description
        self.console = console or Console(stderr=True)
        is_wide = self.console.width >= WIDE_COLUMNS  # an 80-column console has no room for the status
        columns: list[ProgressColumn] = [
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=30 if is_wide else 16),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[headline]}", table_column=Column(no_wrap=True)),
            _Throughput(samples_per_step, unit),
            _TimeRemaining(),
        ]
        if is_wide:
            columns.append(TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True)))
        self._bar = Progress(*columns, console=self.console)
        self._task: TaskID = self._bar.add_task(
            description, total=total, start=False, headline=starting, status=""
        )

    def __enter__(self) -> Self:
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._bar.stop()

    def update(
        self, step: int, headline: Mapping[str, Any] | None = None, *, status: str | None = None,
        total: int | None = None,
    ) -> None:  # fmt: skip
        """Move the bar to `step` steps done; `headline` (e.g. {"loss": 0.57}) replaces the metrics shown,
        `status` the status text (e.g. the last checkpoint) and `total` the number of steps, once known; None
        keeps each."""
        fields: dict[str, str] = {}
        if self._bar.tasks[0].start_time is None:  # the first step: the clock starts, `starting` goes
            self._bar.start_task(self._task)
            fields["headline"] = ""
        if headline is not None:
            fields["headline"] = " ".join(f"{k} {format_value(v)}" for k, v in headline.items())
        if status is not None:
            fields["status"] = status
        if total is not None:
            self.total = total
        self._bar.update(self._task, completed=step, total=self.total, **fields)

    def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One printed line: `stage2 step 20/40 validation: psnr 10.02  ssim 0.358`."""
        values = "  ".join(f"{k} {format_value(v)}" for k, v in metrics.items())
        self.note(f"[bold]{self.description}[/] step {step}/{self.total or '?'} validation: {values}")

    def note(self, message: str) -> None:
        """A line printed above the bar (rich markup)."""
        self._bar.console.print(message, soft_wrap=True)


def summary_table(title: str, metrics: Mapping[str, Any]) -> Table:
    """The closing table: one row per metric, in the order given."""
    table = Table(title=title, min_width=len(title) + 4)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_value(value))
    return table
