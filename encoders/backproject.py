"""Back-projection of per-view feature maps into an asset's voxels (DESIGN section 6).

Every voxel centre is projected into every view with the recorded cameras, the view's feature map is sampled
there bilinearly (`grid_sample`, `align_corners=False`, zero padding, so a sample centre sits at the centre of
its patch) and the samples are averaged over views: TRELLIS's plain mean, which the released encoder expects,
counts occluded and out-of-frame views too (the latter as zeros). With `use_visibility` only views whose
rendered depth shows the voxel at the surface count.

TRELLIS materialises all (views x voxels x channels) samples at once (12 GB for 20K voxels); here views and
voxels are processed in chunks whose sampled block stays under `chunk_budget_mb`, accumulating in float32.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from encoders.voxelize import voxel_centers
from infra.config import FrozenConfig
from render_jobs.cameras import opencv_intrinsics, opencv_w2c


@dataclasses.dataclass(frozen=True)
class BackprojectConfig(FrozenConfig):
    """How features are gathered from the views; part of the features step's spec hash."""

    use_visibility: bool = False
    """Average only over views where the voxel is at the visible surface (depth test against the rendered
    depth); off for compatibility with the released encoder, which was trained on plain means."""
    depth_tolerance_voxels: float = 1.0
    """A voxel centre counts as visible up to this many voxel diagonals behind the rendered depth."""
    chunk_budget_mb: int = 256
    """Bound on the float32 block of sampled features (views x voxels x channels) held at once."""
    resolution: int = 64

    def __post_init__(self) -> None:
        if self.chunk_budget_mb < 1 or self.depth_tolerance_voxels < 0:
            raise ValueError(f"invalid {self!r}: chunk_budget_mb >= 1 and depth_tolerance_voxels >= 0 needed")


@dataclasses.dataclass(frozen=True)
class Cameras:
    """Pinhole cameras in OpenCV convention (x right, y down, looking down +z) with normalized intrinsics."""

    w2c: Float[Tensor, "V 4 4"]
    Ks: Float[Tensor, "V 3 3"]  # the image spans [0, 1]^2: f = 0.5 / tan(fov / 2), c = (0.5, 0.5)

    @classmethod
    def from_blender(
        cls, c2w: np.ndarray, fov_rad: np.ndarray, *, device: torch.device | None = None
    ) -> "Cameras":
        """From `transforms.json` frames: Blender/OpenGL camera-to-world (V, 4, 4) and horizontal FOV (V,).

        The conversion is `render_jobs.cameras`'s, the one every part of the project uses.
        """
        w2c = np.stack([opencv_w2c(m) for m in c2w])
        Ks = np.stack([opencv_intrinsics(float(fov), 1) for fov in fov_rad])
        return cls(
            torch.tensor(w2c, dtype=torch.float32, device=device),
            torch.tensor(Ks, dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return self.w2c.shape[0]


def project_points(
    points: Float[Tensor, "N 3"], cameras: Cameras
) -> tuple[Float[Tensor, "V N 2"], Float[Tensor, "V N"]]:
    """Normalized image coordinates (u right, v down, [0, 1] inside the image) and camera-axis depth."""
    cam = torch.einsum("vij,nj->vni", cameras.w2c[:, :3, :3], points) + cameras.w2c[:, None, :3, 3]
    depth = cam[..., 2]
    pix = torch.einsum("vij,vnj->vni", cameras.Ks, cam)
    return pix[..., :2] / depth[..., None], depth


@torch.inference_mode()
def backproject(
    feature_maps: Float[Tensor, "V C h w"],
    coords: Int[Tensor, "N 3"],
    cameras: Cameras,
    *,
    config: BackprojectConfig = BackprojectConfig(),
    depth_maps: Float[Tensor, "V H W"] | None = None,
) -> Float[Tensor, "N C"]:
    """Mean over views of each voxel centre's bilinear sample of the feature maps (float32).

    Args:
        feature_maps: per-view features, row 0 at the top of the image (any float dtype).
        coords: voxel indices (x, y, z) on the `config.resolution` grid.
        cameras: one camera per view.
        depth_maps: rendered camera-axis depth (0 on background); required when `config.use_visibility`.
    """
    if len(cameras) != feature_maps.shape[0]:
        raise ValueError(f"{feature_maps.shape[0]} feature maps but {len(cameras)} cameras")
    if config.use_visibility and depth_maps is None:
        raise ValueError("use_visibility needs the rendered depth maps")
    device, (num_views, channels) = feature_maps.device, feature_maps.shape[:2]
    points = voxel_centers(coords.to(device), resolution=config.resolution)
    cameras = Cameras(cameras.w2c.to(device), cameras.Ks.to(device))
    sums = torch.zeros((len(points), channels), dtype=torch.float32, device=device)
    view_counts = torch.zeros(len(points), dtype=torch.float32, device=device)
    views_per_chunk = max(1, min(num_views, 8))
    voxels_per_chunk = max(1, (config.chunk_budget_mb << 20) // (4 * channels * views_per_chunk))
    tolerance = config.depth_tolerance_voxels * math.sqrt(3.0) / config.resolution
    for v0 in range(0, num_views, views_per_chunk):
        views = slice(v0, v0 + views_per_chunk)
        maps = feature_maps[views].float()
        chunk_cameras = Cameras(cameras.w2c[views], cameras.Ks[views])
        for n0 in range(0, len(points), voxels_per_chunk):
            voxels = slice(n0, n0 + voxels_per_chunk)
            uv, depth = project_points(points[voxels], chunk_cameras)
            grid = (2.0 * uv - 1.0).unsqueeze(1)  # (v, 1, n, 2), x = u = column, y = v = row
            samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            samples = samples[:, :, 0].transpose(1, 2)  # (v, n, C)
            if config.use_visibility:
                weights = _visible(uv, depth, depth_maps[views].to(device).float(), tolerance).float()
                sums[voxels] += torch.einsum("vn,vnc->nc", weights, samples)
                view_counts[voxels] += weights.sum(0)
            else:
                sums[voxels] += samples.sum(0)
    if not config.use_visibility:
        view_counts.fill_(num_views)
    return sums / view_counts.clamp_min(1.0)[:, None]


def _visible(
    uv: Float[Tensor, "v n 2"],
    depth: Float[Tensor, "v n"],
    depth_maps: Float[Tensor, "v H W"],
    tolerance: float,
) -> Tensor:
    """Projects onto the rendered surface (not background) and is not behind it.

    A voxel centre lies up to half a voxel diagonal off the surface, so the test allows `tolerance`.
    """
    grid = (2.0 * uv - 1.0).unsqueeze(1)
    surface = F.grid_sample(
        depth_maps[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0, 0]
    return (surface > 0) & (depth > 0) & (depth <= surface + tolerance)
