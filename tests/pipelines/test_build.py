"""The build on a real local Ray cluster: release contents, and incremental semantics counted by the build's
own records (versioned_catalogs.md section 4.7).

One data root is built several times in order; each test changes one thing and checks exactly what ran.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from catalogs.keys import sha256_file
from catalogs.release_reader import Release
from pipelines.build import RELEASE_ROLES, BuildRecord, run_build
from pipelines.build_config import BuildConfig
from pipelines.demo import write_demo_models
from pipelines.report import write_report

pytestmark = [pytest.mark.ray, pytest.mark.blender, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

TINY_RECIPES = {
    "lh": {"num_views": 4, "resolution_px": 48, "samples": 1},
    "input": {"num_views": 2, "resolution_px": 48, "samples": 1},
    "relight": {"num_views": 2, "lightings_per_view": 2, "resolution_px": 48, "samples": 1},
}
ALL_STEPS = (
    "render_lh",
    "normalize",
    "voxelize",
    "features",
    "slat_lh",
    "slat_bc",
    "render_input",
    "slat_shaded",
    "render_relight",
)
SHADED = {"views": 2, "sampler": {"steps": 2}}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, resources={"render_slot": 1}, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_assets: dict[str, Path], render_python) -> dict:
    root = tmp_path_factory.mktemp("build")
    assets = root / "assets"
    assets.mkdir()
    for name in ("textured_cube", "diffuse_sphere"):
        shutil.copy(demo_assets[name], assets)
    models = write_demo_models(root / "models", seed=0)
    return {
        "root": root,
        "assets": assets,
        "dinov2": str(models["dinov2"]),
        "slat_encoder": str(models["slat_encoder"]),
        "slat_flow": str(models["slat_flow"]),
    }


def _config(
    workspace: dict,
    *,
    release: str | None = None,
    slat_encoder: str | None = None,
    slat_flow: str | None = None,
    lh_samples: int = 1,
) -> BuildConfig:
    recipes = {**TINY_RECIPES, "lh": {**TINY_RECIPES["lh"], "samples": lh_samples}}
    return BuildConfig.from_dict(
        {
            "data_root": str(workspace["root"] / "data"),
            "source": {"kind": "local", "path": str(workspace["assets"])},
            "recipes": recipes,
            "models": {
                "dinov2": workspace["dinov2"],
                "slat_encoder": slat_encoder or workspace["slat_encoder"],
                "slat_flow": slat_flow or workspace["slat_flow"],
            },
            "shaded": SHADED,
            "release": {"name": release},
            "execution": {"allow_software_gl": True, "max_in_flight": 3},
        }
    )


def _computed(record: BuildRecord) -> dict[str, int]:
    """step -> artifacts this build executed (ok or failed)."""
    return {step: sum(by_status.values()) for step, by_status in record.computed_by_step().items()}


@pytest.fixture(scope="module")
def first_build(local_ray, workspace) -> BuildRecord:
    return run_build(_config(workspace, release="v1"))


def test_first_build_computes_every_step_and_releases_every_role(first_build: BuildRecord, workspace) -> None:
    assert _computed(first_build) == {step: 2 for step in ALL_STEPS}
    assert first_build.failures == []
    release = Release.open(workspace["root"] / "data", "v1")
    assert sorted(release.sample_ids) == ["diffuse_sphere.glb", "textured_cube.glb"]
    sample = release.read("textured_cube.glb", "slat_lh", verify=True)
    voxels = release.read("textured_cube.glb", "voxels")["coords"]
    assert sample["latent"].shape == (len(voxels), 8) and np.array_equal(sample["coords"], voxels)
    assert release.read("textured_cube.glb", "features")["feats_bc"].shape == (len(voxels), 64)
    relight = release.read("textured_cube.glb", "relight")
    assert relight["beauty"].shape == (4, 48, 48, 4) and relight["shadow"].shape == (4, 48, 48)
    shaded = release.read("textured_cube.glb", "slat_shaded", verify=True)
    assert shaded["latent"].shape == (len(voxels), 2, 8) and np.array_equal(shaded["coords"], voxels)
    assert np.isfinite(shaded["latent"]).all() and not np.allclose(
        shaded["latent"][:, 0], shaded["latent"][:, 1]
    )
    assert set(RELEASE_ROLES) == {
        "voxels",
        "features",
        "slat_lh",
        "slat_bc",
        "slat_shaded",
        "input",
        "relight",
    }
    assert not any((workspace["root"] / "data" / "scratch").rglob("*.exr"))  # transient renders deleted


def test_report_lists_steps_and_contact_sheets(first_build: BuildRecord, workspace) -> None:
    html = write_report(first_build, workspace["root"] / "data").read_text()
    assert "render_relight" in html and "textured_cube" in html
    assert len(first_build.sheets) == 6  # lh, input, relight per asset


def _chunk(pack: Path, array: str) -> Path:
    return next(path for path in sorted((pack / array / "c").rglob("*")) if path.is_file())


def test_verify_deep_names_five_kinds_of_damage_in_a_built_root(first_build: BuildRecord, workspace, tmp_path) -> None:
    """A copy of a built root verifies clean; with a missing chunk, a flipped byte, a truncated zarr.json, a deleted
    pack and swapped manifest rows, `near catalog verify --deep` names all five and exits non-zero."""
    root = tmp_path / "data"
    shutil.copytree(workspace["root"] / "data", root)

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", "catalog", "--root", str(root), "verify", "--deep"],
                              capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, cwd=REPO)

    clean = verify()
    assert clean.returncode == 0 and " 0 problems" in clean.stdout, clean.stdout + clean.stderr
    release = Release.open(root, "v1")
    pack = {role: root / release._row("textured_cube.glb", role)["pack_path"] for role in RELEASE_ROLES}
    _chunk(pack["features"], "feats_lh").unlink()
    flipped = _chunk(pack["slat_lh"], "latent")
    raw = flipped.read_bytes()
    flipped.write_bytes(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:])
    metadata = pack["slat_bc"] / "latent" / "zarr.json"
    metadata.write_bytes(metadata.read_bytes()[:60])
    shutil.rmtree(pack["relight"])
    folder = root / "releases" / "v1"
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    first, second = (i for i, row in enumerate(rows) if row["role"] == "slat_shaded")
    for column in ("artifact_key", "pack_path", "arrays", "content_digest"):
        rows[first][column], rows[second][column] = rows[second][column], rows[first][column]
    pq.write_table(pa.Table.from_pylist(rows, schema=release.manifest.schema), folder / "manifest.parquet")
    info = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**info, "manifest_sha256": sha256_file(folder / "manifest.parquet")}))

    damaged = verify()
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr, damaged.stderr
    out = damaged.stdout
    assert "feats_lh/c/" in out and "is missing" in out, out
    assert f"{pack['slat_lh'].relative_to(root)}, array 'latent'" in out and "checksum" in out
    assert f"{pack['slat_bc'].relative_to(root)}, array 'latent'" in out and "JSONDecodeError" in out
    assert f"pack {pack['relight'].relative_to(root)}: the pack folder is missing" in out
    assert "release v1: the manifest differs from the catalog's tagged snapshot" in out


def test_incremental_rebuilds_run_exactly_what_changed(
    first_build: BuildRecord, workspace, demo_assets
) -> None:
    """One data root, changed one thing at a time (versioned_catalogs.md section 4.7)."""
    assert _computed(run_build(_config(workspace))) == {}, "nothing changed: nothing runs"

    shutil.copy(demo_assets["open_box"], workspace["assets"])
    assert _computed(run_build(_config(workspace))) == {step: 1 for step in ALL_STEPS}, "only the added asset"

    lh_samples = run_build(_config(workspace, lh_samples=2))
    assert _computed(lh_samples) == {"render_lh": 3, "features": 3, "slat_lh": 3, "slat_bc": 3}

    other = str(write_demo_models(workspace["root"] / "models-b", seed=1)["slat_encoder"])
    new_weights = run_build(_config(workspace, lh_samples=2, slat_encoder=other))
    assert _computed(new_weights) == {"slat_lh": 3, "slat_bc": 3}, "stored features, no render"

    other_flow = str(write_demo_models(workspace["root"] / "models-b", seed=1)["slat_flow"])
    new_flow = run_build(_config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow))
    assert _computed(new_flow) == {"slat_shaded": 3}, "stored input views and voxels, no render"

    (workspace["assets"] / "broken.glb").write_bytes(b"glTF but not really")
    failed = run_build(_config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow))
    assert _computed(failed) == {step: 1 for step in ALL_STEPS}
    assert {f["asset_id"] for f in failed.failures} == {"broken.glb"}
    assert any(f["error"].startswith("import_error") for f in failed.failures)
    assert (
        _computed(run_build(_config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow))) == {}
    ), "failures stay failed"
    retried = run_build(
        _config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow), retry_failed=True
    )
    assert _computed(retried) == {step: 1 for step in ALL_STEPS} and len(retried.failures) == len(ALL_STEPS)
