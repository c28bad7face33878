"""`ray job submit ... pipelines/build_lh_slat.py` against a real head node (`ray start --head`), over every real
and adversarial asset in ../shared/assets: the release holds every expected-ok asset, every expected failure
is recorded with its reason, and no asset's embedded script ever ran. Then Stage 1 trains on that release as a
second submitted job (`near train stage1` through Ray Train)."""

import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from catalogs.release_reader import Release
from pipelines.build import run_build
from pipelines.build_config import BuildConfig, FilterConfig, ReleaseConfig
from pipelines.demo import write_demo_models
from tests.conftest import SHARED_ASSETS
from tests.pipelines.test_render_shared_assets import AUTOEXEC_MARKER, BASE_COLOR_TEXTURED, EXPECTED

pytestmark = [pytest.mark.ray, pytest.mark.blender, pytest.mark.slow, pytest.mark.real_assets]

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real head node with one render slot; its dashboard address is what `ray job submit` talks to."""
    dashboard = _free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # Ray's default: token auth
    env = {**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "", **token}
    started = subprocess.run(
        [
            str(RAY),
            "start",
            "--head",
            f"--port={_free_port()}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            '--resources={"render_slot": 1}',
            "--disable-usage-stats",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run([str(RAY), "stop", "--force"], check=False, capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def submitted(head_node, tmp_path_factory, render_python) -> tuple[Path, dict]:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} is not there")
    if AUTOEXEC_MARKER.exists():
        AUTOEXEC_MARKER.unlink()
    root = tmp_path_factory.mktemp("job")
    models = write_demo_models(root / "models", seed=0)
    tiny = {"resolution_px": 32, "samples": 1}
    (root / "build.yaml").write_text(
        yaml.safe_dump(
            {
                "data_root": str(root / "data"),
                "source": {"kind": "local", "path": str(SHARED_ASSETS)},
                "recipes": {
                    "lh": {**tiny, "num_views": 2},
                    "input": {**tiny, "num_views": 1},
                    "relight": {**tiny, "num_views": 1, "lightings_per_view": 1},
                },
                "models": {name: str(path) for name, path in models.items()},
                "shaded": {"sampler": {"steps": 2}},  # Z_s on CPU: few flow steps
                "release": {"name": "shared-v1"},
                "execution": {"allow_software_gl": True, "render_timeout_s": 300},
            }
        )
    )
    job = _submit(head_node, "python", "pipelines/build_lh_slat.py", "--config", str(root / "build.yaml"))
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (
        job.stdout[-4000:] + job.stderr[-2000:]
    )
    report = json.loads(next((root / "data" / "reports").glob("*/report.json")).read_text())
    return root / "data", report


def _submit(head_node: tuple[str, dict], *command: str) -> subprocess.CompletedProcess:
    """`ray job submit`, waiting (up to a minute) for the head's job agent, which starts after `ray start`."""
    address, env = head_node
    for _ in range(12):
        job = subprocess.run(
            [str(RAY), "job", "submit", f"--address={address}", "--working-dir", str(REPO), "--", *command],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=1500,
        )
        if "No available agent to submit job" not in job.stderr:
            return job
        time.sleep(5)
    return job


def test_release_holds_every_expected_ok_asset(submitted) -> None:
    data_root, _ = submitted
    expected_ok = sorted(path for path, (status, _) in EXPECTED.items() if status == "ok")
    assert sorted(Release.open(data_root, "shared-v1").sample_ids) == expected_ok


def test_every_expected_failure_is_recorded_with_its_reason(submitted) -> None:
    _, report = submitted
    reasons = {
        f["asset_id"]: f["reason"] for f in report["failures"] if f["step"] == "render_lh"
    }
    expected = {path: reason for path, (status, reason) in EXPECTED.items() if status == "failed"}
    assert reasons == expected
    assert not AUTOEXEC_MARKER.exists()


def test_a_pbr_texture_filter_keeps_exactly_the_textured_assets(submitted) -> None:
    """The paper's curation as a release filter: a second release of the same build keeps the assets whose
    base color is textured, computes nothing, and records what each filter removed."""
    data_root, _ = submitted
    config = BuildConfig.from_yaml(data_root.parent / "build.yaml")
    textured = FilterConfig("has_base_color_texture", equals=True)
    record = run_build(dataclasses.replace(config, release=ReleaseConfig(name="shared-textured", filters=(textured,))))
    assert record.computed_by_step() == {}
    release = Release.open(data_root, "shared-textured")
    expected_ok = {path for path, (status, _) in EXPECTED.items() if status == "ok"}
    assert sorted(release.sample_ids) == sorted(expected_ok & set(BASE_COLOR_TEXTURED))
    voxels, texture = release.info["filters"]
    assert release.info["candidates"] == len(expected_ok) and voxels["removed"] == 0
    assert texture["stat"] == "has_base_color_texture" and texture["removed"] == len(expected_ok - set(BASE_COLOR_TEXTURED))


def test_stage1_trains_on_the_release_as_a_submitted_job(submitted, head_node) -> None:
    data_root, _ = submitted
    models, run = data_root.parent / "models", data_root.parent / "stage1-run"
    config = {
        "data_root": str(data_root),
        "out_dir": str(run),
        "base_model": str(models / "slat-flow-demo.safetensors"),
        "dinov2": str(models / "dinov2-demo"),
        "lora": {"rank": 8, "alpha": 8.0},
        "steps": 2,
        "batch_size": 2,
        "val_split": "train",
        "val_samples": 2,
        "sampler": {"steps": 2, "cfg_strength": 0.0},
    }
    (data_root.parent / "stage1.yaml").write_text(yaml.safe_dump(config))
    command = ["python", "-m", "pipelines.cli", "train", "stage1", "--release", "shared-v1"]
    job = _submit(head_node, *command, "--config", str(data_root.parent / "stage1.yaml"))
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (
        job.stdout[-4000:] + job.stderr[-2000:]
    )
    meta = json.loads((run / "checkpoints" / "step-00000002" / "checkpoint.json").read_text())
    pinned = Release.open(data_root, "shared-v1").info["manifest_sha256"]
    assert meta["release"] == {"name": "shared-v1", "manifest_sha256": pinned}
