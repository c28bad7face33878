"""The on-disk render set of one asset and one recipe: layout, writer helpers and the reader.

    <asset_dir>/
      transforms.json         NeRF/TRELLIS-readable cameras + our fields (lighting, passes, stats, renderer)
      mesh.ply                the normalized mesh, [-0.5, 0.5]^3 (binary PLY, float32 xyz, int32 triangles)
      beauty/VVV_LL.exr       per view and lighting: linear HDR R, G, B, A (half) [+ shadow]
      gbuffer/VVV.exr         per view: alpha, depth (float, 0 on background), normal.XYZ (world),
                              basecolor.RGB, roughness, metallic (half)
      contact_sheets/<pass>.png

Passes that do not depend on lighting are stored once per view (DESIGN section 5). A set that is only read
back by the next step on the same node (every set a build renders) may store its frames as `.npy` instead of
`.exr`: the same named channels and dtypes as the fields of one uncompressed structured array, which costs a
memory copy to write and one read to load (no ZIP on the render child's store thread, no inflate in the step
that reads it). transforms.json names each frame's files, so readers never guess the format.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import DTypeLike

from render_jobs.exr import read_channels, write_channels

FORMAT_VERSION = "near-render-set/1"
TRANSFORMS_FILE = "transforms.json"
MESH_FILE = "mesh.ply"

# pass -> (file kind, stored channel names, Blender channel names)
PASS_CHANNELS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "beauty": ("beauty", ("R", "G", "B", "A"), ("Combined.R", "Combined.G", "Combined.B", "Combined.A")),
    "shadow": ("beauty", ("shadow",), ("Shadow.R",)),
    "alpha": ("gbuffer", ("alpha",), ("Combined.A",)),
    "depth": ("gbuffer", ("depth",), ("Depth.Z",)),
    "normal": ("gbuffer", ("normal.X", "normal.Y", "normal.Z"), ("Normal.X", "Normal.Y", "Normal.Z")),
    "basecolor": ("gbuffer", ("basecolor.R", "basecolor.G", "basecolor.B"), ("basecolor.R", "basecolor.G", "basecolor.B")),
    "roughness": ("gbuffer", ("roughness",), ("roughness.X",)),
    "metallic": ("gbuffer", ("metallic",), ("metallic.X",)),
}


FrameFormat = Literal["exr", "npy"]
FRAME_FORMATS: tuple[str, ...] = get_args(FrameFormat)
"""`exr`: ZIP-compressed OpenEXR, for sets people open and keep. `npy`: uncompressed NumPy, for transient sets."""


def beauty_path(view_index: int, lighting_index: int, frame_format: FrameFormat = "exr") -> str:
    return f"beauty/{view_index:03d}_{lighting_index:02d}.{frame_format}"


def gbuffer_path(view_index: int, frame_format: FrameFormat = "exr") -> str:
    return f"gbuffer/{view_index:03d}.{frame_format}"


def write_frame_file(path: str | os.PathLike[str], channels: dict[str, np.ndarray]) -> None:
    """One frame file of named (H, W) channels, in the format its suffix names (`.npy`: one structured array,
    a field per channel)."""
    if Path(path).suffix == ".npy":
        first = next(iter(channels.values()))
        frame = np.empty(first.shape, dtype=[(name, array.dtype) for name, array in channels.items()])
        for name, array in channels.items():
            frame[name] = array
        np.save(path, frame)
    else:
        write_channels(path, channels)


def read_frame_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Inverse of `write_frame_file`."""
    if Path(path).suffix == ".npy":
        frame = np.load(path)
        return {name: frame[name] for name in frame.dtype.names}
    return read_channels(path)


def split_passes(
    blender: dict[str, np.ndarray], passes: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Blender's multilayer channels -> (beauty channels, gbuffer channels) in the stored names and dtypes."""
    alpha = blender["Combined.A"]
    beauty, gbuffer = {}, {}
    for name in passes:
        kind, stored, source = PASS_CHANNELS[name]
        for dst, src in zip(stored, source):
            array = blender[src]
            if name == "depth":
                array = np.where(alpha > 0, array, 0.0).astype(np.float32)
            else:
                array = array.astype(np.float16, copy=False)
            (beauty if kind == "beauty" else gbuffer)[dst] = array
    return beauty, gbuffer


def write_ply(path: str | os.PathLike[str], vertices: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY of vertices (V, 3) float32 and triangles (F, 3) int32."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    face_rows = np.zeros(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face_rows["n"], face_rows["idx"] = 3, faces
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.ascontiguousarray(vertices, dtype="<f4").tobytes())
        f.write(face_rows.tobytes())


def read_ply(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `write_ply`: vertices (V, 3) float32, faces (F, 3) int32."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    counts = {line.split()[1].decode(): int(line.split()[2]) for line in data[:end].splitlines() if line.startswith(b"element")}
    nv, nf = counts["vertex"], counts["face"]
    vertices = np.frombuffer(data, dtype="<f4", count=nv * 3, offset=end).reshape(nv, 3)
    faces = np.frombuffer(data, dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=nf, offset=end + nv * 12)["idx"]
    return vertices.copy(), faces.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Frame:
    """One rendered image of a render set, with lazy access to its passes."""

    root: Path
    record: dict[str, Any]

    @property
    def c2w(self) -> np.ndarray:
        """4x4 camera-to-world, Blender/OpenGL convention."""
        return np.array(self.record["transform_matrix"])

    @property
    def fov_rad(self) -> float:
        return float(self.record["camera_angle_x"])

    def load(self, pass_name: str) -> np.ndarray:
        """(H, W) or (H, W, C) float32 array of one pass, row 0 at the top."""
        return self.load_passes(pass_name)[pass_name]

    def load_passes(self, *pass_names: str, dtype: DTypeLike | None = np.float32) -> dict[str, np.ndarray]:
        """Several passes, as `load` gives them, reading each frame file once; `dtype=None` keeps the stored
        dtypes (half for colours, float for depth), which saves a conversion per pass."""
        files: dict[str, dict[str, np.ndarray]] = {}
        passes = {}
        for name in pass_names:
            kind, stored, _ = PASS_CHANNELS[name]
            if kind not in files:
                path = self.record["file_path"] if kind == "beauty" else self.record["gbuffer_path"]
                files[kind] = read_frame_file(self.root / path)
            arrays = [files[kind][channel] for channel in stored]
            array = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
            passes[name] = array if dtype is None else array.astype(dtype, copy=False)
        return passes


@dataclasses.dataclass(frozen=True)
class RenderSet:
    """A finished render set on disk (see the module docstring)."""

    root: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> "RenderSet":
        root = Path(root)
        meta = json.loads((root / TRANSFORMS_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root}: not a {FORMAT_VERSION} render set (format={meta.get('format')!r})")
        return cls(root, meta)

    @property
    def frames(self) -> list[Frame]:
        return [Frame(self.root, record) for record in self.meta["frames"]]

    def mesh(self) -> tuple[np.ndarray, np.ndarray]:
        return read_ply(self.root / MESH_FILE)
