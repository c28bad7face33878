"""A data root in an object store, as a cluster runs it: two `near build`s at once, each with its own Ray,
write packs, tables, releases and reports to one `s3://` root and commit through one PostgreSQL catalog; then
`near catalog verify --deep`, `near train stage1` and `near catalog gc` work on that URL. Against a real S3
HTTP API on loopback (moto's server) and a real PostgreSQL server; nothing of the root lands on local disk."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from upath import UPath

from catalogs.packs import write_pack
from catalogs.release_reader import Release
from catalogs.tables import FactoryCatalog
from pipelines.demo import write_demo_models
from tests.training.conftest import TINY_RECIPES
from training.run import CHECKPOINTS, LATEST

REPO = Path(__file__).resolve().parents[2]
ASSETS = {"a": "textured_cube", "b": "diffuse_sphere"}


def _near(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                               cwd=REPO, env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout,
                               check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed


def _start_build(folder: Path, asset: Path, config: dict) -> subprocess.Popen:
    folder.mkdir()
    shutil.copy(asset, folder)  # a source folder's symlinks out of it are skipped
    (folder / "build.yaml").write_text(yaml.safe_dump({**config, "source": {"kind": "local", "path": str(folder)}}))
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "build", "--config", str(folder / "build.yaml")], cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "local", "COLUMNS": "200"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.ray
def test_two_concurrent_builds_into_s3_then_verify_train_and_gc(
    s3_root: str, postgres_uri: str, tmp_path: Path, demo_assets: dict[str, Path], render_python: Path
) -> None:
    models = write_demo_models(tmp_path / "models", seed=0)
    FactoryCatalog(s3_root, postgres_uri)  # the root and its tables exist before the race starts
    common = {
        "data_root": s3_root, "catalog_uri": postgres_uri, "recipes": TINY_RECIPES,
        "models": {key: str(path) for key, path in models.items()}, "shaded": {"views": 2, "sampler": {"steps": 4}},
        "execution": {"allow_software_gl": True, "max_in_flight": 2},
    }  # fmt: skip
    releases = {name: {"name": f"build-{name}", "val_percent": 0, "test_percent": 0, "num_held_out_env_maps": 0}
                for name in ASSETS}  # fmt: skip
    builds = [_start_build(tmp_path / name, demo_assets[asset], {**common, "release": releases[name]})
              for name, asset in ASSETS.items()]  # fmt: skip
    outputs = [build.communicate(timeout=1500)[0] for build in builds]
    for build, output in zip(builds, outputs):
        assert build.returncode == 0, output[-4000:]

    root = UPath(s3_root)
    assert not list(tmp_path.rglob("near-root.json")) and not list(tmp_path.rglob("*.parquet")), "all in the bucket"
    assert list(root.glob("warehouse/factory/*/metadata/*.metadata.json")), "the Iceberg tables live in the bucket"
    packs = {p.relative_to(root).as_posix() for p in root.glob("packs/*/*/*")}
    assert len(packs) >= 10 and not any(Path(p).name.startswith(".tmp-") for p in packs)
    reports = list(root.glob("reports/*/report.html"))
    assert len(reports) == 2 and all(list(r.parent.glob("sheets/*.png")) for r in reports), "reports, sheets"
    for name, asset in ASSETS.items():
        release = Release.open(s3_root, f"build-{name}")
        assert any(asset in sample for sample in release.sample_ids), f"build {name} released its asset {asset}"

    catalog = FactoryCatalog(s3_root, postgres_uri, read_only=True)
    status = catalog.artifact_status()
    assert set(status["status"].to_pylist()) == {"ok"}
    rows = catalog.read("artifacts", ("artifact_key", "step")).to_pylist()
    twice = {row["artifact_key"] for row in rows if sum(r["artifact_key"] == row["artifact_key"] for r in rows) > 1}
    shared = {row["artifact_key"] for row in rows if row["step"] == "env_map_rgb"}
    assert twice <= shared, "only the env maps both builds planned at once are committed twice (the first row wins)"

    env = {"NEAR_CATALOG_URI": postgres_uri}
    assert "0 problems" in _near("catalog", "--root", s3_root, "verify", "--deep", env=env).stdout
    _near("catalog", "--root", s3_root, "verify", "build-b", env=env)

    run = tmp_path / "stage1"
    config = {"base_model": str(models["slat_flow"]), "dinov2": str(models["dinov2"]), "out_dir": str(run),
              "lora": {"rank": 8, "alpha": 8.0}, "steps": 2, "batch_size": 2, "val_split": "train",
              "val_every": 2, "checkpoint_every": 2}  # fmt: skip
    (tmp_path / "stage1.yaml").write_text(json.dumps(config))
    trained = _near("train", "stage1", "--release", "build-b", "--data-root", s3_root, "--config",
                    str(tmp_path / "stage1.yaml"), env={"RAY_ADDRESS": "local"}, timeout=900)  # fmt: skip
    assert "stage1 finished" in trained.stdout
    assert (run / CHECKPOINTS / LATEST).read_text().strip() == "step-00000002"

    (orphan,) = write_pack(s3_root, "slat_lh", "0" * 64, "crashed-run", [("orphan", {"x": np.zeros((2, 3))})])
    listed = _near("catalog", "--root", s3_root, "gc", "--grace-hours", "0", env=env).stdout
    assert orphan.pack_path in listed and not any(pack in listed for pack in packs), "committed packs are live"
    _near("catalog", "--root", s3_root, "gc", "--grace-hours", "0", "--delete", env=env)
    assert not (root / orphan.pack_path).exists() and all((root / pack).exists() for pack in packs)
    assert "0 problems" in _near("catalog", "--root", s3_root, "verify", "--deep", env=env).stdout
