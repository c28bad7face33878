"""Garbage: pack folders that no committed registry row, tagged snapshot or published release names.

Such folders come from a writer that died between writing its pack and committing its rows (or while
writing, as `.tmp-*`). They are deleted only after a grace period, so a batch still on its way to its commit
is never touched. Committed rows are facts and are never removed, so nothing a release names is ever garbage;
the tagged `samples` snapshots and the release manifests on disk are checked as well. What counts as proof of
"unreferenced" is only the registry of this very root: `FactoryCatalog` refuses a catalog that is not the
root's own (another root's, an empty one), and gc refuses when a manifest cannot be read.
"""

import dataclasses
import time

from catalogs.errors import GcRefused
from catalogs.release_reader import MANIFEST_FILE
from catalogs.releases import TAG_PREFIX
from catalogs.storage import read_parquet_bytes, remove_tree, tree_stats
from catalogs.tables import FactoryCatalog

DEFAULT_GRACE_S = 7 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class Garbage:
    pack_path: str
    """Relative to the data root."""
    reason: str
    age_s: float
    size_bytes: int


def live_packs(catalog: FactoryCatalog) -> set[str]:
    """Every pack a committed artifact row, a tagged `samples` snapshot or a release manifest names."""
    live = {p for p in catalog.read("artifacts", ("pack_path",))["pack_path"].to_pylist() if p}
    samples = catalog.table("samples")
    for name, ref in samples.refs().items():
        if name.startswith(TAG_PREFIX):
            live.update(catalog.read("samples", ("pack_path",), snapshot_id=ref.snapshot_id)["pack_path"].to_pylist())
    for manifest in (catalog.data_root / "releases").glob(f"*/{MANIFEST_FILE}"):
        try:
            table = read_parquet_bytes(manifest.read_bytes(), columns=["pack_path"])
            live.update(table["pack_path"].to_pylist())
        except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on a damaged file
            raise GcRefused(f"cannot read {manifest} ({err}); not collecting while a release's references are unknown") from err
    return live


def find_garbage(catalog: FactoryCatalog, grace_s: float = DEFAULT_GRACE_S) -> list[Garbage]:
    """Unreferenced pack folders older than `grace_s`, oldest first."""
    live = live_packs(catalog)
    now = time.time()
    found = []
    for folder in sorted((catalog.data_root / "packs").glob("*/*/*")):
        relative = folder.relative_to(catalog.data_root).as_posix()
        if not folder.is_dir() or relative in live:
            continue
        newest, size = tree_stats(folder)
        age = now - newest
        if age < grace_s:
            continue
        reason = ("unfinished pack: its writer died while writing" if folder.name.startswith(".tmp-")
                  else "orphan pack: written, but its rows were never committed")
        found.append(Garbage(relative, reason, age, size))
    return sorted(found, key=lambda g: -g.age_s)


def collect_garbage(catalog: FactoryCatalog, garbage: list[Garbage]) -> int:
    """Delete the given garbage (re-checking liveness first); returns bytes freed."""
    live = live_packs(catalog)
    freed = 0
    for item in garbage:
        if item.pack_path in live:
            raise GcRefused(f"{item.pack_path} became referenced after it was listed; not deleting it")
        remove_tree(catalog.data_root / item.pack_path)
        freed += item.size_bytes
    return freed
