"""Camera and lighting rigs, recipes and their seeding: pure functions, no Blender."""

import math
import subprocess
import sys

import numpy as np
import pytest

from render_jobs import lighting
from render_jobs.cameras import look_at_c2w, opencv_w2c, project_points
from render_jobs.recipes import ALL_PASSES, plan_frames, recipe_config
from render_jobs.views import frontal_views, hammersley_views

SOURCE_ID = "ab" * 32


def test_paper_defaults():
    lh, inp, relight = (recipe_config(n) for n in ("lh", "input", "relight"))
    assert (lh.num_views, lh.radius_m, lh.fov_deg, lh.resolution_px) == (150, 2.0, 40.0, 512)
    assert inp.num_views == 8
    assert (relight.num_views, relight.lightings_per_view, relight.passes) == (12, 16, ALL_PASSES)
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("sunset")
    with pytest.raises(ValueError, match="passes"):
        recipe_config("lh", passes=("depth",))


def test_hammersley_rig_is_trellis_like():
    views = hammersley_views(4000, rng=np.random.default_rng(0))
    pitch = np.array([v.pitch_rad for v in views])
    assert np.mean(pitch < 0) == pytest.approx(0.25, abs=0.01)  # TRELLIS: a quarter below the equator
    assert all(v.radius_m == 2.0 and v.fov_rad == pytest.approx(math.radians(40)) for v in views)
    uniform = hammersley_views(4000, rng=np.random.default_rng(0), upper_bias=False)
    z = np.array([v.location[2] for v in uniform]) / 2.0
    assert np.mean(z < 0) == pytest.approx(0.5, abs=0.01) and np.mean(np.abs(z) < 0.5) == pytest.approx(0.5, abs=0.02)


def test_frontal_views_stay_in_range_and_fit_the_unit_cube():
    for view in frontal_views(500, rng=np.random.default_rng(1)):
        assert -135.0 - 1e-9 <= math.degrees(view.yaw_rad) <= -45.0 + 1e-9
        assert -10.0 - 1e-9 <= math.degrees(view.pitch_rad) <= 45.0 + 1e-9
        assert 10.0 - 1e-9 <= math.degrees(view.fov_rad) <= 70.0 + 1e-9
        assert view.radius_m * math.sin(view.fov_rad / 2) == pytest.approx(math.sqrt(3) / 2)


def test_cameras_look_at_the_origin():
    for view in hammersley_views(20, rng=np.random.default_rng(2)):
        c2w = view.c2w
        np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
        uv, depth = project_points(np.zeros((1, 3)), c2w, view.fov_rad, 64)
        np.testing.assert_allclose(uv, [[32.0, 32.0]], atol=1e-9)
        assert depth[0] == pytest.approx(2.0)
        assert opencv_w2c(c2w)[2, 3] == pytest.approx(2.0)  # OpenCV: +z forward
    straight_down = look_at_c2w(np.array([0.0, 0.0, 3.0]))
    assert np.all(np.isfinite(straight_down))


def test_lighting_rigs():
    rng = np.random.default_rng(3)
    six = lighting.area_sphere(rng)
    directions = np.array([l.location_m for l in six.lights])
    distances = np.linalg.norm(directions, axis=1)
    assert len(six.lights) == 6 and np.all((distances >= 5) & (distances <= 8))
    unit = directions / distances[:, None]
    gram = np.abs(unit @ unit.T)
    assert np.all((np.isclose(gram, 0.0, atol=1e-9)) | (np.isclose(gram, 1.0, atol=1e-9)))  # +-3 orthogonal axes
    assert np.allclose(unit.sum(0), 0.0, atol=1e-9)
    camera = np.array([0.0, -2.0, 0.5])
    for _ in range(50):
        hemi = lighting.area_hemisphere(rng, camera)
        assert 1 <= len(hemi.lights) <= 3
        assert all(np.dot(l.location_m, camera) >= 0 and 300 <= l.power_w <= 700 for l in hemi.lights)
    env = lighting.env_map(rng, ["a.exr", "b.exr"])
    assert env.env_map in ("a.exr", "b.exr") and 0 <= env.yaw_rad < 2 * math.pi
    with pytest.raises(ValueError):
        lighting.env_map(rng, [])


def test_frame_plans_are_deterministic_and_differ_per_asset():
    recipe = recipe_config("input", num_views=6)
    maps = ["a.exr", "b.exr", "c.exr"]
    first, again = plan_frames(recipe, SOURCE_ID, maps), plan_frames(recipe, SOURCE_ID, maps)
    assert first == again
    assert plan_frames(recipe, "cd" * 32, maps) != first
    assert plan_frames(recipe.replace(seed=1), SOURCE_ID, maps) != first
    assert {f.lighting.rig for f in plan_frames(recipe.replace(num_views=60), SOURCE_ID, maps)} == {"area_sphere", "area_hemisphere", "env_map"}
    relight = plan_frames(recipe_config("relight", num_views=2, lightings_per_view=3), SOURCE_ID, maps)
    assert [(f.view_index, f.lighting_index) for f in relight] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_plans_do_not_depend_on_the_process_hash_seed():
    code = ("from render_jobs.recipes import plan_frames, recipe_config;"
            f"print(plan_frames(recipe_config('input', num_views=3), '{SOURCE_ID}', ['a', 'b'])[2])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
