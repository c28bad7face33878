"""`near relight` on a real asset from ../shared/assets: its `input` render and normalized mesh in, per held-out
map a turntable (frames and GIF), the PBR maps and shadow, the map turning, and a 3DGS PLY out."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import plyfile
import pytest
from PIL import Image

from tests.conftest import SHARED_ASSETS
from training.stage2.export import ply_property_names

pytestmark = [pytest.mark.blender, pytest.mark.slow, pytest.mark.real_assets]
REPO = Path(__file__).resolve().parents[2]
ASSET = "gltf-blender-io/scenes/02_suzanne.blend"


def _near(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], check=False, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def input_render(tmp_path_factory, render_python) -> Path:
    if not (SHARED_ASSETS / ASSET).is_file():
        pytest.skip(f"{SHARED_ASSETS / ASSET} is not there")
    out = tmp_path_factory.mktemp("relight-input")
    done = _near("render", str(SHARED_ASSETS / ASSET), "--recipe", "input", "--views", "1", "--resolution", "64",
                 "--samples", "1", "--allow-software-gl", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    (transforms,) = out.rglob("transforms.json")
    return transforms.parent


def test_near_relight_writes_turntables_pbr_maps_and_a_3dgs_ply(
    input_render: Path, eval_runs: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "relit"
    done = _near("relight", str(input_render / "beauty" / "000_00.exr"), "--mesh", str(input_render / "mesh.ply"),
                 "--stage1", str(eval_runs["stage1"]), "--stage2", str(eval_runs["stage2"]), "--views", "4",
                 "--rotation-frames", "3", "--resolution", "32", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "relight.json").read_text())
    assert summary["mesh_normalization"]["was_normalized"] and summary["voxels"] > 0
    assert len(summary["env_maps"]) == 2  # the release's held-out maps, by default
    for outputs in summary["env_maps"].values():
        folder = Path(outputs["folder"])
        frames = sorted((folder / "turntable").glob("*.png"))
        assert len(frames) == 4 and Image.open(frames[0]).size == (32, 32)
        gif = Image.open(folder / "turntable.gif")
        assert gif.n_frames >= 2 and gif.size == (32, 32)
        assert len(list((folder / "rotating_env_map").glob("*.png"))) == 3
        for name in ("base_color", "roughness", "metallic", "shadow", "pbr"):
            assert (folder / f"{name}.png").is_file()
        ply = plyfile.PlyData.read(str(folder / "gaussians.ply"))
        vertex = ply["vertex"]
        assert [p.name for p in vertex.properties] == ply_property_names(0)
        assert vertex.count == outputs["gaussians"] > 0
        quats = np.stack([vertex[f"rot_{i}"] for i in range(4)], axis=1)
        assert np.allclose(np.linalg.norm(quats, axis=1), 1, atol=1e-5)
        assert np.isfinite(np.stack([vertex[p.name] for p in vertex.properties])).all()


def test_near_relight_asks_for_an_image_with_alpha(eval_runs: dict[str, Any], input_render: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    opaque = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (120, 80, 40)).save(opaque)
    done = _near("relight", str(opaque), "--mesh", str(input_render / "mesh.ply"), "--stage1",
                 str(eval_runs["stage1"]), "--stage2", str(eval_runs["stage2"]), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "no alpha channel" in done.stderr and "rembg" in done.stderr
    assert not (tmp_path / "x").exists()
