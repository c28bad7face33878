"""LDR previews: tone-map each pass to 8-bit and tile the views into one contact sheet per pass."""

import math
import os

import numpy as np
from PIL import Image

BACKGROUND = 0.18
"""Mid-grey behind transparent pixels, so dark and bright objects both read."""


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear values clipped to [0, 1], sRGB-encoded."""
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


_BACKGROUND_LINEAR = ((BACKGROUND + 0.055) / 1.055) ** 2.4


def _area_resize(data: np.ndarray, size_px: int) -> np.ndarray:
    """Area-average (H, W) or (H, W, C) float32 down to (size, size[, C])."""
    h, w = data.shape[:2]
    if h == w == size_px:
        return data
    if h % size_px == 0 and w % size_px == 0:
        shape = (size_px, h // size_px, size_px, w // size_px, *data.shape[2:])
        return data.reshape(shape).mean(axis=(1, 3))
    planes = data[..., None] if data.ndim == 2 else data
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize((size_px, size_px), Image.Resampling.BOX))
        for c in range(planes.shape[-1])
    ]
    return np.stack(resized, axis=-1).reshape((size_px, size_px, *data.shape[2:]))


def preview_tile(pass_name: str, data: np.ndarray, alpha: np.ndarray, size_px: int) -> np.ndarray:
    """(size, size, 3) uint8 preview of one pass over mid-grey.

    `data` is (H, W) or (H, W, C) linear float, `alpha` (H, W). Averaging happens on linear values before the
    tone curve, which is both correct and cheap (the curve then runs on the small tile only). Beauty is
    premultiplied by alpha as Blender writes it; the other passes are composited as straight values.
    """
    data = _area_resize(data.astype(np.float32), size_px)
    a = _area_resize(alpha.astype(np.float32), size_px)[..., None]
    if pass_name == "depth":
        valid = a[..., 0] > 0.5
        near, far = (np.percentile(data[valid], [1, 99]) if valid.any() else (0.0, 1.0))
        grey = np.where(valid, 1.0 - 0.8 * np.clip((data - near) / max(far - near, 1e-6), 0, 1), 0.0)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    elif pass_name == "normal":
        rgb = 0.5 * (data[..., :3] + 1.0)
    elif pass_name in ("beauty", "basecolor"):
        rgb = data[..., :3]
    else:  # alpha, roughness, metallic, shadow: one channel shown as grey
        rgb = np.repeat((data if data.ndim == 2 else data.mean(-1))[..., None], 3, axis=2)
    if pass_name == "beauty":
        composited = srgb_encode(rgb + _BACKGROUND_LINEAR * (1.0 - a))
    elif pass_name == "basecolor":
        composited = srgb_encode(rgb) * a + BACKGROUND * (1.0 - a)
    else:
        composited = np.clip(rgb, 0.0, 1.0) * a + BACKGROUND * (1.0 - a)
    return (np.clip(composited, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_contact_sheet(path: str | os.PathLike[str], tiles: list[np.ndarray], *, gap_px: int = 2) -> None:
    """Tile (t, t, 3) uint8 previews row-major into a near-square grid PNG."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    t = tiles[0].shape[0]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * (t + gap_px) + gap_px, cols * (t + gap_px) + gap_px, 3), 255, dtype=np.uint8)
    for i, image in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap_px + r * (t + gap_px), gap_px + c * (t + gap_px)
        sheet[y : y + t, x : x + t] = image
    # zlib's fastest level: a 150-view sheet costs 0.2 s instead of 0.7 s (`optimize`), for files ~15 % larger;
    # an asset's four sheets are written after its last frame, so this time is not hidden behind a render.
    Image.fromarray(sheet).save(path, compress_level=1)
