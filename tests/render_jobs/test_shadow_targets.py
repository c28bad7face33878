"""Shadow targets mean one thing: a sun is extracted from every env map with a dominant light, and each frame
records whether a shadow-casting light lit it (`render_jobs.lighting`, module docstring)."""

import math
from pathlib import Path

import numpy as np
import pytest

from catalogs.keys import sha256_file
from render_jobs import lighting
from render_jobs.exr import write_channels
from render_jobs.lighting import LightingSpec
from render_jobs.recipes import eval_recipe, plan_frames, recipe_config
from render_jobs.render_set import RenderSet
from tests.conftest import _render
from tests.render_jobs.helpers import erode

SUN_RADIANCE, SKY_RADIANCE, SUN_RADIUS_DEG = 3000.0, 0.3, 5.0
SUN_AZIMUTH_RAD, SUN_ELEVATION_RAD = 0.4, math.radians(60)
UNIFORM_RADIANCE = 1.0


def _directions(h: int, w: int) -> np.ndarray:
    """(H, W, 3) world direction of each equirect pixel centre, row 0 at +Z (DESIGN convention)."""
    v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    theta, phi = v * math.pi, (0.5 - u) * 2 * math.pi
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)


def _sun_direction() -> np.ndarray:
    c, s = math.cos(SUN_ELEVATION_RAD), math.sin(SUN_ELEVATION_RAD)
    return np.array([c * math.cos(SUN_AZIMUTH_RAD), c * math.sin(SUN_AZIMUTH_RAD), s])


def _sun_map(h: int = 64, w: int = 128) -> np.ndarray:
    """A dim uniform sky with one small, very bright disc high up: (H, W, 3) float32."""
    spot = _directions(h, w) @ _sun_direction() > math.cos(math.radians(SUN_RADIUS_DEG))
    value = np.where(spot, SUN_RADIANCE, SKY_RADIANCE).astype(np.float32)
    return np.repeat(value[..., None], 3, axis=2)


def _write_map(path: Path, rgb: np.ndarray) -> None:
    write_channels(path, {c: np.ascontiguousarray(rgb[..., i]) for i, c in enumerate("RGB")})


def _within_one_face(normal: np.ndarray) -> np.ndarray:
    """(H, W) pixels whose four neighbours show the same normal as they do."""
    same = np.ones(normal.shape[:2], bool)
    for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        same &= np.sum(normal * np.roll(normal, shift, (0, 1)), axis=-1) > 0.99
    return same


# -- sun_threshold (pure) ---------------------------------------------------------------------------------


def test_uniform_and_black_maps_have_no_sun():
    assert lighting.sun_threshold(np.full((32, 64, 3), 0.7, np.float32)) is None
    assert lighting.sun_threshold(np.zeros((32, 64, 3), np.float32)) is None
    overcast = (1.0 + 0.5 * np.clip(_directions(32, 64)[..., 2:3], 0, None)) * np.ones(3)  # brighter up high
    assert lighting.sun_threshold(overcast) is None


def test_a_spot_gets_a_threshold_between_sky_and_spot_that_scales_with_strength():
    rgb = _sun_map()
    threshold = lighting.sun_threshold(rgb)
    assert threshold is not None and SKY_RADIANCE < threshold < SUN_RADIANCE
    assert threshold == pytest.approx(lighting.SUN_FRACTION * SUN_RADIANCE)
    assert lighting.sun_threshold(rgb, strength=2.5) == pytest.approx(2.5 * threshold)
    assert lighting.sun_threshold(rgb, strength=0.0) is None
    assert lighting.sun_threshold(rgb * 7.0) == pytest.approx(7.0 * threshold)  # relative to the map


def test_brightness_is_the_largest_channel_and_bad_values_are_ignored():
    rgb = np.full((32, 64, 3), 0.2, np.float32)
    rgb[10, 5] = (0.0, 500.0, 0.0)  # a green sun: EEVEE compares max(R, G, B) with the threshold
    rgb[20, 7] = (np.inf, np.nan, -3.0)
    assert lighting.sun_threshold(rgb) == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        lighting.sun_threshold(rgb[..., 0])


def test_shadow_fields_say_which_frames_have_a_shadow_casting_light():
    lamp = lighting.AreaLightSpec((5.0, 0.0, 0.0), 500.0, 1.0)
    area = LightingSpec(kind="area", rig="area_sphere", lights=(lamp,))
    env = LightingSpec(kind="env_map", rig="env_map", env_map="sun.exr")
    assert lighting.shadow_fields(area, None) == {"shadow_light": True, "sun_threshold": None}
    unlit = {"shadow_light": False, "sun_threshold": None}
    assert lighting.shadow_fields(lighting.homogenized(), None) == unlit
    assert lighting.shadow_fields(env, 300.0) == {"shadow_light": True, "sun_threshold": 300.0}
    assert lighting.shadow_fields(env, None) == unlit
    with pytest.raises(ValueError, match="no sun threshold"):
        lighting.shadow_fields(area, 1.0)


# -- the eval recipe rendered under a sun map and a uniform map (Blender) --------------------------------

MAPS = ("sun.exr", "uniform.exr")


@pytest.fixture(scope="module")
def eval_render(tmp_path_factory, demo_assets, supervisor, worker_config) -> RenderSet:
    """The open box under both maps, through the `eval` recipe: one input camera that looks into the box."""
    maps = tmp_path_factory.mktemp("shadow_maps")
    _write_map(maps / "sun.exr", _sun_map())
    _write_map(maps / "uniform.exr", np.full((32, 64, 3), UNIFORM_RADIANCE, np.float32))
    asset = demo_assets["open_box"]
    source_id = sha256_file(asset)
    # The first seed whose input camera looks down into the box (pitch > 30 degrees): its floor then shows
    # both the walls' cast shadow and sunlit parts.
    def pitch_rad(seed: int) -> float:
        (frame,) = plan_frames(recipe_config("input", num_views=1, seed=seed), source_id, list(MAPS))
        return frame.view.pitch_rad

    seed = next(s for s in range(200) if pitch_rad(s) > math.radians(30))
    input_cfg = recipe_config("input", num_views=1, resolution_px=48, samples=4, seed=seed)
    recipe = eval_recipe(input_cfg, recipe_config("relight", env_maps_dir=str(maps)), MAPS)
    out = tmp_path_factory.mktemp("shadow")
    record = _render([asset], recipe, out, supervisor, worker_config)["open_box"]
    assert record.result.is_ok, record.result
    return RenderSet.open(record.result.out_dir)


@pytest.mark.blender
@pytest.mark.slow
def test_each_frame_records_its_shadow_casting_light(eval_render):
    frames = {f.record["lighting"]["env_map"]: f for f in eval_render.frames}
    assert sorted(frames) == sorted(MAPS) and len(eval_render.frames) == 2
    sun, uniform = frames["sun.exr"].record["lighting"], frames["uniform.exr"].record["lighting"]
    spec_keys = set(LightingSpec(kind="env_map", rig="env_map").to_dict())
    assert set(sun) == set(uniform) == spec_keys | {"shadow_light", "sun_threshold"}
    assert sun["shadow_light"] is True
    assert sun["sun_threshold"] == pytest.approx(lighting.SUN_FRACTION * SUN_RADIANCE)
    assert uniform["shadow_light"] is False and uniform["sun_threshold"] is None
    assert eval_render.meta["recipe"]["env_map_names"] == list(MAPS)
    assert sorted(eval_render.meta["env_maps"]) == sorted(MAPS)


@pytest.mark.blender
@pytest.mark.slow
def test_sun_map_shadow_pass_shows_the_walls_cast_shadow_and_is_one_on_the_background(eval_render):
    frame = next(f for f in eval_render.frames if f.record["lighting"]["env_map"] == "sun.exr")
    passes = frame.load_passes("shadow", "alpha", "normal")
    shadow, alpha = passes["shadow"], passes["alpha"]
    yaw = frame.record["lighting"]["yaw_rad"]
    rotation = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    facing_sun = passes["normal"] @ (rotation @ _sun_direction())  # the recorded yaw turns the map's sun
    inside = erode(alpha > 0.999, 1)
    assert np.all(shadow[alpha == 0] == 1.0)
    assert shadow[inside].min() < 0.5 and shadow[inside].max() > 0.9
    # Away from the edges between faces: the shadow pass averages a pixel's samples, the normal pass does not.
    inside &= _within_one_face(passes["normal"])
    sunward = inside & (facing_sun > 0.5)  # faces the sun: dark only where something else blocks it
    cast = sunward & (shadow < 0.5)
    lit = sunward & (shadow > 0.9)
    assert cast.sum() >= 5 and lit.sum() >= 5, (cast.sum(), lit.sum(), sunward.sum())
    assert np.all(shadow[inside & (facing_sun < -0.2)] < 0.05)  # turned away from the only light: 0


@pytest.mark.blender
@pytest.mark.slow
def test_uniform_map_has_no_sun_and_its_shadow_pass_is_zero_on_the_object(eval_render):
    """The documented convention where `shadow_light` is false: 0 over the object, 1 on the background, and
    the film's blend of the two, 1 - alpha, on the silhouette."""
    frame = next(f for f in eval_render.frames if f.record["lighting"]["env_map"] == "uniform.exr")
    passes = frame.load_passes("shadow", "alpha", "beauty")
    shadow, alpha = passes["shadow"], passes["alpha"]
    assert np.all(shadow[alpha == 0] == 1.0)
    assert np.all(shadow[erode(alpha > 0.999, 1)] < 0.01)
    np.testing.assert_allclose(shadow, 1.0 - alpha, atol=0.01)
    assert passes["beauty"][alpha > 0.999][:, :3].mean() > 0.1  # lit all the same, by the world probe
