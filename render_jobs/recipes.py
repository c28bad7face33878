"""Render recipes: camera rig x lighting rig x passes x resolution x samples (DESIGN section 5).

A recipe plans its frames as pure data from (config, source_id, env map ids), so the same asset always
gets the same cameras and lights, and a frame's record is enough to reproduce it.
"""

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from infra.config import (
    ConfigFieldError,
    FrozenConfig,
    LocalPath,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
)
from render_jobs import lighting, views
from render_jobs.lighting import LightingSpec
from render_jobs.views import ViewSpec

RecipeName = Literal["lh", "input", "relight"]
RECIPE_NAMES: tuple[str, ...] = ("lh", "input", "relight")

ALL_PASSES = ("beauty", "alpha", "depth", "normal", "basecolor", "roughness", "metallic", "shadow")


@dataclasses.dataclass(frozen=True)
class RecipeConfig(FrozenConfig):
    """One render recipe. Defaults of each named recipe come from `recipe_config`."""

    name: RecipeName
    num_views: PositiveInt
    """Views per asset: 150 for `lh`, 8 for `input`, 12 for `relight`."""
    lightings_per_view: PositiveInt = 1
    """Lighting conditions rendered per view: 16 random env maps for `relight`, else 1."""
    passes: tuple[str, ...] = ALL_PASSES
    resolution_px: PositiveInt = 512
    samples: PositiveInt = 16
    """EEVEE TAA samples per frame."""
    seed: NonNegativeInt = 0
    """Mixed with the asset's source_id: same seed and asset, same cameras and lights."""
    radius_m: PositiveFloat = 2.0
    fov_deg: Annotated[float, Range(gt=0, lt=180)] = 40.0
    env_maps_dir: LocalPath | None = None
    """Folder of .exr/.hdr maps; None uses the eight HDRIs that bpy ships."""
    env_strength: NonNegativeFloat = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in RECIPE_NAMES:
            raise ConfigFieldError("name", f"unknown recipe {self.name!r}; expected one of {RECIPE_NAMES}")
        unknown = sorted(set(self.passes) - set(ALL_PASSES))
        if unknown or "beauty" not in self.passes:
            raise ConfigFieldError(
                "passes", f"must include 'beauty' and be a subset of {ALL_PASSES}, got {self.passes}"
            )

    @property
    def needs_env_maps(self) -> bool:
        return self.name in ("input", "relight")


_DEFAULTS: dict[str, dict] = {
    "lh": dict(num_views=150, passes=("beauty", "alpha", "depth", "basecolor")),
    "input": dict(num_views=8, passes=("beauty", "alpha", "depth", "normal")),
    "relight": dict(num_views=12, lightings_per_view=16, passes=ALL_PASSES),
}


def recipe_config(name: str, **overrides) -> RecipeConfig:
    """The named recipe with the paper's defaults, then `overrides` (None values are ignored)."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown recipe {name!r}; expected one of {RECIPE_NAMES}")
    fields = {**_DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return RecipeConfig(name=name, **fields)


ENV_MAP_SUFFIXES = (".exr", ".hdr")


def env_map_files(folder: Path) -> dict[str, Path]:
    """The environment maps a recipe draws from `folder`, by file name (frames name their map by it)."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in ENV_MAP_SUFFIXES and p.is_file()}


def drawn_env_maps(cfg: RecipeConfig, source_id: str, env_map_ids: list[str]) -> set[str]:
    """The env maps one asset's frames use: what its output is made of besides the asset."""
    return {f.lighting.env_map for f in plan_frames(cfg, source_id, env_map_ids) if f.lighting.env_map}


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """One image to render: a view under one lighting."""

    view_index: int
    lighting_index: int
    view: ViewSpec
    lighting: LightingSpec


def asset_rng(seed: int, source_id: str, recipe: str) -> np.random.Generator:
    """The random stream of one (seed, asset, recipe): independent of process, platform and hash seed."""
    return np.random.default_rng([seed, int(source_id[:16], 16), RECIPE_NAMES.index(recipe)])


def plan_frames(cfg: RecipeConfig, source_id: str, env_map_ids: list[str]) -> list[FramePlan]:
    """Every frame of `cfg` for one asset, view-major."""
    rng = asset_rng(cfg.seed, source_id, cfg.name)
    if cfg.name == "input":
        rig = views.frontal_views(cfg.num_views, rng=rng)
    else:
        rig = views.hammersley_views(
            cfg.num_views, rng=rng, radius_m=cfg.radius_m, fov_deg=cfg.fov_deg, upper_bias=cfg.name == "lh"
        )
    frames = []
    for v, view in enumerate(rig):
        for k in range(cfg.lightings_per_view):
            if cfg.name == "lh":
                light = lighting.homogenized()
            elif cfg.name == "input":
                light = lighting.random_input_lighting(rng, view.location, env_map_ids)
            else:
                light = lighting.env_map(rng, env_map_ids, cfg.env_strength)
            frames.append(FramePlan(v, k, view, light))
    return frames
