"""Test-only geometry: a small numpy z-buffer rasterizer to compare renders against the mesh they show."""

import numpy as np

from render_jobs.cameras import project_points


def rasterize_depth(vertices: np.ndarray, faces: np.ndarray, c2w: np.ndarray, fov_rad: float, size_px: int) -> np.ndarray:
    """(H, W) camera-axis depth of the nearest triangle at each pixel centre; inf where no triangle covers it."""
    uv, depth = project_points(vertices, c2w, fov_rad, size_px)
    zbuf = np.full((size_px, size_px), np.inf)
    ys, xs = np.mgrid[0:size_px, 0:size_px] + 0.5
    for tri in faces:
        (x0, y0), (x1, y1), (x2, y2) = uv[tri]
        lo_x, hi_x = int(max(0, np.floor(min(x0, x1, x2)))), int(min(size_px, np.ceil(max(x0, x1, x2))))
        lo_y, hi_y = int(max(0, np.floor(min(y0, y1, y2)))), int(min(size_px, np.ceil(max(y0, y1, y2))))
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        px, py = xs[lo_y:hi_y, lo_x:hi_x], ys[lo_y:hi_y, lo_x:hi_x]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-12:
            continue
        w1 = ((px - x0) * (y2 - y0) - (x2 - x0) * (py - y0)) / area
        w2 = ((x1 - x0) * (py - y0) - (px - x0) * (y1 - y0)) / area
        w0 = 1.0 - w1 - w2
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        # perspective-correct depth: interpolate 1/z in screen space
        inv_z = w0 / depth[tri[0]] + w1 / depth[tri[1]] + w2 / depth[tri[2]]
        z = np.where(inside, 1.0 / np.maximum(inv_z, 1e-12), np.inf)
        block = zbuf[lo_y:hi_y, lo_x:hi_x]
        np.minimum(block, z, out=block)
    return zbuf


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 cross: drops pixels next to the silhouette (partial coverage, filtering)."""
    for _ in range(steps):
        m = mask.copy()
        m[1:] &= mask[:-1]
        m[:-1] &= mask[1:]
        m[:, 1:] &= mask[:, :-1]
        m[:, :-1] &= mask[:, 1:]
        mask = m
    return mask
