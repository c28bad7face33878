"""The SLAT VAE encoder of TRELLIS (`slat_enc_swin8_B_64l8_fp16`), compatible with its released weights.

It maps the averaged DINOv2 features of an asset's active voxels on the 64^3 grid to one 8-channel latent
per voxel (the posterior mean; reference section 4.2): an fp32 input layer plus an absolute sinusoidal
position embedding, an fp16 torso of pre-LN transformer blocks with sparse window attention (window 8,
shifted by 4 on odd blocks), a final LayerNorm and an fp32 output layer giving mean and log-variance.

Checkpoints are TRELLIS's files: `<name>.safetensors` (module names, shapes and dtypes of the release, no
metadata) beside `<name>.json` = `{"name": "SLatEncoder", "args": {...}}`.
"""

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from encoders.attention import AttentionBackend, WindowPartition, window_partition
from encoders.layers import Mlp, SparseSelfAttention, layer_norm_fp32, position_embedding
from encoders.sparse import SparseTensor
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

TRELLIS_NAME = "SLatEncoder"
"""The `name` of TRELLIS's config JSON; its training variant `ElasticSLatEncoder` has the same weights."""
_TRELLIS_FIXED_ARGS = {"attn_mode": "swin", "pe_mode": "ape", "qk_rms_norm": False}
"""TRELLIS constructor args with the only value this implementation (and the release) has."""
_TRELLIS_IGNORED_ARGS = ("use_checkpoint", "num_head_channels")
"""Training-only, or unused because num_heads is given."""


@dataclasses.dataclass(frozen=True)
class SlatEncoderConfig(FrozenConfig):
    """Architecture of the encoder; the defaults are the released `slat_enc_swin8_B_64l8_fp16`."""

    resolution: int = 64
    """Voxel grid side; coordinates must lie in [0, resolution)."""
    in_channels: int = 1024
    """Input feature channels (DINOv2 ViT-L/14 with registers)."""
    model_channels: int = 768
    latent_channels: int = 8
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    """Attention window side in voxels; odd blocks shift the windows by half of it."""
    use_fp16: bool = True
    """The transformer blocks' weights (and activations) are float16, as released; the rest is float32."""
    attention_backend: AttentionBackend = "auto"
    """Kernel for window attention (`encoders.attention`); not part of the checkpoint."""

    def __post_init__(self) -> None:
        if self.model_channels % self.num_heads or self.model_channels < 6:
            raise ConfigError(
                f"model_channels={self.model_channels} must be >= 6 and divisible by num_heads={self.num_heads}"
            )
        if min(self.resolution, self.in_channels, self.latent_channels, self.window_size) < 1:
            raise ConfigError(f"resolution, in/latent channels and window_size must be >= 1: {self!r}")


class _TransformerBlock(nn.Module):
    """Pre-LN block: h + attn(norm(h)), then h + mlp(norm(h)); the norms run in fp32 without affine."""

    def __init__(self, config: SlatEncoderConfig) -> None:
        super().__init__()
        channels = config.model_channels
        self.attn = SparseSelfAttention(channels, config.num_heads, backend=config.attention_backend)
        self.mlp = Mlp(channels, int(channels * config.mlp_ratio))

    def forward(self, h: Float[Tensor, "N C"], partition: WindowPartition) -> Float[Tensor, "N C"]:
        h = h.to(self.attn.to_qkv.weight.dtype)
        h = h + self.attn(layer_norm_fp32(h, eps=1e-6), partition)
        return h + self.mlp(layer_norm_fp32(h, eps=1e-6))


class SlatEncoder(nn.Module):
    """TRELLIS's SLAT encoder; module names give exactly the released state dict (reference Appendix A).

    Constructed directly, its weights are untrained with the release dtypes (torso float16 when
    `use_fp16`); use `load_slat_encoder` for real weights or `build_random_slat_encoder` for seeded ones.
    """

    def __init__(self, config: SlatEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.random_init_seed: int | None = None  # set for random weights: saving them marks the file
        channels = config.model_channels
        self.input_layer = nn.Linear(config.in_channels, channels)
        self.blocks = nn.ModuleList(_TransformerBlock(config) for _ in range(config.num_blocks))
        self.out_layer = nn.Linear(channels, 2 * config.latent_channels)  # mean | logvar
        self.blocks.to(_release_torso_dtype(config))

    def forward(self, x: SparseTensor) -> SparseTensor:
        """Encode voxel features to latents.

        Args:
            x: (batch, x, y, z) coords on the `resolution`^3 grid and (N, in_channels) features.

        Returns:
            The same coords, in the same row order, with the posterior mean (N, latent_channels) float32.
        """
        config = self.config
        if x.feats.shape[1] != config.in_channels:
            raise ValueError(f"expected {config.in_channels} feature channels, got {x.feats.shape[1]}")
        if bool((x.coords[:, 1:] >= config.resolution).any()):
            raise ValueError(f"voxel coords must lie in [0, {config.resolution})")
        h = self.input_layer(x.feats.to(self.input_layer.weight.dtype))
        h = h + position_embedding(x.coords[:, 1:], config.model_channels)
        # block b attends in windows shifted by W/2 when b is odd; each partition is computed once
        shifts = (0, config.window_size // 2)
        partitions = [window_partition(x.coords, config.window_size, shift) for shift in shifts]
        for b, block in enumerate(self.blocks):
            h = block(h, partitions[b % 2])
        h = F.layer_norm(h.float(), h.shape[1:], eps=1e-5)
        return x.replace(feats=self.out_layer(h)[:, : config.latent_channels])


def build_random_slat_encoder(config: SlatEncoderConfig, *, seed: int) -> SlatEncoder:
    """An encoder with seeded random weights, for tests and the demo (no downloads there).

    Linear layers are Xavier-uniform with zero biases, as TRELLIS initialises them, except `out_layer`:
    TRELLIS zeroes it, which would make every latent zero, so it is drawn from N(0, 0.02^2) instead.
    Saving the result with `save_slat_encoder` marks the file as random (`encoders.weights`).
    """
    model = _uninitialized_slat_encoder(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                weight = torch.empty(module.weight.shape)  # drawn in fp32, so fp16 and fp32 models agree
                if module is model.out_layer:
                    nn.init.normal_(weight, std=0.02, generator=generator)
                else:
                    nn.init.xavier_uniform_(weight, generator=generator)
                module.weight.copy_(weight)
                module.bias.zero_()
    model.random_init_seed = seed
    return model


def save_slat_encoder(model: SlatEncoder, path: str | os.PathLike[str]) -> None:
    """Write `path` (`<dir>/<name>.safetensors`, release dtypes, no metadata) and `<dir>/<name>.json`.

    With the release config the files match the published ones in size (173,242,816 and 321 bytes).
    Random weights (`model.random_init_seed` set) also get the random-init marker; a stale marker of
    earlier random weights at `path` is removed.
    """
    torso_dtype = _release_torso_dtype(model.config)
    dtype_of = lambda name: torso_dtype if name.startswith("blocks.") else torch.float32
    state_dict = {name: t.to("cpu", dtype_of(name)) for name, t in model.state_dict().items()}
    save_checkpoint(
        state_dict, path, trellis_json=_trellis_json(model.config), random_init_seed=model.random_init_seed
    )


def load_slat_encoder(
    reference: str,
    *,
    device: torch.device | str = "cpu",
    attention_backend: AttentionBackend = "auto",
) -> tuple[SlatEncoder, WeightsInfo]:
    """Load an encoder checkpoint strictly, in eval mode, on `device`.

    On CPU the torso is converted to float32 after loading: fp16 matrix products there are slow and
    accumulate visibly worse. On CUDA it stays in the checkpoint's dtypes, as TRELLIS runs it.

    Args:
        reference: a local `<name>.safetensors`, the same path without the suffix (as TRELLIS's
            `pipeline.json` writes `ckpts/<name>`), or a hub id `owner/repo/path/in/repo/<name>`. The
            `<name>.json` beside it gives the config; without it the release config is assumed.
        device: where the model runs.
        attention_backend: window-attention kernel (`encoders.attention`).

    Returns:
        The model and where its weights came from (digest, random-init flag).

    Raises:
        ConfigError: the reference names no local file and is no hub id, the JSON is no SLAT encoder
            config this implementation supports, or the tensors do not fit the config (names listed).

    Examples:
        >>> release = "microsoft/TRELLIS-image-large/ckpts/slat_enc_swin8_B_64l8_fp16"
        >>> model, info = load_slat_encoder(release, device="cuda")  # doctest: +SKIP
    """
    device = torch.device(device)
    state_dict, trellis_json, info, seed = load_checkpoint(reference)
    config = _config_from_json(trellis_json, reference) if trellis_json is not None else SlatEncoderConfig()
    model = _uninitialized_slat_encoder(config.replace(attention_backend=attention_backend))
    check_state_dict(state_dict, expected=model.state_dict(), source=reference)
    model.load_state_dict(state_dict, strict=True)
    model.random_init_seed = seed
    if device.type == "cpu":
        model.blocks.float()
    logger.info(
        "loaded SLAT encoder %s (digest %s, random=%s)", reference, info.digest[:12], info.is_random_init
    )
    return model.to(device).eval(), info


def _uninitialized_slat_encoder(config: SlatEncoderConfig) -> SlatEncoder:
    """A CPU model with allocated but uninitialised tensors, for callers that overwrite every one of them
    (PyTorch's default init of the release model takes a second)."""
    with torch.device("meta"):
        model = SlatEncoder(config)
    return model.to_empty(device="cpu")


def _release_torso_dtype(config: SlatEncoderConfig) -> torch.dtype:
    return torch.float16 if config.use_fp16 else torch.float32


def _trellis_json(config: SlatEncoderConfig) -> dict[str, Any]:
    """TRELLIS's config JSON, keys in its order; an integral mlp_ratio is written as an int, as released."""
    mlp_ratio = config.mlp_ratio
    args = {
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "model_channels": config.model_channels,
        "latent_channels": config.latent_channels,
        "num_blocks": config.num_blocks,
        "num_heads": config.num_heads,
        "mlp_ratio": int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio,
        "attn_mode": _TRELLIS_FIXED_ARGS["attn_mode"],
        "window_size": config.window_size,
        "use_fp16": config.use_fp16,
    }
    return {"name": TRELLIS_NAME, "args": args}


def _config_from_json(trellis_json: dict[str, Any], source: str) -> SlatEncoderConfig:
    return config_from_trellis_json(
        trellis_json,
        SlatEncoderConfig,
        name=TRELLIS_NAME,
        fixed_args=_TRELLIS_FIXED_ARGS,
        ignored_args=_TRELLIS_IGNORED_ARGS,
        source=source,
    )
