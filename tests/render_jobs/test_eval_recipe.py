"""The `eval` recipe: the `input` cameras under each held-out env map (pure planning, no Blender)."""

import math

import numpy as np
import pytest

from infra.config import ConfigFieldError
from infra.errors import NotFound
from render_jobs.recipes import (
    ALL_PASSES,
    EVAL_RECIPE,
    RECIPE_NAMES,
    RecipeConfig,
    asset_rng,
    drawn_env_maps,
    eval_recipe,
    plan_frames,
    recipe_config,
    recipe_env_maps,
)

SOURCE_ID = "ab" * 32
FOLDER_MAPS = ["city.exr", "forest.exr", "night.exr", "studio.exr", "sunset.exr"]
HELD_OUT = ("sunset.exr", "city.exr", "night.exr")


@pytest.fixture
def input_cfg() -> RecipeConfig:
    return recipe_config("input", num_views=5, resolution_px=96, samples=3, seed=7)


@pytest.fixture
def relight_cfg() -> RecipeConfig:
    return recipe_config("relight", env_maps_dir="/maps", env_strength=1.5)


def test_eval_recipe_takes_cameras_from_input_and_light_from_relight(input_cfg, relight_cfg):
    cfg = eval_recipe(input_cfg, relight_cfg, list(HELD_OUT))
    assert cfg.name == EVAL_RECIPE and EVAL_RECIPE not in RECIPE_NAMES
    assert (cfg.num_views, cfg.resolution_px, cfg.samples, cfg.seed) == (5, 96, 3, 7)
    assert (cfg.radius_m, cfg.fov_deg) == (input_cfg.radius_m, input_cfg.fov_deg)
    assert (cfg.env_maps_dir, cfg.env_strength) == ("/maps", 1.5)
    assert cfg.passes == ALL_PASSES and cfg.needs_env_maps
    assert cfg.lightings_per_view == 3 and cfg.env_map_names == HELD_OUT
    assert RecipeConfig.from_dict(cfg.to_dict()) == cfg


def test_eval_cameras_are_exactly_the_input_cameras(input_cfg, relight_cfg):
    cfg = eval_recipe(input_cfg, relight_cfg, HELD_OUT)
    inputs = {f.view_index: f.view for f in plan_frames(input_cfg, SOURCE_ID, FOLDER_MAPS)}
    frames = plan_frames(cfg, SOURCE_ID, FOLDER_MAPS)
    assert len(frames) == cfg.num_views * len(HELD_OUT)
    for frame in frames:
        expected = inputs[frame.view_index]
        np.testing.assert_array_equal(frame.view.c2w, expected.c2w)
        assert frame.view.fov_rad == expected.fov_rad
    other = plan_frames(cfg, "cd" * 32, FOLDER_MAPS)
    assert not np.allclose(other[0].view.c2w, frames[0].view.c2w)  # another asset, other cameras


def test_every_view_meets_every_held_out_map_once_in_order(input_cfg, relight_cfg):
    cfg = eval_recipe(input_cfg, relight_cfg, HELD_OUT)
    frames = plan_frames(cfg, SOURCE_ID, FOLDER_MAPS)
    pairs = [(f.view_index, f.lighting_index, f.lighting.env_map) for f in frames]
    assert pairs == [(v, k, name) for v in range(cfg.num_views) for k, name in enumerate(HELD_OUT)]
    assert {f.lighting.kind for f in frames} == {"env_map"}
    assert {f.lighting.strength for f in frames} == {1.5}
    assert drawn_env_maps(cfg, SOURCE_ID, FOLDER_MAPS) == set(HELD_OUT)
    assert drawn_env_maps(cfg, SOURCE_ID, list(HELD_OUT)) == set(HELD_OUT)  # as the build passes them


def test_eval_yaws_are_deterministic_uniform_draws_of_their_own_stream(input_cfg, relight_cfg):
    cfg = eval_recipe(input_cfg, relight_cfg, HELD_OUT)
    yaws = [f.lighting.yaw_rad for f in plan_frames(cfg, SOURCE_ID, FOLDER_MAPS)]
    assert yaws == [f.lighting.yaw_rad for f in plan_frames(cfg, SOURCE_ID, list(reversed(FOLDER_MAPS)))]
    expected = asset_rng(cfg.seed, SOURCE_ID, EVAL_RECIPE).uniform(0.0, 2.0 * math.pi, size=len(yaws))
    np.testing.assert_allclose(yaws, expected)
    assert len(set(yaws)) == len(yaws)
    assert yaws != [f.lighting.yaw_rad for f in plan_frames(cfg.replace(seed=8), SOURCE_ID, FOLDER_MAPS)]


def test_recipe_streams_keep_their_numbers():
    """lh 0, input 1, relight 2, eval 3: adding eval changes no existing asset's cameras or lights."""
    for index, name in enumerate(("lh", "input", "relight", EVAL_RECIPE)):
        expected = np.random.default_rng([3, int(SOURCE_ID[:16], 16), index]).random(4)
        np.testing.assert_array_equal(asset_rng(3, SOURCE_ID, name).random(4), expected)


def test_recipes_without_names_keep_their_record_and_digest():
    """Step keys hash `to_dict()`: recipes that name no maps serialise as they did before the field existed."""
    for name in RECIPE_NAMES:
        cfg = recipe_config(name)
        assert "env_map_names" not in cfg.to_dict()
        assert RecipeConfig.from_dict(cfg.to_dict()) == cfg
    relight = recipe_config("relight", env_map_names=("city.exr",))
    assert relight.to_dict()["env_map_names"] == ["city.exr"] and relight.digest() != recipe_config("relight").digest()


def test_env_map_names_restrict_other_recipes_in_their_order():
    chosen = ("studio.exr", "city.exr")
    relight = recipe_config("relight", num_views=2, lightings_per_view=6, env_map_names=chosen)
    assert {f.lighting.env_map for f in plan_frames(relight, SOURCE_ID, FOLDER_MAPS)} == set(chosen)
    assert recipe_env_maps(relight, FOLDER_MAPS) == ["studio.exr", "city.exr"]
    assert recipe_env_maps(relight.replace(env_map_names=()), reversed(FOLDER_MAPS)) == FOLDER_MAPS


def test_missing_held_out_maps_are_named(input_cfg, relight_cfg):
    cfg = eval_recipe(input_cfg, relight_cfg, ("sunset.exr", "moon.exr", "mars.hdr"))
    with pytest.raises(NotFound, match=r"\['moon.exr', 'mars.hdr'\]"):
        plan_frames(cfg, SOURCE_ID, FOLDER_MAPS)
    with pytest.raises(NotFound, match="moon.exr"):
        recipe_env_maps(cfg, FOLDER_MAPS)


def test_invalid_eval_configs_fail_with_clear_errors(input_cfg, relight_cfg):
    with pytest.raises(ConfigFieldError, match="env_map_names: the eval recipe needs the held-out maps"):
        eval_recipe(input_cfg, relight_cfg, [])
    with pytest.raises(ConfigFieldError, match=r"lightings_per_view: .* 3 \(len\(env_map_names\)\), got 2"):
        RecipeConfig(name="eval", num_views=2, lightings_per_view=2, env_map_names=HELD_OUT)
    with pytest.raises(ConfigFieldError, match=r"env_map_names: \['city.exr'\] appear more than once"):
        eval_recipe(input_cfg, relight_cfg, ["city.exr", "night.exr", "city.exr"])
    with pytest.raises(ConfigFieldError, match="no folders"):
        eval_recipe(input_cfg, relight_cfg, ["maps/city.exr"])
    with pytest.raises(ConfigFieldError, match="ending in"):
        eval_recipe(input_cfg, relight_cfg, ["city.png"])
    with pytest.raises(ConfigFieldError, match="the lh recipe draws no env maps"):
        recipe_config("lh", env_map_names=("city.exr",))
    with pytest.raises(ValueError, match="takes the input and the relight recipes"):
        eval_recipe(relight_cfg, relight_cfg, HELD_OUT)
    with pytest.raises(ValueError, match="build it with eval_recipe"):
        recipe_config(EVAL_RECIPE)
    with pytest.raises(ConfigFieldError, match="unknown recipe 'sunset'"):
        RecipeConfig(name="sunset", num_views=1)
