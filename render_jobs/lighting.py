"""Lighting rigs: what lights a frame, sampled deterministically and recorded verbatim (pure numpy).

Three families (DESIGN section 5): the homogenized light E_h (a uniform white environment of strength 1,
so a Lambertian surface of albedo rho shows radiance rho where unoccluded), area lights (six uniformly on
a sphere, or 1-3 in the camera's hemisphere; power U[300, 700] W at distance U[5, 8] m, each facing the
origin) and an HDR environment map rotated about +Z by a random yaw.

Yaw convention: an environment recorded with yaw theta shows the light that the unrotated map has in
direction d in direction Rz(theta) d, i.e. the whole environment turns by +theta about +Z.
"""

import dataclasses
import math
from typing import Any, Literal

import numpy as np

LightingKind = Literal["homogenized", "area", "env_map"]


@dataclasses.dataclass(frozen=True)
class AreaLightSpec:
    """A square area light at `location_m`, facing the origin."""

    location_m: tuple[float, float, float]
    power_w: float
    size_m: float


@dataclasses.dataclass(frozen=True)
class LightingSpec:
    """Everything needed to reproduce a frame's lighting."""

    kind: LightingKind
    rig: str
    """Which sampler made it: homogenized, area_sphere, area_hemisphere or env_map."""
    strength: float = 1.0
    """World strength (homogenized and env_map)."""
    env_map: str | None = None
    """Environment map id: the file name within its folder."""
    yaw_rad: float = 0.0
    lights: tuple[AreaLightSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AreaLightRange:
    """Sampling ranges of area lights (paper defaults)."""

    power_w: tuple[float, float] = (300.0, 700.0)
    distance_m: tuple[float, float] = (5.0, 8.0)
    size_m: float = 1.0


def homogenized(strength: float = 1.0) -> LightingSpec:
    return LightingSpec(kind="homogenized", rig="homogenized", strength=strength)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _area_lights(directions: np.ndarray, rng: np.random.Generator, ranges: AreaLightRange) -> tuple[AreaLightSpec, ...]:
    lights = []
    for direction in directions:
        distance = rng.uniform(*ranges.distance_m)
        location = tuple(float(c) for c in direction / np.linalg.norm(direction) * distance)
        lights.append(AreaLightSpec(location, float(rng.uniform(*ranges.power_w)), ranges.size_m))
    return tuple(lights)


def area_sphere(rng: np.random.Generator, ranges: AreaLightRange = AreaLightRange()) -> LightingSpec:
    """Six area lights on the axes of a uniformly random rotation: evenly spread over the sphere."""
    axes = np.concatenate([np.eye(3), -np.eye(3)]) @ _random_rotation(rng).T
    return LightingSpec(kind="area", rig="area_sphere", lights=_area_lights(axes, rng, ranges))


def area_hemisphere(
    rng: np.random.Generator, camera_dir: np.ndarray, ranges: AreaLightRange = AreaLightRange()
) -> LightingSpec:
    """1-3 area lights uniformly in the hemisphere around the direction from the origin to the camera."""
    camera_dir = np.asarray(camera_dir, dtype=np.float64) / np.linalg.norm(camera_dir)
    directions = []
    for _ in range(int(rng.integers(1, 4))):
        d = rng.normal(size=3)
        directions.append(d if d @ camera_dir >= 0 else -d)
    return LightingSpec(kind="area", rig="area_hemisphere", lights=_area_lights(np.array(directions), rng, ranges))


def env_map(rng: np.random.Generator, env_map_ids: list[str], strength: float = 1.0) -> LightingSpec:
    """A random map from `env_map_ids`, rotated about +Z by a uniform random yaw."""
    if not env_map_ids:
        raise ValueError("env_map lighting needs at least one environment map")
    name = env_map_ids[int(rng.integers(len(env_map_ids)))]
    return LightingSpec(kind="env_map", rig="env_map", strength=strength, env_map=name, yaw_rad=float(rng.uniform(0.0, 2.0 * math.pi)))


def random_input_lighting(
    rng: np.random.Generator, camera_dir: np.ndarray, env_map_ids: list[str], ranges: AreaLightRange = AreaLightRange()
) -> LightingSpec:
    """The `input` recipe's lighting: one of the three random families, chosen uniformly."""
    choice = int(rng.integers(3))
    if choice == 0:
        return area_sphere(rng, ranges)
    if choice == 1:
        return area_hemisphere(rng, camera_dir, ranges)
    return env_map(rng, env_map_ids)
