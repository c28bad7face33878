"""Environment maps by content: the factory records, per relight frame, the sha256 of the map it was lit with
(`frame_env_map`), so training finds the same pixels whatever the file was called or where it lay.

The release is the source. The build packs every map its recipes draw as role `env_maps`, one row per map:
`sample_id` `env_map:<file name>`, `source_id` the file's sha256, split `shared` (never in train or val). A
training node therefore needs neither Blender nor the map files. Folders of .exr maps (found by hashing their
bytes) remain only for releases made before the build packed env maps.

Each map is read on first use, resized by area averaging to the lighting tokenizer's size, and kept in memory
(per process: every data-loader worker keeps its own).
"""

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from catalogs.errors import ReleaseIntegrityError
from catalogs.keys import ENV_MAP_KIND
from catalogs.release_reader import Release
from infra.errors import FactoryError, NotFound
from pipelines.steps import ENV_MAPS
from render_jobs.exr import read_env_map

__all__ = ["ENV_MAP_PREFIX", "EnvMapNotFound", "EnvMapStore", "packed_env_maps"]

logger = logging.getLogger(__name__)

ENV_MAP_PREFIX = f"{ENV_MAP_KIND}:"
"""An `env_maps` row's sample_id is this prefix and the map's file name."""


class EnvMapNotFound(FactoryError, LookupError):
    """The store lacks a map that a frame (by sha256) or the config (by file name) names, or the release packs
    no maps at all; the message names the release or folders and the fix."""


def packed_env_maps(release: Release) -> dict[str, tuple[str, str]]:
    """The maps a release packs: file name -> (sample_id, sha256); empty for a release made before the build
    packed env maps.

    Raises:
        ReleaseIntegrityError: an `env_maps` row whose sample_id lacks the `env_map:` prefix or whose
            source_id is not a sha256 (a damaged or foreign manifest).
    """
    rows = release.manifest.filter(pc.equal(release.manifest["role"], ENV_MAPS))
    maps = {}
    for sample_id, digest in zip(rows["sample_id"].to_pylist(), rows["source_id"].to_pylist()):
        name = sample_id.removeprefix(ENV_MAP_PREFIX)
        if name == sample_id or not _is_sha256(digest):
            raise ReleaseIntegrityError(
                f"release {release.info['name']!r}: {ENV_MAPS!r} row {sample_id!r} (source_id {digest!r}) "
                f"is not '{ENV_MAP_PREFIX}<file name>' with a sha256 source_id; the manifest is damaged: "
                f"rebuild the release"
            )
        maps[name] = (sample_id, digest)
    return maps


def resize_env_map(rgb: Float[Tensor, "H W 3"], map_size: tuple[int, int]) -> Float[Tensor, "He We 3"]:
    """A linear map at the lighting tokenizer's size (area averaging, so the energy of a small sun is kept)."""
    hdr = rgb.float().permute(2, 0, 1)[None]
    return F.interpolate(hdr, size=tuple(map_size), mode="area")[0].permute(1, 2, 0)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class EnvMapStore:
    """Environment maps by sha256, each (H, W, 3) linear RGB resized to `map_size`, row 0 at the +Z pole.

    Build one with `from_release` (the maps the release packs) or `from_folders` (.exr files: only for
    releases made before maps were packed); `get(digest)` serves a frame's map, `digest_of(name)` finds a map
    by the file name the render recorded, `name_of(digest)` is the reverse.
    """

    def __init__(
        self, maps: dict[str, tuple[str, str]], map_size: tuple[int, int], *, source: str,
        release: Release | None = None,
    ) -> None:  # fmt: skip
        """`maps`: file name -> (location, sha256), a location being a release sample_id when `release` is
        given, else an .exr path; `source` says where the maps come from, for error messages."""
        self.map_size, self.source, self._release = map_size, source, release
        self.names = {name: digest for name, (_, digest) in sorted(maps.items())}
        self._locations: dict[str, str] = {}
        self._names_by_digest: dict[str, str] = {}
        for name, (location, digest) in sorted(maps.items()):
            self._locations.setdefault(digest, location)
            self._names_by_digest.setdefault(digest, name)
        self._cache: dict[str, Tensor] = {}

    @classmethod
    def from_release(
        cls, release: Release, map_size: tuple[int, int], *, folders: Sequence[str | os.PathLike[str]] = ()
    ) -> "EnvMapStore":
        """The maps `release` packs (role `env_maps`), read lazily from its packs.

        Args:
            release: an opened release.
            map_size: (H, W) every map is resized to (the lighting tokenizer's).
            folders: used only when the release packs no maps (made before the build packed them): folders
                of the .exr maps it was rendered with. Ignored, with a warning, for a release that packs maps.

        Raises:
            EnvMapNotFound: the release packs no maps and no folders are given; the message names the fix.
        """
        name = release.info["name"]
        maps = packed_env_maps(release)
        if maps:
            if folders:
                logger.warning(
                    "release %r packs its %d environment maps: the configured env_maps folders %s are "
                    "ignored", name, len(maps), [str(f) for f in folders],
                )  # fmt: skip
            return cls(maps, map_size, source=f"release {name!r}", release=release)
        if not folders:
            raise EnvMapNotFound(
                f"release {name!r} packs no environment maps (no {ENV_MAPS!r} rows): it was made before "
                f"the build packed them. Rebuild the release (a new release name) with the current build, "
                f"or, for this old release, set the Stage 2 config's `env_maps` to the folders of the .exr "
                f"maps it was rendered with"
            )
        logger.warning(
            "release %r packs no environment maps: reading them from the configured folders %s (rebuild the "
            "release to drop this)", name, [str(f) for f in folders],
        )  # fmt: skip
        return cls.from_folders(folders, map_size)

    @classmethod
    def from_folders(
        cls, folders: Sequence[str | os.PathLike[str]], map_size: tuple[int, int]
    ) -> "EnvMapStore":
        """The .exr maps in `folders` (not recursive), by the sha256 of their bytes; the first folder holding
        a file name wins it.

        Raises:
            NotFound: no .exr file in any of the folders.
        """
        maps: dict[str, tuple[str, str]] = {}
        for folder in folders:
            for path in sorted(Path(folder).glob("*.exr")):
                if path.name not in maps:
                    maps[path.name] = (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
        if not maps:
            raise NotFound(f"no .exr environment maps in {[str(f) for f in folders]}")
        return cls(maps, map_size, source=f"folders {[str(f) for f in folders]}")

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, digest: object) -> bool:
        return digest in self._locations

    def digest_of(self, name: str) -> str:
        """The sha256 of the map stored as `name` (its file name, as the render recorded it)."""
        if name not in self.names:
            raise EnvMapNotFound(
                f"no environment map named {name!r} in {self.source}; it has {sorted(self.names)}"
            )
        return self.names[name]

    def name_of(self, digest: str) -> str:
        """The file name of the map with this sha256 (the first in name order if several share its bytes)."""
        self._require(digest)
        return self._names_by_digest[digest]

    def require(self, digests: set[str] | frozenset[str], *, where: str = "") -> None:
        """Fail fast, before training, if any of `digests` (those some frames were lit with) is not stored.

        Raises:
            EnvMapNotFound: names the missing digests, `where` they are used, and the store's source.
        """
        missing = sorted(set(digests) - self._locations.keys())
        if missing:
            raise EnvMapNotFound(self._missing_message(missing, where))

    def get(self, digest: str) -> Float[Tensor, "H W 3"]:
        """The map with this sha256, resized to `map_size`.

        Raises:
            EnvMapNotFound: no map with this sha256 in the store.
            ReleaseIntegrityError: the release's pixels are not (H, W, 3).
        """
        if digest not in self._cache:
            self._require(digest)
            self._cache[digest] = resize_env_map(self._read(self._locations[digest]), self.map_size)
        return self._cache[digest]

    def _require(self, digest: str) -> None:
        if digest not in self._locations:
            raise EnvMapNotFound(self._missing_message([digest], ""))

    def _missing_message(self, digests: list[str], where: str) -> str:
        used = f" (used by {where})" if where else ""
        if self._release is not None:
            return (
                f"environment map sha256 {', '.join(digests)}{used} is not among the {len(self)} maps "
                f"{self.source} packs; the release is inconsistent (frames lit by maps it does not carry): "
                f"rebuild it"
            )
        return (
            f"environment map sha256 {', '.join(digests)}{used} is in none of the {self.source}; add the "
            f"folder holding the maps the release was rendered with to `env_maps`, or rebuild the release so "
            f"it packs them"
        )

    def _read(self, location: str) -> Float[Tensor, "H W 3"]:
        if self._release is None:
            return torch.from_numpy(read_env_map(location))
        rgb = self._release.read(location, ENV_MAPS)["rgb"]
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ReleaseIntegrityError(
                f"{self.source}: {location}/{ENV_MAPS} rgb has shape {rgb.shape}, not (H, W, 3): "
                f"rebuild the release"
            )
        return torch.from_numpy(np.array(rgb, dtype=np.float32))  # a writable copy, whatever the pack gave
