"""The build report: `report.json` (the numbers) and `report.html` (the same, with contact sheets) per run."""

import collections
import html
import json
from pathlib import Path

import numpy as np

from catalogs.storage import RootPath, root_path
from pipelines.build import BuildRecord

_STYLE = """body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}table{border-collapse:collapse;margin-bottom:1em}
figure{display:inline-block;margin:4px}pre{max-width:60em;white-space:pre-wrap;font-size:11px;text-align:left}"""


def write_report(record: BuildRecord, data_root: str | RootPath) -> RootPath:
    """Write `<data_root>/reports/<run_id>/report.{json,html}`; returns the HTML path."""
    folder = root_path(data_root) / "reports" / record.run_id
    folder.mkdir(parents=True, exist_ok=True)
    record.sheets = sorted(str(p.relative_to(folder)) for p in (folder / "sheets").glob("*.png"))
    (folder / "report.json").write_text(json.dumps(record.to_dict(), indent=1) + "\n")
    (folder / "report.html").write_text(_html(record))
    return folder / "report.html"


def _table(header: list[str], rows: list[list[object]], empty: str = "none") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or f'<tr><td colspan={len(header)}>{empty}</td></tr>'}</table>"


def _html(record: BuildRecord) -> str:
    computed = record.computed_by_step()
    steps = _table(
        ["step", "targets", "reused (ok before)", "computed ok", "computed failed", "compute s"],
        [
            [
                html.escape(step),
                c["targets"],
                c["ok"],
                computed.get(step, {}).get("ok", 0),
                computed.get(step, {}).get("failed", 0),
                f"{record.step_seconds.get(step, 0.0):.1f}",
            ]
            for step, c in record.planned.items()
        ],
    )
    by_reason = collections.defaultdict(list)
    for failure in record.failures:
        by_reason[failure["reason"]].append(failure)
    reasons = _table(
        ["reason", "artifacts", "steps", "assets", "example message", "stderr tail"],
        [
            [
                html.escape(reason),
                len(items),
                html.escape(", ".join(sorted({f["step"] for f in items}))),
                html.escape(", ".join(sorted({f["asset_id"] for f in items}))),
                html.escape(f"{items[0]['step']}: {items[0]['message']}"[:300]),
                f"<pre>{html.escape(items[0]['stderr_tail'][-600:])}</pre>",
            ]
            for reason, items in sorted(by_reason.items())
        ],
    )
    skipped = _table(
        ["source entry", "reason", "message"],
        [
            [html.escape(s["entry"]), html.escape(s["reason"]), html.escape(s["message"][:300])]
            for s in sorted(record.skipped_sources, key=lambda s: (s["reason"], s["entry"]))
        ],
    )
    assets = _table(
        ["asset", "compute s", "voxels"],
        [
            [html.escape(a), f"{s:.1f}", record.voxels.get(a, "")]
            for a, s in sorted(record.asset_seconds.items())
        ],
    )
    counts = np.array(list(record.voxels.values()) or [0])
    voxels = (
        f"<p>{len(record.voxels)} assets voxelized or encoded: min {counts.min()}, median {int(np.median(counts))}, "
        f"max {counts.max()} voxels</p>"
        if record.voxels
        else "<p>no asset voxelized or encoded in this run</p>"
    )
    latents = _table(
        ["slat step", "per-channel mean", "per-channel std"],
        [
            [step, " ".join(f"{v:+.3f}" for v in s["mean"]), " ".join(f"{v:.3f}" for v in s["std"])]
            for step, s in record.latent_stats().items()
        ],
    )
    sheets = (
        "".join(
            f'<figure><img src="{html.escape(s)}" width="320"><figcaption>{html.escape(Path(s).stem)}'
            "</figcaption></figure>"
            for s in record.sheets
        )
        or "<p>nothing rendered in this run</p>"
    )
    release = html.escape(json.dumps(record.release, indent=1)) if record.release else "no release"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>NeAR build {record.run_id}</title>
<style>{_STYLE}</style></head><body><h1>NeAR factory build {record.run_id}</h1><p>{record.seconds:.1f} s in all</p>
<h2>Steps</h2>{steps}<h2>Failures by reason</h2>{reasons}
<h2>Skipped sources</h2>{skipped}<h2>Assets</h2>{assets}
<h2>Voxels and latents</h2>{voxels}{latents}<h2>Contact sheets</h2>{sheets}<h2>Release</h2><pre>{release}</pre>
</body></html>
"""
