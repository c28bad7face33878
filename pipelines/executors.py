"""Ray actors that execute steps: render workers (one supervised render child each) and encoders.

A render actor holds one `RenderSupervisor`, so its child (and its compiled shaders) lives across assets; it
asks for one `render_slot`, a resource every node declares by how many renders it can run. Renders land on
node-local scratch: `render_lh` sets are consumed by an encoder actor pinned to the same node and then deleted;
`render_input` and `render_relight` sets are turned into arrays by the render actor itself, and an encoder
actor samples the shaded SLATs from the input views' arrays.
"""

import shutil
import time
from pathlib import Path

import numpy as np
import ray
import torch

from catalogs.commit import StepResult
from encoders.asset_encoder import AssetEncoder, AssetEncoderConfig
from encoders.dinov2 import Dinov2Config
from encoders.shaded_slat import ShadedSlatConfig, input_view_frames, shaded_slat
from encoders.slat_flow import SlatFlowModel, load_slat_flow
from encoders.voxelize import voxelize_mesh
from infra.errors import AssetRejected
from pipelines import scratch
from render_jobs.protocol import RenderRequest, RenderResult
from render_jobs.render_set import RenderSet
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig


def render_set_arrays(render_set: RenderSet) -> dict[str, np.ndarray]:
    """A render set as arrays: per frame (view x lighting) the lighting-dependent passes, per view the others.

    beauty (F, H, W, 4) float16; shadow (F, H, W) float16 if rendered; frame_view, frame_lighting (F,) int16;
    frame_env_map (F, 32) uint8, the sha256 of the frame's environment map (zeros if not env-map lit), and
    frame_yaw and frame_env_strength (F,) float32, its rotation about +Z and its world strength; c2w (V, 4, 4) float32 (Blender/OpenGL); fov (V,) float32;
    <pass> (V, H, W[, C]) float16 per view pass
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
    arrays["frame_env_map"] = np.stack(
        [np.frombuffer(bytes.fromhex(digests.get(light.get("env_map"), "00" * 32)), np.uint8) for light in lightings]
    )
    arrays["frame_yaw"] = np.array([light.get("yaw_rad", 0.0) for light in lightings], np.float32)
    arrays["frame_env_strength"] = np.array([light.get("strength", 1.0) for light in lightings], np.float32)
    firsts = [f for f in frames if f.record["lighting_index"] == 0]
    arrays["c2w"] = np.stack([f.c2w for f in firsts]).astype(np.float32)
    arrays["fov"] = np.array([f.fov_rad for f in firsts], np.float32)
    views = [f.load_passes(*per_view) for f in firsts]
    arrays.update({p: np.stack([v[p] for v in views]).astype(np.float16) for p in per_view})
    return arrays


class RenderActor:
    """Renders one asset at a time through its own supervised render child, into the run's folder of this node's
    scratch, which it claims (and where it first removes what killed builds left: `pipelines.scratch`)."""

    def __init__(self, worker: RenderWorkerConfig, run_dir: str) -> None:
        scratch.remove_stale_runs(Path(run_dir).parent)
        self.claim = scratch.claim(Path(run_dir))
        self.supervisor = RenderSupervisor(worker)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def render_lh(
        self, request: RenderRequest, keys: dict[str, str], sheet: str
    ) -> tuple[list[StepResult], RenderResult, str]:
        """Render the `lh` set, kept on this node's scratch for the encoder, and the results of the todo ones of
        `keys` (step -> artifact key): `render_lh` commits the cameras, c2w (V, 4, 4) and fov (V,); `normalize`
        the normalized mesh, vertices (P, 3) and faces (T, 3), with its scale (1,) and offset (3,)."""
        clock = time.perf_counter()
        result = self.supervisor.render(request)
        if not result.is_ok:
            return [_failed(key, result) for key in keys.values()], result, self.node_id()
        render_set = RenderSet.open(result.out_dir)
        vertices, faces = render_set.mesh()
        normalization = render_set.meta["normalization"]
        arrays = {
            "render_lh": {
                "c2w": np.stack([f.c2w for f in render_set.frames]).astype(np.float32),
                "fov": np.array([f.fov_rad for f in render_set.frames], np.float32),
            },
            "normalize": {
                "vertices": vertices.astype(np.float32),
                "faces": faces.astype(np.int32),
                "scale": np.array([normalization["scale"]], np.float64),
                "offset": np.array(normalization["offset"], np.float64),
            },
        }
        _keep_sheet(Path(result.out_dir), sheet)
        stats = {**result.stats, "timings_s": result.timings_s, "node": self.node_id()}
        seconds = time.perf_counter() - clock
        charged = "render_lh" if "render_lh" in keys else "normalize"  # one render call, counted once
        results = [
            StepResult(key, arrays[step], stats=stats, duration_s=seconds if step == charged else 0.0)
            for step, key in keys.items()
        ]
        return results, result, self.node_id()

    def render_arrays(
        self, request: RenderRequest, artifact_key: str, sheet: str, keep: bool
    ) -> tuple[StepResult, RenderResult]:
        """Render and read back the set as arrays (`render_input`, `render_relight`); scratch is then deleted."""
        clock = time.perf_counter()
        result = self.supervisor.render(request)
        if not result.is_ok:
            return _failed(artifact_key, result), result
        try:
            render_set = RenderSet.open(result.out_dir)
            arrays = render_set_arrays(render_set)
            stats = {
                **result.stats,
                "lighting": [frame.record["lighting"] for frame in render_set.frames],  # enough to reproduce
                "timings_s": result.timings_s,
                "node": self.node_id(),
            }
            _keep_sheet(Path(result.out_dir), sheet)
        finally:
            if not keep:
                shutil.rmtree(result.out_dir, ignore_errors=True)
        return StepResult(artifact_key, arrays, stats=stats, duration_s=time.perf_counter() - clock), result

    def shutdown(self) -> None:
        self.supervisor.close()
        scratch.release(self.claim)


class EncoderActor:
    """Holds DINOv2 and the SLAT encoder (and, from its first shaded SLAT on, the flow model); encodes `lh`
    render sets on its node, latents from stored features, and shaded SLATs from input views."""

    def __init__(self, dinov2: str, slat_encoder: str, slat_flow: str, shaded: ShadedSlatConfig) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = AssetEncoder(
            AssetEncoderConfig(dinov2=Dinov2Config(model=dinov2), slat_encoder=slat_encoder),
            device=self.device,
        )
        self.slat_flow, self.shaded = slat_flow, shaded
        self._flow: SlatFlowModel | None = None

    def weights(self) -> dict[str, str]:
        return {name: info.digest for name, info in self.encoder.weights.items()}

    def encode(self, render_dir: str, keys: dict[str, str], keep: bool) -> list[StepResult]:
        """voxelize, features, slat_lh, slat_bc of one asset (`keys`: step -> artifact key, the todo ones)."""
        clock = time.perf_counter()
        try:
            encoding = self.encoder.encode(render_dir)
        except AssetRejected as err:
            return [StepResult(key, error=f"{err.reason.value}: {err.detail}") for key in keys.values()]
        finally:
            if not keep:
                shutil.rmtree(render_dir, ignore_errors=True)
        timings = encoding.meta["timings"]
        reading = time.perf_counter() - clock - sum(timings.values())  # opening the set, deleting it
        seconds = {
            "voxelize": timings["voxelize_s"],
            "features": reading
            + timings["load_views_s"]
            + sum(
                timings[f"{kind}_{role}_s"]
                for kind in ("dinov2", "backproject")
                for role in encoding.features
            ),
            **{f"slat_{role}": timings[f"slat_{role}_s"] for role in encoding.latents},
        }
        stats = {
            "num_voxels": len(encoding.coords),
            "random_weights": encoding.is_random_weights,
            "timings_s": encoding.meta["timings"],
            "node": ray.get_runtime_context().get_node_id(),
        }
        arrays = {
            "voxelize": {"coords": encoding.coords},
            "features": {f"feats_{role}": feats for role, feats in encoding.features.items()},
            **{
                f"slat_{role}": {"coords": encoding.coords, "latent": latent}
                for role, latent in encoding.latents.items()
            },
        }
        return [
            StepResult(key, arrays[step], stats=stats, duration_s=seconds[step]) for step, key in keys.items()
        ]

    def encode_latents(
        self, coords: np.ndarray, features: dict[str, np.ndarray], keys: dict[str, str]
    ) -> list[StepResult]:
        """slat_<role> from stored features: what new encoder weights recompute."""
        clock = time.perf_counter()
        roles = {step.removeprefix("slat_") for step in keys}
        latents = self.encoder.encode_latents(coords, {r: f for r, f in features.items() if r in roles})
        seconds = (time.perf_counter() - clock) / len(keys)
        return [
            StepResult(
                key,
                {"coords": coords, "latent": latents[step.removeprefix("slat_")]},
                stats={"num_voxels": len(coords)},
                duration_s=seconds,
            )
            for step, key in keys.items()
        ]

    def shade(self, views: dict[str, np.ndarray], coords: np.ndarray, key: str) -> StepResult:
        """slat_shaded of one asset: latent (N, V, 8) float32, Z_s of its first V input views (lighting 0 of
        each view) on its voxels, rows following coords (N, 3)."""
        clock = time.perf_counter()
        frames = input_view_frames(views["frame_view"], views["frame_lighting"], self.shaded.views)
        if len(frames) < self.shaded.views:
            return StepResult(
                key, error=f"too_few_views: the input set has {len(frames)}, need {self.shaded.views}"
            )
        if self._flow is None:
            self._flow, self._flow_weights = load_slat_flow(self.slat_flow, device=self.device)
        rgba = torch.from_numpy(views["beauty"][frames].astype(np.float32)).permute(0, 3, 1, 2)
        seed = int(key[:15], 16)  # the artifact key: the same inputs and spec give the same noise
        latent = shaded_slat(
            self._flow,
            self.encoder.dinov2,
            rgba,
            torch.from_numpy(coords.astype(np.int64)),
            self.shaded,
            seed=seed,
        )
        stats = {
            "num_voxels": len(coords),
            "views": len(frames),
            "random_weights": self._flow_weights.is_random_init or self.encoder.dinov2.weights.is_random_init,
            "node": ray.get_runtime_context().get_node_id(),
        }
        return StepResult(
            key,
            {"coords": coords, "latent": latent.transpose(0, 1).numpy()},
            stats=stats,
            duration_s=time.perf_counter() - clock,
        )

    def voxelize(self, vertices: np.ndarray, faces: np.ndarray, key: str) -> StepResult:
        clock = time.perf_counter()
        coords = voxelize_mesh(torch.from_numpy(vertices), torch.from_numpy(faces)).numpy().astype(np.uint8)
        if not len(coords):
            return StepResult(key, error="empty_scene: the normalized mesh occupies no voxel")
        return StepResult(
            key, {"coords": coords}, stats={"num_voxels": len(coords)}, duration_s=time.perf_counter() - clock
        )


def _keep_sheet(render_dir: Path, sheet: str) -> None:
    """Copy the beauty contact sheet into the build report before the render set is deleted."""
    source = render_dir / "contact_sheets" / "beauty.png"
    if source.exists():
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, sheet)


def _failed(artifact_key: str, result: RenderResult) -> StepResult:
    return StepResult(
        artifact_key,
        error=f"{result.reason}: {result.message}",
        stats={"stderr_tail": result.stderr_tail, "timings_s": result.timings_s},
    )
