"""The Intrinsic Aware Decoder, the view embedding and the Lighting Aware Decoder (paper section 3.5).

Voxel tokens of all objects are concatenated rows (`rows[b]` tokens for object b, in order), as in the
encoders' sparse transformers.

- Intrinsic Aware Decoder: LH-SLAT (optionally with the BC-SLAT channels) -> 768-d intrinsic features, through
  sparse 8^3 window attention (shifted on odd blocks) and 16 register tokens per object. In every block the
  registers read their object's voxels and the voxels read the registers, so the windows see a global summary.
- View embedding: NeRF encoding of the camera-space direction to each voxel centre plus a learned encoding of
  its distance, added to the intrinsic features.
- Lighting Aware Decoder: blocks of cross-attention to the sample's lighting tokens and to its registers, then
  an MLP. Every sample has as many lighting tokens and registers, so with `batched_cross_attention` all samples
  attend in one call, their queries zero-padded to the largest sample (`RowGroups`): no mask, fused kernels.
"""

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from encoders.attention import AttentionBackend, WindowPartition, window_partition
from encoders.layers import (
    Mlp,
    ObjectCrossAttention,
    SparseSelfAttention,
    layer_norm_fp32,
    position_embedding,
)
from encoders.sparse import SparseTensor
from infra.config import FrozenConfig
from infra.errors import ConfigError
from training.stage2.gaussians import gl_from_cv, nerf_encoding


@dataclasses.dataclass(frozen=True)
class DecoderConfig(FrozenConfig):
    latent_channels: int = 8
    with_bc_slat: bool = False
    """Concatenate the BC-SLAT to the LH-SLAT (16 input channels)."""
    model_channels: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    intrinsic_blocks: int = 12
    lighting_blocks: int = 6
    num_registers: int = 16
    resolution: int = 64
    view_frequencies: int = 4
    distance_frequencies: int = 8
    attention_backend: AttentionBackend = "auto"
    gradient_checkpointing: bool = False
    batched_cross_attention: bool = True
    """Lighting Aware Decoder: one attention call for all samples (queries padded to the largest sample) rather
    than one per sample; the same result."""

    def __post_init__(self) -> None:
        if self.model_channels % self.num_heads:
            raise ConfigError(f"model_channels {self.model_channels} must divide into {self.num_heads} heads")
        if min(self.intrinsic_blocks, self.lighting_blocks, self.num_registers, self.window_size) < 1:
            raise ConfigError(f"block, register and window counts must be >= 1: {self!r}")

    @property
    def input_channels(self) -> int:
        return self.latent_channels * (2 if self.with_bc_slat else 1)


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """Rows grouped by sample (`rows[s]` consecutive rows of sample s), and their place in the zero-padded
    (S, max(rows)) layout of the batched paths. Built once per batch, the only step that reads sizes on the host, so
    the per-sample work after it never waits on the GPU (and CUDA graphs can capture it)."""

    rows: list[int]
    index: Int[Tensor, " M"] | None
    """Position of each row in the flattened (S * max(rows)) layout; None when every sample has as many rows."""

    @classmethod
    def of(cls, rows: Sequence[int], device: torch.device) -> "RowGroups":
        rows = [int(n) for n in rows]
        if len(set(rows)) == 1:
            return cls(rows, None)
        width = max(rows)
        index = torch.cat([torch.arange(n) + s * width for s, n in enumerate(rows)])
        return cls(rows, index.to(device))

    def pad(self, x: Float[Tensor, "M *D"]) -> Float[Tensor, "S W *D"]:
        """Sample s's rows at [s, :rows[s]], zeros after them."""
        if self.index is None:
            return x.unflatten(0, (len(self.rows), -1))
        width = max(self.rows)
        padded = x.new_zeros(len(self.rows) * width, *x.shape[1:]).index_copy(0, self.index, x)
        return padded.unflatten(0, (len(self.rows), width))

    def unpad(self, x: Float[Tensor, "S W *D"]) -> Float[Tensor, "M *D"]:
        flat = x.flatten(0, 1)
        return flat if self.index is None else flat[self.index]


def _norm(h: Tensor) -> Tensor:
    return (
        layer_norm_fp32(h, eps=1e-6)
        if h.ndim == 2
        else F.layer_norm(h.float(), h.shape[-1:], eps=1e-6).to(h.dtype)
    )


class RegisterReadout(nn.Module):
    """Each object's registers attend to that object's voxel tokens."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self, registers: Float[Tensor, "B R C"], h: Float[Tensor, "N C"], rows: list[int]
    ) -> Float[Tensor, "B R C"]:  # fmt: skip
        q = self.to_q(registers).unflatten(2, (self.num_heads, -1)).transpose(1, 2)  # (B, H, R, D)
        k, v = self.to_kv(h).unflatten(1, (2, self.num_heads, -1)).unbind(1)  # (N, H, D)
        attended = [
            F.scaled_dot_product_attention(q[b : b + 1], k_b.transpose(0, 1)[None], v_b.transpose(0, 1)[None])
            for b, (k_b, v_b) in enumerate(zip(k.split(rows), v.split(rows)))
        ]
        return self.to_out(torch.cat(attended).transpose(1, 2).flatten(2))


class IntrinsicBlock(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        channels = config.model_channels
        self.attn = SparseSelfAttention(channels, config.num_heads, backend=config.attention_backend)
        self.register_readout = RegisterReadout(channels, config.num_heads)
        self.register_attn = ObjectCrossAttention(channels, channels, config.num_heads)
        self.mlp = Mlp(channels, int(channels * config.mlp_ratio))

    def forward(
        self, h: Float[Tensor, "N C"], registers: Float[Tensor, "B R C"], partition: WindowPartition, rows: list[int]
    ) -> tuple[Float[Tensor, "N C"], Float[Tensor, "B R C"]]:  # fmt: skip
        h = h + self.attn(_norm(h), partition)
        registers = registers + self.register_readout(_norm(registers), _norm(h), rows)
        h = h + self.register_attn(_norm(h), _norm(registers), rows)
        return h + self.mlp(_norm(h)), registers


class IntrinsicAwareDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layer = nn.Linear(config.input_channels, config.model_channels)
        self.registers = nn.Parameter(torch.randn(config.num_registers, config.model_channels) * 0.02)
        self.blocks = nn.ModuleList(IntrinsicBlock(config) for _ in range(config.intrinsic_blocks))

    def forward(self, slat: SparseTensor) -> tuple[Float[Tensor, "N C"], Float[Tensor, "B R C"]]:
        """Intrinsic features of every voxel and the registers of every object."""
        config = self.config
        rows = torch.bincount(slat.coords[:, 0].long(), minlength=slat.batch_size).tolist()
        partitions = [
            window_partition(slat.coords, config.window_size, shift) for shift in (0, config.window_size // 2)
        ]
        h = self.input_layer(slat.feats) + position_embedding(slat.coords[:, 1:], config.model_channels)
        registers = self.registers.expand(len(rows), -1, -1)
        for i, block in enumerate(self.blocks):
            args = (h, registers, partitions[i % 2], rows)
            h, registers = (
                checkpoint(block, *args, use_reentrant=False) if self._checkpointing else block(*args)
            )
        return h, registers

    @property
    def _checkpointing(self) -> bool:
        return self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()


class ViewEmbedding(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.direction = nn.Linear(3 + 6 * config.view_frequencies, config.model_channels)
        self.distance = nn.Linear(2 * config.distance_frequencies, config.model_channels)

    def forward(
        self, coords: Int[Tensor, "N 3"], w2c: Float[Tensor, "N 4 4"]
    ) -> Float[Tensor, "N C"]:  # fmt: skip
        """`w2c`: each voxel's sample's OpenCV world-to-camera matrix."""
        centre = (coords.float() + 0.5) / self.config.resolution - 0.5
        camera = gl_from_cv(torch.einsum("nij,nj->ni", w2c[:, :3, :3], centre) + w2c[:, :3, 3])
        distance = camera.norm(dim=-1, keepdim=True)
        angles = (
            distance
            * (2.0 ** torch.arange(self.config.distance_frequencies, device=coords.device))
            * torch.pi
        )
        return self.direction(nerf_encoding(camera / distance, self.config.view_frequencies)) + self.distance(
            torch.cat([angles.sin(), angles.cos()], dim=-1)
        )


class LightingBlock(nn.Module):
    def __init__(self, config: DecoderConfig, lighting_channels: int) -> None:
        super().__init__()
        channels = config.model_channels
        self.batched = config.batched_cross_attention
        self.lighting_attn = ObjectCrossAttention(channels, lighting_channels, config.num_heads)
        self.register_attn = ObjectCrossAttention(channels, channels, config.num_heads)
        self.mlp = Mlp(channels, int(channels * config.mlp_ratio))

    def forward(
        self, h: Float[Tensor, "M C"], lighting: Float[Tensor, "S L C_l"], registers: Float[Tensor, "S R C"],
        groups: RowGroups,
    ) -> Float[Tensor, "M C"]:  # fmt: skip
        h = h + self._attend(self.lighting_attn, _norm(h), lighting, groups)
        h = h + self._attend(self.register_attn, _norm(h), _norm(registers), groups)
        return h + self.mlp(_norm(h))

    def _attend(
        self, attn: ObjectCrossAttention, h: Float[Tensor, "M C"], context: Float[Tensor, "S L C_ctx"],
        groups: RowGroups,
    ) -> Float[Tensor, "M C"]:  # fmt: skip
        if self.batched:
            return groups.unpad(attn.padded(groups.pad(h), context))
        return attn(h, context, groups.rows)


class LightingAwareDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, lighting_channels: int) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            LightingBlock(config, lighting_channels) for _ in range(config.lighting_blocks)
        )

    def forward(
        self, h: Float[Tensor, "M C"], lighting: Float[Tensor, "S L C_l"], registers: Float[Tensor, "S R C"],
        groups: RowGroups,
    ) -> Float[Tensor, "M C"]:  # fmt: skip
        """Rows are grouped by sample (S samples: one view and one lighting each)."""
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            args = (h, lighting, registers, groups)
            h = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)
        return h
