"""Environment maps by content: the factory records, per relight frame, the sha256 of the map it was lit with
(`frame_env_map`), so training finds the same pixels whatever the file is called or where it lies.

The store indexes equirectangular OpenEXR maps in the given folders (by default the CC0 maps bpy ships,
which the factory renders with when no `env_maps_dir` is set) and serves each, resized by area averaging to the
lighting tokenizer's size, from memory.
"""

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from infra.environments import find_render_python
from infra.errors import FactoryError, NotFound
from render_jobs.exr import read_channels

BUNDLED_MAPS_QUERY = "import bpy; print(bpy.utils.system_resource('DATAFILES', path='studiolights/world'))"


class EnvMapNotFound(FactoryError, LookupError):
    """A release names an environment map that no configured folder holds."""


def bundled_env_map_folder() -> Path:
    """Where the render env's bpy keeps its environment maps (asked of that interpreter, since only it has bpy)."""
    result = subprocess.run(
        [str(find_render_python()), "-c", BUNDLED_MAPS_QUERY], capture_output=True, text=True, check=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def read_env_map(path: str | os.PathLike[str]) -> Float[Tensor, "H W 3"]:
    """Linear RGB of an equirectangular OpenEXR map, row 0 at the top (v = 0, the +Z pole)."""
    if Path(path).suffix.lower() != ".exr":
        raise ValueError(f"{path}: environment maps are read as OpenEXR; convert it to .exr")
    channels = read_channels(path)
    rgb = np.stack([channels[c] for c in ("R", "G", "B")], axis=-1).astype(np.float32)
    return torch.from_numpy(np.nan_to_num(rgb, nan=0.0, posinf=0.0).clip(min=0.0))


class EnvMapStore:
    def __init__(self, folders: list[str | os.PathLike[str]], map_size: tuple[int, int]) -> None:
        self.map_size = map_size
        self.paths: dict[str, Path] = {}
        self.names: dict[str, str] = {}
        for folder in folders:
            for path in sorted(Path(folder).glob("*.exr")):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                self.paths.setdefault(digest, path)
                self.names.setdefault(path.name, digest)
        if not self.paths:
            raise NotFound(f"no .exr environment maps in {[str(f) for f in folders]}")
        self._cache: dict[str, Tensor] = {}

    def digest_of(self, name: str) -> str:
        """The content address of the map stored as `name` (a file name, as render records name maps)."""
        if name not in self.names:
            raise EnvMapNotFound(f"no environment map named {name!r}; the store has {sorted(self.names)}")
        return self.names[name]

    def get(self, digest: str) -> Float[Tensor, "H W 3"]:
        """The map with this sha256, resized to `map_size`."""
        if digest not in self._cache:
            if digest not in self.paths:
                raise EnvMapNotFound(
                    f"environment map sha256 {digest} is in no configured folder; add the folder holding the maps "
                    f"the release was rendered with to `env_maps`"
                )
            hdr = read_env_map(self.paths[digest]).permute(2, 0, 1)[None]
            self._cache[digest] = F.interpolate(hdr, size=self.map_size, mode="area")[0].permute(1, 2, 0)
        return self._cache[digest]
