"""Building blocks shared by the sparse transformers: TRELLIS's SLAT encoder and flow model, and the Stage 2
decoders."""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from encoders.attention import AttentionBackend, WindowPartition, sparse_window_attention


class Mlp(nn.Module):
    """Linear -> GELU (tanh form, as TRELLIS) -> Linear; the state-dict names are `mlp.0` and `mlp.2`."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels)
        )

    def forward(self, h: Float[Tensor, "*batch C"]) -> Float[Tensor, "*batch C"]:
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


class MultiHeadRmsNorm(nn.Module):
    """Per-head L2 normalisation times a learned gain and sqrt(head_dim), computed in float32."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: Float[Tensor, "N H D"]) -> Float[Tensor, "N H D"]:
        return (F.normalize(x.float(), dim=-1) * self.gamma * math.sqrt(x.shape[-1])).to(x.dtype)


class SparseSelfAttention(nn.Module):
    """Self-attention of each token with its window's tokens (a window may be a whole object), optionally with
    per-head RMS-normalised queries and keys; rows of `to_qkv`: q, k, v blocks, heads contiguous inside each."""

    def __init__(
        self, channels: int, num_heads: int, *, qk_rms_norm: bool = False, backend: AttentionBackend = "auto"
    ) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRmsNorm(num_heads, channels // num_heads)
            self.k_rms_norm = MultiHeadRmsNorm(num_heads, channels // num_heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: Float[Tensor, "N C"], partition: WindowPartition) -> Float[Tensor, "N C"]:
        qkv = self.to_qkv(h).unflatten(1, (3, self.num_heads, -1))  # (N, 3, H, D)
        if self.qk_rms_norm:
            q, k, v = qkv.unbind(1)
            qkv = torch.stack([self.q_rms_norm(q), self.k_rms_norm(k), v], dim=1)
        return self.to_out(sparse_window_attention(qkv, partition, backend=self.backend).flatten(1))


class ObjectCrossAttention(nn.Module):
    """Each object's tokens attend to its own context tokens (image or lighting tokens, registers); rows of
    `to_kv`: k, v blocks."""

    def __init__(self, channels: int, context_channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self, h: Float[Tensor, "N C"], context: Float[Tensor, "B L C_ctx"], rows: list[int]
    ) -> Float[Tensor, "N C"]:  # fmt: skip
        """`rows` is the number of tokens of each object (h's rows are grouped by object)."""
        q = self.to_q(h).unflatten(1, (self.num_heads, -1))  # (N, H, D)
        k, v = self.to_kv(context.to(h.dtype)).unflatten(2, (2, self.num_heads, -1)).unbind(2)  # (B, L, H, D)
        attended = [  # unpadded per object, as (1, H, L, D): SDPA picks its fused kernels
            F.scaled_dot_product_attention(*(a.transpose(0, 1)[None] for a in (q_b, k_b, v_b)))[0]
            for q_b, k_b, v_b in zip(q.split(rows), k, v)
        ]
        return self.to_out(torch.cat(attended, dim=1).transpose(0, 1).flatten(1))

    def padded(self, h: Float[Tensor, "B W C"], context: Float[Tensor, "B L C_ctx"]) -> Float[Tensor, "B W C"]:
        """The same attention for B objects in one call, their tokens zero-padded to a common W. Every object has
        L context tokens, so padded queries need no mask (their outputs are the caller's to drop) and SDPA keeps
        its fused kernels."""
        q = self.to_q(h).unflatten(2, (self.num_heads, -1))  # (B, W, H, D)
        k, v = self.to_kv(context.to(h.dtype)).unflatten(2, (2, self.num_heads, -1)).unbind(2)  # (B, L, H, D)
        attended = F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v)))  # (B, H, W, D)
        return self.to_out(attended.transpose(1, 2).flatten(2))
