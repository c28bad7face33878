"""Asset file formats: detection by content (extensions lie) and discovery of asset files in folders."""

import os
import zipfile
from pathlib import Path
from typing import Literal

from infra.errors import NotFound

AssetFormat = Literal["glb", "gltf", "obj", "fbx", "ply", "stl", "usd", "usda", "usdc", "usdz", "blend"]
ASSET_EXTENSIONS: tuple[str, ...] = ("glb", "gltf", "obj", "fbx", "ply", "stl", "usd", "usda", "usdc", "usdz", "blend")
"""Files with these extensions are assets; sidecars (.bin, textures, .mtl) travel with their asset."""

_MAGIC: tuple[tuple[bytes, AssetFormat], ...] = (
    (b"glTF", "glb"),
    (b"BLENDER", "blend"),
    (b"\x28\xb5\x2f\xfd", "blend"),  # zstd-compressed .blend (Blender >= 3.0)
    (b"\x1f\x8b", "blend"),  # gzip-compressed .blend (older Blender)
    (b"Kaydara FBX Binary", "fbx"),
    (b"PXR-USDC", "usdc"),
    (b"#usda", "usda"),
    (b"ply\n", "ply"),
    (b"ply\r\n", "ply"),
)


def detect_format(path: str | os.PathLike[str]) -> AssetFormat | None:
    """The format of `path` from its bytes, falling back to its extension; None when neither tells.

    Magic numbers decide where the content has them (a .glb that is really a .blend imports as a
    .blend); text formats without a magic number (gltf, obj, ascii stl/fbx) trust a plausible extension.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head.startswith(b"PK\x03\x04") and _is_usdz(path):
        return "usdz"
    ext = path.suffix.lower().lstrip(".")
    if head.lstrip().startswith(b"{") and (ext == "gltf" or b'"asset"' in head):
        return "gltf"
    if ext == "stl" or _is_binary_stl(head, path.stat().st_size):
        return "stl"
    if ext in ASSET_EXTENSIONS:
        return ext  # type: ignore[return-value]
    return None


def _is_usdz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.lower().endswith((".usdc", ".usda", ".usd")) for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def _is_binary_stl(head: bytes, size: int) -> bool:
    """Binary STL has no magic: an 80-byte header, a uint32 triangle count, 50 bytes per triangle."""
    return len(head) >= 84 and size == 84 + 50 * int.from_bytes(head[80:84], "little") and size > 84


def find_asset_files(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Asset files among `paths`: files as given, folders searched recursively, sorted and deduplicated.

    Symbolic links are not followed out of a searched folder. An entry whose type cannot be read (its folder
    is listable but not searchable) is kept, for its reader to report, rather than silently dropped.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            root = path.resolve()
            for candidate in sorted(path.rglob("*")):
                if candidate.suffix.lower().lstrip(".") not in ASSET_EXTENSIONS:
                    continue
                if not _may_be_file(candidate):
                    continue
                if not candidate.resolve().is_relative_to(root):
                    continue
                found[candidate] = None
        elif path.exists():
            found[path] = None
        else:
            raise NotFound(f"no such asset file or folder: {path}")
    return list(found)


def _may_be_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # is_file() answers False itself only for a missing entry or a symlink loop
        return True
