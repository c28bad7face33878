"""The Stage 2 model: LH-SLAT + camera + environment map -> relightable Gaussians -> rendered buffers.

A batch holds A assets and S samples (one view under one lighting each); `sample_asset[s]` says which asset
sample s shows. The intrinsic part (decoder, intrinsic head) runs once per asset; the lighting tokenizer, the
view embedding, the Lighting Aware Decoder, the lighting head, the radiance MLP and the rasterizer run per
sample. So several views of one asset in a batch share their intrinsic pass, and rendering a new view or
lighting of a decoded asset costs only the per-sample part.
"""

import dataclasses
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from encoders.sparse import SparseTensor
from infra.config import FrozenConfig
from training.stage2.decoders import DecoderConfig, IntrinsicAwareDecoder, LightingAwareDecoder, ViewEmbedding
from training.stage2.gaussians import (
    FEATURE_CHANNELS,
    FEATURE_WIDTHS,
    GaussianHeadsConfig,
    IntrinsicGaussians,
    IntrinsicHead,
    LightingAttributes,
    LightingHead,
    RadianceMlp,
    splats_for_view,
)
from training.stage2.lighting_tokenizer import LightingTokenizer, LightingTokenizerConfig
from training.stage2.rasterizer import Camera, RasterBackend, rasterize


@dataclasses.dataclass(frozen=True)
class Stage2ModelConfig(FrozenConfig):
    """Defaults are the paper's sizes: 12 + 6 blocks of width 768, 16 registers, 4096 lighting tokens."""

    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    tokenizer: LightingTokenizerConfig = dataclasses.field(default_factory=LightingTokenizerConfig)
    heads: GaussianHeadsConfig = dataclasses.field(default_factory=GaussianHeadsConfig)
    rasterizer: RasterBackend = "auto"


@dataclasses.dataclass(frozen=True)
class Stage2Inputs:
    slat: SparseTensor  # (N, C_in) normalised latents of A assets, coords (asset, x, y, z)
    sample_asset: Int[Tensor, " S"]
    w2c: Float[Tensor, "S 4 4"]  # OpenCV world-to-camera
    K: Float[Tensor, "S 3 3"]  # pixel intrinsics
    env_ldr: Float[Tensor, "S 3 He We"]
    env_log: Float[Tensor, "S 3 He We"]
    env_dir: Float[Tensor, "S 3 He We"]
    image_size: tuple[int, int]  # (H, W)

    def to(self, device: torch.device) -> "Stage2Inputs":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        slat = SparseTensor(self.slat.coords.to(device), self.slat.feats.to(device))
        return dataclasses.replace(self, slat=slat, **moved)


@dataclasses.dataclass(frozen=True)
class Stage2Render:
    """Per sample, premultiplied on black: HDR radiance and the PBR and shadow buffers, plus alpha."""

    radiance: Float[Tensor, "S H W 3"]
    base_color: Float[Tensor, "S H W 3"]
    roughness: Float[Tensor, "S H W 1"]
    metallic: Float[Tensor, "S H W 1"]
    shadow: Float[Tensor, "S H W 1"]
    alpha: Float[Tensor, "S H W 1"]
    scales: Float[Tensor, "M 3"]  # every rendered Gaussian of every sample, for the regularizers
    opacities: Float[Tensor, " M"]

    def sample(self, index: int) -> "Stage2Render":
        """The images of sample `index` alone (S = 1); the Gaussians' scales and opacities stay whole."""
        images = ("radiance", "base_color", "roughness", "metallic", "shadow", "alpha")
        return dataclasses.replace(self, **{name: getattr(self, name)[index : index + 1] for name in images})


def take(fields: Any, index: Tensor) -> Any:
    """The same dataclass with every tensor field indexed by `index` along its first axis."""
    return dataclasses.replace(
        fields, **{f.name: getattr(fields, f.name)[index] for f in dataclasses.fields(fields)}
    )


class Stage2Model(nn.Module):
    def __init__(self, config: Stage2ModelConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.decoder.model_channels
        self.tokenizer = LightingTokenizer(config.tokenizer)
        self.intrinsic_decoder = IntrinsicAwareDecoder(config.decoder)
        self.view_embedding = ViewEmbedding(config.decoder)
        self.lighting_decoder = LightingAwareDecoder(config.decoder, config.tokenizer.width)
        self.intrinsic_head = IntrinsicHead(channels, config.heads)
        self.lighting_head = LightingHead(channels, config.heads)
        self.radiance_mlp = RadianceMlp(config.heads)

    def decode_intrinsic(
        self, slat: SparseTensor
    ) -> tuple[Float[Tensor, "N C"], Float[Tensor, "A R C"], IntrinsicGaussians]:  # fmt: skip
        """Once per asset: intrinsic features, registers and the lighting-independent Gaussian attributes."""
        features, registers = self.intrinsic_decoder(slat)
        return features, registers, self.intrinsic_head(features, slat.coords[:, 1:])

    def decode_lighting(
        self, inputs: Stage2Inputs, features: Float[Tensor, "N C"], registers: Float[Tensor, "A R C"]
    ) -> tuple[Int[Tensor, " M"], list[int], LightingAttributes]:  # fmt: skip
        """Per sample: the rows of `features` it uses (grouped by sample), their counts, and its lighting-aware
        attributes."""
        coords = inputs.slat.coords
        counts = torch.bincount(coords[:, 0].long(), minlength=registers.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        rows = [int(counts[a]) for a in inputs.sample_asset.tolist()]
        gather = torch.cat([torch.arange(int(starts[a]), int(starts[a]) + n, device=coords.device)
                            for a, n in zip(inputs.sample_asset.tolist(), rows)])  # fmt: skip
        sample_of_row = torch.repeat_interleave(
            torch.arange(len(rows), device=coords.device), torch.tensor(rows, device=coords.device)
        )
        tokens = self.tokenizer(inputs.env_ldr, inputs.env_log, inputs.env_dir)  # (S, L, C_l)
        h = features[gather] + self.view_embedding(coords[gather, 1:], inputs.w2c[sample_of_row]).to(
            features.dtype
        )
        h = self.lighting_decoder(h, tokens.to(h.dtype), registers[inputs.sample_asset], rows)
        return gather, rows, self.lighting_head(h)

    def forward(self, inputs: Stage2Inputs) -> Stage2Render:
        features, registers, gaussians = self.decode_intrinsic(inputs.slat)
        gather, rows, lighting = self.decode_lighting(inputs, features, registers)
        return self.render(inputs, take(gaussians, gather), lighting, rows)

    def render(
        self, inputs: Stage2Inputs, gaussians: IntrinsicGaussians, lighting: LightingAttributes, rows: list[int]
    ) -> Stage2Render:  # fmt: skip
        """Rasterize each sample's Gaussians (rows grouped by sample) in float32."""
        height, width = inputs.image_size
        images, alphas, scales, opacities = [], [], [], []
        for s, (sample_gaussians, sample_lighting) in enumerate(
            zip(_split(gaussians, rows), _split(lighting, rows))
        ):
            w2c = inputs.w2c[s].float()
            splats = splats_for_view(sample_gaussians, sample_lighting, self.radiance_mlp, w2c)
            camera = Camera(w2c=w2c, K=inputs.K[s].float(), width=width, height=height)
            image, alpha = rasterize(splats, camera, backend=self.config.rasterizer)
            images.append(image)
            alphas.append(alpha)
            scales.append(splats.scales)
            opacities.append(splats.opacities)
        buffers = torch.stack(images).split([FEATURE_WIDTHS[name] for name in FEATURE_CHANNELS], dim=-1)
        return Stage2Render(
            **dict(zip(FEATURE_CHANNELS, buffers)),
            alpha=torch.stack(alphas),
            scales=torch.cat(scales),
            opacities=torch.cat(opacities),
        )


def _split(fields: Any, rows: list[int]) -> list[Any]:
    pieces = {f.name: getattr(fields, f.name).split(rows) for f in dataclasses.fields(fields)}
    return [
        dataclasses.replace(fields, **{name: parts[i] for name, parts in pieces.items()})
        for i in range(len(rows))
    ]
