"""A picture of one asset's encoding: its voxels seen from the front, the side and the top, coloured by the
first three principal components of each role's features and latents (the usual way to look at DINOv2 and
SLAT features: nearby colours mean similar features). Pure numpy."""

import os

import numpy as np
from PIL import Image, ImageDraw

# view name -> (depth axis, +1 when the viewer looks from the + side, image x axis, image up axis)
_VIEWS = {"front (-y)": (1, -1, 0, 2), "side (+x)": (0, 1, 1, 2), "top (+z)": (2, 1, 0, 1)}
BACKGROUND = 0.1


def principal_colors(feats: np.ndarray) -> np.ndarray:
    """(N, C) features -> (N, 3) colours in [0, 1]: the first three principal components, each stretched
    between its 1st and 99th percentile."""
    x = feats.astype(np.float64)
    x = x - x.mean(axis=0)
    if len(x) < 2:
        return np.full((len(x), 3), 0.5)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = x @ vt[:3].T
    components = np.pad(components, ((0, 0), (0, 3 - components.shape[1])))  # fewer than 3 channels
    low, high = np.percentile(components, [1, 99], axis=0)
    return np.clip((components - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)


def orthographic_views(coords: np.ndarray, colors: np.ndarray, *, resolution: int = 64) -> np.ndarray:
    """(R, 3R, 3) float image: the nearest voxel's colour along each view axis, shaded by depth."""
    coords = coords.astype(np.int64)
    panels = []
    for depth_axis, sign, u_axis, v_axis in _VIEWS.values():
        panel = np.full((resolution, resolution, 3), BACKGROUND)
        nearness = coords[:, depth_axis] if sign > 0 else resolution - 1 - coords[:, depth_axis]
        pixel = (resolution - 1 - coords[:, v_axis]) * resolution + coords[:, u_axis]
        order = np.lexsort((nearness, pixel))  # by pixel, nearest last
        last = np.r_[pixel[order][1:] != pixel[order][:-1], True]
        front = order[last]
        shade = 0.55 + 0.45 * nearness[front] / (resolution - 1)
        panel.reshape(-1, 3)[pixel[front]] = colors[front] * shade[:, None]
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def write_preview(
    path: str | os.PathLike[str], coords: np.ndarray, layers: dict[str, np.ndarray], *, scale: int = 4
) -> None:
    """One row of three views (front, side, top) per named (N, C) array of `layers`, labelled, `scale` pixels
    per voxel."""
    rows = [orthographic_views(coords, principal_colors(values)) for values in layers.values()]
    image = np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray((image * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    panel_px = image.shape[0] // len(rows)
    for row, name in enumerate(layers):
        for column, view in enumerate(_VIEWS):
            draw.text((column * panel_px + 4, row * panel_px + 4), f"{name}, {view}", fill=(255, 255, 255))
    picture.save(path)
