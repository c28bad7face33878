"""Environment-map inputs of the lighting tokenizer: E_ldr, E_log and E_dir (paper section 3.5).

- E_ldr: extended Reinhard (white point 16) then the sRGB OETF: what the map looks like.
- E_log: log(1 + E) / log(1 + 10^4), one fixed normaliser for every map, so absolute intensity survives (a
  per-map maximum would make a dim map and a bright one look alike).
- E_dir: the camera-space direction each texel's light comes from. Texels follow DESIGN section 4's Blender
  equirectangular convention in the Z-up world (u = 0.5 - atan2(y, x) / 2 pi, v = acos(z) / pi); a map recorded
  with yaw theta shows the unrotated map's texel m at world direction R_z(theta) m (render_jobs.lighting). So
  rotating the lighting changes E_dir only; E_ldr and E_log are the stored map's pixels.
"""

import dataclasses
import math

import torch
from jaxtyping import Float
from torch import Tensor

from encoders.dinov2 import srgb_encode

REINHARD_WHITE = 16.0
LOG_NORMALIZER = math.log1p(1e4)


@dataclasses.dataclass(frozen=True)
class EnvMapEncoding:
    ldr: Float[Tensor, "3 H W"]
    log: Float[Tensor, "3 H W"]
    direction: Float[Tensor, "3 H W"]  # unit vectors, camera space (OpenGL: the camera looks down -Z)


def equirect_directions(
    height: int, width: int, *, device: torch.device | None = None
) -> Float[Tensor, "H W 3"]:
    """World (Z-up) direction of each texel centre: the inverse of u = 0.5 - atan2(y, x) / 2 pi, v = acos(z) / pi."""
    u = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    azimuth = 2 * math.pi * (0.5 - u)  # atan2(y, x)
    polar = math.pi * v  # acos(z)
    sin_polar = polar.sin()[:, None]
    direction = torch.stack(
        [
            sin_polar * azimuth.cos()[None],
            sin_polar * azimuth.sin()[None],
            polar.cos()[:, None].expand(-1, width),
        ],
        dim=-1,
    )
    return direction.float()


def yaw_matrix(yaw_rad: float) -> Float[Tensor, "3 3"]:
    c, s = math.cos(yaw_rad), math.sin(yaw_rad)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def encode_env_map(
    hdr: Float[Tensor, "H W 3"], *, yaw_rad: float, c2w: Float[Tensor, "4 4"]
) -> EnvMapEncoding:  # fmt: skip
    """The three encodings of a linear HDR map (as stored, unrotated) lit with `yaw_rad`, seen from camera `c2w`
    (Blender/OpenGL camera-to-world)."""
    hdr = hdr.clamp_min(0.0).float()
    reinhard = hdr * (1 + hdr / REINHARD_WHITE**2) / (1 + hdr)
    world = equirect_directions(*hdr.shape[:2], device=hdr.device) @ yaw_matrix(yaw_rad).to(hdr.device).t()
    camera = world @ c2w[:3, :3].to(hdr.device, torch.float32)  # R^T d for each row d
    return EnvMapEncoding(
        ldr=srgb_encode(reinhard).permute(2, 0, 1),
        log=(torch.log1p(hdr) / LOG_NORMALIZER).permute(2, 0, 1),
        direction=camera.permute(2, 0, 1),
    )
