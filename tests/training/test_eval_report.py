"""The evaluation report: strict metrics.json, one CSV row per (asset, task, input), and an HTML page with the
summary table and the image grids worst first; plus the grid PNGs themselves."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.eval.metrics import METRICS, EvalBuffers, average_per_asset, summarize
from training.eval.report import (
    CSV_FILE,
    HTML_FILE,
    JSON_FILE,
    error_map,
    grid_columns,
    save_grid,
    write_report,
)
from training.stage2.agx import AgX

TASKS, INPUTS, ASSETS = ("forward_rendering", "relighting"), ("gt", "predicted"), ("chair", "lamp", "mug")


def _rows() -> list[dict]:
    """Two frames per (task, input, asset), no LPIPS (absent), one frame with an undefined masked PSNR."""
    rows = []
    for t, task in enumerate(TASKS):
        for i, input_ in enumerate(INPUTS):
            for a, asset in enumerate(ASSETS):
                for frame in range(2):
                    psnr = 20.0 + 3 * a + i + t + frame
                    keys = {
                        "task": task,
                        "input": input_,
                        "asset": asset,
                        "split": "test",
                        "frame": f"eval/{frame}",
                    }
                    metrics = {"psnr": psnr, "psnr_masked": psnr - 2, "ssim": 0.9, "ssim_masked": 0.8}
                    rows.append({**keys, **metrics, "base_color_l1": 0.05, "shadow_l1": 0.1 * frame})
    rows[0]["psnr_masked"] = math.nan
    return rows


def _no_constants(name: str) -> None:
    raise ValueError(f"metrics.json holds {name}: not strict JSON")


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A written report with three grids of forward_rendering (scores 25, 18 and undefined) and one of relighting."""
    image = torch.linspace(0, 1, 8 * 12 * 3).reshape(8, 12, 3)
    grids = []
    for name, task, score in (
        ("a", "forward_rendering", 25.0),
        ("b", "forward_rendering", 18.0),
        ("c", "forward_rendering", None),
        ("d", "relighting", 30),
    ):
        path = f"images/{name}.png"
        save_grid(tmp_path / path, {"prediction": image, "truth": image.flip(0), "roughness": image[..., :1]})
        grids.append({"task": task, "input": "predicted", "asset": name, "frame": "eval/0", "score": score,
                      "path": path})  # fmt: skip
    rows = _rows()
    meta = {"release": "demo-release", "manifest_sha256": "ab" * 32, "device": "cpu",
            "checkpoints": {"stage2": {"path": Path("/runs/s2/checkpoints/step-100"), "step": 100}},
            "settings": {"batch_size": 4, "undefined": math.inf}}  # fmt: skip
    write_report(
        tmp_path, summary=summarize(rows), asset_rows=average_per_asset(rows), meta=meta, grids=grids
    )
    return tmp_path


def test_metrics_json_is_strict_and_holds_everything(report: Path) -> None:
    document = json.loads((report / JSON_FILE).read_text(), parse_constant=_no_constants)
    assert document["meta"]["release"] == "demo-release"
    assert document["meta"]["checkpoints"]["stage2"]["path"] == "/runs/s2/checkpoints/step-100"
    assert document["meta"]["settings"]["undefined"] is None  # infinity, written as null
    assert "null" in document["schema"]
    entry = document["summary"]["forward_rendering"]["gt"]["psnr"]
    assert set(entry) == {"mean", "low", "high", "assets", "frames"}
    assert entry["assets"] == 3 and entry["frames"] == 6
    assert document["summary"]["forward_rendering"]["gt"]["psnr_masked"]["frames"] == 5  # the NaN frame is missing
    assert "lpips" not in document["summary"]["forward_rendering"]["gt"]
    assert len(document["assets"]) == len(TASKS) * len(INPUTS) * len(ASSETS)
    assert [g["asset"] for g in document["grids"]] == ["b", "a", "c", "d"]


def test_csv_has_one_row_per_asset_task_and_input_with_every_metric(report: Path) -> None:
    with (report / CSV_FILE).open() as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    metrics = ["psnr_masked", "ssim_masked", "psnr", "ssim", "base_color_l1", "shadow_l1"]
    assert reader.fieldnames == ["task", "input", "asset", "split", "frames", *metrics]
    assert [m for m in METRICS if m in metrics] == metrics  # report order
    assert len(rows) == len(TASKS) * len(INPUTS) * len(ASSETS)
    assert len({(r["asset"], r["task"], r["input"]) for r in rows}) == len(rows)
    chair = next(r for r in rows if (r["task"], r["input"], r["asset"]) == ("forward_rendering", "gt", "chair"))
    assert chair["frames"] == "2" and float(chair["psnr"]) == 20.5 and float(chair["psnr_masked"]) == 19.0


def test_html_has_the_summary_and_the_grids_worst_first(report: Path) -> None:
    page = (report / HTML_FILE).read_text()
    assert '<table id="summary">' in page and '<table id="assets">' in page
    assert "demo-release" in page and "ab" * 32 in page
    assert "n/a" in page  # LPIPS was not measured
    sources = [page.index(f'src="images/{name}.png"') for name in "bacd"]
    assert sources == sorted(sources)  # task1 worst first (18, 25, undefined last), then task3
    for name in "abcd":
        assert (report / "images" / f"{name}.png").is_file()
    assert "<script" not in page


def test_save_grid_lays_columns_out_left_to_right(tmp_path: Path) -> None:
    red = torch.zeros(10, 20, 3)
    red[..., 0] = 1
    gray = torch.full((5, 5, 1), 0.5)  # smaller: enlarged to the tallest column, aspect kept
    path = save_grid(tmp_path / "deep" / "grid.png", {"input": red, "roughness": gray})
    with Image.open(path) as image:
        assert image.size == (4 + 20 + 4 + 10 + 4, 16 + 10 + 4)
        assert image.getpixel((4 + 5, 16 + 5)) == (255, 0, 0)
        assert image.getpixel((4 + 20 + 4 + 5, 16 + 5)) == (128, 128, 128)
    with pytest.raises((ValueError, TypeError), match="expected|Type-check"):  # TypeError: under jaxtyping
        save_grid(tmp_path / "bad.png", {"bad": torch.zeros(4, 4, 2)})


def test_grid_columns_and_error_map() -> None:
    agx = AgX.from_simple_ocio()
    alpha = torch.ones(2, 8, 8, 1)
    truth = EvalBuffers(torch.rand(2, 8, 8, 3), alpha)
    predicted = EvalBuffers(
        truth.radiance * 2, alpha, torch.rand(2, 8, 8, 3), alpha * 0.3, alpha * 0.1, alpha
    )
    columns = grid_columns(predicted, truth, 1, agx=agx, input_image=torch.rand(16, 16, 3))
    labels = ["input", "prediction", "truth", "|error| x4", "base color", "roughness", "metallic", "shadow"]
    assert list(columns) == labels
    assert error_map(columns["truth"], columns["truth"]).max() < 0.02  # no error: (almost) black
    assert error_map(torch.zeros(2, 2, 3), torch.ones(2, 2, 3)).min() > 0.6  # saturated: bright


def test_grid_paths_must_stay_in_the_output_folder(tmp_path: Path) -> None:
    grid = {"task": "forward_rendering", "input": "gt", "asset": "a", "frame": 0, "score": 1.0, "path": "/tmp/x.png"}
    with pytest.raises(ValueError, match="relative"):
        write_report(tmp_path, summary={}, asset_rows=[], meta={}, grids=[grid])
