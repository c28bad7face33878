"""Read a pinned release for training with pyarrow and zarr alone (no catalog, no pyiceberg, no SQLite).

    <data_root>/releases/<name>/release.json       snapshot id, manifest sha256, spec hashes, code version
    <data_root>/releases/<name>/manifest.parquet   one row per (sample, role): pack path (relative), slices,
                                                   content digest; sorted by sample_id, role

The manifest's sha256 is checked on open (against release.json and, when given, the caller's pin); packs are
opened lazily and one asset's role is one slice per array.
"""

import collections
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from catalogs.keys import sha256_file
from catalogs.packs import ArraySlice, content_digest, open_pack_array

RELEASE_FILE = "release.json"
MANIFEST_FILE = "manifest.parquet"
OPEN_ARRAYS = 256
"""Pack arrays kept open per reader (an LRU)."""


class ReleaseIntegrityError(RuntimeError):
    """The release on disk is not the one pinned: a changed manifest, a wrong pin, a bad digest."""


def release_dir(data_root: str | os.PathLike[str], name: str) -> Path:
    return Path(data_root) / "releases" / name


@dataclasses.dataclass
class Release:
    """An opened release: its record, its manifest and lazy access to the packs it names."""

    data_root: Path
    info: dict
    manifest: pa.Table
    _rows: dict[tuple[str, str], int] = dataclasses.field(init=False, repr=False)
    _arrays: collections.OrderedDict = dataclasses.field(init=False, repr=False, default_factory=collections.OrderedDict)

    def __post_init__(self) -> None:
        pairs = zip(self.manifest["sample_id"].to_pylist(), self.manifest["role"].to_pylist())
        self._rows = {pair: i for i, pair in enumerate(pairs)}

    @classmethod
    def open(cls, data_root: str | os.PathLike[str], name: str, expected_sha256: str | None = None) -> "Release":
        folder = release_dir(data_root, name)
        if not (folder / RELEASE_FILE).is_file():
            raise FileNotFoundError(f"no release {name!r} under {Path(data_root) / 'releases'}")
        info = json.loads((folder / RELEASE_FILE).read_text())
        actual = sha256_file(folder / MANIFEST_FILE)
        for pinned, source in ((info["manifest_sha256"], RELEASE_FILE), (expected_sha256, "the caller's pin")):
            if pinned is not None and actual != pinned:
                raise ReleaseIntegrityError(f"release {name!r}: manifest sha256 {actual} does not match {source} ({pinned})")
        return cls(Path(data_root), info, pq.read_table(folder / MANIFEST_FILE))

    @property
    def sample_ids(self) -> list[str]:
        return list(dict.fromkeys(self.manifest["sample_id"].to_pylist()))

    def split(self, name: str) -> list[str]:
        rows = self.manifest.filter(pc.equal(self.manifest["split"], name))
        return list(dict.fromkeys(rows["sample_id"].to_pylist()))

    def read(
        self, sample_id: str, role: str, *, names: tuple[str, ...] | None = None, verify: bool = False
    ) -> dict[str, np.ndarray]:
        """One sample's arrays of one role (for example `slat_lh`), or only those in `names`: one slice per array.
        `verify` checks the content digest, which needs every array."""
        if verify and names is not None:
            raise ValueError("verify needs every array of the role; leave names unset")
        row = self._row(sample_id, role)
        arrays = {}
        for item in row["arrays"]:
            a = ArraySlice.from_dict(item)
            if names is not None and a.name not in names:
                continue
            arrays[a.name] = self._array(row["pack_path"], a.name)[a.row_start : a.row_start + a.row_count]
        if verify and content_digest(arrays) != row["content_digest"]:
            raise ReleaseIntegrityError(f"{sample_id}/{role}: content digest mismatch in {row['pack_path']}")
        return arrays

    def read_row(self, sample_id: str, role: str, name: str, index: int) -> np.ndarray:
        """Row `index` of one array of a sample's role (one view or frame), reading only its own chunk."""
        row = self._row(sample_id, role)
        for item in row["arrays"]:
            a = ArraySlice.from_dict(item)
            if a.name == name:
                if not 0 <= index < a.row_count:
                    raise IndexError(f"{sample_id}/{role}/{name} has {a.row_count} rows, asked for row {index}")
                return self._array(row["pack_path"], name)[a.row_start + index]
        raise KeyError(f"{sample_id}/{role} has no array {name!r}")

    def _row(self, sample_id: str, role: str) -> dict:
        try:
            return self.manifest.slice(self._rows[(sample_id, role)], 1).to_pylist()[0]
        except KeyError:
            raise KeyError(f"release {self.info['name']!r} has no ({sample_id!r}, {role!r})") from None

    def _array(self, pack_path: str, name: str) -> zarr.Array:
        key = (pack_path, name)
        if key in self._arrays:
            self._arrays.move_to_end(key)
        else:
            self._arrays[key] = open_pack_array(self.data_root, pack_path, name)
            if len(self._arrays) > OPEN_ARRAYS:
                self._arrays.popitem(last=False)
        return self._arrays[key]
