"""Read a pinned release for training with pyarrow and zarr alone (no catalog, no pyiceberg, no SQLite).

    <data_root>/releases/<name>/release.json       snapshot id, manifest sha256, spec hashes, code version
    <data_root>/releases/<name>/manifest.parquet   one row per (sample, role): pack path (relative), slices,
                                                   content digest; sorted by sample_id, role

The manifest's sha256 is checked on open (against release.json and, when given, the caller's pin); packs are
opened lazily and one asset's role is one slice per array. A damaged record, manifest or pack raises a typed
error that names the file (`catalogs.errors`), never a traceback from deep inside pyarrow or zarr.
"""

import collections
import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogs.errors import ReleaseIntegrityError, ReleaseNotFound, check_release_name
from catalogs.packs import ArraySlice, PackReader
from catalogs.storage import RootPath, read_parquet_bytes, root_path

RELEASE_FILE = "release.json"
MANIFEST_FILE = "manifest.parquet"
RECORD_FIELDS = ("name", "manifest", "manifest_sha256", "snapshot_id", "roles", "num_rows", "num_samples", "splits")
"""Fields every release.json has; a missing or null one is damage."""
MANIFEST_COLUMNS = ("sample_id", "split", "role", "step", "artifact_key", "pack_path", "arrays", "content_digest")
SHARED_SPLIT = "shared"
"""Split of the rows of a shared role: one per env map, not per asset, in no training split."""
OPEN_PACKS = 64
"""Packs kept open per reader (an LRU)."""


def release_dir(data_root: str | os.PathLike[str], name: str) -> RootPath:
    return root_path(data_root) / "releases" / check_release_name(name)


def read_record(folder: RootPath) -> dict:
    """A release folder's release.json, with every field of RECORD_FIELDS present and not null.

    Raises:
        ReleaseIntegrityError: not JSON, not an object, or a field missing or null.
    """
    path = folder / RELEASE_FILE
    try:
        info = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ReleaseIntegrityError(f"{path} is unreadable: {type(err).__name__}: {err}") from err
    if not isinstance(info, dict):
        raise ReleaseIntegrityError(f"{path} holds a {type(info).__name__}, not a release record")
    missing = [field for field in RECORD_FIELDS if info.get(field) is None]
    if missing:
        raise ReleaseIntegrityError(f"{path} is damaged: {', '.join(missing)} missing or null")
    if info["name"] != folder.name:
        raise ReleaseIntegrityError(f"{path} names release {info['name']!r}, but lies in folder {folder.name!r}")
    return info


@dataclasses.dataclass
class Release:
    """An opened release: its record, its manifest and lazy access to the packs it names."""

    data_root: RootPath
    info: dict
    manifest: pa.Table
    _rows: dict[tuple[str, str], int] = dataclasses.field(init=False, repr=False)
    _packs: collections.OrderedDict = dataclasses.field(init=False, repr=False, default_factory=collections.OrderedDict)
    _pid: int = dataclasses.field(init=False, repr=False, default_factory=os.getpid)

    def __post_init__(self) -> None:
        pairs = zip(self.manifest["sample_id"].to_pylist(), self.manifest["role"].to_pylist())
        self._rows = {pair: i for i, pair in enumerate(pairs)}

    @classmethod
    def open(cls, data_root: str | os.PathLike[str], name: str, expected_sha256: str | None = None) -> "Release":
        """Raises:
        InvalidReleaseName: `name` is not one plain path component (`../x`, `/abs`, `.hidden`).
        ReleaseNotFound: no published release of that name (no release.json).
        ReleaseIntegrityError: a damaged record or manifest, or a manifest that is not the one recorded or pinned.
        """
        folder = release_dir(data_root, name)
        if not (folder / RELEASE_FILE).is_file():
            raise ReleaseNotFound(f"no release {name!r} under {folder.parent}")
        info = read_record(folder)
        path = folder / MANIFEST_FILE
        try:
            manifest_bytes = path.read_bytes()
        except OSError as err:
            raise ReleaseIntegrityError(f"{path} is unreadable: {err}") from err
        actual = hashlib.sha256(manifest_bytes).hexdigest()
        for pinned, source in ((info["manifest_sha256"], RELEASE_FILE), (expected_sha256, "the caller's pin")):
            if pinned is not None and actual != pinned:
                raise ReleaseIntegrityError(f"release {name!r}: manifest sha256 {actual} does not match {source} ({pinned})")
        try:
            manifest = read_parquet_bytes(manifest_bytes)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ReleaseIntegrityError(f"{path} is not a readable parquet file: {err}") from err
        missing = sorted(set(MANIFEST_COLUMNS) - set(manifest.column_names))
        if missing:
            raise ReleaseIntegrityError(f"{path} lacks the columns {missing}")
        return cls(root_path(data_root), info, manifest)

    @property
    def split_rule(self) -> dict | None:
        """The rule that put each sample in train, val or test (`catalogs.splits.SplitRule.to_dict`); None for a
        release published before releases recorded it (train and val only, by a hash of the asset id)."""
        return self.info.get("split_rule")

    @property
    def test_roles(self) -> frozenset[str]:
        """Roles only the `test` samples have (render_eval's ground truth); none for releases before split rules."""
        return frozenset(self.info.get("test_roles", ()))

    @property
    def sample_ids(self) -> list[str]:
        """The assets of the release (not the shared rows, such as its env maps)."""
        rows = self.manifest.filter(pc.not_equal(self.manifest["split"], SHARED_SPLIT))
        return list(dict.fromkeys(rows["sample_id"].to_pylist()))

    def has(self, sample_id: str, role: str) -> bool:
        """Whether the sample has a row of `role` (test-only roles exist for test samples alone)."""
        return (sample_id, role) in self._rows

    def array_names(self, sample_id: str, role: str) -> list[str]:
        """The names of the arrays of a sample's role, read from the manifest (no pack is opened)."""
        return [item["name"] for item in self._row(sample_id, role)["arrays"]]

    def split(self, name: str) -> list[str]:
        """The samples of split `name` (`train`, `val`, `test`; `shared` for rows such as the env maps)."""
        rows = self.manifest.filter(pc.equal(self.manifest["split"], name))
        return list(dict.fromkeys(rows["sample_id"].to_pylist()))

    def read(
        self, sample_id: str, role: str, *, names: tuple[str, ...] | None = None, verify: bool = False
    ) -> dict[str, np.ndarray]:
        """One sample's arrays of one role (for example `slat_lh`), or only those in `names`: one slice per array.

        Every chunk read is checked (present, checksum); `verify` also checks the content digest, which reads
        every array of the role. Packs without chunk checksums are always digest-checked.

        Raises:
            DamagedPackError: a chunk the read needs is missing or undecodable, or the digest does not match.
        """
        row = self._row(sample_id, role)
        slices = [ArraySlice.from_dict(item) for item in row["arrays"]]
        return self._pack(row["pack_path"]).read_names(slices, names, digest=row["content_digest"],
                                                       where=f"{sample_id}/{role}", verify=verify)

    def read_row(self, sample_id: str, role: str, name: str, index: int) -> np.ndarray:
        """Row `index` of one array of a sample's role (one view or frame), reading only its own chunk."""
        row = self._row(sample_id, role)
        for item in row["arrays"]:
            a = ArraySlice.from_dict(item)
            if a.name == name:
                if not 0 <= index < a.row_count:
                    raise IndexError(f"{sample_id}/{role}/{name} has {a.row_count} rows, asked for row {index}")
                pack = self._pack(row["pack_path"])
                if not pack.is_checked:
                    return self.read(sample_id, role)[name][index]
                return pack.rows(a, a.row_start + index, where=f"{sample_id}/{role}")
        raise KeyError(f"{sample_id}/{role} has no array {name!r}")

    def _row(self, sample_id: str, role: str) -> dict:
        try:
            return self.manifest.slice(self._rows[(sample_id, role)], 1).to_pylist()[0]
        except KeyError:
            raise KeyError(f"release {self.info['name']!r} has no ({sample_id!r}, {role!r})") from None

    def _pack(self, pack_path: str) -> PackReader:
        if self._pid != os.getpid():  # a forked data-loader worker: an object store's client is per process
            self._packs.clear()
            self._pid = os.getpid()
        if pack_path in self._packs:
            self._packs.move_to_end(pack_path)
        else:
            self._packs[pack_path] = PackReader(self.data_root, pack_path)
            if len(self._packs) > OPEN_PACKS:
                self._packs.popitem(last=False)
        return self._packs[pack_path]

