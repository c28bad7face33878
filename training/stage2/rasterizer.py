"""Splatting 3-D Gaussians into images, behind one adapter with two backends (reference section 1.4).

- `gsplat`: `gsplat.rasterization` (CUDA only; its kernels JIT-compile on first use).
- `torch`: a dense pure-torch reference for small scenes on any device: EWA projection, then every pixel
  blends every Gaussian front to back with gsplat's rules, so the two agree to float tolerance:
  alpha = min(0.999, o exp(-sigma)) at pixel centres (j + 0.5, i + 0.5), Gaussians with sigma < 0 or
  alpha < 1/255 skipped, blending stopped before the transmittance would fall to 1e-4, eps2d added to the
  projected covariance, Gaussians nearer than `near_plane` culled. Like gsplat it works in 16 x 16 tiles, each
  blending only the Gaussians whose opacity-aware extent reaches it; each tile is dense, O(256 N_tile) memory.
- `auto`: `gsplat` on CUDA tensors, else `torch`.

Batched: S cameras, each with its own set of N Gaussians (`*S` leading axes), render in one gsplat call (its
batched-scene mode: means (S, N, 3) with viewmats (S, 1, 4, 4)); the reference renders them one at a time. Sets of
different sizes are padded to a common N with zero-opacity Gaussians, which both backends skip (alpha < 1/255).

Channels are arbitrary post-activation features (radiance, PBR maps, shadow), blended with the same weights;
images come out on a black background (premultiplied), as the factory's renders are stored.
"""

import dataclasses
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from infra.errors import ConfigError

RasterBackend = Literal["auto", "gsplat", "torch"]
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4
TILE = 16


@dataclasses.dataclass(frozen=True)
class Camera:
    """One pinhole camera, or a batch of S, in OpenCV convention (x right, y down, z forward)."""

    w2c: Float[Tensor, "*S 4 4"]
    K: Float[Tensor, "*S 3 3"]  # pixel units
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Splats:
    """N Gaussians with post-activation attributes, in world units; S sets of N for a batch of S cameras."""

    means: Float[Tensor, "*S N 3"]
    quats: Float[Tensor, "*S N 4"]  # (w, x, y, z), normalised inside
    scales: Float[Tensor, "*S N 3"]  # standard deviations along the rotated axes
    opacities: Float[Tensor, "*S N"]
    features: Float[Tensor, "*S N D"]


def rasterize(
    splats: Splats,
    camera: Camera,
    *,
    backend: RasterBackend = "auto",
    eps2d: float = 0.3,
    near_plane: float = 0.01,
) -> tuple[Float[Tensor, "*S H W D"], Float[Tensor, "*S H W 1"]]:
    """Blend `splats` into `camera`'s image: (features, alpha), features premultiplied (black background). With a
    batch of S cameras, splat set s goes into camera s's image.

    Raises:
        ConfigError: unknown backend, or `gsplat` asked for on tensors that are not on CUDA.
    """
    if backend not in get_args(RasterBackend):
        raise ConfigError(f"unknown rasterizer backend {backend!r}; choose one of {get_args(RasterBackend)}")
    if backend == "auto":
        backend = "gsplat" if splats.means.is_cuda else "torch"
    if backend == "gsplat":
        if not splats.means.is_cuda:
            raise ConfigError(
                f"the gsplat rasterizer needs CUDA tensors, got tensors on {splats.means.device}"
            )
        return _rasterize_gsplat(splats, camera, eps2d=eps2d, near_plane=near_plane)
    if camera.w2c.ndim == 2:
        return _rasterize_torch(splats, camera, eps2d=eps2d, near_plane=near_plane)
    images, alphas = zip(*(
        _rasterize_torch(_index(splats, s), _index(camera, s), eps2d=eps2d, near_plane=near_plane)
        for s in range(camera.w2c.shape[0])
    ))  # fmt: skip
    return torch.stack(images), torch.stack(alphas)


def _index(fields: Splats | Camera, s: int) -> Splats | Camera:
    tensors = {f.name: getattr(fields, f.name) for f in dataclasses.fields(fields)}
    return dataclasses.replace(fields, **{k: v[s] for k, v in tensors.items() if isinstance(v, Tensor)})


def _rasterize_gsplat(
    splats: Splats, camera: Camera, *, eps2d: float, near_plane: float
) -> tuple[Float[Tensor, "*S H W D"], Float[Tensor, "*S H W 1"]]:
    import gsplat  # CUDA only; imported here so CPU machines never trigger its JIT build

    features, alphas, _ = gsplat.rasterization(  # one camera per splat set: (*S, 1, H, W, D)
        splats.means.float().contiguous(),
        splats.quats.float().contiguous(),
        splats.scales.float().contiguous(),
        splats.opacities.float().contiguous(),
        splats.features.float().contiguous(),
        camera.w2c.float()[..., None, :, :].contiguous(),
        camera.K.float()[..., None, :, :].contiguous(),
        camera.width,
        camera.height,
        near_plane=near_plane,
        eps2d=eps2d,
        packed=False,
    )
    return features.squeeze(-4), alphas.squeeze(-4)


def quaternion_to_matrix(quats: Float[Tensor, "... 4"]) -> Float[Tensor, "... 3 3"]:
    """Rotation matrices of (w, x, y, z) quaternions, normalised first."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def _rasterize_torch(
    splats: Splats, camera: Camera, *, eps2d: float, near_plane: float
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    R, t = camera.w2c[:3, :3], camera.w2c[:3, 3]
    means_cam = splats.means @ R.T + t  # (N, 3)
    rotation = quaternion_to_matrix(splats.quats)
    covariance = rotation @ torch.diag_embed(splats.scales**2) @ rotation.transpose(1, 2)  # (N, 3, 3) world
    covariance_cam = R @ covariance @ R.T
    x, y, z = means_cam.unbind(-1)
    fx, fy, cx, cy = camera.K[0, 0], camera.K[1, 1], camera.K[0, 2], camera.K[1, 2]
    visible = z > near_plane
    z = torch.where(visible, z, torch.ones_like(z))
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(  # (N, 2, 3): d(pixel) / d(camera point)
        [torch.stack([fx / z, zeros, -fx * x / z**2], -1), torch.stack([zeros, fy / z, -fy * y / z**2], -1)],
        -2,
    )
    cov2d = jacobian @ covariance_cam @ jacobian.transpose(1, 2) + eps2d * torch.eye(2, device=z.device)
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = a * c - b * b
    visible = visible & (det > 0)
    det = torch.where(visible, det, torch.ones_like(det))
    conic = torch.stack([c / det, -b / det, a / det], -1)  # inverse covariance (xx, xy, yy)
    center = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # (N, 2)

    order = torch.argsort(torch.where(visible, means_cam[:, 2], torch.inf))
    order = order[visible[order]]  # front to back
    # gsplat's opacity-aware extent: beyond it alpha < 1/255, so a Gaussian only touches the tiles it reaches
    extent = torch.sqrt(2 * torch.log((splats.opacities[order] / ALPHA_MIN).clamp(min=1.0))).clamp(max=3.33)
    radius = extent[:, None] * torch.sqrt(torch.stack([a, c], -1)[order])  # (M, 2) in pixels
    center, conic = center[order], conic[order]
    features, opacities = splats.features[order], splats.opacities[order]
    image = z.new_zeros(camera.height, camera.width, splats.features.shape[1])
    coverage = z.new_zeros(camera.height, camera.width, 1)
    for top in range(0, camera.height, TILE):
        for left in range(0, camera.width, TILE):
            rows, cols = (
                slice(top, min(top + TILE, camera.height)),
                slice(left, min(left + TILE, camera.width)),
            )
            low = z.new_tensor([left, top])
            high = z.new_tensor([cols.stop, rows.stop])
            touches = ((center + radius > low) & (center - radius < high)).all(-1)
            image[rows, cols], coverage[rows, cols] = _blend_tile(
                rows, cols, center[touches], conic[touches], opacities[touches], features[touches]
            )
    return image, coverage


def _blend_tile(
    rows: slice, cols: slice, center: Float[Tensor, "M 2"], conic: Float[Tensor, "M 3"], opacities: Float[Tensor, " M"],
    features: Float[Tensor, "M D"],
) -> tuple[Float[Tensor, "h w D"], Float[Tensor, "h w 1"]]:  # fmt: skip
    """Front-to-back blending of depth-sorted Gaussians at the centres of one tile's pixels."""
    ys = torch.arange(rows.start, rows.stop, device=center.device) + 0.5
    xs = torch.arange(cols.start, cols.stop, device=center.device) + 0.5
    pixels = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # (P, 2) as (x, y)
    delta = pixels[:, None, :] - center[None]  # (P, M, 2)
    cxx, cxy, cyy = conic.unbind(-1)
    sigma = 0.5 * (cxx * delta[..., 0] ** 2 + cyy * delta[..., 1] ** 2) + cxy * delta[..., 0] * delta[..., 1]
    alpha = torch.clamp(opacities * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    transmittance = torch.cumprod(F.pad(1 - alpha, (1, 0), value=1.0), dim=1)  # (P, M + 1), T before each
    # gsplat stops at the first Gaussian after which T would drop to 1e-4 and does not blend it
    alive = torch.cumprod((transmittance[:, 1:] > TRANSMITTANCE_MIN).to(alpha.dtype), dim=1)
    weights = transmittance[:, :-1] * alpha * alive  # (P, M)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    return (weights @ features).reshape(*shape, -1), weights.sum(1, keepdim=True).reshape(*shape, 1)
