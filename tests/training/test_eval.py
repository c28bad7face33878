"""`near eval` on a factory-built release with a test split: every task and decoder input scored, through the
CLI and through Ray actors alike; the test split fixed by content, rendered for evaluation only, never trained on."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import ray

from catalogs.release_reader import Release
from catalogs.splits import TEST, SplitRule
from catalogs.tables import FactoryCatalog
from infra.errors import ConfigError
from pipelines.steps import EVAL
from tests.training.conftest import EVAL_ASSETS, EVAL_RECIPES, EVAL_SPLIT, build_release
from training.eval.runner import EvalSettings, check_not_trained_on, evaluate
from training.eval.tasks import INPUTS, NOVEL_VIEW, TASK_INPUTS, TASKS
from training.run import CHECKPOINTS, LATEST
from training.stage2.data import Stage2Data
from training.stage2.env_map_store import EnvMapStore

pytestmark = [pytest.mark.blender, pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def _no_nan(value: str) -> float:
    raise ValueError(f"metrics.json holds {value}")


@pytest.fixture(scope="module")
def cli_eval(eval_runs: dict[str, Any], tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("eval") / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "eval", "--release", eval_runs["release"], "--stage1",
         str(eval_runs["stage1"]), "--stage2", str(eval_runs["stage2"]), "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
    return {"out": out, "metrics": metrics, "stdout": completed.stdout, "stderr": completed.stderr}


def test_near_eval_scores_every_task_and_decoder_input(cli_eval: dict[str, Any]) -> None:
    summary, out = cli_eval["metrics"]["summary"], cli_eval["out"]
    assert set(summary) == set(TASKS)
    assert set(summary[NOVEL_VIEW]) == set(INPUTS)  # the ground-truth input is forward rendering's
    for task in TASKS:
        for decoder_input in set(TASK_INPUTS[task]) | ({"gt"} if task == NOVEL_VIEW else set()):
            values = summary[task][decoder_input]
            for metric in ("psnr", "ssim", "psnr_masked", "ssim_masked"):
                assert values[metric]["mean"] is not None and values[metric]["assets"] == 1, (task, metric)
    relight = summary["forward_rendering"]["gt"]
    assert "base_color_l1" in relight and "shadow_l1" in relight or "shadow_l1_masked" in relight
    meta = cli_eval["metrics"]["meta"]
    assert meta["release"]["name"] == "eval-tiny" and meta["release"]["split_rule"]["test_percent"] == 20
    assert meta["stage1"]["step"] == 2 and len(meta["stage2"]["weights_sha256"]) == 64
    html = (out / "report.html").read_text()
    images = [grid["path"] for grid in cli_eval["metrics"]["grids"]]
    assert images and all((out / path).is_file() and path in html for path in images)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("task,input,asset,split,frames") and len(rows) == 1 + 3 + 3 + 3 + 1
    assert "report:" in cli_eval["stderr"] and "1/1" in cli_eval["stderr"]  # the progress bar, in assets
    assert "forward_rendering" in cli_eval["stdout"]  # the closing table
    assert "Loading weights" not in cli_eval["stderr"] and "is_fx_tracing" not in cli_eval["stderr"]


def test_ray_evaluator_actors_give_the_in_process_numbers(eval_runs: dict[str, Any], cli_eval: dict[str, Any],
                                                         tmp_path: Path) -> None:  # fmt: skip
    settings = EvalSettings(data_root=str(eval_runs["data_root"]), release=eval_runs["release"],
                            stage1_run=str(eval_runs["stage1"]), stage2_run=str(eval_runs["stage2"]),
                            out_dir=str(tmp_path / "ray"), tasks=("forward_rendering", "reconstruction"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = evaluate(settings, workers=2)
    finally:
        ray.shutdown()
    for task in settings.tasks:
        for decoder_input, values in summary[task].items():
            expected = cli_eval["metrics"]["summary"][task][decoder_input]
            assert values["psnr"]["mean"] == pytest.approx(expected["psnr"]["mean"], abs=1e-4)


def test_the_test_split_is_fixed_by_content_rendered_for_eval_and_never_trained_on(
    eval_runs: dict[str, Any], demo_assets: dict[str, Path], tmp_path: Path
) -> None:
    release = Release.open(eval_runs["data_root"], eval_runs["release"])
    rule = SplitRule(test_percent=EVAL_SPLIT["test_percent"], val_percent=EVAL_SPLIT["val_percent"])
    manifest = release.manifest.filter(pc.not_equal(release.manifest["split"], "shared"))
    splits = dict(zip(manifest["source_id"].to_pylist(), manifest["split"].to_pylist()))
    assert all(rule.split_of(source) == split for source, split in splits.items())
    test = release.split(TEST)
    assert [Path(asset).stem for asset in test] == ["open_box"]
    assert all(release.has(asset, EVAL) == (asset in test) for asset in release.sample_ids)
    held_out = release.info["held_out_env_maps"]
    assert len(held_out) == 2
    # render_eval ran for the test asset alone
    catalog = FactoryCatalog(eval_runs["data_root"])
    artifacts = catalog.table("artifacts").scan(row_filter="step == 'render_eval'").to_arrow()
    assert artifacts.num_rows == 1 and set(artifacts["status"].to_pylist()) == {"ok"}
    # training never reads it
    with pytest.raises(ConfigError, match="test"):
        Stage2Data(release, TEST, EnvMapStore.from_release(release, (16, 32)))
    # a second release with another val split: nothing recomputed, the same test set, disjoint from train/val
    record = build_release(eval_runs["root"], demo_assets, EVAL_ASSETS,
                           {"name": "eval-tiny-2", **EVAL_SPLIT, "val_percent": 50}, EVAL_RECIPES)
    assert not any(sum(by_status.values()) for by_status in record.computed_by_step().values())
    second = Release.open(eval_runs["data_root"], "eval-tiny-2")
    assert second.split(TEST) == test
    for one in (release, second):
        assert set(one.split(TEST)).isdisjoint(one.split("train") + one.split("val"))
    assert second.split("val")  # the val share moved; the test share did not
    # a run trained on a release that had the open box in train cannot be evaluated on it
    build_release(eval_runs["root"], demo_assets, EVAL_ASSETS, {"name": "eval-no-test", **EVAL_SPLIT,
                                                                 "test_percent": 0}, EVAL_RECIPES)  # fmt: skip
    leaky = Release.open(eval_runs["data_root"], "eval-no-test")
    assert not leaky.split(TEST) and Path(test[0]).stem in {Path(a).stem for a in leaky.split("train")}
    run = tmp_path / "leaky-run"
    (run / CHECKPOINTS / "step-00000001").mkdir(parents=True)
    (run / CHECKPOINTS / LATEST).write_text("step-00000001\n")
    (run / CHECKPOINTS / "step-00000001" / "checkpoint.json").write_text(json.dumps({
        "step": 1, "release": {"name": "eval-no-test", "manifest_sha256": leaky.info["manifest_sha256"]},
        "config": {"data_root": str(eval_runs["data_root"])}}))  # fmt: skip
    check_not_trained_on(release, TEST, [str(eval_runs["stage2"])])  # trained on eval-tiny's train split: fine
    with pytest.raises(ConfigError, match="1 test assets .* were trained on"):
        check_not_trained_on(release, TEST, [str(run)])
