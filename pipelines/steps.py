"""The step table (DESIGN section 8): every step of the build declared once, with the resources next to the work.

    env map source -> env_map_rgb                                               (release role env_maps)
    asset source --> render_lh (+ normalize) -> voxelize -> features -> slat_lh, slat_bc
                 --> render_input (+ the env maps its frames draw) ---------> slat_shaded (with voxelize)
                 --> render_relight (+ the env maps its frames draw)
                 --> render_eval (test assets only: the input cameras under each held-out map)

A `Step` is its key spec (params taken from the very config objects its worker runs with: the recipe, the
encoder's config with its resolved device and dtype, the Blender version), its inputs, the `Call` that makes it
(which worker pool, which compute function, what the call also makes), its array schema and release role, and
the stats it records (what release filters select on). The driver, the scheduler, the report, releases and
the training readers read this table; no other module names a step.

Only Blender imports assets, so the `lh` render call also makes `normalize` (the mesh scaled so its largest
side is 1 and centred, DESIGN section 4); its images are transient, read by the `encode` call on the same node.
"""

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from catalogs.keys import ENV_MAP_KIND, SOURCE, StepGraph, StepSpec
from encoders.asset_encoder import AssetEncoderConfig
from encoders.dinov2 import Dinov2Config
from encoders.weights import WeightsInfo
from pipelines import compute
from pipelines.build_config import BuildConfig
from pipelines.scheduler import CallNode, StepNode, Topology
from render_jobs.recipes import EVAL_RECIPE, RecipeConfig, drawn_env_maps, eval_recipe
from render_jobs.render_set import PASS_CHANNELS

WorkerKind = Literal["render", "encoder"]
VOXEL_RESOLUTION = 64


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a step's output for one asset: rows first; a str dimension varies per asset."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def check(self, array: np.ndarray) -> str | None:
        """Why `array` does not fit, or None."""
        fits = array.dtype == np.dtype(self.dtype) and array.ndim == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, array.shape))
        if fits:
            return None
        return f"{self.name} is {array.dtype}{list(array.shape)}, declared {self.dtype}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class Call:
    """One actor call: the pool that runs it, its compute function and the config object it runs with.

    `compute(worker, request, inputs) -> compute.CallOutput` gets the actor (its models or render child), the
    `compute.CallRequest` and the inputs' arrays; it makes every step whose call this is (and those in `also`
    that the request asks for), or raises `infra.errors.StepFailed`."""

    name: str
    worker: WorkerKind
    compute: Callable[..., Any]
    config: Any = None
    also: tuple[str, ...] = ()
    transient: bool = False


@dataclasses.dataclass(frozen=True)
class Step:
    spec: StepSpec
    call: Call
    arrays: tuple[ArraySpec, ...]
    role: str | None = None
    """Release role it fills (one row per asset, or per env map for a step over env maps)."""
    transient_inputs: tuple[str, ...] = ()
    stats: tuple[str, ...] = ()
    """Stats it records per asset that release filters may select on."""

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class Worker:
    """A worker pool: the Ray resources of each of its actors."""

    kind: WorkerKind
    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    config: Any = None
    """What its actors are built with (the encoders' `EncoderRuntime`: the keys' device and dtype)."""


class StepTable:
    """The build's steps in dependency order, with their calls and workers."""

    def __init__(self, steps: list[Step], workers: list[Worker],
                 held_out_env_maps: Mapping[str, str] | None = None) -> None:
        self.held_out_env_maps = dict(held_out_env_maps or {})
        """File name -> sha256 of the env maps held out for evaluation (`render_eval` lights test assets with
        them; the release records them so Stage 2 never trains on them)."""
        self.graph = StepGraph([s.spec for s in steps])
        by_name = {s.name: s for s in steps}
        self.steps = {name: by_name[name] for name in self.graph.names}
        self.calls = {s.call.name: s.call for s in self.steps.values()}
        self.workers = {w.kind: w for w in workers}
        roles = [s.role for s in self.steps.values() if s.role]
        if len(roles) != len(set(roles)):
            raise ValueError(f"release roles must be distinct, got {roles}")

    def __getitem__(self, name: str) -> Step:
        return self.steps[name]

    @property
    def roles(self) -> dict[str, str]:
        """Release role -> step."""
        return {s.role: s.name for s in self.steps.values() if s.role}

    @property
    def shared_roles(self) -> set[str]:
        """Roles with one row per env map rather than per asset."""
        return {s.role for s in self.steps.values() if s.role and s.spec.over == ENV_MAP_KIND}

    @property
    def test_roles(self) -> set[str]:
        """Roles only test assets have: those of steps that run for test assets alone (`render_eval`)."""
        return {s.role for s in self.steps.values() if s.role and s.spec.only is not None}

    def step_recording(self, stat: str) -> str:
        """The step whose artifacts record `stat`."""
        for step in self.steps.values():
            if stat in step.stats:
                return step.name
        known = sorted({s for step in self.steps.values() for s in step.stats})
        raise KeyError(f"no step records the stat {stat!r}; recorded stats: {known}")

    def topology(self) -> Topology:
        steps = {
            s.name: StepNode(s.name, tuple(i for i in s.spec.inputs if i != SOURCE), s.call.name, s.transient_inputs)
            for s in self.steps.values()
        }
        calls = {c.name: CallNode(c.name, c.worker, c.also, c.transient) for c in self.calls.values()}
        return Topology(steps, calls)

    def with_steps(self, *extra: Step) -> "StepTable":
        """This table plus `extra` steps (a new step is one declaration and its compute function)."""
        return StepTable([*self.steps.values(), *extra], list(self.workers.values()), self.held_out_env_maps)


# -- role names the release readers use (the table fills each from one step) ---------------------------------

VOXELS, FEATURES, SLAT_LH, SLAT_BC, SLAT_SHADED = "voxels", "features", "slat_lh", "slat_bc", "slat_shaded"
INPUT, RELIGHT, EVAL, ENV_MAPS = "input", "relight", "eval", "env_maps"


@dataclasses.dataclass(frozen=True)
class EnvMaps:
    """The env maps each recipe draws: file name -> (path, sha256)."""

    files: Mapping[str, tuple[Path, str]]
    by_recipe: Mapping[str, tuple[str, ...]]
    """Recipe name -> the names it can draw (sorted: frames pick by index into this list); for the `eval`
    recipe the held-out maps, in the order its lightings use them."""

    @property
    def held_out(self) -> dict[str, str]:
        """File name -> sha256 of the maps Stage 2 never trains on (what `render_eval` lights test assets with)."""
        return {name: self.files[name][1] for name in self.by_recipe.get(EVAL_RECIPE, ())}


@dataclasses.dataclass(frozen=True)
class EncoderRuntime:
    """Where and in what dtype the encoders run: part of every encoder step's key."""

    device: Literal["cpu", "cuda"]
    encoder: AssetEncoderConfig

    @classmethod
    def of(cls, config: BuildConfig) -> "EncoderRuntime":
        device = "cuda" if config.execution.encoder_gpus > 0 else "cpu"
        precision = config.models.precision
        if precision == "auto":
            precision = "bfloat16" if device == "cuda" else "float32"
        dinov2 = Dinov2Config(model=config.dinov2, precision=precision)
        return cls(device, AssetEncoderConfig(dinov2=dinov2, slat_encoder=config.slat_encoder))

    def params(self) -> dict[str, Any]:
        """The encoder config without model references (their weights' digests enter the keys instead)."""
        params = self.encoder.to_dict()
        params.pop("slat_encoder")
        params["dinov2"].pop("model")
        return {**params, "device": self.device}


def render_arrays(recipe: RecipeConfig) -> tuple[ArraySpec, ...]:
    """`compute.render_set_arrays` of a recipe: per frame (F = views x lightings) the lighting-dependent passes,
    per view (V) the others, at R x R pixels."""
    frames, views, size = recipe.num_views * recipe.lightings_per_view, recipe.num_views, recipe.resolution_px
    per_frame = [p for p in ("beauty", "shadow") if p in recipe.passes]
    per_view = [p for p in recipe.passes if p not in per_frame]

    def channels(name: str) -> tuple[int, ...]:
        count = len(PASS_CHANNELS[name][1])
        return (count,) if count > 1 else ()

    return (
        *(ArraySpec(p, "float16", (frames, size, size, *channels(p))) for p in per_frame),
        *((ArraySpec("frame_shadow_light", "uint8", (frames,)),) if "shadow" in per_frame else ()),
        ArraySpec("frame_view", "int16", (frames,)),
        ArraySpec("frame_lighting", "int16", (frames,)),
        ArraySpec("frame_env_map", "uint8", (frames, 32)),
        ArraySpec("frame_yaw", "float32", (frames,)),
        ArraySpec("frame_env_strength", "float32", (frames,)),
        ArraySpec("c2w", "float32", (views, 4, 4)),
        ArraySpec("fov", "float32", (views,)),
        *(ArraySpec(p, "float16", (views, size, size, *channels(p))) for p in per_view),
    )


ASSET_STATS = ("vertices", "faces", "materials", "textures", "missing_textures", "rebuilt_materials",
               "max_alpha_coverage", "has_base_color_texture", "has_metallic_roughness_texture", "has_normal_texture")
"""What importing and rendering an asset records (`render_jobs.worker.prepare_scene`)."""


def build_table(config: BuildConfig, weights: Mapping[str, WeightsInfo], blender_version: str,
                env_maps: EnvMaps) -> StepTable:
    """The paper's steps for `config`, keyed by the models' digests, the Blender version and the env maps.

    Render versions: `render_lh` 4; `render_input` and `render_relight` 5 (the sun extracted from each map by
    a threshold relative to its peak, so the shadow pass means one thing: `render_jobs.lighting`)."""
    runtime = EncoderRuntime.of(config)
    blender = {"blender": blender_version}
    render_modules = ("render_jobs.worker", "render_jobs.blender_scene", "pipelines.compute")

    def render_spec(name: str, version: str, recipe: RecipeConfig, **fields: Any) -> StepSpec:
        maps = list(env_maps.by_recipe.get(recipe.name, ()))
        files = env_maps.files
        draws = None
        if maps:
            def draws(source_id: str) -> dict[str, str]:
                return {f"{ENV_MAP_KIND}:{m}": files[m][1] for m in sorted(drawn_env_maps(recipe, source_id, maps))}
        params = {**recipe.to_dict(), "env_maps_dir": None, "env_maps": maps}  # the maps' bytes key each asset
        return StepSpec(name, version, (SOURCE,), params, env=blender, implementation=render_modules, draws=draws,
                        **fields)

    lh, input_, relight = (config.recipes[name] for name in ("lh", "input", "relight"))
    render_lh_call = Call("render_lh", "render", compute.render_lh, lh, transient=True)
    encode = Call("encode", "encoder", compute.encode_features, runtime, also=("slat_lh", "slat_bc"))
    latents = Call("latents", "encoder", compute.encode_latents, runtime)
    voxels = (ArraySpec("coords", "uint8", ("N", 3)),)
    latent_channels = "C"
    encoder_models = {"slat_encoder": weights["slat_encoder"].digest}
    steps = [
        Step(
            StepSpec("env_map_rgb", "1", (SOURCE,), {"layout": "equirectangular linear RGB, row 0 at +Z"},
                     implementation=("pipelines.compute",), over=ENV_MAP_KIND),
            Call("env_map_rgb", "encoder", compute.env_map_pixels),
            (ArraySpec("rgb", "float32", ("H", "W", 3)),),
            role=ENV_MAPS,
        ),
        Step(render_spec("render_lh", "4", lh), render_lh_call,
             (ArraySpec("c2w", "float32", (lh.num_views, 4, 4)), ArraySpec("fov", "float32", (lh.num_views,))),
             stats=ASSET_STATS),
        Step(
            StepSpec("normalize", "2", (SOURCE,), {"largest_side": 1.0, "centre": "aabb"}, env=blender,
                     implementation=("render_jobs.blender_scene",)),
            render_lh_call,
            (ArraySpec("vertices", "float32", ("P", 3)), ArraySpec("faces", "int32", ("T", 3)),
             ArraySpec("scale", "float64", (1,)), ArraySpec("offset", "float64", (3,))),
        ),
        Step(
            StepSpec("voxelize", "2", ("normalize",), {"resolution": VOXEL_RESOLUTION, "device": runtime.device},
                     implementation=("encoders.voxelize",)),
            Call("voxelize", "encoder", compute.voxelize, VOXEL_RESOLUTION),
            voxels, role=VOXELS, stats=("num_voxels",),
        ),
        Step(
            StepSpec("features", "2", ("render_lh", "voxelize"), runtime.params(),
                     {"dinov2": weights["dinov2"].digest},
                     implementation=("encoders.backproject", "pipelines.compute")),
            encode,
            tuple(ArraySpec(f"feats_{r}", "float16", ("N", "D")) for r in runtime.encoder.roles),
            role=FEATURES, transient_inputs=("render_lh",),
        ),
        *(
            Step(
                StepSpec(f"slat_{r}", "2", ("voxelize", "features"), {"role": r, "device": runtime.device},
                         encoder_models, implementation=("encoders.slat_encoder",)),
                latents,
                (*voxels, ArraySpec("latent", "float32", ("N", latent_channels))),
                role=role,
            )
            for r, role in (("lh", SLAT_LH), ("bc", SLAT_BC))
        ),
        Step(render_spec("render_input", "5", input_), Call("render_input", "render", compute.render_arrays, input_),
             render_arrays(input_), role=INPUT),
        Step(
            StepSpec("slat_shaded", "2", ("render_input", "voxelize"),
                     {**config.shaded.to_dict(), "dinov2_precision": runtime.encoder.dinov2.precision,
                      "device": runtime.device},
                     {"dinov2": weights["dinov2"].digest, "slat_flow": weights["slat_flow"].digest},
                     implementation=("encoders.shaded_slat", "encoders.slat_flow", "encoders.flow_sampler")),
            Call("shade", "encoder", compute.shade, config.shaded),
            (*voxels, ArraySpec("latent", "float32", ("N", config.shaded.views, latent_channels))),
            role=SLAT_SHADED,
        ),
        Step(render_spec("render_relight", "5", relight),
             Call("render_relight", "render", compute.render_arrays, relight), render_arrays(relight), role=RELIGHT),
    ]
    held_out = env_maps.by_recipe.get(EVAL_RECIPE, ())
    if held_out:
        split = config.release.split
        evaluation = eval_recipe(input_, relight, held_out)
        steps.append(Step(render_spec("render_eval", "1", evaluation, only=split.is_test),
                          Call("render_eval", "render", compute.render_arrays, evaluation),
                          render_arrays(evaluation), role=EVAL))
    execution = config.execution
    workers = [
        Worker("render", 1, execution.render_gpus, {"render_slot": 1}),
        Worker("encoder", 1, execution.encoder_gpus, config=runtime),
    ]
    return StepTable(steps, workers, env_maps.held_out)
