"""The build report page: drawn from `report.json` alone, each asset's outcome named, outside text escaped.
No Ray, no Blender: a record filled the way a build fills it."""

import collections
import json
import re
from pathlib import Path

from pipelines.build import BuildRecord
from pipelines.report import render_html, write_report


def _record() -> BuildRecord:
    record = BuildRecord("run-7", seconds=12.5)
    record.planned = {"render_lh": {"targets": 3, "ok": 0}, "voxelize": {"targets": 3, "ok": 1},
                      "render_relight": {"targets": 3, "ok": 0}}
    record.computed = collections.Counter({("render_lh", "ok"): 2, ("render_lh", "failed"): 1,
                                           ("voxelize", "ok"): 1, ("voxelize", "failed"): 1})
    record.step_seconds = collections.Counter({"render_lh": 9.4, "voxelize": 1.5})
    record.asset_seconds = collections.Counter({"good.glb": 6.0, "broken.glb": 3.0, "<b>odd</b>.glb": 1.75})
    record.voxels = {"good.glb": 4096}
    record.failures = [  # in commit order, not step order
        {"asset_id": "broken.glb", "step": "render_relight", "reason": "import_error",
         "message": "glb importer failed", "stderr_tail": ""},
        {"asset_id": "broken.glb", "step": "voxelize", "reason": "upstream_failed",
         "message": "render_lh failed: import_error", "stderr_tail": ""},
        {"asset_id": "broken.glb", "step": "render_lh", "reason": "import_error",
         "message": "glb importer failed", "stderr_tail": "Traceback <bad bytes>"},
    ]
    return record


def _row(page: str, first_cell: str) -> list[str]:
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", page) if r.startswith(f"<td>{first_cell}</td>"))
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_the_page_is_its_json_drawn(tmp_path: Path) -> None:
    page_path = write_report(_record(), tmp_path)
    report = json.loads((page_path.parent / "report.json").read_text())
    assert page_path.read_text() == render_html(report)


def test_assets_show_their_outcome_and_numbers_align_right(tmp_path: Path) -> None:
    page = write_report(_record(), tmp_path).read_text()
    assert _row(page, "broken.glb") == ["broken.glb", "import_error (render_lh)", "3.0", ""]  # its earliest step
    assert _row(page, "good.glb") == ["good.glb", "ok", "6.0", "4096"]
    assert _row(page, "render_lh") == ["render_lh", "3", "0", "2", "1", "9.4"]
    assert '<td class="n">9.4</td>' in page and '<td>import_error (render_lh)</td>' in page
    assert "3 sources computed on (assets and env maps), 1 of them failed" in page
    assert "none failed" in render_html({**json.loads((tmp_path / "reports" / "run-7" / "report.json").read_text()),
                                         "failures": []})


def test_failures_keep_their_log_folded_and_outside_text_escaped(tmp_path: Path) -> None:
    page = write_report(_record(), tmp_path).read_text()
    folded = "<details><summary>stderr tail</summary><pre>Traceback &lt;bad bytes&gt;</pre></details>"
    assert f"render_lh: glb importer failed{folded}" in page
    assert "&lt;b&gt;odd&lt;/b&gt;.glb" in page and "<b>odd</b>" not in page
    assert _row(page, "upstream_failed")[3] == "broken.glb"
