"""`ray job submit ... pipelines/build_lh_slat.py` against a real head node (`ray start --head`), over every real
and adversarial asset in ../shared/assets: the release holds every expected-ok asset, every expected failure
is recorded with its reason, and no asset's embedded script ever ran."""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalogs.release_reader import Release
from pipelines.demo import write_demo_models
from tests.conftest import SHARED_ASSETS
from tests.pipelines.test_render_shared_assets import AUTOEXEC_MARKER, EXPECTED

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
                "release": {"name": "shared-v1"},
                "execution": {"allow_software_gl": True, "render_timeout_s": 300},
            }
        )
    )
    address, env = head_node
    job = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "pipelines/build_lh_slat.py",
            "--config",
            str(root / "build.yaml"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (
        job.stdout[-4000:] + job.stderr[-2000:]
    )
    report = json.loads(next((root / "data" / "reports").glob("*/report.json")).read_text())
    return root / "data", report


def test_release_holds_every_expected_ok_asset(submitted) -> None:
    data_root, _ = submitted
    expected_ok = sorted(path for path, (status, _) in EXPECTED.items() if status == "ok")
    assert sorted(Release.open(data_root, "shared-v1").sample_ids) == expected_ok


def test_every_expected_failure_is_recorded_with_its_reason(submitted) -> None:
    _, report = submitted
    reasons = {
        f["asset_id"]: f["error"].split(":")[0] for f in report["failures"] if f["step"] == "render_lh"
    }
    expected = {path: reason for path, (status, reason) in EXPECTED.items() if status == "failed"}
    assert reasons == expected
    assert not AUTOEXEC_MARKER.exists()
