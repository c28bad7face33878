"""Camera conventions (DESIGN section 4): Blender/OpenGL camera-to-world matrices and the OpenCV derivation.

A camera looks down its local -Z with +Y up (Blender, OpenGL, NeRF `transforms.json`). Every OpenCV-style
extrinsic or intrinsic in the project is derived here, by these functions alone. Pure numpy.
"""

import math

import numpy as np

# Flips camera Y and Z: OpenGL (x right, y up, looks -z) <-> OpenCV (x right, y down, looks +z).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def look_at_c2w(eye: np.ndarray, target: np.ndarray = np.zeros(3), up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """4x4 camera-to-world matrix of a camera at `eye` looking at `target`, roll-free about world `up`."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    back = eye - target
    back /= np.linalg.norm(back)
    if abs(float(np.dot(back, up))) > 1.0 - 1e-9:  # looking straight up or down: any horizontal right vector
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, back, eye
    return c2w


def focal_px(fov_rad: float, size_px: int) -> float:
    """Focal length in pixels of a square image whose horizontal field of view is `fov_rad`."""
    return 0.5 * size_px / math.tan(0.5 * fov_rad)


def opencv_intrinsics(fov_rad: float, size_px: int) -> np.ndarray:
    """3x3 pixel-unit K for a square image; pixel centres at integer + 0.5, principal point at the centre."""
    f = focal_px(fov_rad, size_px)
    return np.array([[f, 0.0, 0.5 * size_px], [0.0, f, 0.5 * size_px], [0.0, 0.0, 1.0]])


def opencv_w2c(c2w: np.ndarray) -> np.ndarray:
    """4x4 OpenCV world-to-camera extrinsic from a Blender/OpenGL camera-to-world matrix."""
    return _GL_TO_CV @ np.linalg.inv(np.asarray(c2w, dtype=np.float64))


def project_points(points: np.ndarray, c2w: np.ndarray, fov_rad: float, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Project world points (P, 3) to pixel coordinates (P, 2) (x right, y down) and camera depth (P,).

    Depth is the distance along the viewing axis, the quantity Blender's Z pass stores.
    """
    w2c = opencv_w2c(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]  # (P, 3), +z forward
    K = opencv_intrinsics(fov_rad, size_px)
    uv = cam[:, :2] / cam[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    return uv, cam[:, 2]
