"""Trained NeAR for inference (paper Fig. 4, top): the EMA weights of a Stage 1 and a Stage 2 run folder.

    image -> DINOv2 condition -> Z_s (the pretrained flow model on the asset's voxels) -> Stage 1 -> LH-SLAT
          -> Stage 2 under any camera and environment map -> relightable Gaussians -> images

`Stage1Predictor` samples the LH-SLAT of one asset from its Z_s and image condition; `Stage2Renderer` decodes a
latent once and renders it at any (camera, map) list. Both load the newest checkpoint of a run folder with its
EMA weights and the latent normalisation pinned in it, and say which checkpoint (step and digest) they are.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from jaxtyping import Float, Int
from peft import set_peft_model_state_dict
from torch import Tensor

from encoders.dinov2 import Dinov2Config, Dinov2Features
from encoders.flow_sampler import sample_flow
from encoders.shaded_slat import ShadedSlatConfig, shaded_slat
from encoders.slat_flow import SlatFlowModel, load_slat_flow
from encoders.sparse import SparseTensor
from infra.errors import ConfigError, NotFound
from render_jobs.cameras import opencv_intrinsics, opencv_w2c
from training.latents import LatentNormalization
from training.run import CHECKPOINTS, LATEST, META_FILE
from training.stage1.config import Stage1Config
from training.stage1.model import stage1_model, velocity
from training.stage1.trainer import ADAPTER_FILE
from training.stage1.trainer import EMA_FILE as STAGE1_EMA_FILE
from training.stage2.config import Stage2Config
from training.stage2.env_map_store import resize_env_map
from training.stage2.envmap import encode_env_map
from training.stage2.gaussians import splats_for_view
from training.stage2.model import Stage2Inputs, Stage2Model, Stage2Render, take
from training.stage2.rasterizer import Splats
from training.stage2.trainer import EMA_FILE as STAGE2_EMA_FILE
from training.stage2.trainer import MODEL_FILE


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """The newest checkpoint of a run folder and its `checkpoint.json`."""

    run_dir: Path
    folder: Path
    meta: dict[str, Any]

    @classmethod
    def latest(cls, run_dir: str | Path) -> "RunCheckpoint":
        run_dir = Path(run_dir)
        latest = run_dir / CHECKPOINTS / LATEST
        if not latest.is_file():
            raise NotFound(f"{run_dir} holds no checkpoint ({latest} is missing): is it a `near train` run folder?")
        folder = run_dir / CHECKPOINTS / latest.read_text().strip()
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            raise NotFound(f"{run_dir}: its latest checkpoint {folder} has no {META_FILE}")
        return cls(run_dir, folder, json.loads(meta_file.read_text()))

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def describe(self) -> dict[str, Any]:
        """What an evaluation records about the weights it used."""
        digest = self.meta.get("model_sha256") or self.meta.get("adapter_sha256")
        return {"run": str(self.run_dir), "checkpoint": str(self.folder), "step": self.step,
                "weights_sha256": digest, "release": self.meta.get("release"), "weights": "ema"}


@dataclasses.dataclass(frozen=True)
class View:
    """One image to render: a Blender/OpenGL camera-to-world, its field of view and the lighting."""

    c2w: np.ndarray  # (4, 4)
    fov_rad: float
    env_map: Float[Tensor, "He We 3"]  # linear RGB as stored, unrotated, at the tokenizer's map size
    yaw_rad: float = 0.0
    strength: float = 1.0


class Stage1Predictor:
    """Stage 1 with its EMA adapters merged in: (Z_s, image) -> LH-SLAT. Also samples Z_s itself (the
    pretrained flow model), for images that did not come from a release."""

    def __init__(self, run_dir: str | Path, device: torch.device) -> None:
        self.checkpoint = RunCheckpoint.latest(run_dir)
        meta = self.checkpoint.meta
        self.config = Stage1Config.from_dict(meta["config"])
        self.device = device
        self.normalization = LatentNormalization(**meta["normalization"])
        flow, weights = load_slat_flow(self.config.base_model, device=torch.device("cpu"))
        if weights.digest != meta["base_model"]["digest"]:
            raise ConfigError(f"{self.checkpoint.folder} was trained on base model {meta['base_model']}, but "
                              f"{self.config.base_model} now has sha256 {weights.digest}")
        self.base_flow: SlatFlowModel | None = None
        model = stage1_model(flow, self.config.lora)
        folder = self.checkpoint.folder
        result = set_peft_model_state_dict(model, safetensors.torch.load_file(folder / ADAPTER_FILE))
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: unexpected adapter tensors {result.unexpected_keys}")
        ema = safetensors.torch.load_file(folder / STAGE1_EMA_FILE)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in ema:
                    parameter.copy_(ema[name])
        self.model = model.merge_and_unload().to(device).eval()
        self.dinov2 = Dinov2Features(Dinov2Config(model=self.config.dinov2), device=device)

    def condition(self, views_rgba: Float[Tensor, "V 4 H W"]) -> Float[Tensor, "V T C"]:
        """DINOv2 tokens of premultiplied linear RGBA views, cropped as the factory's input views are."""
        return self.dinov2.condition(views_rgba.to(self.device)).clone()

    @torch.no_grad()
    def shaded(self, views_rgba: Float[Tensor, "V 4 H W"], coords: Int[Tensor, "N 3"], *, seed: int
               ) -> Float[Tensor, "V N 8"]:  # fmt: skip
        """Z_s of each view on `coords` (raw latents), sampled as the factory's `slat_shaded` step samples it,
        with this run's sampler settings."""
        if self.base_flow is None:
            self.base_flow = load_slat_flow(self.config.base_model, device=self.device)[0].eval()
        config = ShadedSlatConfig(views=views_rgba.shape[0], sampler=self.config.sampler)
        return shaded_slat(self.base_flow, self.dinov2, views_rgba, coords, config, seed=seed)

    @torch.no_grad()
    def predict(self, shaded: Float[Tensor, "N 8"], coords: Int[Tensor, "N 3"], cond: Float[Tensor, "1 T C"],
                *, seed: int) -> Float[Tensor, "N 8"]:  # fmt: skip
        """The LH-SLAT (raw latents, rows following `coords`) Stage 1 samples from Z_s and the image."""
        zs = self.normalization.apply(shaded.float()).to(self.device)
        batch_coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.to(torch.int32)], 1)
        noise = torch.randn(zs.shape, generator=torch.Generator().manual_seed(seed)).to(self.device)

        def denoiser(x: SparseTensor, t: Tensor, c: Tensor) -> SparseTensor:
            v = velocity(self.model, x, zs, t, c)
            return v.replace(feats=v.feats.float())

        x = sample_flow(denoiser, SparseTensor(batch_coords.to(self.device), noise), cond.to(self.device),
                        self.config.sampler)
        return self.normalization.invert(x.feats.float()).cpu()


class Stage2Renderer:
    """Stage 2 with its EMA weights: a latent on its voxels -> rendered buffers at any (camera, map)."""

    def __init__(self, run_dir: str | Path, device: torch.device) -> None:
        self.checkpoint = RunCheckpoint.latest(run_dir)
        meta = self.checkpoint.meta
        self.config = Stage2Config.from_dict(meta["config"])
        self.device = device
        self.normalization = {role: LatentNormalization(**n) for role, n in meta["normalization"].items()}
        self.model = Stage2Model(self.config.model).to(device).eval()
        state = self.model.state_dict()
        state.update(safetensors.torch.load_file(self.checkpoint.folder / STAGE2_EMA_FILE, device=str(device)))
        self.model.load_state_dict(state)
        self.with_bc_slat = self.config.model.decoder.with_bc_slat
        self.map_size = tuple(self.config.model.tokenizer.map_size)
        self.trained_env_maps: dict[str, str] = meta.get("env_maps", {})
        """sha256 -> file name of the maps the run trained on."""

    @property
    def weights_file(self) -> Path:
        return self.checkpoint.folder / MODEL_FILE

    def resize_map(self, rgb: Float[Tensor, "H W 3"]) -> Float[Tensor, "He We 3"]:
        """A linear map at the tokenizer's size, as `EnvMapStore` serves them in training."""
        return resize_env_map(rgb, self.map_size)

    def inputs(self, latent: Float[Tensor, "N C"], coords: Int[Tensor, "N 3"], views: Sequence[View],
               image_size: int) -> Stage2Inputs:  # fmt: skip
        """One asset (raw latents: LH-SLAT, then BC-SLAT for a model that reads it) under `views`."""
        channels = latent.shape[1] // (2 if self.with_bc_slat else 1)
        roles = ["slat_lh", "slat_bc"] if self.with_bc_slat else ["slat_lh"]
        normalized = torch.cat([self.normalization[role].apply(part.float())
                                for role, part in zip(roles, latent.split(channels, dim=1))], dim=1)
        batch_coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.to(torch.int32)], 1)
        encodings = [encode_env_map(v.env_map * v.strength, yaw_rad=v.yaw_rad,
                                    c2w=torch.from_numpy(np.asarray(v.c2w, np.float64)).float()) for v in views]
        return Stage2Inputs(
            slat=SparseTensor(batch_coords, normalized),
            sample_asset=torch.zeros(len(views), dtype=torch.long),
            w2c=torch.stack([torch.from_numpy(opencv_w2c(np.asarray(v.c2w, np.float64))).float() for v in views]),
            K=torch.stack([torch.from_numpy(opencv_intrinsics(v.fov_rad, image_size)).float() for v in views]),
            env_ldr=torch.stack([e.ldr for e in encodings]),
            env_log=torch.stack([e.log for e in encodings]),
            env_dir=torch.stack([e.direction for e in encodings]),
            image_size=(image_size, image_size),
        ).to(self.device)

    @torch.no_grad()
    def render(self, latent: Float[Tensor, "N C"], coords: Int[Tensor, "N 3"], views: Sequence[View],
               image_size: int, *, batch_size: int = 4) -> Stage2Render:  # fmt: skip
        """The buffers of every view (premultiplied on black, float32 on the CPU), `batch_size` at a time."""
        parts = []
        for start in range(0, len(views), batch_size):
            render = self.model(self.inputs(latent, coords, views[start : start + batch_size], image_size))
            parts.append({f.name: getattr(render, f.name).float().cpu() for f in dataclasses.fields(render)})
        return Stage2Render(**{name: torch.cat([p[name] for p in parts]) for name in parts[0]})

    @torch.no_grad()
    def splats(self, latent: Float[Tensor, "N C"], coords: Int[Tensor, "N 3"], view: View) -> Splats:
        """The Gaussians of one view and lighting, as the rasterizer receives them (world frame)."""
        inputs = self.inputs(latent, coords, [view], image_size=1)
        features, registers, gaussians = self.model.decode_intrinsic(inputs.slat)
        gather, _, lighting = self.model.decode_lighting(inputs, features, registers)
        splats = splats_for_view(take(gaussians, gather), lighting, self.model.radiance_mlp, inputs.w2c[0])
        return Splats(**{f.name: getattr(splats, f.name).float().cpu() for f in dataclasses.fields(splats)})
