"""Re-check what the catalog and the releases promise against the bytes and records on disk.

Every check yields `Problem`s and goes on: one damaged pack, sample or release is reported by name with its
reason, and the rest is still checked. A release is checked against its witness in the catalog, the tagged
`samples` snapshot: same rows as the manifest, and a `release_digest` equal to the digest of release.json; and
each sample's split is re-derived from the split rule release.json records.
"""

import collections
import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterator

import pyarrow as pa

from catalogs.errors import CatalogError, DamagedPackError
from catalogs.packs import ArraySlice, PackReader
from catalogs.release_reader import RELEASE_FILE, SHARED_SPLIT, Release
from catalogs.releases import TAG_PREFIX, record_digest
from catalogs.splits import TEST, TRAIN, VAL, SplitRule
from catalogs.storage import RootPath
from catalogs.tables import SCHEMAS, FactoryCatalog

SHOWN_DIFFERENCES = 3
"""Differing manifest rows named per release; the rest are counted."""


@dataclasses.dataclass(frozen=True)
class Problem:
    where: str
    what: str


def verify_catalog(catalog: FactoryCatalog, *, deep: bool = False, on_row: Callable[[], None] = lambda: None) -> Iterator[Problem]:
    """Every `ok` artifact: its pack exists; with `deep`, its chunks decode (checksums) and hash to its digest."""
    rows = catalog.ok_artifacts().select(["artifact_key", "step", "asset_id", "pack_path", "arrays", "content_digest"])
    yield from _check_rows(catalog.data_root, rows.sort_by("pack_path").to_pylist(), deep, on_row,
                           where=lambda row: f"{row['step']}/{row['asset_id']}")


def verify_release(release: Release, on_row: Callable[[], None] = lambda: None) -> Iterator[Problem]:
    """Every (sample, role) of an opened release (its manifest sha256 was checked on open): pack present, chunks
    decodable, content digest equal to the one recorded."""
    rows = release.manifest.select(["sample_id", "role", "pack_path", "arrays", "content_digest"])
    yield from _check_rows(release.data_root, rows.sort_by("pack_path").to_pylist(), True, on_row,
                           where=lambda row: f"{row['sample_id']}/{row['role']}")


def verify_release_record(catalog: FactoryCatalog, release: Release) -> Iterator[Problem]:
    """The release against the catalog's tagged snapshot, and release.json against the manifest."""
    info = release.info
    where = f"release {info['name']}"
    samples = catalog.table("samples")
    tag = TAG_PREFIX + info["name"]
    ref = samples.refs().get(tag)
    if ref is None:
        yield Problem(where, f"the catalog has no tag {tag}: not a release of this catalog")
        return
    if ref.snapshot_id != info["snapshot_id"]:
        yield Problem(where, f"release.json names snapshot {info['snapshot_id']}, the catalog's tag {ref.snapshot_id}")
    summary = samples.snapshot_by_id(ref.snapshot_id).summary
    recorded = summary.additional_properties.get("release_digest") if summary else None
    if recorded is None:
        yield Problem(where, "the tagged snapshot carries no release digest (an older release): release.json is unchecked")
    elif recorded != record_digest(info):
        yield Problem(where, f"{RELEASE_FILE} was changed since it was published (its digest differs from the catalog's)")
    witness = catalog.read("samples", snapshot_id=ref.snapshot_id)
    yield from _compare_rows(where, release.manifest, witness)
    yield from _check_counts(where, release)


def verify_published_releases(catalog: FactoryCatalog) -> Iterator[Problem]:
    """Every published release of the root: it opens (record, manifest sha256) and matches the catalog."""
    for record in sorted((catalog.data_root / "releases").glob(f"*/{RELEASE_FILE}")):
        name = record.parent.name
        try:
            release = Release.open(catalog.data_root, name)
        except CatalogError as err:
            yield Problem(f"release {name}", str(err))
            continue
        yield from verify_release_record(catalog, release)


def _check_rows(data_root: RootPath, rows: list[dict], deep: bool, on_row: Callable[[], None],
                where: Callable[[dict], str]) -> Iterator[Problem]:  # fmt: skip
    """Rows sorted by pack: each pack is opened once."""
    for pack_path, group in itertools.groupby(rows, key=lambda row: row["pack_path"]):
        try:
            reader = PackReader(data_root, pack_path)
        except DamagedPackError as err:
            reader, damage = None, str(err)
        for row in group:
            if reader is None:
                yield Problem(where(row), damage)
            elif deep:
                try:
                    reader.read([ArraySlice.from_dict(a) for a in row["arrays"]], digest=row["content_digest"])
                except DamagedPackError as err:
                    yield Problem(where(row), str(err))
            on_row()


def _compare_rows(where: str, manifest: pa.Table, witness: pa.Table) -> Iterator[Problem]:
    columns = SCHEMAS["samples"].names

    def keyed(table: pa.Table) -> dict[tuple[str, str], tuple]:
        rows = table.select(columns).to_pylist()
        return {(r["sample_id"], r["role"]): tuple(str(r[c]) for c in columns) for r in rows}

    ours, theirs = keyed(manifest), keyed(witness)
    differing = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differing:
        named = ", ".join(f"{sample}/{role}" for sample, role in differing[:SHOWN_DIFFERENCES])
        more = f" and {len(differing) - SHOWN_DIFFERENCES} more" if len(differing) > SHOWN_DIFFERENCES else ""
        yield Problem(where, f"the manifest differs from the catalog's tagged snapshot at {named}{more}")


def _check_counts(where: str, release: Release) -> Iterator[Problem]:
    """release.json's counts, splits and roles against its manifest (which the sha256 pins)."""
    info, manifest = release.info, release.manifest
    splits = dict(zip(manifest["sample_id"].to_pylist(), manifest["split"].to_pylist()))
    facts = {
        "num_rows": manifest.num_rows,
        "num_samples": sum(1 for split in splits.values() if split != SHARED_SPLIT),
        "splits": dict(collections.Counter(splits.values())),
        "roles": sorted(set(manifest["role"].to_pylist())),
    }
    absent = set() if TEST in splits.values() else release.test_roles  # test-only roles need a test sample
    recorded = {**{key: info[key] for key in facts}, "roles": sorted(set(info["roles"]) - absent)}
    for key, value in facts.items():
        if recorded[key] != value:
            yield Problem(where, f"{RELEASE_FILE} says {key} = {recorded[key]}, the manifest has {value}")
    steps = dict(zip(manifest["role"].to_pylist(), manifest["step"].to_pylist()))
    for role, spec in info["roles"].items():
        if role in steps and steps[role] != spec.get("step"):
            yield Problem(where, f"role {role} is step {spec.get('step')} in {RELEASE_FILE}, {steps[role]} in the manifest")
    yield from _check_splits(where, release, splits)


def _check_splits(where: str, release: Release, splits: dict[str, str]) -> Iterator[Problem]:
    """Each sample's split against the rule release.json records, and the test-only roles against the splits."""
    info, manifest = release.info, release.manifest
    if "split_rule" not in info:
        if "val_percent" in info:  # a release before split rules: train / val by a hash of the asset id
            wrong = [s for s, split in splits.items()
                     if split in (TRAIN, VAL) and split != _split_before_rules(s, info["val_percent"])]
            if wrong:
                yield Problem(where, f"{len(wrong)} samples are not in the split val_percent={info['val_percent']} puts them in")
        return
    try:
        rule = SplitRule.from_dict(info["split_rule"])
    except (TypeError, ValueError, KeyError) as err:
        yield Problem(where, f"{RELEASE_FILE} records a split rule this code cannot check: {err}")
        return
    if "source_id" not in manifest.column_names:
        yield Problem(where, "the manifest has no source_id column: its splits cannot be checked")
        return
    sources = dict(zip(manifest["sample_id"].to_pylist(), manifest["source_id"].to_pylist()))
    wrong = sorted(s for s, split in splits.items() if split != SHARED_SPLIT and split != _rule_split(rule, sources[s]))
    if wrong:
        yield Problem(where, f"{len(wrong)} samples are not in the split {RELEASE_FILE}'s split rule puts them in "
                             f"(first: {wrong[0]})")
    test_roles = release.test_roles
    outside = sorted({s for s, role in zip(manifest["sample_id"].to_pylist(), manifest["role"].to_pylist())
                      if role in test_roles and splits[s] != TEST})
    if outside:
        yield Problem(where, f"{len(outside)} samples outside test have rows of the test-only roles "
                             f"{sorted(test_roles)} (first: {outside[0]})")
    roles_of = collections.defaultdict(set)
    for sample, role in zip(manifest["sample_id"].to_pylist(), manifest["role"].to_pylist()):
        roles_of[sample].add(role)
    lacking = sorted(s for s, split in splits.items() if split == TEST and not test_roles <= roles_of[s])
    if lacking:
        yield Problem(where, f"{len(lacking)} test samples lack a test-only role of {sorted(test_roles)} "
                             f"(first: {lacking[0]})")


def _rule_split(rule: SplitRule, source_id: str) -> str | None:
    try:
        return rule.split_of(source_id)
    except ValueError:  # not a sha256: no split is right for it
        return None


def _split_before_rules(sample_id: str, val_percent: int) -> str:
    """The split of releases published before split rules (release.json's `val_percent`, no test split)."""
    return VAL if int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) % 100 < val_percent else TRAIN
