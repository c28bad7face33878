"""The image-conditioned SLAT flow model of TRELLIS (`slat_flow_img_dit_L_64l8p2_fp16`), compatible with its
released weights (reference section 6).

It predicts the rectified-flow velocity of a normalised 8-channel latent on an asset's active 64^3 voxels,
given the time (x 1000) and the DINOv2 tokens of an image:
- an fp32 input layer, then sub-manifold convolution res-blocks at 64^3 ending in a 2x average pool to 32^3;
- an absolute position embedding at 32^3 and a torso of adaLN-Zero DiT blocks: full self-attention over each
  object's tokens (q/k RMS norm), cross-attention to that object's image tokens, an MLP;
- res-blocks that upsample back to 64^3 with U-Net skips, a LayerNorm and an fp32 output layer.

Checkpoints are TRELLIS's files (`encoders.trellis_checkpoint`).
"""

import dataclasses
import logging
import math
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from encoders.attention import AttentionBackend, WindowPartition, window_partition
from encoders.layers import (
    Mlp,
    MultiHeadRmsNorm,
    ObjectCrossAttention,
    SparseSelfAttention,
    layer_norm_fp32,
    position_embedding,
    timestep_embedding,
)
from encoders.sparse import SparseTensor
from encoders.sparse_conv import ConvBackend, Pooling, SubmanifoldConv3d, VoxelGrid
from encoders.trellis_checkpoint import (
    check_state_dict,
    config_from_trellis_json,
    load_checkpoint,
    save_checkpoint,
)
from encoders.weights import WeightsInfo
from infra.config import FrozenConfig
from infra.errors import ConfigError

logger = logging.getLogger(__name__)

TRELLIS_NAME = "SLatFlowModel"
_TRELLIS_FIXED_ARGS = {"pe_mode": "ape", "share_mod": False, "use_skip_connection": True}
"""TRELLIS constructor args with the only value this implementation (and the release) has."""
_TRELLIS_IGNORED_ARGS = ("use_checkpoint", "num_head_channels")
"""Training-only, or unused because num_heads is given."""
_TORSO = ("input_blocks.", "blocks.", "out_blocks.")
"""Module prefixes whose Linear and convolution weights are float16 in the release (reference 6.9)."""

SLAT_MEAN = (-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
             -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826)  # fmt: skip
SLAT_STD = (2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
            2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338)  # fmt: skip
"""Per-channel statistics of TRELLIS's SLATs, which the released flow model was trained on (reference 7)."""


@dataclasses.dataclass(frozen=True)
class SlatFlowConfig(FrozenConfig):
    """Architecture of the flow model; the defaults are the released `slat_flow_img_dit_L_64l8p2_fp16`."""

    resolution: int = 64
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    """Channels of the image tokens (DINOv2 ViT-L: 1024)."""
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    """Total down-sampling before the torso: 2 ** len(io_block_channels)."""
    num_io_res_blocks: int = 2
    io_block_channels: tuple[int, ...] = (128,)
    """Res-block channels at each resolution above the torso's, finest first."""
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = False
    use_fp16: bool = True
    """Torso weights (and activations) float16, as released; the rest float32."""
    attention_backend: AttentionBackend = "auto"
    """Kernel for the self-attention (`encoders.attention`); not part of the checkpoint."""
    conv_backend: ConvBackend = "auto"
    """Kernel for the sub-manifold convolutions (`encoders.sparse_conv`); not part of the checkpoint."""

    def __post_init__(self) -> None:
        if self.model_channels % self.num_heads:
            raise ConfigError(
                f"model_channels={self.model_channels} is not divisible by num_heads={self.num_heads}"
            )
        if self.patch_size != 2 ** len(self.io_block_channels):
            raise ConfigError(
                f"patch_size={self.patch_size} must be 2 ** len(io_block_channels={self.io_block_channels})"
            )
        if self.resolution % self.patch_size or self.num_io_res_blocks < 1:
            raise ConfigError(f"need resolution divisible by patch_size and num_io_res_blocks >= 1: {self!r}")


class _ResBlock(nn.Module):
    """TRELLIS's SparseResBlock3d: optional 2x resampling, two 3^3 sub-manifold convolutions, the time
    embedding as (scale, shift) of the second norm, and a skip (a Linear when the channels change)."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, resample: Literal["down", "up"] | None,
        conv_backend: ConvBackend,
    ) -> None:  # fmt: skip
        super().__init__()
        self.resample = resample
        self.norm1 = nn.LayerNorm(in_channels, eps=1e-6)
        self.conv1 = SubmanifoldConv3d(in_channels, out_channels, backend=conv_backend)
        self.conv2 = SubmanifoldConv3d(out_channels, out_channels, backend=conv_backend)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = (
            nn.Linear(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        )

    def forward(
        self, feats: Float[Tensor, "N_in C_in"], emb: Float[Tensor, "B E"], grid: VoxelGrid, pooling: Pooling | None
    ) -> Float[Tensor, "N C_out"]:  # fmt: skip
        """`grid` holds the output voxels; `pooling` links them with the input's when resampling."""
        dtype = self.conv1.conv.weight.dtype
        x = feats.to(dtype)
        if self.resample == "down":
            x = pooling.downsample(x)
        elif self.resample == "up":
            x = pooling.upsample(x)
        batch = grid.coords[:, 0].long()
        scale, shift = self.emb_layers(emb.to(dtype)).chunk(2, dim=1)  # (B, C_out) each; scale first
        h = F.layer_norm(x.float(), x.shape[1:], self.norm1.weight, self.norm1.bias, eps=1e-6).to(dtype)
        h = self.conv1(F.silu(h), grid)
        h = layer_norm_fp32(h, eps=1e-6) * (1 + scale[batch]) + shift[batch]
        h = self.conv2(F.silu(h), grid)
        return h + self.skip_connection(x)


class _Block(nn.Module):
    """adaLN-Zero DiT block with cross-attention (TRELLIS's ModulatedSparseTransformerCrossBlock)."""

    def __init__(self, config: SlatFlowConfig) -> None:
        super().__init__()
        channels = config.model_channels
        self.norm2 = nn.LayerNorm(
            channels, eps=1e-6
        )  # the only affine norm; no modulation on cross-attention
        self.self_attn = SparseSelfAttention(
            channels, config.num_heads, qk_rms_norm=config.qk_rms_norm, backend=config.attention_backend
        )
        self.cross_attn = ObjectCrossAttention(channels, config.cond_channels, config.num_heads)
        self.mlp = Mlp(channels, int(channels * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(
        self, h: Float[Tensor, "N C"], emb: Float[Tensor, "B C"], context: Float[Tensor, "B L C_ctx"],
        batch: Tensor, partition: WindowPartition, rows: list[int],
    ) -> Float[Tensor, "N C"]:  # fmt: skip
        modulation = self.adaLN_modulation(emb)[batch]  # (N, 6 C), per object broadcast to its tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = layer_norm_fp32(h, eps=1e-6) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * self.self_attn(x, partition)
        x = F.layer_norm(h.float(), h.shape[1:], self.norm2.weight, self.norm2.bias, eps=1e-6).to(h.dtype)
        h = h + self.cross_attn(x, context, rows)
        x = layer_norm_fp32(h, eps=1e-6) * (1 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.mlp(x)


class _TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, frequency_channels: int = 256) -> None:
        super().__init__()
        self.frequency_channels = frequency_channels
        self.mlp = nn.Sequential(
            nn.Linear(frequency_channels, channels), nn.SiLU(), nn.Linear(channels, channels)
        )

    def forward(self, t: Float[Tensor, " B"]) -> Float[Tensor, "B C"]:
        return self.mlp(timestep_embedding(t, self.frequency_channels))


class SlatFlowModel(nn.Module):
    """TRELLIS's SLAT flow model; module names give exactly the released state dict (reference Appendix B).

    Constructed directly, its weights are untrained with the release dtypes; use `load_slat_flow` for real
    weights or `build_random_slat_flow` for seeded ones.
    """

    def __init__(self, config: SlatFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.random_init_seed: int | None = None  # set for random weights: saving them marks the file
        self.gradient_checkpointing = False
        """Recompute each torso block in the backward pass (training memory for compute)."""
        channels, emb = config.model_channels, config.model_channels
        io = list(config.io_block_channels)
        self.t_embedder = _TimestepEmbedder(channels)
        self.input_layer = nn.Linear(config.in_channels, io[0])
        block = lambda c_in, c_out, resample: _ResBlock(c_in, c_out, emb, resample, config.conv_backend)
        self.input_blocks = nn.ModuleList()
        for c, c_next in zip(io, io[1:] + [channels]):
            self.input_blocks.extend(block(c, c, None) for _ in range(config.num_io_res_blocks - 1))
            self.input_blocks.append(block(c, c_next, "down"))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_blocks))
        self.out_blocks = nn.ModuleList()
        for c, c_prev in zip(reversed(io), [channels] + list(reversed(io[1:]))):
            self.out_blocks.append(block(2 * c_prev, c, "up"))
            self.out_blocks.extend(block(2 * c, c, None) for _ in range(config.num_io_res_blocks - 1))
        self.out_layer = nn.Linear(io[0], config.out_channels)
        self.to_release_dtypes()

    @property
    def torso_dtype(self) -> torch.dtype:
        return self.blocks[0].self_attn.to_out.weight.dtype

    def to_release_dtypes(self) -> "SlatFlowModel":
        """Torso weights float16 (when `use_fp16`), the norms' affines and RMS gains float32, as released."""
        self.to_torso_dtype(torch.float16 if self.config.use_fp16 else torch.float32)
        return self

    def to_torso_dtype(self, dtype: torch.dtype) -> "SlatFlowModel":
        """Casts the torso's Linear and convolution weights; norms, embeddings and I/O layers stay float32."""
        for prefix in _TORSO:
            for module in self.get_submodule(prefix.rstrip(".")).modules():
                if isinstance(module, (nn.Linear, SubmanifoldConv3d)):
                    module.to(dtype)
        return self

    def forward(
        self, x: SparseTensor, t: Float[Tensor, " B"], cond: Float[Tensor, "B L C_cond"]
    ) -> SparseTensor:  # fmt: skip
        """Velocity of the normalised latent `x` at time `t` (1000 x flow time), conditioned on image tokens.

        Args:
            x: (batch, x, y, z) coords on the `resolution`^3 grid and (N, in_channels) features.
            t: one time per object, in [0, 1000].
            cond: the image tokens of each object (zeros for the unconditional branch).

        Returns:
            The same coords, in the same row order, with (N, out_channels) velocities in `x`'s dtype.
        """
        config = self.config
        if x.feats.shape[1] != self.input_layer.in_features:
            raise ValueError(
                f"expected {self.input_layer.in_features} feature channels, got {x.feats.shape[1]}"
            )
        if bool((x.coords[:, 1:] >= config.resolution).any()):
            raise ValueError(f"voxel coords must lie in [0, {config.resolution})")
        if t.shape != (x.batch_size,) or cond.shape[0] != x.batch_size:
            raise ValueError(
                f"need one time and one condition per object: t {tuple(t.shape)}, cond {tuple(cond.shape)}"
            )
        dtype = self.torso_dtype
        grids = [VoxelGrid(x.coords, config.resolution)]
        poolings = []
        for _ in config.io_block_channels:
            poolings.append(Pooling.of(grids[-1]))
            grids.append(poolings[-1].coarse)
        emb = self.t_embedder(t.float()).to(dtype)  # (B, C)

        h = self.input_layer(x.feats.to(self.input_layer.weight.dtype)).to(dtype)
        skips, level = [], 0
        for block in self.input_blocks:
            level += block.resample == "down"
            h = block(h, emb, grids[level], poolings[level - 1] if block.resample else None)
            skips.append(h)

        coarse = grids[-1]
        h = h + position_embedding(coarse.coords[:, 1:], config.model_channels).to(dtype)
        batch = coarse.coords[:, 0].long()
        partition = window_partition(coarse.coords, coarse.resolution, 0)  # one window per object
        rows = torch.bincount(batch, minlength=x.batch_size).tolist()
        context = cond.to(dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, context, batch, partition, rows, use_reentrant=False)
            else:
                h = block(h, emb, context, batch, partition, rows)

        for block, skip in zip(self.out_blocks, reversed(skips)):
            level -= block.resample == "up"
            h = block(
                torch.cat([h, skip], dim=1), emb, grids[level], poolings[level] if block.resample else None
            )
        h = F.layer_norm(h.float(), h.shape[1:], eps=1e-5).to(x.feats.dtype)
        return x.replace(feats=self.out_layer(h.to(self.out_layer.weight.dtype)).to(x.feats.dtype))


def build_random_slat_flow(config: SlatFlowConfig, *, seed: int) -> SlatFlowModel:
    """A flow model with seeded random weights, standing in for pretrained ones in tests and the demo.

    Linear layers are Xavier-uniform with zero biases and convolutions Kaiming-uniform, as TRELLIS
    initialises them, except its zero inits, which would make the stand-in a constant function: the adaLN
    modulations and each res-block's second convolution are drawn from N(0, 0.02^2), and the output layer is
    Xavier-uniform like the others, so velocities come out at the unit scale of a trained model's.
    """
    model = _uninitialized_slat_flow(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, MultiHeadRmsNorm):
                module.gamma.fill_(1.0)
            elif isinstance(module, (nn.Linear, SubmanifoldConv3d)):
                params = module.conv if isinstance(module, SubmanifoldConv3d) else module
                draw = torch.empty(params.weight.shape)  # drawn in fp32, so fp16 and fp32 models agree
                if name.endswith(("adaLN_modulation.1", "conv2")) or name.startswith("t_embedder"):
                    nn.init.normal_(draw, std=0.02, generator=generator)
                elif isinstance(module, SubmanifoldConv3d):  # (C_out, 3, 3, 3, C_in): fan_in = 27 C_in
                    bound = 1 / math.sqrt(draw[0].numel())
                    draw.uniform_(-bound, bound, generator=generator)
                else:
                    nn.init.xavier_uniform_(draw, generator=generator)
                params.weight.copy_(draw)
                params.bias.zero_()
    model.random_init_seed = seed
    return model


def save_slat_flow(model: SlatFlowModel, path: str | os.PathLike[str]) -> None:
    """Write `path` (`<dir>/<name>.safetensors`, release dtypes, no metadata) and `<dir>/<name>.json`.

    With the release config the weights file is exactly the published 1,203,755,136 bytes.
    """
    torso_dtype = torch.float16 if model.config.use_fp16 else torch.float32
    state_dict = {
        name: t.to("cpu", _release_dtype(name, t, torso_dtype)) for name, t in model.state_dict().items()
    }
    save_checkpoint(
        state_dict, path, trellis_json=_trellis_json(model.config), random_init_seed=model.random_init_seed
    )


def load_slat_flow(
    reference: str,
    *,
    device: torch.device | str = "cpu",
    attention_backend: AttentionBackend = "auto",
    conv_backend: ConvBackend = "auto",
) -> tuple[SlatFlowModel, WeightsInfo]:
    """Load a flow checkpoint strictly, in eval mode with gradients off, on `device`.

    On CPU the torso is converted to float32 (spconv's CPU kernels need it, and fp16 products there are slow);
    on CUDA it keeps the checkpoint's dtypes. Callers that train cast it as they need (`to_torso_dtype`).

    Args:
        reference: a local `<name>.safetensors` (with or without the suffix) or a hub id
            `owner/repo/path/in/repo/<name>`; the `<name>.json` beside it gives the config, else the release's.

    Raises:
        ConfigError: no such file or hub id, an unsupported config, or tensors that do not fit (names listed).

    Examples:
        >>> release = "microsoft/TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_fp16"
        >>> model, info = load_slat_flow(release, device="cuda")  # doctest: +SKIP
    """
    device = torch.device(device)
    state_dict, trellis_json, info, seed = load_checkpoint(reference)
    config = _config_from_json(trellis_json, reference) if trellis_json is not None else SlatFlowConfig()
    config = config.replace(attention_backend=attention_backend, conv_backend=conv_backend)
    model = _uninitialized_slat_flow(config)
    check_state_dict(state_dict, expected=model.state_dict(), source=reference)
    model.load_state_dict(state_dict, strict=True)
    model.random_init_seed = seed
    if device.type == "cpu":
        model.to_torso_dtype(torch.float32)
    logger.info(
        "loaded SLAT flow %s (digest %s, random=%s)", reference, info.digest[:12], info.is_random_init
    )
    return model.to(device).eval().requires_grad_(False), info


def _uninitialized_slat_flow(config: SlatFlowConfig) -> SlatFlowModel:
    """A CPU model with allocated but uninitialised tensors, in release dtypes (default init of the
    600M-parameter release takes seconds, and every tensor is overwritten anyway)."""
    with torch.device("meta"):
        model = SlatFlowModel(config)
    return model.to_empty(device="cpu")


def _release_dtype(name: str, tensor: Tensor, torso_dtype: torch.dtype) -> torch.dtype:
    """Torso Linear and convolution tensors in `torso_dtype`; norms, RMS gains and everything else float32."""
    is_norm = ".norm" in name or "rms_norm" in name
    return torso_dtype if name.startswith(_TORSO) and not is_norm else torch.float32


def _trellis_json(config: SlatFlowConfig) -> dict[str, Any]:
    """TRELLIS's config JSON, keys in its order, an integral mlp_ratio written as an int."""
    mlp_ratio = config.mlp_ratio
    args = {
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "cond_channels": config.cond_channels,
        "num_blocks": config.num_blocks,
        "num_heads": config.num_heads,
        "mlp_ratio": int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio,
        "patch_size": config.patch_size,
        "num_io_res_blocks": config.num_io_res_blocks,
        "io_block_channels": list(config.io_block_channels),
        "pe_mode": _TRELLIS_FIXED_ARGS["pe_mode"],
        "qk_rms_norm": config.qk_rms_norm,
        "use_fp16": config.use_fp16,
    }
    return {"name": TRELLIS_NAME, "args": args}


def _config_from_json(trellis_json: dict[str, Any], source: str) -> SlatFlowConfig:
    return config_from_trellis_json(
        trellis_json,
        SlatFlowConfig,
        name=TRELLIS_NAME,
        fixed_args=_TRELLIS_FIXED_ARGS,
        ignored_args=_TRELLIS_IGNORED_ARGS,
        source=source,
    )
