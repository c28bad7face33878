"""Render recipes: camera rig x lighting rig x passes x resolution x samples (DESIGN section 5).

A recipe plans its frames as pure data from (config, source_id, env map ids), so the same asset always
gets the same cameras and lights, and a frame's record is enough to reproduce it.

Besides the three recipes a build config names (`RECIPE_NAMES`), `eval` (`eval_recipe`) is the ground truth of
unknown-lit relighting: the asset's `input` cameras re-rendered under each of a list of held-out env maps.
"""

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

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
from infra.errors import NotFound
from render_jobs import lighting, views
from render_jobs.lighting import LightingSpec
from render_jobs.views import ViewSpec

RecipeName = Literal["lh", "input", "relight", "eval"]
RECIPE_NAMES: tuple[str, ...] = ("lh", "input", "relight")
"""The recipes a build config and `near render --recipe` name."""
EVAL_RECIPE = "eval"
"""Made from the `input` and `relight` recipes by `eval_recipe`, for the held-out env maps."""
_RANDOM_STREAMS: tuple[str, ...] = (*RECIPE_NAMES, EVAL_RECIPE)
"""Every recipe, in the order that numbers its random stream (`asset_rng`): append, never reorder."""

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
    env_map_names: tuple[str, ...] = ()
    """When set, the maps drawn (file names within the env map folder), in this order, instead of every map in
    it. `eval` needs them: its lighting k of each view is map k."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in _RANDOM_STREAMS:
            raise ConfigFieldError("name", f"unknown recipe {self.name!r}; expected one of {_RANDOM_STREAMS}")
        unknown = sorted(set(self.passes) - set(ALL_PASSES))
        if unknown or "beauty" not in self.passes:
            raise ConfigFieldError(
                "passes", f"must include 'beauty' and be a subset of {ALL_PASSES}, got {self.passes}"
            )
        self._check_env_map_names()

    def _check_env_map_names(self) -> None:
        names = self.env_map_names
        if names and not self.needs_env_maps:
            raise ConfigFieldError("env_map_names", f"the {self.name} recipe draws no env maps, got {names}")
        bad = [n for n in names if Path(n).name != n or Path(n).suffix.lower() not in ENV_MAP_SUFFIXES]
        if bad:
            raise ConfigFieldError(
                "env_map_names", f"expected file names ending in {ENV_MAP_SUFFIXES} (no folders), got {bad}"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigFieldError("env_map_names", f"{repeated} appear more than once")
        if self.name == EVAL_RECIPE:
            if not names:
                raise ConfigFieldError("env_map_names", "the eval recipe needs the held-out maps to light")
            if self.lightings_per_view != len(names):
                raise ConfigFieldError(
                    "lightings_per_view",
                    f"the eval recipe renders each view once per env map: expected {len(names)} "
                    f"(len(env_map_names)), got {self.lightings_per_view}",
                )

    @property
    def needs_env_maps(self) -> bool:
        return self.name in ("input", "relight", EVAL_RECIPE)

    def to_dict(self) -> dict[str, Any]:
        """As every config's, but without `env_map_names` while it is empty: a recipe that sets no names keeps the
        digest (and so the step keys) it had before the field existed."""
        data = super().to_dict()
        if not self.env_map_names:
            del data["env_map_names"]
        return data


_DEFAULTS: dict[str, dict] = {
    "lh": dict(num_views=150, passes=("beauty", "alpha", "depth", "basecolor")),
    "input": dict(num_views=8, passes=("beauty", "alpha", "depth", "normal")),
    "relight": dict(num_views=12, lightings_per_view=16, passes=ALL_PASSES),
}


def recipe_config(name: str, **overrides) -> RecipeConfig:
    """The named recipe with the paper's defaults, then `overrides` (None values are ignored)."""
    if name not in _DEFAULTS:
        hint = " (build it with eval_recipe)" if name == EVAL_RECIPE else ""
        raise ValueError(f"unknown recipe {name!r}; expected one of {RECIPE_NAMES}{hint}")
    fields = {**_DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return RecipeConfig(name=name, **fields)


def eval_recipe(
    input_cfg: RecipeConfig, relight_cfg: RecipeConfig, env_map_names: Sequence[str]
) -> RecipeConfig:
    """The `eval` recipe: the cameras of `input_cfg` (every asset's `input` views, exactly) under each map of
    `env_map_names`, lit as `relight_cfg` lights (its folder and strength), with every pass.

    Raises:
        ValueError: the configs are not an `input` and a `relight` recipe.
        ConfigFieldError: no map names, or a name that is not a plain .exr/.hdr file name, or a repeated one.

    Examples:
        >>> cfg = eval_recipe(recipe_config("input"), recipe_config("relight"), ["sunset.exr", "city.exr"])
        >>> cfg.name, cfg.num_views, cfg.lightings_per_view, cfg.env_map_names
        ('eval', 8, 2, ('sunset.exr', 'city.exr'))
    """
    if input_cfg.name != "input" or relight_cfg.name != "relight":
        raise ValueError(f"eval_recipe takes the input and the relight recipes, got {input_cfg.name!r} and "
                         f"{relight_cfg.name!r}")
    names = tuple(env_map_names)
    return RecipeConfig(
        name=EVAL_RECIPE,
        num_views=input_cfg.num_views,
        lightings_per_view=max(len(names), 1),  # 0 maps: env_map_names' own error names the problem
        passes=ALL_PASSES,
        resolution_px=input_cfg.resolution_px,
        samples=input_cfg.samples,
        seed=input_cfg.seed,
        radius_m=input_cfg.radius_m,
        fov_deg=input_cfg.fov_deg,
        env_maps_dir=relight_cfg.env_maps_dir,
        env_strength=relight_cfg.env_strength,
        env_map_names=names,
    )


ENV_MAP_SUFFIXES = (".exr", ".hdr")


def env_map_files(folder: Path) -> dict[str, Path]:
    """The environment maps a recipe draws from `folder`, by file name (frames name their map by it)."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in ENV_MAP_SUFFIXES and p.is_file()}


def recipe_env_maps(cfg: RecipeConfig, available: Iterable[str]) -> list[str]:
    """The env map ids `plan_frames` draws from, in order: `cfg.env_map_names` when set, else every one of
    `available`, sorted.

    Raises:
        NotFound: a name of `cfg.env_map_names` is not among `available`.
    """
    available = set(available)
    if not cfg.env_map_names:
        return sorted(available)
    missing = [n for n in cfg.env_map_names if n not in available]
    if missing:
        raise NotFound(f"recipe {cfg.name}: env maps {missing} are missing (available: {sorted(available)})")
    return list(cfg.env_map_names)


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
    """The random stream of one (seed, asset, recipe): independent of process, platform and hash seed.
    Recipes number their streams lh 0, input 1, relight 2, eval 3."""
    return np.random.default_rng([seed, int(source_id[:16], 16), _RANDOM_STREAMS.index(recipe)])


def plan_frames(cfg: RecipeConfig, source_id: str, env_map_ids: list[str]) -> list[FramePlan]:
    """Every frame of `cfg` for one asset, view-major.

    `env_map_ids` are the maps available to draw from (`recipe_env_maps`); a recipe with `env_map_names` draws
    from those, in their order, and `eval` lights view v with map k as frame (v, k), at a random yaw.

    Raises:
        NotFound: a name of `cfg.env_map_names` is not among `env_map_ids`.
    """
    if cfg.env_map_names:
        env_map_ids = recipe_env_maps(cfg, env_map_ids)
    if cfg.name == EVAL_RECIPE:
        return _plan_eval_frames(cfg, source_id, env_map_ids)
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


def _plan_eval_frames(cfg: RecipeConfig, source_id: str, env_map_ids: list[str]) -> list[FramePlan]:
    """The `input` recipe's views (the same stream, drawn first there too), each under every map in order."""
    rig = views.frontal_views(cfg.num_views, rng=asset_rng(cfg.seed, source_id, "input"))
    rng = asset_rng(cfg.seed, source_id, EVAL_RECIPE)
    return [
        FramePlan(v, k, view, lighting.rotated_env_map(rng, name, cfg.env_strength))
        for v, view in enumerate(rig)
        for k, name in enumerate(env_map_ids)
    ]
