"""Lighting rigs: what lights a frame, sampled deterministically and recorded verbatim (pure numpy).

Three families (DESIGN section 5): the homogenized light E_h (a uniform white environment of strength 1,
so a Lambertian surface of albedo rho shows radiance rho where unoccluded), area lights (six uniformly on
a sphere, or 1-3 in the camera's hemisphere; power U[300, 700] W at distance U[5, 8] m, each facing the
origin) and an HDR environment map rotated about +Z by a random yaw.

Yaw convention: an environment recorded with yaw theta shows the light that the unrotated map has in
direction d in direction Rz(theta) d, i.e. the whole environment turns by +theta about +Z.

Shadow targets. EEVEE (Blender 5.0) shadows only lights: area lights, and the one sun it extracts from a
world: the world's radiance above `world.sun_threshold` (compared with max(R, G, B) x strength; the rest stays
in the world probe, which casts no shadow), gathered into one directional light; a threshold of 0 extracts
none. Its `shadow` pass holds, per sample, then averaged over the pixel's samples,

    sum over shadow-casting lights of shadowed direct light / the same sum unshadowed    (mean over R, G, B)

    object, lit by such a light      1 where fully lit, 0 in shadow, and 0 where the surface faces away from
                                     every such light (no unshadowed light: EEVEE's safe reciprocal gives 0)
    object, no such light            0 everywhere
    background (film_transparent)    1, always
    silhouette (coverage alpha)      (1 - alpha) + alpha x the object's value

Measured on the demo open box (tests/render_jobs/test_shadow_targets.py, 48 px, 4 samples): under a map with
a small sun, background 1.0 exactly, the sun-facing floor 0 inside the walls' cast shadow and 1 outside it,
faces turned from the sun <= 0.008; under a uniform map, every pixel inside the silhouette 0.0 exactly,
background 1.0, silhouette pixels 1 - alpha within 0.005. The homogenized world and an env map lit with a
threshold of 0 or 1e9 read the same way (32 px probes: object <= 0.006, background 1).
A frame with no shadow-casting light therefore reads 0 over the whole object: "in shadow" where nothing
casts one.

So every frame records (`shadow_fields`, in the `lighting` dict of each frame of transforms.json):
    "shadow_light": bool          true when at least one shadow-casting light lit the frame (any area light,
                                  or an extracted sun). The shadow pass is a target only where this is true;
                                  consumers mask the shadow loss and metric of the other frames.
    "sun_threshold": float | None the `world.sun_threshold` set for an env-map frame (`sun_threshold`); None
                                  for the other families and for maps without a dominant light (no sun).
An env map's dominant light is always extracted as the sun, by a threshold relative to the map's peak, so
whether a frame has a sun no longer depends on the map's absolute brightness.
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
    return rotated_env_map(rng, name, strength)


def rotated_env_map(rng: np.random.Generator, name: str, strength: float = 1.0) -> LightingSpec:
    """The map `name`, rotated about +Z by a uniform random yaw."""
    yaw_rad = float(rng.uniform(0.0, 2.0 * math.pi))
    return LightingSpec(kind="env_map", rig="env_map", strength=strength, env_map=name, yaw_rad=yaw_rad)


SUN_FRACTION = 0.1
"""The extracted sun is the map's radiance above this fraction of its peak (`sun_threshold`)."""
MIN_SUN_CONTRAST = 100.0
"""A map has a dominant light when its peak is at least this many times its mean (`sun_threshold`)."""

# The eight maps bpy 5.0 ships (1024 x 512), brightness = max(R, G, B); mean weighted by solid angle:
#
#   map        peak      mean   peak/mean  pixels > 0.1 peak  what is brightest
#   city       35456     1.069    33167          6            the sun
#   courtyard  54.8      1.204       45.5     28519            a shaded courtyard's open side (no sun)
#   forest     1437      0.984     1461         48            the sun through the canopy
#   interior   35744     1.295    27606          6            ceiling lamps
#   night      11600     0.214    54197          4            a street lamp
#   studio     616.5     0.900      685        759            softboxes
#   sunrise    34560     0.810    42689          4            the sun
#   sunset     6248      0.741     8430          4            the sun
#
# MIN_SUN_CONTRAST = 100 sits between the courtyard (45.5: no sun) and the studio (685); a uniform or overcast
# sky has a ratio near 1. SUN_FRACTION = 0.1 puts the compact sources wholly into the sun (a few pixels; the
# studio's softboxes too) and leaves a margin of 10x for EEVEE's resampling of the map into its world probe,
# which lowers one-pixel peaks. With the threshold at 0.5, 0.25 and 0.1 of the peak, EEVEE extracted a sun in
# every frame (its shadow pass reached 1 on the object; it is 0 there without a sun): 32 px, the demo diffuse
# sphere under city, courtyard, night, studio and sunset at three yaws, the open box under forest, interior
# and sunrise at two.


def sun_threshold(
    rgb: np.ndarray,  # (H, W, 3) linear radiance, equirectangular, row 0 at the +Z pole
    *,
    strength: float = 1.0,
) -> float | None:
    """The `world.sun_threshold` that extracts the map's dominant light as EEVEE's sun; None if it has none.

    EEVEE compares max(R, G, B) x world strength of each direction with the threshold, so both the peak and
    the mean here are of max(R, G, B); the mean weights each row by its solid angle (sin theta). A map has a
    dominant light when its peak is at least `MIN_SUN_CONTRAST` times its mean; the threshold is then
    `SUN_FRACTION` of the peak, times `strength` (the world strength the map is lit with).

    Args:
        rgb: (H, W, 3) linear RGB; NaN and infinities count as 0, negatives are clipped.
        strength: the world strength.

    Returns:
        The threshold, or None for a map without a dominant light (uniform, overcast, black) or strength 0.

    Examples:
        >>> sky = np.full((32, 64, 3), 0.5, np.float32)
        >>> sun_threshold(sky) is None
        True
        >>> sky[8, 3] = 1000.0
        >>> sun_threshold(sky, strength=2.0)
        200.0
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) equirectangular map, got shape {rgb.shape}")
    if strength < 0 or not math.isfinite(strength):
        raise ValueError(f"strength must be finite and >= 0, got {strength}")
    finite = np.nan_to_num(rgb.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    brightness = finite.clip(min=0.0).max(axis=2)
    h = brightness.shape[0]
    row_weight = np.sin((np.arange(h) + 0.5) / h * math.pi)
    mean = float(row_weight @ brightness.mean(axis=1) / row_weight.sum())
    peak = float(brightness.max())
    if strength == 0 or peak <= 0 or peak < MIN_SUN_CONTRAST * mean:
        return None
    return SUN_FRACTION * peak * strength


def shadow_fields(spec: LightingSpec, sun_threshold: float | None) -> dict[str, Any]:
    """The shadow record of a frame lit by `spec` (module docstring): `shadow_light` and `sun_threshold`.

    `sun_threshold` is the value `sun_threshold()` gave for the frame's env map and strength (None otherwise).
    """
    if spec.kind != "env_map" and sun_threshold is not None:
        raise ValueError(f"a {spec.kind} frame has no sun threshold, got {sun_threshold}")
    shadow_light = bool(spec.lights) if spec.kind == "area" else sun_threshold is not None
    return {"shadow_light": shadow_light, "sun_threshold": sun_threshold}


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
