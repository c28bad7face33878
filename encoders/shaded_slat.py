"""The shaded SLAT Z_s of NeAR's Stage 1: what the pretrained TRELLIS flow model makes of one input view.

Z_s = f_s(DINOv2 tokens of the view), sampled on the asset's own voxels (not on the sparse-structure stage's),
so it shares coords and row order with the asset's LH-SLAT; the lighting baked into the view is what Stage 1
learns to remove. The noise is seeded per asset, so a step recomputed with the same inputs gives the same Z_s.
"""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from encoders.dinov2 import Dinov2Features
from encoders.flow_sampler import FlowSamplerConfig, sample_flow
from encoders.slat_flow import SLAT_MEAN, SLAT_STD, SlatFlowModel
from encoders.sparse import SparseTensor
from infra.config import FrozenConfig, PositiveInt

DEFAULT_SLAT_FLOW = "microsoft/TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_fp16"


@dataclasses.dataclass(frozen=True)
class ShadedSlatConfig(FrozenConfig):
    """How Z_s is sampled; part of the `slat_shaded` step's spec hash."""

    views: PositiveInt = 1
    """Input views per asset with a Z_s each (the first ones of the `input` render set)."""
    sampler: FlowSamplerConfig = dataclasses.field(default_factory=FlowSamplerConfig)


def input_view_frames(frame_view: np.ndarray, frame_lighting: np.ndarray, count: int) -> np.ndarray:
    """The frames of an `input` render set that Z_s is sampled from: lighting 0 of the first `count` views."""
    frames = np.flatnonzero(frame_lighting == 0)
    return frames[np.argsort(frame_view[frames], kind="stable")][:count]


def normalize_slat(latent: Float[Tensor, "N 8"]) -> Float[Tensor, "N 8"]:
    """Per-channel standardisation with the statistics the flow model was trained on."""
    return (latent - latent.new_tensor(SLAT_MEAN)) / latent.new_tensor(SLAT_STD)


def denormalize_slat(normalized: Float[Tensor, "N 8"]) -> Float[Tensor, "N 8"]:
    return normalized * normalized.new_tensor(SLAT_STD) + normalized.new_tensor(SLAT_MEAN)


@torch.no_grad()
def shaded_slat(
    flow: SlatFlowModel,
    dinov2: Dinov2Features,
    views_rgba: Float[Tensor, "V 4 H W"],
    coords: Int[Tensor, "N 3"],
    config: ShadedSlatConfig,
    *,
    seed: int,
) -> Float[Tensor, "V N 8"]:
    """Z_s of each view (premultiplied linear RGBA), on `coords` (64^3 voxel indices), denormalised, float32."""
    device = next(flow.parameters()).device
    num_views, num_voxels = views_rgba.shape[0], coords.shape[0]
    cond = dinov2.condition(views_rgba).to(device)  # (V, T, C)
    batch = torch.arange(num_views, dtype=torch.int32).repeat_interleave(num_voxels)
    batch_coords = torch.cat([batch[:, None], coords.to(torch.int32).repeat(num_views, 1)], dim=1).to(device)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_views * num_voxels, flow.config.in_channels, generator=generator)
    x = sample_flow(flow, SparseTensor(batch_coords, noise.to(device)), cond, config.sampler)
    return denormalize_slat(x.feats.float()).view(num_views, num_voxels, -1).cpu()
