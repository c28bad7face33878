"""Re-check what the catalog and releases promise against the bytes on disk."""

import dataclasses
from collections.abc import Callable, Iterator

from catalogs.packs import ArraySlice, content_digest, read_asset
from catalogs.release_reader import Release
from catalogs.tables import FactoryCatalog


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str
    what: str


def verify_release(release: Release, on_row: Callable[[], None] = lambda: None) -> Iterator[Problem]:
    """Every (sample, role) of an opened release (its manifest sha256 was checked on open): pack present,
    content digest equal to the one recorded."""
    for row in release.manifest.select(["sample_id", "role", "pack_path", "arrays", "content_digest"]).to_pylist():
        where = f"{row['sample_id']}/{row['role']}"
        yield from _check(release.data_root, where, row)
        on_row()


def verify_catalog(catalog: FactoryCatalog, *, deep: bool = False, on_row: Callable[[], None] = lambda: None) -> Iterator[Problem]:
    """Every `ok` artifact: its pack exists; with `deep`, its bytes still hash to its content digest."""
    rows = catalog.ok_artifacts().select(["artifact_key", "step", "asset_id", "pack_path", "arrays", "content_digest"])
    for row in rows.to_pylist():
        yield from _check(catalog.data_root, f"{row['step']}/{row['asset_id']}", row, deep=deep)
        on_row()


def _check(data_root, where: str, row: dict, *, deep: bool = True) -> Iterator[Problem]:
    """The row's pack exists and, when `deep`, its bytes still hash to the recorded digest."""
    if not (data_root / row["pack_path"]).is_dir():
        yield Problem(where, f"pack {row['pack_path']} is missing")
        return
    if not deep:
        return
    arrays = read_asset(data_root, row["pack_path"], [ArraySlice.from_dict(a) for a in row["arrays"]])
    if content_digest(arrays) != row["content_digest"]:
        yield Problem(where, f"content digest mismatch in {row['pack_path']}")
