"""Cameras and writers for `near relight`'s media: turntables, rotating environment maps, GIFs and PNG frames.

The command renders the frames with the Stage 2 model; this module only places the cameras and writes images.
Conventions are DESIGN section 4's: Blender world, Z up, the asset's front towards -Y; cameras as
Blender/OpenGL camera-to-world matrices with a horizontal FOV (`render_jobs.cameras`); environment-map
rotation as a yaw about +Z in radians. GIF is the only animated format: it needs nothing beyond Pillow.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infra.errors import ConfigError
from render_jobs.views import ViewSpec

logger = logging.getLogger(__name__)

__all__ = [
    "PBR_LABELS",
    "env_rotation_yaws",
    "pbr_panel",
    "to_uint8",
    "turntable_cameras",
    "write_frames",
    "write_gif",
]

PBR_LABELS = ("base colour", "roughness", "metallic", "shadow")


def turntable_cameras(
    num_views: int,
    *,
    radius_m: float = 2.0,
    fov_deg: float = 40.0,
    elevation_deg: float = 20.0,
    start_yaw_deg: float = -90.0,
) -> list[tuple[np.ndarray, float]]:  # [(c2w (4, 4) float64 Blender/OpenGL, horizontal fov_rad)] * num_views
    """Cameras evenly spaced in yaw around +Z, all looking at the origin, roll-free (world +Z up on screen).

    Yaw is measured from +X towards +Y (`render_jobs.views.ViewSpec`), so the default first view, yaw -90
    degrees, sits on -Y: Blender's front view of the asset. The yaw grows from view to view: the camera
    circles counter-clockwise seen from above (the asset's +X side comes next), so the asset seems to turn
    clockwise.
    The last view stops one step short of the first, so the sequence loops without a repeated frame.

    Args:
        num_views: how many cameras, >= 1.
        radius_m: distance from the origin (the asset lies in [-0.5, 0.5]^3).
        fov_deg: horizontal field of view.
        elevation_deg: height above the XY plane as an angle seen from the origin, in (-90, 90).
        start_yaw_deg: yaw of the first camera.

    Returns:
        num_views pairs (c2w, fov_rad).

    Raises:
        ConfigError: num_views < 1, a non-positive radius, a FOV outside (0, 180) or an elevation outside
            (-90, 90).

    Examples:
        >>> c2w, fov_rad = turntable_cameras(4, elevation_deg=0.0)[0]
        >>> c2w[:3, 3].round(6).tolist(), round(fov_rad, 4)
        ([0.0, -2.0, 0.0], 0.6981)
    """
    if num_views < 1:
        raise ConfigError(f"num_views must be >= 1, got {num_views}")
    if not radius_m > 0:
        raise ConfigError(f"radius_m must be > 0, got {radius_m}")
    if not 0 < fov_deg < 180:
        raise ConfigError(f"fov_deg must be in (0, 180), got {fov_deg}")
    if not -90 < elevation_deg < 90:
        raise ConfigError(f"elevation_deg must be in (-90, 90), got {elevation_deg}")
    step = 2 * math.pi / num_views
    views = [
        ViewSpec(
            yaw_rad=math.radians(start_yaw_deg) + k * step,
            pitch_rad=math.radians(elevation_deg),
            radius_m=radius_m,
            fov_rad=math.radians(fov_deg),
        )
        for k in range(num_views)
    ]
    return [(view.c2w, view.fov_rad) for view in views]


def env_rotation_yaws(num_frames: int) -> list[float]:
    """Environment-map yaws (radians, about +Z) for a loop with the map turning once under a fixed camera.

    Evenly spaced in [0, 2 pi) from 0 (the map as stored), the full turn left out so the loop does not show
    the first frame twice. Pass each as `yaw_rad` to `training.stage2.envmap.encode_env_map`.

    Raises:
        ConfigError: num_frames < 1.

    Examples:
        >>> [round(y, 4) for y in env_rotation_yaws(4)]
        [0.0, 1.5708, 3.1416, 4.7124]
    """
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    return [2 * math.pi * k / num_frames for k in range(num_frames)]


def to_uint8(image: Any) -> np.ndarray:  # (H, W) or (H, W, C), float in [0, 1] or uint8 -> same shape uint8
    """An image as uint8: floats clipped to [0, 1], scaled by 255 and rounded; uint8 passes unchanged.

    Accepts numpy arrays and anything `np.asarray` takes; torch tensors are detached and moved to the CPU.

    Raises:
        ConfigError: not 2-D or 3-D, an integer type other than uint8, or a non-finite float.

    Examples:
        >>> to_uint8(np.array([[0.0, 0.5, 1.2]])).tolist()
        [[0, 128, 255]]
    """
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ConfigError(f"an image must be (H, W) or (H, W, C), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"an image must be float in [0, 1] or uint8, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ConfigError("the image holds non-finite values")
    return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_gif(path: str | Path, frames: Sequence[Any], fps: float = 24.0) -> Path:
    """Write an animated GIF that loops forever, one frame per image.

    Args:
        path: the `.gif` to write; its folder is created.
        frames: (H, W, 3) images of one size, float in [0, 1] or uint8 (see `to_uint8`).
        fps: frames per second. GIF delays are whole hundredths of a second, so the delay is rounded to one
            (24 fps plays at 25). Pillow quantises each frame to its own 256-colour palette, and merges
            consecutive identical frames into one that lasts as long (the timing is kept).

    Returns:
        `path`.

    Raises:
        ConfigError: no frames, a frame that is not (H, W, 3), frames of different sizes, or fps <= 0.
    """
    if not fps > 0:
        raise ConfigError(f"fps must be > 0, got {fps}")
    images = _rgb_images(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    delay_ms = 10 * max(1, round(100.0 / fps))
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=delay_ms, loop=0)
    logger.info("wrote %d frames %dx%d at %d ms to %s", len(images), *images[0].size, delay_ms, path)
    return path


def write_frames(folder: str | Path, frames: Sequence[Any], prefix: str = "frame") -> list[Path]:
    """Write each frame as a numbered PNG, `{prefix}_0000.png` onwards (more digits past 10 000 frames).

    Args:
        folder: created if missing; files of the same names are overwritten.
        frames: (H, W, 3) images of one size, float in [0, 1] or uint8 (see `to_uint8`).
        prefix: the file-name stem before the number.

    Returns:
        The paths written, in frame order.

    Raises:
        ConfigError: as for `write_gif`, or a prefix with a path separator.
    """
    if not prefix or "/" in prefix or "\\" in prefix:
        raise ConfigError(f"prefix must be a plain, non-empty file-name stem, got {prefix!r}")
    images = _rgb_images(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(len(images) - 1)))
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"{prefix}_{index:0{digits}d}.png")
        image.save(paths[-1], format="PNG")
    logger.info("wrote %d frames to %s", len(paths), folder)
    return paths


def pbr_panel(
    base_color: Any,  # (H, W, 3) in [0, 1]
    roughness: Any,  # (H, W, 1) or (H, W)
    metallic: Any,  # (H, W, 1) or (H, W)
    shadow: Any,  # (H, W, 1) or (H, W)
    *,
    labels: Sequence[str] | None = PBR_LABELS,
) -> np.ndarray:  # (H, 4 W, 3) uint8
    """A contact sheet of one view's PBR buffers side by side: base colour, roughness, metallic, shadow.

    Values are shown as given, clipped to [0, 1] (no tone mapping or gamma, as the trainer's image grid); the
    one-channel maps as grey. Floats, uint8 and torch tensors are accepted (see `to_uint8`).

    Args:
        labels: four captions drawn in the top-left corner of each tile, or None for none.

    Raises:
        ConfigError: maps of different sizes, a base colour that is not (H, W, 3), a map of more than one
            channel, or not four labels.

    Examples:
        >>> grey = np.full((8, 8, 1), 0.5)
        >>> pbr_panel(np.zeros((8, 8, 3)), grey, grey, grey, labels=None).shape
        (8, 32, 3)
    """
    tiles = [to_uint8(base_color)]
    if tiles[0].ndim != 3 or tiles[0].shape[2] != 3:
        raise ConfigError(f"base_color must be (H, W, 3), got shape {tiles[0].shape}")
    for name, image in (("roughness", roughness), ("metallic", metallic), ("shadow", shadow)):
        grey = to_uint8(image)
        if grey.ndim == 3 and grey.shape[2] != 1:
            raise ConfigError(f"{name} must be (H, W) or (H, W, 1), got shape {grey.shape}")
        tiles.append(np.repeat(grey.reshape(*grey.shape[:2], 1), 3, axis=2))
    if len({tile.shape for tile in tiles}) != 1:
        raise ConfigError(f"the maps differ in size: {[tile.shape[:2] for tile in tiles]}")
    panel = np.concatenate(tiles, axis=1)
    if labels is None:
        return panel
    if len(labels) != len(tiles):
        raise ConfigError(f"pbr_panel needs {len(tiles)} labels, got {len(labels)}")
    return _draw_labels(panel, labels, tile_width=tiles[0].shape[1])


def _rgb_images(frames: Sequence[Any]) -> list[Image.Image]:
    if len(frames) == 0:
        raise ConfigError("no frames to write")
    arrays = [to_uint8(frame) for frame in frames]
    for index, array in enumerate(arrays):
        if array.ndim != 3 or array.shape[2] != 3:
            raise ConfigError(f"frame {index} must be (H, W, 3), got shape {array.shape}")
        if array.shape != arrays[0].shape:
            raise ConfigError(
                f"frame {index} is {array.shape}, frame 0 is {arrays[0].shape}: sizes must match"
            )
    return [Image.fromarray(np.ascontiguousarray(array)) for array in arrays]


def _draw_labels(panel: np.ndarray, labels: Sequence[str], *, tile_width: int) -> np.ndarray:
    """White captions on black boxes, sized to the image height (a bitmap font where FreeType is missing)."""
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, panel.shape[0] // 16))
    margin = max(1, panel.shape[0] // 64)
    for index, label in enumerate(labels):
        left, top, right, bottom = draw.textbbox((index * tile_width + margin, margin), label, font=font)
        draw.rectangle((left - margin, top - margin, right + margin, bottom + margin), fill=(0, 0, 0))
        draw.text((index * tile_width + margin, margin), label, fill=(255, 255, 255), font=font)
    return np.asarray(image)
