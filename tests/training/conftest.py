"""A small release built by the factory itself (two demo assets at tiny render sizes), shared by the
training tests: the same roles and layout a real release has, the environment maps its relight frames were lit
with included (role `env_maps`, split `shared`), so Stage 2 needs no render env to train from it."""

import shutil
from pathlib import Path

import pytest
import ray

from pipelines.build import run_build
from pipelines.build_config import BuildConfig
from pipelines.demo import write_demo_models

RELEASE = "train-tiny"
TINY_RECIPES = {
    "lh": {"num_views": 4, "resolution_px": 48, "samples": 1},
    "input": {"num_views": 2, "resolution_px": 64, "samples": 1},
    "relight": {"num_views": 2, "lightings_per_view": 2, "resolution_px": 48, "samples": 1},
}


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory, demo_assets: dict[str, Path], render_python) -> dict[str, Path]:
    """data_root, models folder and release name of a release of 2 assets x 2 input views, all in `train`
    (the tests validate on the training split: an overfit check)."""
    root = tmp_path_factory.mktemp("stage1-release")
    assets = root / "assets"
    assets.mkdir()
    for name in ("textured_cube", "diffuse_sphere"):
        shutil.copy(demo_assets[name], assets)
    models = write_demo_models(root / "models", seed=0)
    config = BuildConfig.from_dict(
        {
            "data_root": str(root / "data"),
            "source": {"kind": "local", "path": str(assets)},
            "recipes": TINY_RECIPES,
            "models": {name: str(path) for name, path in models.items()},
            "shaded": {"views": 2, "sampler": {"steps": 4}},
            "release": {"name": RELEASE, "val_percent": 0},
            "execution": {"allow_software_gl": True, "max_in_flight": 2},
        }
    )
    ray.init(num_cpus=2, resources={"render_slot": 1}, include_dashboard=False, log_to_driver=False)
    try:
        record = run_build(config)
    finally:
        ray.shutdown()
    assert not record.failures, record.failures
    return {"data_root": root / "data", "models": root / "models", "release": RELEASE}
