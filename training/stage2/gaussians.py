"""Gaussian heads (paper section 3.5): K relightable Gaussians per voxel.

From the intrinsic features (lighting-independent): the centre (voxel centre + tanh(offset) within
`offset_extent` voxels), base colour, roughness, metallic, scale, rotation and opacity (tanh). From the
lighting-aware features: a 48-d colour feature, a lighting-specific scale factor and a shadow value. The
normal is the Gaussian's shortest axis, turned to face the camera; a shallow MLP (ReLU, ELU out) on the NeRF
encoding of the camera-space normal and the colour feature gives the HDR radiance.

Both output layers start at zero, with biases chosen as TRELLIS's Gaussian decoder does (reference section
4.2), so training starts from a sane cloud: Gaussians spread on a Hammersley pattern inside each voxel,
scale 4e-3, identity rotation, opacity 0.1, grey base colour.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from infra.config import FrozenConfig
from infra.errors import ConfigError
from training.stage2.rasterizer import Splats, quaternion_to_matrix

FEATURE_CHANNELS = ("radiance", "base_color", "roughness", "metallic", "shadow")
FEATURE_WIDTHS = {"radiance": 3, "base_color": 3, "roughness": 1, "metallic": 1, "shadow": 1}
"""What every splat carries into the rasterizer, in this order: 9 channels."""
INTRINSIC_LAYOUT = {
    "offset": 3,
    "base_color": 3,
    "roughness": 1,
    "metallic": 1,
    "scale": 3,
    "rotation": 4,
    "opacity": 1,
}


@dataclasses.dataclass(frozen=True)
class GaussianHeadsConfig(FrozenConfig):
    gaussians_per_voxel: int = 32
    color_feature_channels: int = 48
    offset_extent: float = 1.5
    """Centres stay within +-offset_extent / 2 voxels of the voxel centre (TRELLIS's voxel_size)."""
    scale_bias: float = 4e-3
    opacity_init: float = 0.1
    normal_frequencies: int = 4
    radiance_hidden: int = 64
    resolution: int = 64

    def __post_init__(self) -> None:
        if min(self.gaussians_per_voxel, self.color_feature_channels, self.radiance_hidden) < 1:
            raise ConfigError(f"Gaussian head sizes must be >= 1: {self!r}")
        if not 0.0 < self.opacity_init < 1.0:
            raise ConfigError(f"opacity_init must be in (0, 1), got {self.opacity_init}")


@dataclasses.dataclass(frozen=True)
class IntrinsicGaussians:
    """Per voxel (N) and Gaussian (K), in world units; with leading S when padded per sample (`RowGroups.pad`)."""

    centres: Float[Tensor, "*S N K 3"]
    base_color: Float[Tensor, "*S N K 3"]
    roughness: Float[Tensor, "*S N K 1"]
    metallic: Float[Tensor, "*S N K 1"]
    scales: Float[Tensor, "*S N K 3"]
    quats: Float[Tensor, "*S N K 4"]  # (w, x, y, z), unit
    opacities: Float[Tensor, "*S N K"]


@dataclasses.dataclass(frozen=True)
class LightingAttributes:
    color_feature: Float[Tensor, "*S N K F"]
    scale_factor: Float[Tensor, "*S N K 3"]  # in [1/2, 2]
    shadow: Float[Tensor, "*S N K 1"]  # in [0, 1]


def gl_from_cv(x: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3"]:
    """OpenCV camera axes (y down, z forward) to OpenGL/Blender ones (y up, camera looks down -z), as E_dir uses.
    Negates y and z without a host-side constant, so CUDA graphs can capture it."""
    return torch.cat([x[..., :1], -x[..., 1:]], dim=-1)


def nerf_encoding(x: Float[Tensor, "... 3"], frequencies: int) -> Float[Tensor, "... E"]:
    """[x, sin(2^k pi x), cos(2^k pi x)] for k < frequencies: 3 + 6 * frequencies channels."""
    scaled = (
        x[..., None, :]
        * (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype) * math.pi)[:, None]
    )
    return torch.cat([x, scaled.sin().flatten(-2), scaled.cos().flatten(-2)], dim=-1)


def hammersley(count: int) -> Float[Tensor, "K 3"]:
    """`count` well-spread points of [0, 1)^3: (k + 1/2) / K and the base-2 and base-3 radical inverses of k."""

    def radical_inverse(k: int, base: int) -> float:
        value, scale = 0.0, 1.0 / base
        while k:
            value, k, scale = value + (k % base) * scale, k // base, scale / base
        return value

    return torch.tensor(
        [[(k + 0.5) / count, radical_inverse(k, 2), radical_inverse(k, 3)] for k in range(count)]
    )


class IntrinsicHead(nn.Module):
    def __init__(self, channels: int, config: GaussianHeadsConfig) -> None:
        super().__init__()
        self.config = config
        k = config.gaussians_per_voxel
        self.out_layer = nn.Linear(channels, k * sum(INTRINSIC_LAYOUT.values()))
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)
        self.register_buffer(
            "offset_bias", torch.atanh((hammersley(k) * 2 - 1) / config.offset_extent), persistent=False
        )

    def forward(self, h: Float[Tensor, "N C"], coords: Int[Tensor, "N 3"]) -> IntrinsicGaussians:
        config = self.config
        raw = self.out_layer(F.layer_norm(h.float(), h.shape[1:], eps=1e-6).to(h.dtype)).float()
        raw = raw.unflatten(1, (config.gaussians_per_voxel, -1)).split(list(INTRINSIC_LAYOUT.values()), dim=2)
        fields = dict(zip(INTRINSIC_LAYOUT, raw))
        voxel = 1.0 / config.resolution
        centres = (coords.float() + 0.5) * voxel - 0.5  # DESIGN section 4: the grid spans [-0.5, 0.5]^3
        offset = torch.tanh(fields["offset"] + self.offset_bias) * (0.5 * config.offset_extent * voxel)
        opacity_bias = math.atanh(2 * config.opacity_init - 1)
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=h.device)
        return IntrinsicGaussians(
            centres=centres[:, None] + offset,
            base_color=torch.sigmoid(fields["base_color"]),
            roughness=torch.sigmoid(fields["roughness"]),
            metallic=torch.sigmoid(fields["metallic"]),
            scales=F.softplus(fields["scale"] + math.log(math.expm1(config.scale_bias))),
            quats=F.normalize(fields["rotation"] + identity, dim=-1),
            opacities=0.5 * (1 + torch.tanh(fields["opacity"][..., 0] + opacity_bias)),
        )


class LightingHead(nn.Module):
    def __init__(self, channels: int, config: GaussianHeadsConfig) -> None:
        super().__init__()
        self.config = config
        self.widths = [config.color_feature_channels, 3, 1]
        self.out_layer = nn.Linear(channels, config.gaussians_per_voxel * sum(self.widths))
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, h: Float[Tensor, "N C"]) -> LightingAttributes:
        raw = self.out_layer(F.layer_norm(h.float(), h.shape[1:], eps=1e-6).to(h.dtype)).float()
        feature, scale, shadow = raw.unflatten(1, (self.config.gaussians_per_voxel, -1)).split(
            self.widths, dim=2
        )
        return LightingAttributes(feature, 2.0 ** torch.tanh(scale), torch.sigmoid(shadow))


class RadianceMlp(nn.Module):
    """HDR radiance of a Gaussian from its camera-space normal and colour feature; ELU + 1 keeps it >= 0."""

    def __init__(self, config: GaussianHeadsConfig) -> None:
        super().__init__()
        self.frequencies = config.normal_frequencies
        inputs = 3 + 6 * config.normal_frequencies + config.color_feature_channels
        self.mlp = nn.Sequential(
            nn.Linear(inputs, config.radiance_hidden),
            nn.ReLU(),
            nn.Linear(config.radiance_hidden, config.radiance_hidden),
            nn.ReLU(),
            nn.Linear(config.radiance_hidden, 3),
        )

    def forward(
        self, normal: Float[Tensor, "... 3"], feature: Float[Tensor, "... F"]
    ) -> Float[Tensor, "... 3"]:
        return F.elu(self.mlp(torch.cat([nerf_encoding(normal, self.frequencies), feature], dim=-1))) + 1.0


def camera_normals(
    gaussians: IntrinsicGaussians, w2c: Float[Tensor, "*S 4 4"]
) -> Float[Tensor, "*S N K 3"]:  # fmt: skip
    """Each Gaussian's shortest axis in OpenGL camera space, flipped to face the camera. Batched: the Gaussians of
    sample s (padded to a common N) go with camera s."""
    rotation = quaternion_to_matrix(gaussians.quats)  # (*S, N, K, 3, 3), columns are the axes
    shortest = gaussians.scales.argmin(dim=-1)  # (*S, N, K)
    normal_world = torch.take_along_dim(
        rotation, shortest[..., None, None].expand(*shortest.shape, 3, 1), dim=-1
    )[..., 0]
    R, t = w2c[..., None, :3, :3].transpose(-1, -2), w2c[..., None, None, :3, 3]  # broadcast over N (and K)
    normal = gl_from_cv(normal_world @ R)
    position = gl_from_cv(gaussians.centres @ R + t)  # the camera sits at the origin
    facing = torch.where(((normal * position).sum(-1, keepdim=True) > 0), -1.0, 1.0)
    return normal * facing


def splats_for_view(
    gaussians: IntrinsicGaussians, lighting: LightingAttributes, radiance_mlp: RadianceMlp, w2c: Float[Tensor, "*S 4 4"]
) -> Splats:  # fmt: skip
    """The Gaussians of one (view, lighting) sample, flattened to N * K splats with FEATURE_CHANNELS; or of S
    samples at once, each padded to N voxels (padding of zero opacity, which the rasterizer skips)."""
    radiance = radiance_mlp(camera_normals(gaussians, w2c), lighting.color_feature)
    features = torch.cat(
        [radiance, gaussians.base_color, gaussians.roughness, gaussians.metallic, lighting.shadow], dim=-1
    )
    return Splats(
        means=gaussians.centres.flatten(-3, -2),
        quats=gaussians.quats.flatten(-3, -2),
        scales=(gaussians.scales * lighting.scale_factor).flatten(-3, -2),
        opacities=gaussians.opacities.flatten(-2),
        features=features.flatten(-3, -2),
    )
