"""Building blocks shared by TRELLIS's sparse transformers (the SLAT encoder and the SLAT flow model)."""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear -> GELU (tanh form, as TRELLIS) -> Linear; the state-dict names are `mlp.0` and `mlp.2`."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels)
        )

    def forward(self, h: Float[Tensor, "N C"]) -> Float[Tensor, "N C"]:
        return self.mlp(h)


def layer_norm_fp32(h: Float[Tensor, "N C"], *, eps: float) -> Float[Tensor, "N C"]:
    """LayerNorm without affine, computed in float32 and returned in the input dtype."""
    return F.layer_norm(h.float(), h.shape[1:], eps=eps).to(h.dtype)


def position_embedding(xyz: Int[Tensor, "N 3"], channels: int) -> Float[Tensor, "N C"]:
    """Absolute sinusoidal embedding of integer voxel coords: per axis [sin(c w_k), cos(c w_k)],
    w_k = 10000^(-k / F) for k < F = channels // 6, axes x, y, z in turn, zero-padded to `channels`."""
    freq_dim = channels // 3 // 2
    omega = 1.0 / 10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=xyz.device) / freq_dim)
    angles = xyz.float()[:, :, None] * omega  # (N, 3, F)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)
    return F.pad(embedding, (0, channels - embedding.shape[1]))


def timestep_embedding(
    t: Float[Tensor, " B"], dim: int, *, max_period: float = 10000.0
) -> Float[Tensor, "B D"]:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim / 2)), cosine first (TRELLIS's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs
    return F.pad(torch.cat([angles.cos(), angles.sin()], dim=1), (0, dim - 2 * half))
