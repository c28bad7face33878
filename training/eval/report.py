"""The evaluation report: `metrics.json` (the numbers, strict JSON), `metrics.csv` (one row per asset, task
and decoder input) and `report.html` (a Table-1-style summary, notes, image grids worst first, the per-asset
table), plus `save_grid`, which draws the image grids the HTML shows.

The HTML is self-contained apart from the grid PNGs, which it references relatively (`images/...`), so the
output folder can be copied or served as is; it needs no JavaScript.
"""

import csv
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from training.eval.metrics import (
    LPIPS_MIN_CROP_PX,
    MASK_THRESHOLD,
    METRICS,
    PSNR_CAP_DB,
    EvalBuffers,
    is_higher_better,
    tone_map,
)
from training.eval.tasks import FORWARD, NOVEL_VIEW, RECONSTRUCTION, RELIGHTING
from training.stage2.agx import AgX

__all__ = [
    "CSV_FILE",
    "HTML_FILE",
    "INPUT_NOTES",
    "JSON_FILE",
    "SCHEMA",
    "TASK_NOTES",
    "error_map",
    "grid_columns",
    "save_grid",
    "write_report",
]

logger = logging.getLogger(__name__)

JSON_FILE, CSV_FILE, HTML_FILE = "metrics.json", "metrics.csv", "report.html"
ASSET_KEYS = ("task", "input", "asset", "split", "frames")
"""The leading CSV columns; the metric columns follow."""

TASK_NOTES = {
    FORWARD: "1. G-buffer forward rendering: the decoder renders the asset from its ground-truth LH-SLAT at the "
    "relight cameras under held-out maps (the Stage 2 renderer on its own).",
    RECONSTRUCTION: "2. Random-lit reconstruction: an env-map-lit input view -> Z_s -> Stage 1 -> LH-SLAT, "
    "rendered at that view's camera under that view's own map, against the input image.",
    RELIGHTING: "3. Unknown-lit relighting: the same LH-SLAT at the input camera under each held-out map, "
    "against render_eval.",
    NOVEL_VIEW: "4. Novel-view relighting: the same LH-SLAT at the relight cameras under held-out maps (its gt "
    "input is task 1).",
}
INPUT_NOTES = {
    "predicted": "Stage 1's LH-SLAT, sampled from the shaded SLAT: the full NeAR pipeline.",
    "z_s": "The shaded SLAT Z_s fed to the decoder directly, Stage 1 skipped: what Stage 1 adds.",
    "gt": "The ground-truth LH-SLAT: the decoder's upper bound.",
}

SCHEMA = {
    "version": 1,
    "null": "a number that was NaN or infinite (undefined, e.g. a masked metric of a frame with an empty "
    "mask) is written as null; a metric that does not apply (LPIPS without weights, shadow without a "
    "shadow-casting light) is absent",
    "summary": "task -> input -> metric -> {mean, low, high, assets, frames}: the mean over assets of each "
    "asset's mean over its frames; [low, high] the percentile bootstrap interval over assets (low = high = "
    "mean for a single asset); assets and frames count those having the metric",
    "assets": "one row per (task, input, asset): split, frames (records), and each metric's mean over the "
    "asset's frames (absent when no frame has it); the same rows as metrics.csv",
    "grids": "one record per image grid: task, input, asset, frame, score, path (relative to this folder)",
    "meta": "the run's metadata, verbatim (release, checkpoints, device, settings)",
    "metrics": {
        "psnr, ssim, lpips": "on AgX-tone-mapped radiance composited on black, data range 1, full frame",
        "*_masked": f"inside the union of predicted and true alpha > {MASK_THRESHOLD}",
        "psnr cap": f"PSNR is capped at {PSNR_CAP_DB:g} dB (identical images)",
        "lpips_masked": "LPIPS with pixels outside the mask set to black, cropped to the mask's bounding box "
        f"(at least {LPIPS_MIN_CROP_PX} px a side)",
        "base_color_*, roughness_*, metallic_*": "L1 and PSNR of the rendered buffers (premultiplied by "
        "coverage)",
        "shadow_l1*": "L1 of the predicted shadow against true shadow x true alpha, on frames with a "
        "shadow-casting light only",
    },
}

_STYLE = """body{font-family:sans-serif;margin:2em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}table{border-collapse:collapse;margin-bottom:1em}
td.l,th.l{text-align:left}small{color:#666}.worst{color:#a00}
figure{display:block;margin:8px 0}figure img{max-width:100%;image-rendering:pixelated}
pre{max-width:80em;white-space:pre-wrap;font-size:11px;text-align:left}"""

_INFERNO = (  # (position, r, g, b) anchors of matplotlib's "inferno", interpolated linearly
    (0.0, 0.001, 0.000, 0.014),
    (0.25, 0.341, 0.062, 0.429),
    (0.5, 0.736, 0.216, 0.330),
    (0.75, 0.978, 0.557, 0.035),
    (1.0, 0.988, 1.000, 0.645),
)
_LABEL_PX = 16
_GAP_PX = 4


# -- image grids ---------------------------------------------------------------------------------------------


def error_map(
    predicted: Float[Tensor, "H W 3"], truth: Float[Tensor, "H W 3"], *, gain: float = 4.0
) -> Float[Tensor, "H W 3"]:
    """|predicted - truth| averaged over channels, times `gain`, clipped to [0, 1], through an inferno
    colormap (black: no error; yellow-white: an error of 1 / gain or more)."""
    error = ((predicted.float() - truth.float()).abs().mean(dim=-1) * gain).clamp(0, 1).cpu()
    anchors = torch.tensor(_INFERNO)
    position = error * (len(_INFERNO) - 1)
    low = position.floor().long().clamp(max=len(_INFERNO) - 2)
    fraction = (position - low)[..., None]
    return (anchors[low, 1:] * (1 - fraction) + anchors[low + 1, 1:] * fraction).clamp(0, 1)


def grid_columns(
    predicted: EvalBuffers,
    truth: EvalBuffers,
    frame: int,
    *,
    agx: AgX,
    input_image: Float[Tensor, "Hi Wi 3"] | None = None,
    gain: float = 4.0,
) -> dict[str, Float[Tensor, "_ _ 3"]]:
    """The columns of one frame's grid, left to right: input (when given), prediction, truth (AgX on black),
    error map, then the predicted base colour, roughness, metallic and shadow (those the prediction has)."""
    image_p = tone_map(agx, predicted.take([frame]))[0].permute(1, 2, 0)
    image_t = tone_map(agx, truth.take([frame]))[0].permute(1, 2, 0)
    columns = {} if input_image is None else {"input": input_image}
    columns |= {"prediction": image_p, "truth": image_t}
    columns[f"|error| x{gain:g}"] = error_map(image_p, image_t, gain=gain)
    for name, label in (("base_color", "base color"), ("roughness", "roughness"), ("metallic", "metallic"),
                        ("shadow", "shadow")):  # fmt: skip
        buffer = getattr(predicted, name)
        if buffer is not None:
            columns[label] = buffer[frame].float().expand(*buffer.shape[1:3], 3)
    return {label: column.detach().cpu() for label, column in columns.items()}


def save_grid(
    path: str | Path,
    columns: Mapping[str, Float[Tensor, "_ _ 3"] | Float[Tensor, "_ _ 1"]],
    *,
    height_px: int | None = None,
) -> Path:
    """Write one row of labelled images, left to right in the order given, as a PNG.

    Args:
        path: the PNG to write (parent folders are made).
        columns: label -> image in [0, 1] (clipped), channels last, RGB or gray; sizes may differ.
        height_px: the common image height; default the tallest column's. Columns are scaled to it keeping
            their aspect ratio (nearest neighbour when enlarging, so small renders stay crisp).

    Returns:
        `path`.

    Raises:
        ValueError: no columns, or a column that is not (H, W, 1|3).
    """
    if not columns:
        raise ValueError("save_grid needs at least one column")
    arrays = {}
    for label, image in columns.items():
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(
                f"column {label!r} has shape {tuple(image.shape)}, expected (H, W, 3) or (H, W, 1)"
            )
        image = image.detach().float().cpu().clamp(0, 1).expand(*image.shape[:2], 3)
        arrays[label] = (image.numpy() * 255 + 0.5).astype(np.uint8)
    height = height_px or max(a.shape[0] for a in arrays.values())
    tiles = {}
    for label, array in arrays.items():
        tile = Image.fromarray(array, mode="RGB")
        width = max(1, round(tile.width * height / tile.height))
        resample = Image.Resampling.NEAREST if height >= tile.height else Image.Resampling.LANCZOS
        tiles[label] = tile.resize((width, height), resample)
    canvas = Image.new(
        "RGB",
        (sum(t.width for t in tiles.values()) + _GAP_PX * (len(tiles) + 1), height + _LABEL_PX + _GAP_PX),
        (40, 40, 40),
    )
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    x = _GAP_PX
    for label, tile in tiles.items():
        draw.text((x + 2, 2), label, fill=(235, 235, 235), font=font)
        canvas.paste(tile, (x, _LABEL_PX))
        x += tile.width + _GAP_PX
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# -- the report ----------------------------------------------------------------------------------------------


def write_report(
    out_dir: str | Path,
    *,
    summary: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
    asset_rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    grids: Sequence[Mapping[str, Any]] = (),
    score_label: str = "masked PSNR (dB)",
    is_score_higher_better: bool = True,
    confidence: float = 0.95,
    task_notes: Mapping[str, str] = TASK_NOTES,
    input_notes: Mapping[str, str] = INPUT_NOTES,
) -> Path:
    """Write `metrics.json`, `metrics.csv` and `report.html` into `out_dir`; returns the HTML's path.

    Args:
        out_dir: the evaluation's output folder; the grid PNGs lie under it (`images/...`).
        summary: `metrics.summarize(rows)`.
        asset_rows: `metrics.average_per_asset(rows)`.
        meta: free-form, JSON-ready run metadata, stored verbatim in metrics.json (NaN and infinities as null,
            anything not JSON as its `str`); its top-level keys head the HTML.
        grids: `{"task", "input", "asset", "frame", "score", "path"}` per grid PNG, `path` relative to
            `out_dir`; `score` (None or NaN when undefined) orders each task's grids worst first.
        score_label: what `score` is, for captions.
        is_score_higher_better: False when the score is an error (LPIPS, L1): the worst is then the highest.
        confidence: the level the summary's intervals were computed at, for labels.

    Raises:
        ValueError: a grid record without a required key, or with an absolute path or one leaving `out_dir`.
    """
    out = Path(out_dir)
    records = _sorted_grids(grids, is_score_higher_better)
    out.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA, "meta": meta, "summary": summary, "assets": asset_rows, "grids": records}
    (out / JSON_FILE).write_text(json.dumps(_json_ready(document), indent=1, allow_nan=False) + "\n")
    _write_csv(out / CSV_FILE, asset_rows)
    page = _html(out, summary, asset_rows, meta, records, score_label, confidence, task_notes, input_notes)
    (out / HTML_FILE).write_text(page)
    logger.info(
        "wrote the evaluation report to %s (%d asset rows, %d grids)", out, len(asset_rows), len(records)
    )
    return out / HTML_FILE


def _json_ready(value: Any) -> Any:
    """Strict-JSON values: non-finite floats -> None, numpy scalars -> Python, paths and the rest -> str."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return str(value)


def _score(record: Mapping[str, Any]) -> float | None:
    score = record.get("score")
    return float(score) if isinstance(score, int | float) and math.isfinite(score) else None


def _sorted_grids(grids: Sequence[Mapping[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Grid records by task order, worst score first, undefined scores last."""
    for index, record in enumerate(grids):
        missing = [k for k in ("task", "input", "asset", "frame", "path") if k not in record]
        if missing:
            raise ValueError(f"grid record {index} lacks {missing[0]!r}: {dict(record)!r:.200}")
        path = Path(str(record["path"]))
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"grid record {index}: path {str(path)!r} must be relative to the output folder")

    def key(record: Mapping[str, Any]) -> tuple:
        score = _score(record)
        worst_first = math.inf if score is None else (score if higher_is_better else -score)
        return (_task_order(record["task"]), worst_first, str(record["asset"]), str(record["frame"]))

    return [dict(record) for record in sorted(grids, key=key)]


def _task_order(task: str) -> tuple[int, str]:
    return (list(TASK_NOTES).index(task), task) if task in TASK_NOTES else (len(TASK_NOTES), task)


def _input_order(input_: str) -> tuple[int, str]:
    return (list(INPUT_NOTES).index(input_), input_) if input_ in INPUT_NOTES else (len(INPUT_NOTES), input_)


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {key for row in rows for key in row if key not in ASSET_KEYS}
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(ASSET_KEYS) + _metric_columns(rows)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if (v := _json_ready(row.get(k))) is None else v for k in columns})


def _format(metric: str, value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if "psnr" in metric else f"{value:.4f}"


def _cell(metric: str, entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    mean = _format(metric, entry.get("mean"))
    if entry.get("assets", 0) <= 1:
        return f"{mean}<br><small>1 asset: no interval</small>"
    low, high = _format(metric, entry.get("low")), _format(metric, entry.get("high"))
    return f"{mean}<br><small>[{low}, {high}]</small>"


def _arrow(metric: str) -> str:
    return "↑" if is_higher_better(metric) else "↓"


def _rows_of(summary: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, Mapping[str, Any]]]:
    return [
        (task, input_, summary[task][input_])
        for task in sorted(summary, key=_task_order)
        for input_ in sorted(summary[task], key=_input_order)
    ]


def _counts(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[int, int]:
    return (
        max((int(e.get("assets", 0)) for e in metrics.values()), default=0),
        max((int(e.get("frames", 0)) for e in metrics.values()), default=0),
    )


def _summary_table(summary: Mapping[str, Mapping[str, Any]], confidence: float) -> str:
    names = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS"}
    groups = (("_masked", "inside the union of alphas"), ("", "full frame"))
    head = (
        '<tr><th rowspan="2">task</th><th rowspan="2" class="l">input</th>'
        + "".join(f'<th colspan="3">{label}</th>' for _, label in groups)
        + '<th rowspan="2">assets</th><th rowspan="2">frames</th></tr><tr>'
        + "".join(f"<th>{names[m]} {_arrow(m)}</th>" for _ in groups for m in names)
        + "</tr>"
    )
    body = ""
    for task, input_, metrics in _rows_of(summary):
        assets, frames = _counts(metrics)
        cells = "".join(
            f"<td>{_cell(m + suffix, metrics.get(m + suffix))}</td>" for suffix, _ in groups for m in names
        )
        body += (
            f'<tr><td>{html.escape(task)}</td><td class="l">{html.escape(input_)}</td>{cells}'
            f"<td>{assets}</td><td>{frames}</td></tr>"
        )
    body = body or '<tr><td colspan="10">no frame evaluated</td></tr>'
    note = (
        "Mean over assets of each asset's mean over its frames; in brackets the "
        f"{100 * confidence:g} % percentile bootstrap interval over assets (none for a single asset). "
        "Images are AgX-tone-mapped radiance on black, data range 1. Masked: inside the union of predicted "
        f"and true alpha &gt; {MASK_THRESHOLD}; LPIPS there is computed with the outside blacked out, "
        f"cropped to the mask's bounding box. PSNR is capped at {PSNR_CAP_DB:g} dB. "
        "n/a: not measured (LPIPS without weights)."
    )
    return f'<table id="summary">{head}{body}</table><p><small>{note}</small></p>'


def _other_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    image = {f"{m}{s}" for m in ("psnr", "ssim", "lpips") for s in ("", "_masked")}
    metrics = _metric_columns([m for _, _, m in _rows_of(summary)])
    metrics = [m for m in metrics if m not in image]
    if not metrics:
        return "<p>no PBR or shadow buffers evaluated</p>"
    head = "<tr><th>task</th><th class='l'>input</th>" + "".join(
        f"<th>{html.escape(m)} {_arrow(m)}</th>" for m in metrics
    )
    body = "".join(
        f"<tr><td>{html.escape(task)}</td><td class='l'>{html.escape(input_)}</td>"
        + "".join(f"<td>{_cell(m, entry.get(m))}</td>" for m in metrics)
        + "</tr>"
        for task, input_, entry in _rows_of(summary)
    )
    return (
        f'<table id="buffers">{head}</tr>{body}</table><p><small>L1 and PSNR of the predicted base colour, '
        "roughness and metallic (premultiplied by coverage) and L1 of the shadow against true shadow x true "
        "alpha, the latter on frames with a shadow-casting light only; *_masked inside the same union "
        "mask.</small></p>"
    )


def _notes(
    summary: Mapping[str, Mapping[str, Any]], task_notes: Mapping[str, str], input_notes: Mapping[str, str]
) -> str:
    tasks = sorted(summary, key=_task_order)
    inputs = sorted({i for t in summary.values() for i in t}, key=_input_order)
    items = [(f"task {t}", task_notes.get(t, "")) for t in tasks] + [
        (f"input {i}", input_notes.get(i, "")) for i in inputs
    ]
    return "<dl>" + "".join(
        f"<dt><b>{html.escape(name)}</b></dt><dd>{html.escape(note) or 'no note'}</dd>"
        for name, note in items
    ) + "</dl>"  # fmt: skip


def _grids(out: Path, records: list[dict[str, Any]], score_label: str) -> str:
    if not records:
        return "<p>no image grids</p>"
    parts, task = [], None
    for record in records:
        if record["task"] != task:
            task = record["task"]
            parts.append(f"<h3>{html.escape(str(task))}</h3>")
        score = _score(record)
        caption = html.escape(
            f"{record['asset']} | input {record['input']} | frame {record['frame']} | {score_label} "
            + ("undefined" if score is None else f"{score:.4g}")
        )
        source = html.escape(Path(str(record["path"])).as_posix())
        if (out / record["path"]).is_file():
            image = f'<img src="{source}" alt="{caption}">'
        else:
            logger.warning("grid image %s is missing asset=%s", out / record["path"], record["asset"])
            image = f"<p class='worst'>missing image {source}</p>"
        parts.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return f"<p>Worst first ({html.escape(score_label)}).</p>" + "".join(parts)


def _asset_table(rows: Sequence[Mapping[str, Any]]) -> str:
    metrics = _metric_columns(rows)
    head = "".join(f"<th class='l'>{k}</th>" for k in ASSET_KEYS[:4]) + "<th>frames</th>"
    head += "".join(f"<th>{html.escape(m)} {_arrow(m)}</th>" for m in metrics)
    ordered = sorted(rows, key=lambda r: (_task_order(r["task"]), _input_order(r["input"]), str(r["asset"])))
    body = "".join(
        "<tr>"
        + "".join(f"<td class='l'>{html.escape(str(row.get(k, '')))}</td>" for k in ASSET_KEYS[:4])
        + f"<td>{row.get('frames', '')}</td>"
        + "".join(f"<td>{_format(m, row.get(m))}</td>" for m in metrics)
        + "</tr>"
        for row in ordered
    )
    return f'<table id="assets"><tr>{head}</tr>{body or "<tr><td>none</td></tr>"}</table>'


def _meta_header(meta: Mapping[str, Any]) -> str:
    def show(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(_json_ready(value), allow_nan=False)
        return html.escape(text if len(text) <= 400 else text[:400] + " ...")

    rows = "".join(
        f"<tr><th class='l'>{html.escape(str(k))}</th><td class='l'>{show(v)}</td></tr>"
        for k, v in meta.items()
    )
    return f'<table id="meta">{rows or "<tr><td>no metadata</td></tr>"}</table>'


def _html(
    out: Path,
    summary: Mapping[str, Mapping[str, Any]],
    asset_rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    records: list[dict[str, Any]],
    score_label: str,
    confidence: float,
    task_notes: Mapping[str, str],
    input_notes: Mapping[str, str],
) -> str:
    release = meta.get("release")
    title = "NeAR evaluation" + (f" of {release}" if isinstance(release, str) else "")
    full_meta = html.escape(json.dumps(_json_ready(meta), indent=1, allow_nan=False))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{_meta_header(meta)}
<h2>Summary</h2>{_summary_table(summary, confidence)}
<h2>PBR buffers and shadow</h2>{_other_table(summary)}
<h2>Tasks and decoder inputs</h2>{_notes(summary, task_notes, input_notes)}
<h2>Image grids</h2>{_grids(out, records, score_label)}
<h2>Per asset</h2>{_asset_table(asset_rows)}
<p><small>The same numbers: {JSON_FILE} (strict JSON, null for undefined) and {CSV_FILE}.</small></p>
<h2>Run metadata</h2><pre>{full_meta}</pre>
</body></html>
"""
