"""The build report: `report.json` (the numbers) and `report.html` (the same, with contact sheets) per run."""

import collections
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from catalogs.storage import RootPath, root_path
from infra.errors import Reason
from pipelines.build import BuildRecord

_STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{white-space:nowrap}
td.n{text-align:right}figure{display:inline-block;margin:4px}pre{max-width:60em;white-space:pre-wrap;font-size:11px}
summary{cursor:pointer;color:#555}"""


def write_report(record: BuildRecord, data_root: str | RootPath) -> RootPath:
    """Write `<data_root>/reports/<run_id>/report.{json,html}`; returns the HTML path."""
    folder = root_path(data_root) / "reports" / record.run_id
    folder.mkdir(parents=True, exist_ok=True)
    record.sheets = sorted(str(p.relative_to(folder)) for p in (folder / "sheets").glob("*.png"))
    report = record.to_dict()
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "report.html").write_text(render_html(report))
    return folder / "report.html"


def _cell(value: object) -> str:
    """Numbers right-aligned (floats to 0.1), text as given: callers escape what came from outside."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{value}</td>"
    return f'<td class="n">{value:.1f}</td>' if isinstance(value, float) else f'<td class="n">{value}</td>'


def _table(header: list[str], rows: list[list[object]], empty: str = "none") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or f'<tr><td colspan={len(header)}>{empty}</td></tr>'}</table>"


def _lines(items: Iterable[str]) -> str:
    return "<br>".join(html.escape(item) for item in sorted(set(items)))


def render_html(report: dict[str, Any]) -> str:
    """The page of one build, drawn from its `report.json` alone (so any run's page can be drawn again)."""
    computed = report["computed"]
    steps = _table(
        ["step", "targets", "reused (ok before)", "computed ok", "computed failed", "compute s"],
        [
            [html.escape(step), c["targets"], c["ok"], computed.get(step, {}).get("ok", 0),
             computed.get(step, {}).get("failed", 0), float(report["step_seconds"].get(step, 0.0))]
            for step, c in report["planned"].items()
        ],
    )
    by_reason = collections.defaultdict(list)
    first_failure: dict[str, dict[str, Any]] = {}
    step_order = {step: i for i, step in enumerate(report["planned"])}
    for failure in sorted(report["failures"], key=lambda f: step_order.get(f["step"], len(step_order))):
        by_reason[failure["reason"]].append(failure)
        if failure["reason"] != Reason.UPSTREAM_FAILED:
            first_failure.setdefault(failure["asset_id"], failure)
    reasons = _table(
        ["reason", "artifacts", "steps", "assets", "example"],
        [
            [
                html.escape(reason), len(items), _lines(f["step"] for f in items), _lines(f["asset_id"] for f in items),
                html.escape(f"{items[0]['step']}: {items[0]['message']}"[:300])
                + (f"<details><summary>stderr tail</summary><pre>{html.escape(items[0]['stderr_tail'][-600:])}</pre>"
                   "</details>" if items[0]["stderr_tail"] else ""),
            ]
            for reason, items in sorted(by_reason.items())
        ],
    )
    skipped = _table(
        ["source entry", "reason", "message"],
        [
            [html.escape(s["entry"]), html.escape(s["reason"]), html.escape(s["message"][:300])]
            for s in sorted(report["skipped_sources"], key=lambda s: (s["reason"], s["entry"]))
        ],
    )
    failed_assets = {f["asset_id"] for f in report["failures"]}
    assets = _table(
        ["asset", "outcome", "compute s", "voxels"],
        [
            [html.escape(a), _outcome(first_failure.get(a), a in failed_assets), float(s), report["voxels"].get(a, "")]
            for a, s in sorted(report["asset_seconds"].items())
        ],
    )
    counts = np.array(list(report["voxels"].values()) or [0])
    voxels = (
        f"<p>{len(report['voxels'])} assets voxelized or encoded: min {counts.min()}, median {int(np.median(counts))}, "
        f"max {counts.max()} voxels</p>"
        if report["voxels"]
        else "<p>no asset voxelized or encoded in this run</p>"
    )
    latents = _table(
        ["slat step", "per-channel mean", "per-channel std"],
        [
            [step, " ".join(f"{v:+.3f}" for v in s["mean"]), " ".join(f"{v:.3f}" for v in s["std"])]
            for step, s in report["latent_stats"].items()
        ],
    )
    sheets = (
        "".join(
            f'<figure><img src="{html.escape(s)}" width="320"><figcaption>{html.escape(Path(s).stem)}'
            "</figcaption></figure>"
            for s in report["sheets"]
        )
        or "<p>nothing rendered in this run</p>"
    )
    release = report["release"]
    failed = f"{len(failed_assets)} of them failed, each with a reason" if failed_assets else "none failed"
    summary = (
        f"{report['seconds']:.1f} s in all · {len(report['asset_seconds'])} sources computed on "
        f"(assets and env maps), {failed} · "
        + (f"release <b>{html.escape(release['name'])}</b>: {release['num_samples']} samples, "
           f"{release['num_rows']} rows" if release else "no release")
    )
    release_json = html.escape(json.dumps(release, indent=1)) if release else "no release"
    run_id = html.escape(report["run_id"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>NeAR build {run_id}</title>
<style>{_STYLE}</style></head><body><h1>NeAR factory build {run_id}</h1><p>{summary}</p>
<h2>Steps</h2>{steps}<h2>Failures by reason</h2>{reasons}
<h2>Skipped sources</h2>{skipped}<h2>Assets</h2>{assets}
<h2>Voxels and latents</h2>{voxels}{latents}<h2>Contact sheets</h2>{sheets}<h2>Release</h2><pre>{release_json}</pre>
</body></html>
"""


def _outcome(failure: dict[str, Any] | None, failed: bool) -> str:
    """An asset's fate in this run: ok, or the reason of its own failure in the earliest planned step (the
    upstream failures follow from it)."""
    if failure is not None:
        return f"{html.escape(failure['reason'])} ({html.escape(failure['step'])})"
    return Reason.UPSTREAM_FAILED.value if failed else "ok"
