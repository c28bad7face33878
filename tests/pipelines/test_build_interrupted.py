"""Killing the build's driver (with the local Ray it started) mid-build, then rerunning: nothing committed is
lost or done twice, the release ends complete and consistent, and the killed run's scratch is removed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import ray
import yaml

from catalogs.gc import collect_garbage, find_garbage, live_packs
from catalogs.release_reader import Release
from catalogs.tables import FactoryCatalog
from catalogs.verify import verify_catalog
from pipelines.build import run_build
from pipelines.build_config import BuildConfig
from pipelines.demo import write_demo_models

pytestmark = [pytest.mark.ray, pytest.mark.blender, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ASSETS = ("textured_cube", "diffuse_sphere", "metal_torus")
STEPS = 9  # every step of an asset in the step table, slat_shaded included
ENV_MAPS = 8  # the maps bpy ships, each packed once (env_map_rgb)
TOTAL = len(ASSETS) * STEPS + ENV_MAPS


def test_a_killed_driver_loses_nothing_committed(tmp_path, demo_assets, render_python) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ASSETS:
        shutil.copy(demo_assets[name], assets)
    models = write_demo_models(tmp_path / "models", seed=0)
    tiny = {"resolution_px": 48, "samples": 1}
    config_path = tmp_path / "build.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data_root": "data",
                "source": {"kind": "local", "path": "assets"},
                "recipes": {
                    "lh": {**tiny, "num_views": 4},
                    "input": {**tiny, "num_views": 1},
                    "relight": {**tiny, "num_views": 1, "lightings_per_view": 1},
                },
                "models": {name: str(path) for name, path in models.items()},
                "shaded": {"sampler": {"steps": 2}},  # Z_s on CPU: few flow steps
                "release": {"name": "v1"},
                "execution": {"allow_software_gl": True, "commit_every": 1},
            }
        )
    )
    data_root = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "pipelines/build_lh_slat.py", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in driver.stdout:  # "[done/total] step: asset" after each commit
        progress = re.match(r"\[(\d+)/\d+\] ", line)
        if progress and int(progress.group(1)) >= 4:
            break
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and every render child: a crash
    driver.wait()
    catalog = FactoryCatalog(data_root)
    before = catalog.ok_artifacts()["artifact_key"].to_pylist()
    assert 4 <= len(before) < TOTAL, "killed mid-build"
    (killed_run,) = (data_root / "scratch").iterdir()

    try:
        record = run_build(BuildConfig.from_yaml(config_path))
    finally:
        ray.shutdown()
    assert sum(sum(c.values()) for c in record.computed_by_step().values()) == TOTAL - len(before)
    rows = catalog.read("artifacts", ("artifact_key", "status"))
    ok_keys = rows.filter(pc.equal(rows["status"], "ok"))["artifact_key"].to_pylist()
    assert len(ok_keys) == len(set(ok_keys)) == TOTAL, "nothing committed twice"
    assert set(before) <= set(ok_keys)
    # packs that the killed run's actors wrote (some after the kill) but whose rows it never committed are gc's
    # orphans, all of them and only them
    packs = {p.relative_to(data_root).as_posix() for p in data_root.glob("packs/*/*/*")}
    orphans = {g.pack_path for g in find_garbage(catalog, grace_s=0)}
    assert orphans == packs - live_packs(catalog)
    assert {_run_of(data_root / p) for p in orphans} <= {killed_run.name, None}
    collect_garbage(catalog, find_garbage(catalog, grace_s=0))
    assert list(verify_catalog(catalog, deep=True)) == []
    assert len(Release.open(data_root, "v1").sample_ids) == len(ASSETS)
    assert not killed_run.exists() and not list((data_root / "scratch").iterdir()), "the killed run's scratch is gone"


def _run_of(pack: Path) -> str | None:
    """The run that wrote a pack (None for one killed before its metadata was written)."""
    metadata = pack / "zarr.json"
    return json.loads(metadata.read_text())["attributes"]["run_id"] if metadata.is_file() else None
