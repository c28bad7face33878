"""The Gaussians of one (view, lighting) sample as a standard 3D Gaussian Splatting PLY, for splat viewers.

The file follows the INRIA `gaussian-splatting` layout that SuperSplat, gsplat, nerfstudio, GaussianSplats3D
and Spark read: one binary little-endian `vertex` element of float32 properties, in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  [f_rest_0 .. f_rest_{3((d+1)^2-1)-1}]  opacity
    scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3

- `x y z`: the centre, in the factory's world frame (DESIGN section 4: Blender world, Z up, the asset inside
  [-0.5, 0.5]^3, its front towards -Y). Many viewers take +Y as up, so a Z-up file lies on its back there;
  `up_axis` rotates the whole cloud explicitly (never silently), and the header's comment records which frame
  the file is in.
- `nx ny nz`: zeros, as the INRIA files carry them; viewers ignore them.
- `f_dc_*`: the colour as a degree-0 spherical-harmonics coefficient, `(rgb - 0.5) / C0`, so a viewer's SH0
  evaluation `0.5 + C0 f_dc` gives back `rgb`. `rgb` is the Gaussian's HDR radiance for this view and lighting
  tone-mapped with the project's AgX (display sRGB in [0, 1]). A viewer blends these display colours, while
  NeAR blends the HDR radiance and tone-maps the blended pixel; AgX is not linear, so where several Gaussians
  mix the two differ slightly, and the baked colour is right for the exported view and lighting only.
- `f_rest_*`: none by default (`sh_degree=0`): the radiance is baked for one view, so higher bands would be
  zeros, and the viewers above read degree-0 files. INRIA's own SIBR viewer is hard-coded to degree 3:
  `sh_degree=3` pads the 45 zero coefficients it expects.
- `opacity`: the logit of the opacity; `scale_*`: the log of the standard deviations along the Gaussian's
  axes; `rot_*`: the unit rotation quaternion (w, x, y, z).
"""

import logging
import math
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import plyfile
import torch
from torch import Tensor

from infra.errors import ConfigError, Reason, StepFailed
from training.stage2.agx import AgX
from training.stage2.gaussians import FEATURE_CHANNELS, FEATURE_WIDTHS
from training.stage2.rasterizer import ALPHA_MIN, Splats

logger = logging.getLogger(__name__)

__all__ = ["SH_C0", "UpAxis", "ply_property_names", "splat_records", "write_3dgs_ply"]

SH_C0 = 0.28209479177387814
"""The degree-0 real spherical harmonic, 1 / (2 sqrt(pi))."""
UpAxis = Literal["+z", "+y", "-y"]
"""The world axis that is up in the written file:
- `+z`: the factory's frame as is (Blender, Z up, the asset's front towards -Y).
- `+y`: turned -90 degrees about X, (x, y, z) -> (x, z, -y): Y up with the front towards +Z, as glTF and
  three.js-based viewers expect (what Blender's glTF exporter writes).
- `-y`: turned +90 degrees about X, (x, y, z) -> (x, -z, y): Y down with the front towards -Z, as scenes
  trained by the INRIA code on COLMAP (OpenCV-frame) reconstructions often are; for viewers tuned to those.
"""
_UP_ROTATIONS = {  # (rotation matrix, the same rotation as a (w, x, y, z) quaternion)
    "+z": (((1, 0, 0), (0, 1, 0), (0, 0, 1)), (1.0, 0.0, 0.0, 0.0)),
    "+y": (((1, 0, 0), (0, 0, 1), (0, -1, 0)), (math.sqrt(0.5), -math.sqrt(0.5), 0.0, 0.0)),
    "-y": (((1, 0, 0), (0, 0, -1), (0, 1, 0)), (math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0)),
}
_OPACITY_EPS = 1e-6
"""Opacities are clamped to [eps, 1 - eps] before the logit, so 0 and 1 stay finite (|logit| <= 13.8)."""
_SCALE_MIN = 1e-12
_MAX_SH_DEGREE = 3


def ply_property_names(sh_degree: int = 0) -> list[str]:
    """The vertex properties of a 3DGS PLY, in file order.

    Examples:
        >>> ply_property_names()[:9]
        ['x', 'y', 'z', 'nx', 'ny', 'nz', 'f_dc_0', 'f_dc_1', 'f_dc_2']
        >>> len(ply_property_names(3)), ply_property_names(3)[9], ply_property_names(3)[53]
        (62, 'f_rest_0', 'f_rest_44')
    """
    if sh_degree not in range(_MAX_SH_DEGREE + 1):
        raise ConfigError(f"sh_degree must be 0, 1, 2 or 3, got {sh_degree!r}")
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return [
        *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"),
        *(f"f_rest_{i}" for i in range(rest)),
        *("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"),
    ]


@torch.no_grad()
def splat_records(
    splats: Splats,
    agx: AgX,
    *,
    min_opacity: float = ALPHA_MIN,
    up_axis: UpAxis = "+z",
    sh_degree: int = 0,
) -> np.ndarray:  # structured (G,) of float32 fields named by ply_property_names(sh_degree)
    """The PLY vertex records of one sample's splats: pure, no I/O.

    Args:
        splats: one sample's N Gaussians, as `splats_for_view` makes them: `features` (N, D) start with the
            HDR radiance (3 channels, FEATURE_CHANNELS order); the other channels are not exported.
        agx: the tone mapper that turns the radiance into the display colours a viewer shows.
        min_opacity: Gaussians with a lower opacity are dropped. The default, 1/255, loses nothing NeAR
            renders: the rasterizer skips any alpha below it, and alpha never exceeds the opacity. 0 keeps
            all.
        up_axis: the world axis that is up in the file (see `UpAxis`); the centres and rotations are turned.
        sh_degree: 0 writes no `f_rest_*`; 1 to 3 pad the higher bands with zeros.

    Returns:
        G <= N records, in the input order of the Gaussians kept.

    Raises:
        ConfigError: bad shapes, an unknown `up_axis`, `sh_degree` or `min_opacity` outside [0, 1).
        StepFailed: (NON_FINITE) a kept Gaussian has a non-finite attribute.
    """
    names = ply_property_names(sh_degree)
    _check(splats, up_axis=up_axis, min_opacity=min_opacity)
    keep = (splats.opacities >= min_opacity) | splats.opacities.isnan()  # NaN: reported below, not dropped
    means, quats, scales, opacities = (
        t[keep].detach().to("cpu", torch.float64)
        for t in (splats.means, splats.quats, splats.scales, splats.opacities)
    )
    radiance = splats.features[keep, : FEATURE_WIDTHS[FEATURE_CHANNELS[0]]].detach().float()
    lut = agx.lut
    rgb = agx(radiance.to(lut.device)).to("cpu", torch.float64)
    for name, values in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities),
                         ("radiance", radiance)):  # fmt: skip
        if not torch.isfinite(values).all():
            raise StepFailed(Reason.NON_FINITE, f"splat {name} hold non-finite values; nothing to export")
    matrix, rotation = (torch.tensor(v, dtype=torch.float64) for v in _UP_ROTATIONS[up_axis])
    columns = {
        "means": means @ matrix.T,
        "normals": torch.zeros_like(means),
        "f_dc": (rgb - 0.5) / SH_C0,
        "f_rest": torch.zeros(len(means), 3 * ((sh_degree + 1) ** 2 - 1), dtype=torch.float64),
        "opacity": torch.logit(opacities.clamp(_OPACITY_EPS, 1 - _OPACITY_EPS))[:, None],
        "scales": scales.clamp_min(_SCALE_MIN).log(),
        "quats": _quaternion_product(rotation, torch.nn.functional.normalize(quats, dim=-1)),
    }
    table = torch.cat(list(columns.values()), dim=1).numpy().astype("<f4")
    records = np.empty(len(table), dtype=[(name, "<f4") for name in names])
    for index, name in enumerate(names):
        records[name] = table[:, index]
    return records


def write_3dgs_ply(
    path: str | Path,
    splats: Splats,
    agx: AgX,
    *,
    min_opacity: float = ALPHA_MIN,
    up_axis: UpAxis = "+z",
    sh_degree: int = 0,
) -> int:
    """Write one sample's splats as a binary little-endian 3DGS PLY (the module docstring gives the layout).

    Args:
        path: the `.ply` to write; its folder is created.
        splats, agx, min_opacity, up_axis, sh_degree: as for `splat_records`.

    Returns:
        The number of Gaussians written.

    Raises:
        ConfigError, StepFailed: as for `splat_records`.

    Examples:
        >>> import tempfile, torch
        >>> splats = Splats(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.01),
        ...                 torch.tensor([0.5, 0.0]), torch.ones(2, 9))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_3dgs_ply(f"{folder}/sample.ply", splats, AgX.from_simple_ocio())
        1
    """
    records = splat_records(splats, agx, min_opacity=min_opacity, up_axis=up_axis, sh_degree=sh_degree)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comments = [
        "NeAR factory: one view and lighting; colours are AgX display sRGB as SH DC",
        f"up axis {up_axis} (the factory's world is Blender's: +z up, front towards -y)",
    ]
    element = plyfile.PlyElement.describe(records, "vertex")
    plyfile.PlyData([element], text=False, byte_order="<", comments=comments).write(str(path))
    logger.info(
        "wrote %d of %d Gaussians to %s (up %s, SH degree %d)",
        len(records), splats.means.shape[0], path, up_axis, sh_degree,
    )  # fmt: skip
    return len(records)


def _check(splats: Splats, *, up_axis: str, min_opacity: float) -> None:
    if up_axis not in get_args(UpAxis):
        raise ConfigError(f"unknown up_axis {up_axis!r}; choose one of {get_args(UpAxis)}")
    if not 0.0 <= min_opacity < 1.0:
        raise ConfigError(f"min_opacity must be in [0, 1), got {min_opacity}")
    count = splats.means.shape[0]
    expected = {"means": (count, 3), "quats": (count, 4), "scales": (count, 3), "opacities": (count,)}
    for name, shape in expected.items():
        actual = tuple(getattr(splats, name).shape)
        if actual != shape:
            raise ConfigError(f"splats.{name} has shape {actual}, expected {shape} (one sample's splats)")
    width = FEATURE_WIDTHS[FEATURE_CHANNELS[0]]
    features = tuple(splats.features.shape)
    if len(features) != 2 or features[0] != count or features[1] < width:
        raise ConfigError(
            f"splats.features has shape {features}, expected ({count}, >= {width}) with the radiance first"
        )


def _quaternion_product(left: Tensor, right: Tensor) -> Tensor:
    """Hamilton product of (w, x, y, z) quaternions: the rotation `right`, then `left`."""
    w1, x1, y1, z1 = left.unbind(-1)
    w2, x2, y2, z2 = right.unbind(-1)
    return torch.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        dim=-1,
    )
