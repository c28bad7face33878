"""One asset's ground-truth SLATs: its `lh` render set in; voxels, DINOv2 features and SLAT latents out.

This is the unit of work the build's `voxelize`, `features`, `slat_lh` and `slat_bc` steps run, and what
`near encode` runs for debugging. Two roles share the voxels and the cameras:

- `lh`: the beauty pass under the homogenized light, giving the LH-SLAT;
- `bc`: the base-color AOV of the same views (RGB x alpha), giving the base-color SLAT.

Models are loaded once per `AssetEncoder` (a Ray actor holds one); `encode` is called per asset.
"""

import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from encoders.attention import AttentionBackend
from encoders.backproject import BackprojectConfig, Cameras, backproject
from encoders.dinov2 import Dinov2Config, Dinov2Features
from encoders.preview import write_preview
from encoders.slat_encoder import load_slat_encoder
from encoders.sparse import SparseTensor
from encoders.voxelize import voxelize_mesh
from encoders.weights import WeightsInfo
from infra.config import FrozenConfig
from infra.errors import AssetRejected, Reason
from render_jobs.render_set import RenderSet

logger = logging.getLogger(__name__)

Role = Literal["lh", "bc"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_SLAT_ENCODER = "microsoft/TRELLIS-image-large/ckpts/slat_enc_swin8_B_64l8_fp16"
ENCODING_FILE = "encoding.json"
PREVIEW_FILE = "preview.png"
_ROLE_PASS = {"lh": "beauty", "bc": "basecolor"}


@dataclasses.dataclass(frozen=True)
class AssetEncoderConfig(FrozenConfig):
    """Models and options of the per-asset encoding; hashed into the steps' spec hashes."""

    dinov2: Dinov2Config = dataclasses.field(default_factory=Dinov2Config)
    slat_encoder: str = DEFAULT_SLAT_ENCODER
    """Local `.safetensors` (with its TRELLIS `.json` beside it) or hub id `owner/repo/path/name`."""
    backproject: BackprojectConfig = dataclasses.field(default_factory=BackprojectConfig)
    attention_backend: AttentionBackend = "auto"
    roles: tuple[Role, ...] = ROLES

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {self.roles}")


@dataclasses.dataclass(frozen=True)
class AssetEncoding:
    """Everything `encode` makes for one asset; rows of every array follow `coords`."""

    coords: np.ndarray  # (N, 3) uint8 voxel indices (x, y, z), sorted by x * 64^2 + y * 64 + z
    features: dict[str, np.ndarray]  # role -> (N, 1024) float16 mean DINOv2 patch tokens
    latents: dict[str, np.ndarray]  # role -> (N, 8) float32 SLAT (posterior mean)
    meta: dict[str, Any]  # source, views, models (digests, random_weights), timings

    @property
    def is_random_weights(self) -> bool:
        return bool(self.meta["random_weights"])

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """TRELLIS-readable npz files (`features_<role>.npz`: indices, patchtokens; `slat_<role>.npz`: coords,
        feats), `preview.png` (voxels coloured by the features' principal components) and `encoding.json`,
        written last so a folder with it is complete."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for role, feats in self.features.items():
            np.savez_compressed(out / f"features_{role}.npz", indices=self.coords, patchtokens=feats)
        for role, latent in self.latents.items():
            np.savez(out / f"slat_{role}.npz", coords=self.coords, feats=latent)
        layers = {
            f"{kind} {role}": arrays[role]
            for kind, arrays in (("feature", self.features), ("slat", self.latents))
            for role in arrays
        }
        write_preview(out / PREVIEW_FILE, self.coords, layers)
        tmp = out / f".{ENCODING_FILE}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        tmp.replace(out / ENCODING_FILE)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> "AssetEncoding":
        out = Path(out_dir)
        meta = json.loads((out / ENCODING_FILE).read_text())
        features, latents, coords = {}, {}, None
        for role in meta["roles"]:
            with np.load(out / f"features_{role}.npz") as data:
                features[role], coords = data["patchtokens"], data["indices"]
            with np.load(out / f"slat_{role}.npz") as data:
                latents[role] = data["feats"]
        return cls(coords, features, latents, meta)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """`AssetEncoder.features` of one asset."""

    features: dict[str, np.ndarray]  # role -> (N, 1024) float16
    timings: dict[str, float]
    is_random_weights: bool
    num_views: int


class AssetEncoder:
    """Holds the models; `encode(render_dir)` turns one `lh` render set into an `AssetEncoding`."""

    def __init__(self, config: AssetEncoderConfig, *, device: torch.device) -> None:
        self.config, self.device = config, device
        self.dinov2 = Dinov2Features(config.dinov2, device=device)
        self.slat_encoder, self.slat_weights = load_slat_encoder(
            config.slat_encoder, device=device, attention_backend=config.attention_backend
        )

    @property
    def weights(self) -> dict[str, WeightsInfo]:
        return {"dinov2": self.dinov2.weights, "slat_encoder": self.slat_weights}

    def encode(self, render_dir: str | os.PathLike[str]) -> AssetEncoding:
        """Voxelize the normalized mesh, extract and back-project features per role, encode each to a SLAT.

        Raises:
            AssetRejected: `invalid_render_set` (missing files or passes), `empty_scene` (no voxels),
                `non_finite` (NaN or inf features or latents).
        """
        clock = time.perf_counter()
        render_set, asset_id = _open_render_set(render_dir, self.config.roles)
        vertices, faces = render_set.mesh()
        coords = voxelize_mesh(torch.from_numpy(vertices).to(self.device), torch.from_numpy(faces).to(self.device))
        if len(coords) == 0:
            raise AssetRejected(asset_id, Reason.EMPTY_SCENE, "the normalized mesh occupies no voxel")
        coords = coords.cpu().numpy().astype(np.uint8)
        voxelize_s = time.perf_counter() - clock
        found = self.features(render_dir, coords)
        clock = time.perf_counter()
        latents = self.encode_latents(coords, found.features)
        timings = {"voxelize_s": voxelize_s, **found.timings, "slat_s": time.perf_counter() - clock}
        meta = {
            "source_id": render_set.meta.get("source_id"),
            "render_dir": str(render_set.root),
            "roles": list(self.config.roles),
            "num_views": found.num_views,
            "num_voxels": len(coords),
            "config": self.config.to_dict(),
            "models": {name: dataclasses.asdict(info) for name, info in self.weights.items()},
            "random_weights": found.is_random_weights,
            "timings": timings,
        }
        logger.info("encoded asset=%s voxels=%d views=%d in %.1fs", asset_id, len(coords), found.num_views,
                    sum(timings.values()))
        return AssetEncoding(coords, found.features, latents, meta)

    def features(self, render_dir: str | os.PathLike[str], coords: np.ndarray) -> "FeatureSet":
        """Per role the DINOv2 patch features of the `lh` views, back-projected onto `coords` (N, 3) uint8.

        Raises:
            AssetRejected: `invalid_render_set`, `non_finite`.
        """
        render_set, asset_id = _open_render_set(render_dir, self.config.roles)
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        views, depth_maps = load_views(render_set, self.config.roles, self.config.backproject.use_visibility)
        frames = render_set.frames
        cameras = Cameras.from_blender(
            np.stack([f.c2w for f in frames]), np.array([f.fov_rad for f in frames]), device=self.device
        )
        timings["load_views_s"] = time.perf_counter() - clock
        voxels = torch.from_numpy(coords.astype(np.int32)).to(self.device)
        features = {}
        for role in self.config.roles:
            clock = time.perf_counter()
            patch_tokens = self.dinov2(views[role])  # (V, 1024, 37, 37)
            timings[f"dinov2_{role}_s"] = time.perf_counter() - clock
            clock = time.perf_counter()
            feats = backproject(  # stored as float16, and encoded from that, as TRELLIS does
                patch_tokens, voxels, cameras, config=self.config.backproject, depth_maps=depth_maps
            ).half()
            timings[f"backproject_{role}_s"] = time.perf_counter() - clock
            if not torch.isfinite(feats).all():
                raise AssetRejected(asset_id, Reason.NON_FINITE, f"{role}: non-finite features")
            features[role] = feats.cpu().numpy()
        random_weights = any(info.is_random_init for info in self.weights.values())
        return FeatureSet(features, timings, random_weights, len(frames))

    def encode_latents(self, coords: np.ndarray, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """SLATs (N, 8) float32 from features (N, 1024) float16 on `coords` (N, 3): new encoder weights need no
        render.

        Raises:
            AssetRejected: `non_finite` latents.
        """
        batch_coords = torch.nn.functional.pad(torch.from_numpy(coords.astype(np.int32)).to(self.device), (1, 0))
        latents = {}
        for role, feats in features.items():
            latent = self._latent(batch_coords, torch.from_numpy(feats).to(self.device))
            if not torch.isfinite(latent).all():
                raise AssetRejected("", Reason.NON_FINITE, f"{role}: non-finite latents")
            latents[role] = latent.cpu().numpy()
        return latents

    def _latent(self, batch_coords: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.slat_encoder(SparseTensor(batch_coords, feats.float())).feats.float()


def _open_render_set(render_dir: str | os.PathLike[str], roles: tuple[Role, ...]) -> tuple[RenderSet, str]:
    asset_id = Path(render_dir).name
    try:
        render_set = RenderSet.open(render_dir)
    except (OSError, ValueError) as err:
        raise AssetRejected(asset_id, Reason.INVALID_RENDER_SET, str(err)) from err
    asset_id = render_set.meta.get("source_id") or asset_id
    needed = {"alpha", *(_ROLE_PASS[role] for role in roles)}
    missing = sorted(needed - set(render_set.meta.get("passes", {})))
    if missing or not render_set.frames:
        raise AssetRejected(asset_id, Reason.INVALID_RENDER_SET, f"no frames or missing passes {missing}")
    if any(frame.record["lighting_index"] != 0 for frame in render_set.frames):
        raise AssetRejected(
            asset_id, Reason.INVALID_RENDER_SET, "encoding needs one lighting per view (the lh recipe)"
        )
    if not (render_set.root / "mesh.ply").exists():
        raise AssetRejected(asset_id, Reason.INVALID_RENDER_SET, "no mesh.ply")
    return render_set, asset_id


def load_views(
    render_set: RenderSet, roles: tuple[Role, ...], with_depth: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Per role the premultiplied linear RGBA views (V, 4, H, W) float16, and the depth maps (V, H, W).

    Frames are read on a thread pool straight into the preallocated outputs, in the stored dtypes (colours are
    half, as they go to the GPU): one copy per pass."""
    frames = render_set.frames
    names = ["alpha", *(_ROLE_PASS[role] for role in roles), *(["depth"] if with_depth else [])]
    height, width = frames[0].load("alpha").shape
    views = {role: np.empty((len(frames), 4, height, width), np.float16) for role in roles}
    depth = np.empty((len(frames), height, width), np.float32) if with_depth else None

    def load(index: int) -> None:
        passes = frames[index].load_passes(*names, dtype=None)
        for role in roles:
            views[role][index, :3] = np.moveaxis(passes[_ROLE_PASS[role]][..., :3], -1, 0)
            views[role][index, 3] = passes["alpha"]
        if depth is not None:
            depth[index] = passes["depth"]

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(load, range(len(frames))))
    return ({role: torch.from_numpy(array) for role, array in views.items()},
            None if depth is None else torch.from_numpy(depth))
