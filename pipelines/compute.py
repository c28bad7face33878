"""What the build's calls compute, one function per call of the step table, and the call's wire types.

A compute function gets the actor it runs in (its render child or models), the `CallRequest` and the call's
`Inputs`, and returns the arrays of the steps it makes (`CallOutput`), or raises `StepFailed` with a reason.
The actor (`pipelines.executors`) writes the packs and returns only their descriptors: no array travels
through the driver.
"""

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catalogs.commit import ArtifactRecord
from catalogs.errors import DamagedPackError
from catalogs.keys import ENV_MAP_KIND
from catalogs.packs import PackedAsset, PackReader
from catalogs.storage import RootPath
from encoders.shaded_slat import input_view_frames, shaded_slat
from encoders.voxelize import voxelize_mesh
from infra.errors import AssetRejected, Reason, StepFailed
from render_jobs.exr import read_env_map
from render_jobs.render_set import RenderSet


@dataclasses.dataclass(frozen=True)
class CallRequest:
    """One call of one asset, as the driver sends it to an actor."""

    call: str
    compute: Callable[..., "CallOutput"]
    config: Any
    """The config object the call runs with (a recipe, the encoder runtime, ...), as the step table holds it."""
    asset_id: str
    source_id: str
    uri: str
    keys: Mapping[str, str]
    """Step -> artifact key of each step to make."""
    spec_hashes: Mapping[str, str]
    schemas: Mapping[str, tuple]
    """Step -> its declared `pipelines.steps.ArraySpec`s."""
    inputs: Mapping[str, PackedAsset]
    """Input step -> where its committed (or just written) bytes are."""
    lineage: Mapping[str, Mapping[str, str]]
    """Step -> {input role: id} its key was derived from (the env maps a render draws, with their sha256)."""
    run_id: str
    transient: str | None = None
    """The node-local output of another call that this call reads (an `lh` render set)."""


@dataclasses.dataclass(frozen=True)
class StepOutput:
    arrays: Mapping[str, np.ndarray]
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None
    """Compute time charged to the step (default: the call's time split evenly over its steps)."""


@dataclasses.dataclass(frozen=True)
class CallOutput:
    steps: Mapping[str, StepOutput]
    transient: str | None = None


@dataclasses.dataclass(frozen=True)
class CallReply:
    """What an actor returns to the driver: per step its artifact record (a pack descriptor or a reason)."""

    records: Mapping[str, ArtifactRecord]
    node: str
    transient: str | None = None
    failure: StepFailed | None = None
    """Why the call made nothing (also when it had no key to fail: a render run only for its transient)."""


class Inputs:
    """The arrays of a call's inputs, read from their packs: every chunk checked, and for packs without chunk
    checksums the content digest. A damaged input fails the call with `damaged_input`."""

    def __init__(self, data_root: RootPath, request: CallRequest) -> None:
        self.data_root, self.request = data_root, request

    def arrays(self, step: str, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        packed = self.request.inputs[step]
        try:
            return PackReader(self.data_root, packed.pack_path).read_names(
                packed.arrays, names, digest=packed.content_digest, where=f"{self.request.asset_id}/{step}")
        except (DamagedPackError, OSError) as err:
            raise StepFailed(Reason.DAMAGED_INPUT, f"{step}: {err}") from err


def latent_moments(latent: np.ndarray) -> dict[str, Any]:
    """Per-channel count, sum and sum of squares of latents (..., C): the build's latent statistics add them up."""
    flat = latent.astype(np.float64).reshape(-1, latent.shape[-1])
    return {"count": len(flat), "sum": flat.sum(0).tolist(), "sum_sq": (flat**2).sum(0).tolist()}


# -- render calls (in `executors.RenderActor`) ---------------------------------------------------------------


def render_lh(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """The `lh` set, left on this node's scratch for the encode call: `render_lh` commits its cameras, c2w
    (V, 4, 4) and fov (V,); `normalize` the normalized mesh, vertices (P, 3) and faces (T, 3), with its scale
    (1,) and offset (3,)."""
    clock = time.perf_counter()
    result, render_set = worker.render(request)
    vertices, faces = render_set.mesh()
    normalization = render_set.meta["normalization"]
    stats = {**result.stats, "timings_s": result.timings_s, "node": worker.node}
    cameras = {
        "c2w": np.stack([f.c2w for f in render_set.frames]).astype(np.float32),
        "fov": np.array([f.fov_rad for f in render_set.frames], np.float32),
    }
    mesh = {
        "vertices": vertices.astype(np.float32),
        "faces": faces.astype(np.int32),
        "scale": np.array([normalization["scale"]], np.float64),
        "offset": np.array(normalization["offset"], np.float64),
    }
    seconds = time.perf_counter() - clock
    charged = "render_lh" if "render_lh" in request.keys else "normalize"  # one render, counted once
    return CallOutput(
        {step: StepOutput(arrays, stats, seconds if step == charged else 0.0)
         for step, arrays in (("render_lh", cameras), ("normalize", mesh))},
        transient=result.out_dir,
    )


def render_arrays(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """An `input`, `relight` or `eval` set as arrays (`render_set_arrays`), checked against the env maps its key was
    derived from; its scratch folder is then deleted."""
    (step,) = request.keys
    result, render_set = worker.render(request)
    try:
        rendered = render_set.meta.get("env_maps", {})
        for role, digest in request.lineage[step].items():
            name = role.removeprefix(f"{ENV_MAP_KIND}:")
            if role.startswith(f"{ENV_MAP_KIND}:") and rendered.get(name) != digest:
                raise StepFailed(Reason.INPUT_CHANGED, f"env map {name} changed during the build "
                                 f"(planned sha256 {digest[:12]}, rendered {str(rendered.get(name))[:12]})")
        arrays = render_set_arrays(render_set)
        stats = {
            **result.stats,
            "lighting": [frame.record["lighting"] for frame in render_set.frames],  # enough to reproduce
            "timings_s": result.timings_s,
            "node": worker.node,
        }
    finally:
        worker.discard(result.out_dir)
    return CallOutput({step: StepOutput(arrays, stats)})


def render_set_arrays(render_set: RenderSet) -> dict[str, np.ndarray]:
    """A render set as arrays: per frame (view x lighting) the lighting-dependent passes, per view the others.

    beauty (F, H, W, 4) float16; shadow (F, H, W) float16 if rendered, with frame_shadow_light (F,) uint8, 1 where
    a shadow-casting light lit the frame (`render_jobs.lighting`); frame_view, frame_lighting (F,) int16;
    frame_env_map (F, 32) uint8, the sha256 of the frame's environment map (zeros if not env-map lit);
    frame_yaw and frame_env_strength (F,) float32, its rotation about +Z and its world strength;
    c2w (V, 4, 4) float32 (Blender/OpenGL); fov (V,) float32; <pass> (V, H, W[, C]) float16 per view pass.
    """
    frames = render_set.frames
    passes = list(render_set.meta["passes"])
    per_frame = [p for p in ("beauty", "shadow") if p in passes]
    per_view = [p for p in passes if p not in per_frame]
    loaded = [frame.load_passes(*per_frame) for frame in frames]
    arrays = {p: np.stack([x[p] for x in loaded]).astype(np.float16) for p in per_frame}
    arrays["frame_view"] = np.array([f.record["view_index"] for f in frames], np.int16)
    arrays["frame_lighting"] = np.array([f.record["lighting_index"] for f in frames], np.int16)
    digests = render_set.meta.get("env_maps", {})
    lightings = [f.record["lighting"] for f in frames]
    arrays["frame_env_map"] = np.stack([
        np.frombuffer(bytes.fromhex(digests.get(light.get("env_map"), "00" * 32)), np.uint8) for light in lightings
    ])
    arrays["frame_yaw"] = np.array([light.get("yaw_rad", 0.0) for light in lightings], np.float32)
    arrays["frame_env_strength"] = np.array([light.get("strength", 1.0) for light in lightings], np.float32)
    if "shadow" in per_frame:  # the shadow target is defined only where a shadow-casting light lit the frame
        arrays["frame_shadow_light"] = np.array([bool(light["shadow_light"]) for light in lightings], np.uint8)
    firsts = [f for f in frames if f.record["lighting_index"] == 0]
    arrays["c2w"] = np.stack([f.c2w for f in firsts]).astype(np.float32)
    arrays["fov"] = np.array([f.fov_rad for f in firsts], np.float32)
    views = [f.load_passes(*per_view) for f in firsts]
    arrays.update({p: np.stack([v[p] for v in views]).astype(np.float16) for p in per_view})
    return arrays


# -- encoder calls (in `executors.EncoderActor`) -------------------------------------------------------------


def voxelize(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """Occupied voxels (N, 3) uint8 of the normalized mesh on a `request.config`^3 grid."""
    mesh = inputs.arrays("normalize", ("vertices", "faces"))
    vertices, faces = (torch.from_numpy(mesh[name]).to(worker.device) for name in ("vertices", "faces"))
    coords = voxelize_mesh(vertices, faces, resolution=request.config).cpu().numpy().astype(np.uint8)
    if not len(coords):
        raise StepFailed(Reason.EMPTY_SCENE, "the normalized mesh occupies no voxel")
    return CallOutput({"voxelize": StepOutput({"coords": coords}, {"num_voxels": len(coords)})})


def encode_features(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """`features` of the `lh` set this node rendered (then deleted), and the latents asked for with it."""
    coords = inputs.arrays("voxelize")["coords"]
    try:
        encoding = worker.encoder.features(request.transient, coords)
    except AssetRejected as err:
        raise StepFailed(err.reason, err.detail) from err
    finally:
        worker.discard(request.transient)
    stats = {"num_voxels": len(coords), "random_weights": encoding.is_random_weights, "node": worker.node,
             "timings_s": encoding.timings}
    steps = {"features": StepOutput({f"feats_{role}": f for role, f in encoding.features.items()}, stats)}
    asked = {step: step.removeprefix("slat_") for step in ("slat_lh", "slat_bc") if step in request.keys}
    if asked:
        steps.update(_latents(worker, coords, {r: encoding.features[r] for r in asked.values()}, asked))
    return CallOutput(steps)


def encode_latents(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """`slat_<role>` from stored features: what new encoder weights recompute, without a render."""
    coords = inputs.arrays("voxelize")["coords"]
    asked = {step: step.removeprefix("slat_") for step in request.keys}
    stored = inputs.arrays("features", tuple(f"feats_{role}" for role in asked.values()))
    return CallOutput(_latents(worker, coords, {role: stored[f"feats_{role}"] for role in asked.values()}, asked))


def _latents(
    worker: Any, coords: np.ndarray, features: dict[str, np.ndarray], steps: dict[str, str]
) -> dict[str, StepOutput]:
    """Per step (`slat_<role>`, in `steps` with its role) the latents of `features`, on `coords`."""
    clock = time.perf_counter()
    try:
        latents = worker.encoder.encode_latents(coords, features)
    except AssetRejected as err:
        raise StepFailed(err.reason, err.detail) from err
    seconds = (time.perf_counter() - clock) / len(steps)
    return {
        step: StepOutput({"coords": coords, "latent": latents[role]},
                         {"num_voxels": len(coords), "latent_moments": latent_moments(latents[role])}, seconds)
        for step, role in steps.items()
    }


def shade(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """slat_shaded: latent (N, V, 8) float32, Z_s of the first V input views (lighting 0 of each view) on the
    asset's voxels, rows following coords (N, 3); the noise is seeded by the artifact key."""
    config = request.config
    views = inputs.arrays("render_input", ("beauty", "frame_view", "frame_lighting"))
    coords = inputs.arrays("voxelize")["coords"]
    frames = input_view_frames(views["frame_view"], views["frame_lighting"], config.views)
    if len(frames) < config.views:
        raise StepFailed(Reason.TOO_FEW_VIEWS, f"the input set has {len(frames)} views, {config.views} needed")
    flow, flow_weights = worker.flow()
    rgba = torch.from_numpy(views["beauty"][frames].astype(np.float32)).permute(0, 3, 1, 2)
    seed = int(request.keys["slat_shaded"][:15], 16)  # the same inputs and spec give the same noise
    latent = shaded_slat(flow, worker.encoder.dinov2, rgba, torch.from_numpy(coords.astype(np.int64)), config,
                         seed=seed).transpose(0, 1).numpy()
    stats = {
        "num_voxels": len(coords),
        "views": len(frames),
        "random_weights": flow_weights.is_random_init or worker.encoder.dinov2.weights.is_random_init,
        "node": worker.node,
        "latent_moments": latent_moments(latent),
    }
    return CallOutput({"slat_shaded": StepOutput({"coords": coords, "latent": latent}, stats)})


def env_map_pixels(worker: Any, request: CallRequest, inputs: Inputs) -> CallOutput:
    """An environment map's linear RGB (H, W, 3) float32, so training reads maps from a release alone."""
    if Path(request.uri).suffix.lower() != ".exr":
        raise StepFailed(Reason.UNSUPPORTED_FORMAT, f"{request.uri}: env maps are packed from OpenEXR; convert it")
    try:
        rgb = read_env_map(request.uri)
    except (OSError, ValueError) as err:
        raise StepFailed(Reason.UNREADABLE_FILE, f"{request.uri}: {err}") from err
    return CallOutput({"env_map_rgb": StepOutput({"rgb": rgb}, {"height": rgb.shape[0], "width": rgb.shape[1]})})

