"""Lighting tokenizer (paper section 3.5): an environment map, seen from one camera, as a grid of tokens.

    [E_ldr, E_log] (6, H, W) --ConvNeXt--> features at strides 4, 8, 16, 32
    E_dir (3, H, W) --area pool per stride, NeRF encoding--> direction tokens of each scale
    per scale: feature tokens attend to that scale's direction tokens (spatial cross-attention)
    multi-scale fusion: every scale upsampled to stride 4 and summed
    self-attention blocks with 2-D RoPE and RMSNorm  ->  tokens (B, H/4 * W/4, width)

Only E_dir depends on the camera (it is the map's directions in camera space): the ConvNeXt features of E_ldr and
E_log, projected to the token width (`encode_maps`), serve every view of a map, and `tokens` adds the direction
tokens, the cross-attention, the fusion and the self-attention per view.

At the paper's size a 256 x 256 map gives 64 x 64 = 4096 tokens of width 768. The ConvNeXt follows timm's
layout (stem, stages with a 2x2 stride-2 downsampling, blocks of depthwise 7x7 conv, LayerNorm, MLP and layer
scale); it is trained from scratch, as no pretrained weights can be fetched here and its input is not an
RGB image.
"""

import dataclasses

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from encoders.layers import Mlp
from infra.config import FrozenConfig
from infra.errors import ConfigError
from training.stage2.gaussians import nerf_encoding


@dataclasses.dataclass(frozen=True)
class LightingTokenizerConfig(FrozenConfig):
    map_size: tuple[int, int] = (256, 256)
    """(H, W) the equirectangular map is resized to; tokens are (H / 4) x (W / 4)."""
    convnext_depths: tuple[int, ...] = (3, 3, 9, 3)
    convnext_dims: tuple[int, ...] = (96, 192, 384, 768)
    width: int = 768
    num_heads: int = 12
    self_attention_blocks: int = 2
    direction_frequencies: int = 4

    def __post_init__(self) -> None:
        if len(self.convnext_depths) != len(self.convnext_dims):
            raise ConfigError("convnext_depths and convnext_dims need one entry per stage")
        stride = 4 * 2 ** (len(self.convnext_dims) - 1)
        if any(size % stride for size in self.map_size):
            raise ConfigError(f"map_size {self.map_size} must be divisible by the deepest stride {stride}")
        if self.width % (2 * self.num_heads) or (self.width // self.num_heads) % 4:
            raise ConfigError(f"width {self.width} must split into {self.num_heads} heads of a multiple of 4")

    @property
    def num_tokens(self) -> int:
        return (self.map_size[0] // 4) * (self.map_size[1] // 4)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Float[Tensor, "B C H W"]) -> Float[Tensor, "B C H W"]:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Float[Tensor, "B C H W"]) -> Float[Tensor, "B C H W"]:
        h = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_channels: int, depths: tuple[int, ...], dims: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
        )
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            downsample = (
                nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2))
                if i
                else nn.Identity()
            )
            self.stages.append(nn.Sequential(downsample, *(ConvNeXtBlock(dim) for _ in range(depth))))

    def forward(self, x: Float[Tensor, "B C H W"]) -> list[Float[Tensor, "B C_s H_s W_s"]]:
        features, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def rope_2d(
    x: Float[Tensor, "B H L D"], rows: int, cols: int, base: float = 100.0
) -> Float[Tensor, "B H L D"]:
    """Axial rotary embedding of a rows x cols grid: the first half of each head rotates with the row, the
    second half with the column."""
    quarter = x.shape[-1] // 4
    freqs = base ** (-torch.arange(quarter, device=x.device, dtype=torch.float32) / quarter)
    r, c = torch.meshgrid(
        torch.arange(rows, device=x.device), torch.arange(cols, device=x.device), indexing="ij"
    )
    angles = torch.cat([r.flatten()[:, None] * freqs, c.flatten()[:, None] * freqs], dim=-1)  # (L, D / 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class DenseAttention(nn.Module):
    """Multi-head attention of dense tokens with RMS-normalised queries and keys (optionally 2-D RoPE)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.q_norm = nn.RMSNorm(channels // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(channels // num_heads, eps=1e-6)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self, x: Float[Tensor, "B L C"], context: Float[Tensor, "B M C"], grid: tuple[int, int] | None = None
    ) -> Float[Tensor, "B L C"]:  # fmt: skip
        """`grid` (rows, cols): x and context are the same grid's tokens; rotate them with RoPE."""
        q = self.q_norm(self.to_q(x).unflatten(2, (self.num_heads, -1))).transpose(1, 2)
        k, v = self.to_kv(context).unflatten(2, (2, self.num_heads, -1)).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if grid is not None:
            q, k = rope_2d(q, *grid), rope_2d(k, *grid)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class SelfAttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(channels, eps=1e-6)
        self.attn = DenseAttention(channels, num_heads)
        self.norm2 = nn.RMSNorm(channels, eps=1e-6)
        self.mlp = Mlp(channels, 4 * channels)

    def forward(self, x: Float[Tensor, "B L C"], grid: tuple[int, int]) -> Float[Tensor, "B L C"]:
        h = self.norm1(x)
        x = x + self.attn(h, h, grid)
        return x + self.mlp(self.norm2(x))


@dataclasses.dataclass(frozen=True)
class MapFeatures:
    """The camera-independent part of the tokenizer for B maps: per ConvNeXt stage s (stride 4 * 2^s), its
    features of [E_ldr, E_log] projected to the token width, (B, H/stride * W/stride, width)."""

    scales: tuple[Float[Tensor, "B _ width"], ...]


class DirectionFusion(nn.Module):
    """One scale: feature tokens attend to the NeRF-encoded camera-space directions of the same scale."""

    def __init__(self, feature_channels: int, width: int, num_heads: int, frequencies: int) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.feature_proj = nn.Linear(feature_channels, width)
        self.direction_proj = nn.Linear(3 + 6 * frequencies, width)
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.attn = DenseAttention(width, num_heads)

    def project(self, features: Float[Tensor, "B C h w"]) -> Float[Tensor, "B L width"]:
        return self.feature_proj(features.flatten(2).transpose(1, 2))

    def forward(
        self, features: Float[Tensor, "B L width"], grid: tuple[int, int], directions: Float[Tensor, "S 3 H W"]
    ) -> Float[Tensor, "S L width"]:  # fmt: skip
        """`features` of this scale's (rows, cols) `grid`, from `project`; B is S, or 1 for one map seen by S
        cameras."""
        pooled = F.normalize(F.adaptive_avg_pool2d(directions, grid), dim=1)
        context = self.direction_proj(nerf_encoding(pooled.flatten(2).transpose(1, 2), self.frequencies))
        tokens = features + context
        return tokens + self.attn(self.norm(tokens), context, grid)


class LightingTokenizer(nn.Module):
    def __init__(self, config: LightingTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.convnext = ConvNeXt(6, config.convnext_depths, config.convnext_dims)
        self.fusions = nn.ModuleList(
            DirectionFusion(dim, config.width, config.num_heads, config.direction_frequencies)
            for dim in config.convnext_dims
        )
        self.fusion_norm = nn.RMSNorm(config.width, eps=1e-6)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.width, config.num_heads) for _ in range(config.self_attention_blocks)
        )
        self.out_norm = nn.RMSNorm(config.width, eps=1e-6)

    def forward(
        self, ldr: Float[Tensor, "B 3 H W"], log: Float[Tensor, "B 3 H W"], direction: Float[Tensor, "B 3 H W"]
    ) -> Float[Tensor, "B L width"]:  # fmt: skip
        return self.tokens(self.encode_maps(ldr, log), direction)

    def encode_maps(self, ldr: Float[Tensor, "B 3 H W"], log: Float[Tensor, "B 3 H W"]) -> MapFeatures:
        """What does not depend on the camera: compute once per map, then `tokens` per view."""
        self._check_size(ldr)
        features = self.convnext(torch.cat([ldr, log], dim=1))
        return MapFeatures(tuple(fusion.project(f) for f, fusion in zip(features, self.fusions)))

    def tokens(self, maps: MapFeatures, direction: Float[Tensor, "S 3 H W"]) -> Float[Tensor, "S L width"]:
        """The lighting tokens of S views: `maps` holds S maps, or one map that every view sees."""
        self._check_size(direction)
        height, width = direction.shape[-2:]
        tokens_grid = (height // 4, width // 4)
        fused = 0.0
        for s, (features, fusion) in enumerate(zip(maps.scales, self.fusions)):
            grid = (height // (4 << s), width // (4 << s))
            scale_map = fusion(features, grid, direction).transpose(1, 2).unflatten(2, grid)
            fused = fused + F.interpolate(scale_map, size=tokens_grid, mode="bilinear", align_corners=False)
        x = self.fusion_norm(fused.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x = block(x, tokens_grid)
        return self.out_norm(x)

    def _check_size(self, maps: Float[Tensor, "B C H W"]) -> None:
        if tuple(maps.shape[-2:]) != tuple(self.config.map_size):
            raise ValueError(f"environment maps must be {self.config.map_size}, got {tuple(maps.shape[-2:])}")
