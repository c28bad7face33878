"""Small releases built by the factory itself (demo assets at tiny render sizes), shared by the training and
evaluation tests: the same roles and layout a real release has, the environment maps its relight frames were
lit with included (role `env_maps`, split `shared`), so Stage 2 needs no render env to train from it; and a
release with a test split and tiny runs of both stages, for `near eval` and `near relight`."""

import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from pipelines.build import BuildRecord, run_build
from pipelines.build_config import BuildConfig
from pipelines.demo import DEMO_STAGE2_MODEL, write_demo_models
from training.stage1.config import Stage1Config
from training.stage1.trainer import Stage1Trainer
from training.stage2.config import Stage2Config
from training.stage2.trainer import Stage2Trainer

RELEASE = "train-tiny"
TINY_RECIPES = {
    "lh": {"num_views": 4, "resolution_px": 48, "samples": 1},
    "input": {"num_views": 2, "resolution_px": 64, "samples": 1},
    "relight": {"num_views": 2, "lightings_per_view": 2, "resolution_px": 48, "samples": 1},
}


def build_release(root: Path, demo_assets: dict[str, Path], names: tuple[str, ...], release: dict,
                  recipes: dict = TINY_RECIPES) -> BuildRecord:
    """Build `names` of the demo assets at `recipes` sizes into `root / "data"` and publish `release`."""
    assets = root / "assets"
    assets.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(demo_assets[name], assets)
    models = write_demo_models(root / "models", seed=0)
    config = BuildConfig.from_dict(
        {
            "data_root": str(root / "data"),
            "source": {"kind": "local", "path": str(assets)},
            "recipes": recipes,
            "models": {name: str(path) for name, path in models.items()},
            "shaded": {"views": 2, "sampler": {"steps": 4}},
            "release": release,
            "execution": {"allow_software_gl": True, "max_in_flight": 2},
        }
    )
    ray.init(num_cpus=2, resources={"render_slot": 1}, include_dashboard=False, log_to_driver=False)
    try:
        record = run_build(config)
    finally:
        ray.shutdown()
    assert not record.failures, record.failures
    return record


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, demo_assets: dict[str, Path], render_python) -> dict[str, Path]:
    """data_root, models folder and release name of a release of 2 assets x 2 input views, all in `train`
    (the tests validate on the training split: an overfit check), no env map held out."""
    root = tmp_path_factory.mktemp("stage1-release")
    release = {"name": RELEASE, "val_percent": 0, "test_percent": 0, "num_held_out_env_maps": 0}
    build_release(root, demo_assets, ("textured_cube", "diffuse_sphere"), release)
    return {"data_root": root / "data", "models": root / "models", "release": RELEASE}


EVAL_RELEASE = "eval-tiny"
EVAL_ASSETS = ("textured_cube", "diffuse_sphere", "open_box")
EVAL_SPLIT = {"test_percent": 20, "val_percent": 0, "num_held_out_env_maps": 2}
"""At 20 % the open box is the one test asset of the demo's five (the split hashes their bytes)."""
EVAL_RECIPES = {**TINY_RECIPES, "input": {**TINY_RECIPES["input"], "seed": 2}}
"""Input seed 2 lights the open box's first input view with an env map (reconstruction needs one); its relight
frames then include two under the held-out maps, and each train asset's some under the others."""


@pytest.fixture(scope="session")
def eval_runs(tmp_path_factory, demo_assets: dict[str, Path], render_python) -> dict[str, Any]:
    """A release with a test split (the open box), `render_eval` frames of its test asset under the 4 held-out
    maps, and tiny Stage 1 and Stage 2 runs trained on its train split: what `near eval` and `near relight` read."""
    root = tmp_path_factory.mktemp("eval-release")
    record = build_release(root, demo_assets, EVAL_ASSETS, {"name": EVAL_RELEASE, **EVAL_SPLIT}, EVAL_RECIPES)
    data_root, models = root / "data", root / "models"
    common = {"data_root": str(data_root), "release": EVAL_RELEASE, "val_split": "train", "val_every": 1000,
              "data_workers": 0, "steps": 2, "checkpoint_every": 2}
    Stage1Trainer(Stage1Config.from_dict({
        **common, "out_dir": str(root / "stage1"), "base_model": str(models / "slat-flow-demo.safetensors"),
        "dinov2": str(models / "dinov2-demo"), "lora": {"rank": 8, "alpha": 8.0}, "batch_size": 2,
    }), device=torch.device("cpu")).run()  # fmt: skip
    Stage2Trainer(Stage2Config.from_dict({
        **common, "out_dir": str(root / "stage2"), "model": DEMO_STAGE2_MODEL, "batch_size": 2,
        "warmup_steps": 1,
    }), device=torch.device("cpu")).run()  # fmt: skip
    return {"root": root, "data_root": data_root, "release": EVAL_RELEASE, "stage1": root / "stage1",
            "stage2": root / "stage2", "record": record, "assets": root / "assets"}
