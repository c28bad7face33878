"""OpenEXR files as dicts of named float channels (both envs; OpenEXR's own bindings)."""

import os

import numpy as np
import OpenEXR


def read_channels(path: str | os.PathLike[str], *, view_layer: str = "") -> dict[str, np.ndarray]:
    """Every channel of every part, (H, W) each, row 0 at the top.

    Blender names multilayer channels `<view layer>.<pass>.<channel>`; `view_layer` strips that prefix.
    """
    prefix = f"{view_layer}." if view_layer else ""
    channels = {}
    with OpenEXR.File(str(path), separate_channels=True) as exr:
        for part in exr.parts:
            for name, channel in part.channels.items():
                channels[name.removeprefix(prefix)] = channel.pixels
    return channels


def write_channels(path: str | os.PathLike[str], channels: dict[str, np.ndarray]) -> None:
    """One single-part, ZIP-compressed EXR; each channel keeps its dtype (float16 -> HALF, float32 -> FLOAT)."""
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    arrays = {name: np.ascontiguousarray(array) for name, array in channels.items()}
    with OpenEXR.File(header, arrays) as exr:
        exr.write(str(path))


def read_env_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Linear RGB (H, W, 3) float32 of an equirectangular OpenEXR map, row 0 at the top (the +Z pole); NaN and
    infinities read as 0, negatives are clipped."""
    channels = read_channels(path)
    missing = [c for c in ("R", "G", "B") if c not in channels]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} channel; an environment map is RGB")
    rgb = np.stack([channels[c] for c in ("R", "G", "B")], axis=-1).astype(np.float32)
    return np.nan_to_num(rgb, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
