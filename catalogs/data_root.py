"""A data root: the one folder that holds everything a build commits, known by the id in its marker file.

    <root>/near-root.json   {"format": "near-data-root/1", "root_id": <uuid4 hex>, "created_at": ...}
    <root>/catalog.db       the default SQLite catalog; its `factory` namespace records the same root id
    <root>/warehouse/       Iceberg tables, stored at locations relative to the root (`near-root:///warehouse/...`)
    <root>/packs/  releases/  reports/  scratch/

The root may be a local folder or an object-store URL (`s3://bucket/prefix`; `catalogs.storage`).

The id ties a catalog to its root: every open compares them, so a wrong `--catalog-uri` (another root's catalog,
an empty one) is refused before gc could take committed packs for orphans. Every location the catalog and the
releases store is relative to the root, so a root can be copied, moved or mounted at another path and keeps
working. Roots made before the marker existed ("legacy") have no id; they are recognised by their folders.
"""

import dataclasses
import datetime
import json
import os
import uuid

from catalogs.errors import CatalogError, NotADataRoot
from catalogs.storage import RootPath, is_local, root_path, write_exclusive

MARKER_FILE = "near-root.json"
ROOT_FORMAT = "near-data-root/1"
DATA_FOLDERS = ("packs", "releases")
"""Folders whose content only a catalog can account for."""
_LEGACY_SIGNS = ("catalog.db", "warehouse", *DATA_FOLDERS)


@dataclasses.dataclass(frozen=True)
class DataRoot:
    path: RootPath
    root_id: str | None
    """None for a legacy root (made before root ids)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "DataRoot":
        """An existing data root; writes nothing.

        Raises:
            NotADataRoot: the folder is missing or holds neither a marker nor a legacy root's folders.
        """
        path = root_path(path)
        if not path.is_dir():
            raise NotADataRoot(f"data root {path} does not exist")
        marker = path / MARKER_FILE
        if marker.exists():
            return cls(path, _read_marker(marker))
        if any((path / name).exists() for name in _LEGACY_SIGNS):
            return cls(path, None)
        raise NotADataRoot(f"{path} is not a data root (no {MARKER_FILE}): check --root / data_root")

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> "DataRoot":
        """The root at `path`, made with a fresh id if the folder has none yet (legacy roots keep theirs unset:
        the catalog adopts them once it has checked they are its own). In an object store the bucket must
        exist: a mistyped bucket name is an error, not a new bucket.

        Raises:
            NotADataRoot: the bucket of a URL root does not exist.
        """
        path = root_path(path)
        if is_local(path):
            path.mkdir(parents=True, exist_ok=True)
        elif not path.fs.exists(path.path.split("/")[0]):
            raise NotADataRoot(f"cannot make data root {path}: its bucket does not exist (create it first)")
        try:
            return cls.open(path)
        except NotADataRoot:
            return cls(path, None).with_new_id()

    def with_new_id(self) -> "DataRoot":
        """Write a marker with a fresh id, atomically: a crash leaves no half-written marker, and of two
        processes making the same root at once the first one's id stands."""
        root_id = uuid.uuid4().hex
        record = {"format": ROOT_FORMAT, "root_id": root_id,
                  "created_at": datetime.datetime.now(datetime.UTC).isoformat()}
        try:
            write_exclusive(self.path / MARKER_FILE, (json.dumps(record, indent=1) + "\n").encode())
        except FileExistsError:
            return DataRoot.open(self.path)
        return dataclasses.replace(self, root_id=root_id)

    def holds_data(self) -> bool:
        """Whether anything under packs/ or releases/ exists (which no new catalog could account for)."""
        return any(any((self.path / name).iterdir()) for name in DATA_FOLDERS if (self.path / name).is_dir())


def _read_marker(marker: RootPath) -> str:
    try:
        record = json.loads(marker.read_text())
        if record.get("format") != ROOT_FORMAT or not isinstance(record.get("root_id"), str):
            raise ValueError(f"expected format {ROOT_FORMAT!r} with a root_id, got {record!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise CatalogError(f"damaged data root marker {marker}: {err}") from err
    return record["root_id"]
