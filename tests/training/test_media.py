"""`near relight`'s media helpers: turntable cameras, environment-map yaws, GIF and PNG writers, the PBR
panel."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infra.errors import ConfigError
from render_jobs.cameras import project_points
from training.eval.media import (
    env_rotation_yaws,
    pbr_panel,
    to_uint8,
    turntable_cameras,
    write_frames,
    write_gif,
)


def _frames(count: int, height: int = 12, width: int = 20) -> list[np.ndarray]:
    """Distinct float frames (Pillow merges identical consecutive GIF frames)."""
    generator = np.random.default_rng(0)
    return [generator.random((height, width, 3)) for _ in range(count)]


@pytest.mark.parametrize("num_views", [1, 3, 8])
def test_turntable_cameras_circle_the_origin_from_the_front(num_views: int) -> None:
    radius, fov, elevation = 2.5, 35.0, 20.0
    cameras = turntable_cameras(num_views, radius_m=radius, fov_deg=fov, elevation_deg=elevation)
    assert len(cameras) == num_views
    for c2w, fov_rad in cameras:
        assert c2w.shape == (4, 4) and c2w.dtype == np.float64
        assert fov_rad == pytest.approx(math.radians(fov))
        eye = c2w[:3, 3]
        assert np.linalg.norm(eye) == pytest.approx(radius)
        assert eye[2] == pytest.approx(radius * math.sin(math.radians(elevation)))
        assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.allclose(-c2w[:3, 2], -eye / radius)  # looks down its -Z at the origin (OpenGL)
        assert c2w[2, 0] == pytest.approx(0.0, abs=1e-12) and c2w[2, 1] > 0  # roll-free, world up is up
        uv, depth = project_points(np.zeros((1, 3)), c2w, fov_rad, 64)
        assert np.allclose(uv, 32.0) and depth[0] == pytest.approx(radius)  # the origin at the image centre
    first = cameras[0][0][:3, 3]
    assert first[0] == pytest.approx(0.0, abs=1e-12) and first[1] < 0  # Blender's front view: on -Y
    yaws = [math.atan2(c2w[1, 3], c2w[0, 3]) for c2w, _ in cameras]
    steps = np.mod(np.diff(yaws + yaws[:1]), 2 * math.pi)  # wrapping back to the first closes the circle
    assert np.allclose(steps, 2 * math.pi / num_views if num_views > 1 else 0.0)


def test_turntable_start_yaw_and_bad_arguments() -> None:
    c2w, _ = turntable_cameras(4, start_yaw_deg=0.0, elevation_deg=0.0)[1]
    assert np.allclose(c2w[:3, 3], [0.0, 2.0, 0.0])  # yaw grows from +X towards +Y
    for kwargs in ({"num_views": 0}, {"num_views": 2, "radius_m": 0.0}, {"num_views": 2, "fov_deg": 180.0},
                   {"num_views": 2, "elevation_deg": 90.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            turntable_cameras(**kwargs)


@pytest.mark.parametrize("num_frames", [1, 2, 7, 36])
def test_env_rotation_yaws_cover_the_circle_once(num_frames: int) -> None:
    yaws = env_rotation_yaws(num_frames)
    assert len(yaws) == num_frames and yaws[0] == 0.0
    assert all(0.0 <= y < 2 * math.pi for y in yaws)
    assert np.allclose(np.diff(yaws + [2 * math.pi]), 2 * math.pi / num_frames)  # the next would be the start
    with pytest.raises(ConfigError):
        env_rotation_yaws(0)


def test_gif_loops_with_every_frame_at_its_size(tmp_path: Path) -> None:
    frames = _frames(5)
    frames[2] = to_uint8(frames[2])  # uint8 and float frames mix
    path = write_gif(tmp_path / "media" / "turntable.gif", frames, 10)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.is_animated
        assert gif.n_frames == 5 and gif.size == (20, 12)
        assert gif.info["loop"] == 0  # forever
        assert gif.info["duration"] == 100
        gif.seek(4)
        assert np.abs(np.asarray(gif.convert("RGB"), dtype=int) - to_uint8(frames[4])).mean() < 40  # palette


def test_gif_rejects_mismatched_or_missing_frames(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no frames"):
        write_gif(tmp_path / "a.gif", [])
    with pytest.raises(ConfigError, match="sizes must match"):
        write_gif(tmp_path / "a.gif", [np.zeros((4, 4, 3)), np.zeros((4, 5, 3))])
    with pytest.raises(ConfigError, match=r"\(H, W, 3\)"):
        write_gif(tmp_path / "a.gif", [np.zeros((4, 4, 1))])
    with pytest.raises(ConfigError, match="fps"):
        write_gif(tmp_path / "a.gif", _frames(2), fps=0)


def test_frames_are_numbered_pngs_that_round_trip(tmp_path: Path) -> None:
    frames = _frames(3)
    paths = write_frames(tmp_path / "frames", frames, "relight")
    assert [p.name for p in paths] == ["relight_0000.png", "relight_0001.png", "relight_0002.png"]
    for path, frame in zip(paths, frames):
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image), to_uint8(frame))  # PNG is lossless
    with pytest.raises(ConfigError, match="prefix"):
        write_frames(tmp_path, frames, prefix="a/b")


def test_to_uint8_clips_rounds_and_takes_tensors() -> None:
    clipped = to_uint8(np.array([[-0.5, 0.0, 0.499 / 255, 0.5, 1.0, 2.0]]))
    assert clipped.tolist() == [[0, 0, 0, 128, 255, 255]]
    image = torch.rand(4, 5, 3, requires_grad=True)
    assert np.array_equal(to_uint8(image), to_uint8(image.detach().numpy()))
    same = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert to_uint8(same) is same
    for bad in (np.zeros(3), np.zeros((2, 2), dtype=np.int64), np.full((2, 2), np.nan)):
        with pytest.raises(ConfigError):
            to_uint8(bad)


def test_pbr_panel_puts_the_four_maps_side_by_side() -> None:
    height, width = 64, 48
    base = np.zeros((height, width, 3))
    base[..., 0] = 1.0
    roughness, metallic = np.full((height, width, 1), 0.25), torch.full((height, width), 0.5)
    shadow = np.ones((height, width, 1))
    panel = pbr_panel(base, roughness, metallic, shadow, labels=None)
    assert panel.shape == (height, 4 * width, 3) and panel.dtype == np.uint8
    tiles = np.split(panel, 4, axis=1)
    assert np.all(tiles[0] == [255, 0, 0])
    assert np.all(tiles[1] == 64) and np.all(tiles[2] == 128) and np.all(tiles[3] == 255)
    labelled = pbr_panel(base, roughness, metallic, shadow)
    assert labelled.shape == panel.shape
    changed = np.any(labelled != panel, axis=2)
    assert changed[: height // 2].any() and not changed[height // 2 :].any()  # captions at the top only
    assert all(changed[:, i * width : (i + 1) * width].any() for i in range(4))
    with pytest.raises(ConfigError, match="differ in size"):
        pbr_panel(base, roughness[:10], metallic, shadow)
    with pytest.raises(ConfigError, match="roughness"):
        pbr_panel(base, np.zeros((height, width, 3)), metallic, shadow)
    with pytest.raises(ConfigError, match="labels"):
        pbr_panel(base, roughness, metallic, shadow, labels=("a", "b"))
