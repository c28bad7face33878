"""Stage 2 samples from a pinned release: per asset and relight frame (one view under one environment map),
the HDR beauty, alpha, G-buffer and shadow, the camera, and the lighting encodings; per asset its LH-SLAT
(and BC-SLAT). Frames are read one at a time (one chunk each), never the whole relight set.

A batch of S samples decodes each distinct asset once (`Stage2Inputs.sample_asset`); with `frames_per_asset` > 1,
training batches draw that many frames of each asset, so its intrinsic pass serves them all.
"""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from catalogs.release_reader import Release
from encoders.sparse import SparseTensor
from pipelines.steps import RELIGHT, SLAT_BC, SLAT_LH
from render_jobs.cameras import opencv_intrinsics, opencv_w2c
from training.latents import LatentNormalization, latent_statistics, refuse_test_split
from training.stage2.env_map_store import EnvMapStore
from training.stage2.envmap import encode_env_map
from training.stage2.losses import Stage2Target
from training.stage2.model import Stage2Inputs

NO_ENV_MAP = "00" * 32


@dataclasses.dataclass(frozen=True)
class Frame:
    asset: str
    frame: int
    view: int
    env_map: str  # sha256
    yaw_rad: float
    strength: float
    shadow_light: bool
    """Whether a shadow-casting light lit the frame; releases from before render version 5 do not say, and their
    frames count as lit (their shadow pass is 0 over frames without a sun)."""


class Stage2Data:
    """The relight frames of one split of a release, optionally only those lit by (or not lit by) some maps."""

    def __init__(
        self, release: Release, split: str, env_maps: EnvMapStore, *, with_bc_slat: bool = False,
        normalization: dict[str, LatentNormalization] | None = None, only_env_maps: set[str] | None = None,
        without_env_maps: set[str] = frozenset(), frames_per_asset: int = 1,
    ) -> None:  # fmt: skip
        self.release, self.env_maps, self.with_bc_slat = release, env_maps, with_bc_slat
        self.frames_per_asset = frames_per_asset
        refuse_test_split(split)
        assets = release.split(split)
        if not assets:
            raise ValueError(f"release {release.info['name']!r} has no {split!r} samples")
        self.frames = [
            f for asset in assets for f in self._frames(asset)
            if f.env_map not in without_env_maps and (only_env_maps is None or f.env_map in only_env_maps)
        ]  # fmt: skip
        if not self.frames:
            raise ValueError(
                f"release {release.info['name']!r}: no env-map-lit relight frames in {split!r} are selected"
            )
        env_maps.require({f.env_map for f in self.frames}, where=f"the {split!r} relight frames")
        self.asset_frames: dict[str, list[int]] = {}
        """Indices into `frames` of each asset's frames."""
        for i, frame in enumerate(self.frames):
            self.asset_frames.setdefault(frame.asset, []).append(i)
        roles = (SLAT_LH, SLAT_BC) if with_bc_slat else (SLAT_LH,)
        self.normalization = normalization or {
            role: latent_statistics(release, assets, role) for role in roles
        }

    def _frames(self, asset: str) -> list[Frame]:
        names = ("frame_view", "frame_env_map", "frame_yaw", "frame_env_strength")
        recorded = "frame_shadow_light" in self.release.array_names(asset, RELIGHT)
        arrays = self.release.read(asset, RELIGHT, names=names + (("frame_shadow_light",) if recorded else ()))
        lit = arrays["frame_shadow_light"] if recorded else np.ones(len(arrays["frame_view"]), np.uint8)
        return [
            Frame(asset, i, int(view), digest.tobytes().hex(), float(yaw), float(strength), bool(light))
            for i, (view, digest, yaw, strength, light) in enumerate(zip(*(arrays[n] for n in names), lit))
            if digest.tobytes().hex() != NO_ENV_MAP
        ]

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, indices: list[int]) -> tuple[Stage2Inputs, Stage2Target]:
        """A training batch from a run of the sample stream (`training.run.StepBatches`): `read(group(indices))`."""
        return self.read(self.group(indices))

    def group(self, indices: list[int]) -> list[int]:
        """Each run of `frames_per_asset` draws becomes as many distinct frames (while the asset has them) of the
        run's first draw's asset, picked by the other draws: assets stay drawn in proportion to their frames.

        Raises:
            ValueError: the draws do not split into runs of `frames_per_asset`.
        """
        k = self.frames_per_asset
        if len(indices) % k:
            raise ValueError(f"{len(indices)} draws do not split into runs of frames_per_asset={k}")
        grouped = []
        for start in range(0, len(indices), k):
            first, *others = indices[start : start + k]
            own, chosen = self.asset_frames[self.frames[first].asset], [first]
            for draw in others:
                free = [i for i in own if i not in chosen] or own
                chosen.append(free[draw % len(free)])
            grouped += chosen
        return grouped

    def read(self, indices: list[int]) -> tuple[Stage2Inputs, Stage2Target]:
        """The frames at `indices`, as they are (evaluation reads these)."""
        frames = [self.frames[i] for i in indices]
        assets = list(dict.fromkeys(f.asset for f in frames))
        coords, latents = [], []
        for a, asset in enumerate(assets):
            lh = self.release.read(asset, SLAT_LH)
            xyz = torch.from_numpy(lh["coords"].astype(np.int32))
            coords.append(torch.cat([torch.full((len(xyz), 1), a, dtype=torch.int32), xyz], dim=1))
            latent = self.normalization[SLAT_LH].apply(torch.from_numpy(lh["latent"].astype(np.float32)))
            if self.with_bc_slat:
                bc = self.release.read(asset, SLAT_BC)
                if not np.array_equal(bc["coords"], lh["coords"]):
                    raise ValueError(f"{asset}: slat_lh and slat_bc are on different voxels")
                bc_latent = torch.from_numpy(bc["latent"].astype(np.float32))
                latent = torch.cat([latent, self.normalization[SLAT_BC].apply(bc_latent)], dim=1)
            latents.append(latent)
        samples = [self._sample(f) for f in frames]
        size = samples[0]["beauty"].shape[:2]
        stack = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        inputs = Stage2Inputs(
            slat=SparseTensor(torch.cat(coords), torch.cat(latents)),
            sample_asset=torch.tensor([assets.index(f.asset) for f in frames]),
            w2c=stack["w2c"],
            K=stack["K"],
            env_ldr=stack["env_ldr"],
            env_log=stack["env_log"],
            env_dir=stack["env_dir"],
            image_size=(int(size[0]), int(size[1])),
        )
        target = Stage2Target(
            radiance=stack["beauty"][..., :3],
            alpha=stack["beauty"][..., 3:],
            base_color=stack["basecolor"],
            roughness=stack["roughness"],
            metallic=stack["metallic"],
            shadow=stack["shadow"],
            shadow_valid=stack["shadow_valid"],
        )
        return inputs, target

    def _sample(self, frame: Frame) -> dict[str, Float[Tensor, "..."]]:
        read = self.release.read_row
        beauty = read(frame.asset, RELIGHT, "beauty", frame.frame).astype(np.float32)
        c2w = read(frame.asset, RELIGHT, "c2w", frame.view).astype(np.float64)
        fov = float(read(frame.asset, RELIGHT, "fov", frame.view))
        env = encode_env_map(
            self.env_maps.get(frame.env_map) * frame.strength,
            yaw_rad=frame.yaw_rad,
            c2w=torch.from_numpy(c2w).float(),
        )
        per_view = {
            name: torch.from_numpy(read(frame.asset, RELIGHT, name, frame.view).astype(np.float32))
            for name in ("basecolor", "roughness", "metallic")
        }
        shadow = read(frame.asset, RELIGHT, "shadow", frame.frame).astype(np.float32)
        shadow_valid = frame.shadow_light
        return {
            "beauty": torch.from_numpy(np.nan_to_num(beauty)),
            "basecolor": per_view["basecolor"],
            "roughness": per_view["roughness"][..., None],
            "metallic": per_view["metallic"][..., None],
            "shadow": torch.from_numpy(shadow)[..., None],
            "shadow_valid": torch.tensor(float(shadow_valid)),
            "w2c": torch.from_numpy(opencv_w2c(c2w)).float(),
            "K": torch.from_numpy(opencv_intrinsics(fov, beauty.shape[1])).float(),
            "env_ldr": env.ldr,
            "env_log": env.log,
            "env_dir": env.direction,
        }
