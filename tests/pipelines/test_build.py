"""The build on a real local Ray cluster: release contents, and incremental semantics counted by the build's
own records (versioned_catalogs.md section 4.7).

One data root is built several times in order; each test changes one thing and checks exactly what ran.
"""

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from catalogs.keys import StepSpec, sha256_file
from catalogs.planner import plan
from catalogs.release_reader import Release
from catalogs.tables import FactoryCatalog
from infra.environments import render_env_facts
from pipelines.build import BuildRecord, prepare, run_build
from pipelines.build_config import BuildConfig, ReleaseConfig
from pipelines.compute import CallOutput, StepOutput
from pipelines.demo import write_demo_models
from pipelines.report import write_report
from pipelines.steps import (
    ENV_MAPS,
    EVAL,
    FEATURES,
    INPUT,
    RELIGHT,
    SLAT_BC,
    SLAT_LH,
    SLAT_SHADED,
    VOXELS,
    ArraySpec,
    Call,
    Step,
)
from render_jobs.exr import read_env_map, write_channels

pytestmark = [pytest.mark.ray, pytest.mark.blender, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

TINY_RECIPES = {
    "lh": {"num_views": 4, "resolution_px": 48, "samples": 1},
    "input": {"num_views": 2, "resolution_px": 48, "samples": 1},
    "relight": {"num_views": 2, "lightings_per_view": 2, "resolution_px": 48, "samples": 1},
}
ASSET_STEPS = (
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
ALL_STEPS = ASSET_STEPS  # every step of an asset (env maps are registered once per map, not per asset)
BUNDLED_MAPS = 8
ASSET_ROLES = (VOXELS, FEATURES, SLAT_LH, SLAT_BC, SLAT_SHADED, INPUT, RELIGHT)
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
    env_maps_dir: str | None = None,
    precision: str = "auto",
) -> BuildConfig:
    recipes = {**TINY_RECIPES, "lh": {**TINY_RECIPES["lh"], "samples": lh_samples}}
    if env_maps_dir:
        recipes = {name: {**r, "env_maps_dir": env_maps_dir} if name != "lh" else r for name, r in recipes.items()}
    return BuildConfig.from_dict(
        {
            "data_root": str(workspace["root"] / "data"),
            "source": {"kind": "local", "path": str(workspace["assets"])},
            "recipes": recipes,
            "models": {
                "dinov2": workspace["dinov2"],
                "slat_encoder": slat_encoder or workspace["slat_encoder"],
                "slat_flow": slat_flow or workspace["slat_flow"],
                "precision": precision,
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
    assert _computed(first_build) == {**{step: 2 for step in ALL_STEPS}, "env_map_rgb": BUNDLED_MAPS}
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
    assert set(release.info["roles"]) == {*ASSET_ROLES, ENV_MAPS, EVAL}
    assert release.info["test_roles"] == [EVAL] and not release.split("test")  # eval frames: test assets only
    maps = release.manifest.filter(pc.equal(release.manifest["role"], ENV_MAPS))
    assert maps.num_rows == BUNDLED_MAPS and set(maps["split"].to_pylist()) == {"shared"}
    used = {bytes(d).hex() for d in relight["frame_env_map"]}
    assert used <= set(maps["source_id"].to_pylist())
    rgb = release.read(maps["sample_id"][0].as_py(), ENV_MAPS)["rgb"]
    assert rgb.dtype == np.float32 and rgb.shape[2] == 3 and rgb.max() > 0
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
    pack = {role: root / release._row("textured_cube.glb", role)["pack_path"] for role in ASSET_ROLES}
    _chunk(pack[FEATURES], "feats_lh").unlink()
    flipped = _chunk(pack[SLAT_LH], "latent")
    raw = flipped.read_bytes()
    flipped.write_bytes(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:])
    metadata = pack[SLAT_BC] / "latent" / "zarr.json"
    metadata.write_bytes(metadata.read_bytes()[:60])
    shutil.rmtree(pack[RELIGHT])
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
    assert f"{pack[SLAT_LH].relative_to(root)}, array 'latent'" in out and "checksum" in out
    assert f"{pack[SLAT_BC].relative_to(root)}, array 'latent'" in out and "JSONDecodeError" in out
    assert f"pack {pack[RELIGHT].relative_to(root)}: the pack folder is missing" in out
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
    reasons = {f["step"]: f["reason"] for f in failed.failures}
    assert reasons["render_lh"] == reasons["render_input"] == "import_error"
    assert reasons["voxelize"] == reasons["slat_shaded"] == reasons["features"] == "upstream_failed"
    assert (
        _computed(run_build(_config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow))) == {}
    ), "failures stay failed"
    retried = run_build(
        _config(workspace, lh_samples=2, slat_encoder=other, slat_flow=other_flow), retry_failed=True
    )
    assert _computed(retried) == {step: 1 for step in ALL_STEPS} and len(retried.failures) == len(ALL_STEPS)


LATEST = {"lh_samples": 2}  # the incremental test's last config, minus the models it swapped


def _latest(workspace: dict, **overrides) -> BuildConfig:
    models = write_demo_models(workspace["root"] / "models-b", seed=1)  # the same files again
    return _config(workspace, slat_encoder=str(models["slat_encoder"]), slat_flow=str(models["slat_flow"]),
                   **{**LATEST, **overrides})


def _target_keys(config: BuildConfig) -> dict[tuple[str, str], str]:
    catalog, table, sources, _ = prepare(config, "keys")
    targets = plan(catalog, table.graph, sources).targets
    return {(a, s): k for a, s, k in zip(*(targets[c].to_pylist() for c in ("asset_id", "step", "artifact_key")))}


def test_keys_capture_encoder_precision_and_blender_version(first_build, workspace) -> None:
    """float32 and bfloat16 encoders make different `features` (and downstream) keys, nothing else changes;
    the render specs record the Blender version."""
    f32, bf16 = (_target_keys(_config(workspace, precision=p)) for p in ("float32", "bfloat16"))
    assert f32 == _target_keys(_config(workspace)), "auto is float32 on CPU encoders"
    changed = {step for (asset, step), key in f32.items() if bf16[(asset, step)] != key}
    assert changed == {"features", "slat_lh", "slat_bc", "slat_shaded"}
    specs = FactoryCatalog(workspace["root"] / "data", read_only=True).read("step_specs")
    render = [json.loads(e) for s, e in zip(specs["step"].to_pylist(), specs["env_json"].to_pylist()) if s.startswith("render_")]
    assert render and all(env == {"blender": "5.0.1"} for env in render)


def test_rewriting_one_env_map_recomputes_exactly_the_renders_that_drew_it(first_build, workspace, tmp_path) -> None:
    """The maps are content inputs: the same bytes in another folder change no key; new bytes under one name
    recompute the `render_input`/`render_relight` sets that drew that map and their `slat_shaded`, and pack the
    map itself; nothing else."""
    maps = tmp_path / "maps"
    shutil.copytree(render_env_facts().bundled_env_maps, maps)
    assert _target_keys(_latest(workspace, env_maps_dir=str(maps))) == _target_keys(_latest(workspace))
    config = _latest(workspace, env_maps_dir=str(maps))
    run_build(config)  # whatever an isolated run of this test still lacks

    catalog, table, sources, _ = prepare(config, "draws")
    assets = sources.filter(pc.equal(sources["kind"], "glb"))
    draws = {step: {a: set(table[step].spec.draws(s)) for a, s in zip(assets["asset_id"].to_pylist(), assets["source_id"].to_pylist())}
             for step in ("render_input", "render_relight")}
    counts = collections.Counter(role for by_asset in draws.values() for roles in by_asset.values() for role in roles)
    role = next(r for r, n in sorted(counts.items()) if 0 < n < 2 * len(assets))  # drawn by some sets, not all
    name = role.split(":", 1)[1]
    rgb = read_env_map(maps / name)
    write_channels(maps / name, {c: rgb[..., i] * 1.5 for i, c in enumerate("RGB")})

    rebuilt = run_build(config)
    drew = {step: sorted(a for a, roles in by_asset.items() if role in roles) for step, by_asset in draws.items()}
    expected = {"env_map_rgb": 1, **{step: len(a) for step, a in drew.items()}, "slat_shaded": len(drew["render_input"])}
    assert _computed(rebuilt) == {k: v for k, v in expected.items() if v}
    assert {f["asset_id"] for f in rebuilt.failures} <= {"broken.glb"}


def thumbnail(worker, request, inputs) -> CallOutput:
    """The toy step's compute function: the first input view, 8 x 8 by area averaging."""
    beauty = inputs.arrays("render_input", ("beauty",))["beauty"][0].astype(np.float32)  # (H, W, 4)
    size = beauty.shape[0] // 8
    small = beauty[: size * 8, : size * 8].reshape(8, size, 8, size, 4).mean(axis=(1, 3))
    return CallOutput({"thumbnail": StepOutput({"rgba": small.astype(np.float16)}, {"mean_alpha": float(small[..., 3].mean())})})


THUMBNAIL = Step(
    StepSpec("thumbnail", "1", ("render_input",), {"size": 8}),
    Call("thumbnail", "encoder", thumbnail),
    (ArraySpec("rgba", "float16", (8, 8, 4)),),
    role="thumbnail",
    stats=("mean_alpha",),
)


def test_a_new_step_is_one_declaration_and_builds_incrementally(first_build, workspace) -> None:
    config = _latest(workspace)
    run_build(config)  # settle whatever an isolated run of this test still lacks
    added = run_build(dataclasses.replace(config, release=ReleaseConfig(name="with-thumbnails")),
                      customize=lambda table: table.with_steps(THUMBNAIL))
    assert _computed(added) == {"thumbnail": 4}, "only the new step, over the stored input views"
    assert [f["reason"] for f in added.failures] == ["upstream_failed"]  # broken.glb has no input views
    assert _computed(run_build(config, customize=lambda table: table.with_steps(THUMBNAIL))) == {}
    release = Release.open(workspace["root"] / "data", "with-thumbnails")
    assert "thumbnail" in release.info["roles"] and len(release.sample_ids) == 3
    assert release.read("open_box.glb", "thumbnail")["rgba"].shape == (8, 8, 4)
