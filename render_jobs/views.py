"""Camera rigs: view specs sampled deterministically from a seed (pure numpy).

`lh` uses TRELLIS's Hammersley rig (a random offset per asset, 75% of views above the equator), `relight`
the same low-discrepancy sequence without the remap (area-uniform on the whole sphere), `input` TRELLIS's
condition-render FOV/radius coupling with yaw and pitch limited to a frontal cone.
"""

import dataclasses
import math

import numpy as np

from render_jobs.cameras import look_at_c2w


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """One camera on a sphere around the origin, looking at the origin with world +Z up.

    Yaw is measured from +X towards +Y and pitch from the XY plane (TRELLIS convention):
    the camera sits at radius * (cos yaw cos pitch, sin yaw cos pitch, sin pitch).
    """

    yaw_rad: float
    pitch_rad: float
    radius_m: float
    fov_rad: float

    @property
    def location(self) -> np.ndarray:
        cp = math.cos(self.pitch_rad)
        return self.radius_m * np.array(
            [math.cos(self.yaw_rad) * cp, math.sin(self.yaw_rad) * cp, math.sin(self.pitch_rad)]
        )

    @property
    def c2w(self) -> np.ndarray:
        """4x4 camera-to-world, Blender/OpenGL convention."""
        return look_at_c2w(self.location)


def _radical_inverse_base2(i: int) -> float:
    return int(f"{i:032b}"[::-1], 2) / 2.0**32


def hammersley_views(
    num_views: int, *, rng: np.random.Generator, radius_m: float = 2.0, fov_deg: float = 40.0, upper_bias: bool = True
) -> list[ViewSpec]:
    """Hammersley points on the sphere with a random offset per asset.

    With `upper_bias` (TRELLIS's training rig) a quarter of the views lie below the equator and three
    quarters above, area-uniform within each hemisphere; without it the points are area-uniform overall.
    """
    offset = rng.random(2)
    views = []
    for i in range(num_views):
        u = (i + offset[0]) / num_views
        v = (_radical_inverse_base2(i) + offset[1]) % 1.0
        if upper_bias:
            u = 2.0 * u if u < 0.25 else (2.0 / 3.0) * u + 1.0 / 3.0
        pitch = math.asin(min(1.0, max(-1.0, 2.0 * u - 1.0)))
        views.append(ViewSpec(2.0 * math.pi * v, pitch, radius_m, math.radians(fov_deg)))
    return views


def frontal_views(
    num_views: int,
    *,
    rng: np.random.Generator,
    yaw_range_deg: float = 45.0,
    pitch_range_deg: tuple[float, float] = (-10.0, 45.0),
    front_yaw_deg: float = -90.0,
    fov_range_deg: tuple[float, float] = (10.0, 70.0),
) -> list[ViewSpec]:
    """Input-image views: yaw within +-`yaw_range_deg` of the asset's front, pitch in `pitch_range_deg`.

    The front is Blender's front view (camera on -Y, yaw -90 degrees). FOV and radius follow TRELLIS's
    condition renders: sin^2(fov/2) uniform over the FOV range and the radius chosen so the bounding
    sphere of the unit cube (radius sqrt(3)/2) just fills the view.
    """
    views = []
    for _ in range(num_views):
        yaw = math.radians(front_yaw_deg + rng.uniform(-yaw_range_deg, yaw_range_deg))
        pitch = math.radians(rng.uniform(*pitch_range_deg))
        lo, hi = (math.sin(math.radians(f) / 2.0) ** 2 for f in fov_range_deg)
        half_fov = math.asin(math.sqrt(rng.uniform(lo, hi)))
        radius = (math.sqrt(3.0) / 2.0) / math.sin(half_fov)
        views.append(ViewSpec(yaw, pitch, radius, 2.0 * half_fov))
    return views
