"""Make a release: select samples, overwrite `samples`, tag the snapshot, export the pinned manifest.

Order (bytes, then rows, then the release): the manifest is written (through a temporary file), the `samples`
snapshot is committed with the digest of the whole release record in its summary and tagged `rel-<name>`, and
`release.json` (the commit point: readers require it) is linked last, exclusively, so a name can never be
silently reused. A crash before `release.json` leaves no release; retrying the same name then replaces only the
unpublished pieces. The catalog's tagged snapshot is the witness `verify` checks a release against: its rows
are the manifest's, and its `release_digest` covers every field of release.json but the snapshot's own id and
metadata file (`record_digest`).
"""

import collections
import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalogs.errors import CatalogError, ReleaseExistsError, check_release_name
from catalogs.keys import StepGraph, digest, package_version, sha256_file
from catalogs.planner import target_keys
from catalogs.release_reader import MANIFEST_FILE, RELEASE_FILE, release_dir
from catalogs.tables import SCHEMAS, FactoryCatalog, utc_now

TAG_PREFIX = "rel-"
SNAPSHOT_FIELDS = ("snapshot_id", "metadata_location")
"""Fields of release.json known only once the snapshot exists, so outside `record_digest`."""


@dataclasses.dataclass(frozen=True)
class ReleaseSpec:
    """Which artifacts form a sample and which samples are in."""

    name: str
    roles: Mapping[str, str]
    """Role in the release -> step whose `ok` artifact fills it (e.g. {"slat_lh": "slat_lh"})."""
    val_percent: int = 5
    """Share of samples in the `val` split, by a stable hash of the sample id."""
    where: Callable[[pa.Table], pa.Array] | None = None
    """Optional filter over the candidate rows (sample_id, role, step, stats_json, ...) -> boolean mask."""
    selection: str = ""
    """Human-readable description of `where`, recorded in release.json."""

    def __post_init__(self) -> None:
        check_release_name(self.name)
        if not self.roles:
            raise ValueError("a release needs at least one role")


def record_digest(record: Mapping) -> str:
    """The digest a release's tagged snapshot carries: every field of release.json but SNAPSHOT_FIELDS."""
    return digest({key: value for key, value in record.items() if key not in SNAPSHOT_FIELDS})


def split_of(sample_id: str, val_percent: int) -> str:
    return "val" if int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) % 100 < val_percent else "train"


def select_samples(catalog: FactoryCatalog, graph: StepGraph, spec: ReleaseSpec) -> pa.Table:
    """Samples rows (one per sample and role) of every current source whose every role has an `ok` artifact."""
    sources = catalog.current_sources()
    steps = set(spec.roles.values())
    targets = target_keys(graph, sources)
    targets = targets.filter(pc.is_in(targets["step"], pa.array(sorted(steps))))
    ok = catalog.ok_artifacts()
    index = pc.index_in(targets["artifact_key"], value_set=ok["artifact_key"])
    found = pc.is_valid(index)
    joined = targets.select(["asset_id", "source_id", "step", "artifact_key"]).filter(found)
    for column in ("pack_path", "arrays", "content_digest", "stats_json"):
        joined = joined.append_column(column, pc.take(ok[column], index.filter(found)))
    parts = []
    for role, step in sorted(spec.roles.items()):
        rows = joined.filter(pc.equal(joined["step"], step))
        parts.append(rows.append_column("role", pa.array([role] * rows.num_rows, pa.string())))
    candidates = pa.concat_tables(parts) if parts else joined
    if spec.where is not None:
        candidates = candidates.filter(spec.where(candidates))
    complete = pc.value_counts(candidates["asset_id"])
    full = [v["values"] for v in complete.to_pylist() if v["counts"] == len(spec.roles)]
    rows = candidates.filter(pc.is_in(candidates["asset_id"], pa.array(full, pa.string())))
    rows = rows.rename_columns({"asset_id": "sample_id"})
    splits = [split_of(s, spec.val_percent) for s in rows["sample_id"].to_pylist()]
    rows = rows.append_column("split", pa.array(splits, pa.string()))
    rows = rows.append_column("weight", pa.array([1.0] * rows.num_rows, pa.float32()))
    return rows.select(SCHEMAS["samples"].names).cast(SCHEMAS["samples"]).sort_by([("sample_id", "ascending"), ("role", "ascending")])


def create_release(catalog: FactoryCatalog, graph: StepGraph, spec: ReleaseSpec) -> dict:
    """Publish release `spec.name`; returns its release.json record. Raises ReleaseExistsError if it exists."""
    folder = release_dir(catalog.data_root, spec.name)
    if (folder / RELEASE_FILE).exists():
        raise ReleaseExistsError(f"release {spec.name!r} already exists ({folder / RELEASE_FILE}); pick a new name")
    samples = select_samples(catalog, graph, spec)
    if not samples.num_rows:
        raise CatalogError(f"release {spec.name!r} would be empty: no source has ok artifacts for every role {dict(spec.roles)}")
    role_specs = {role: {"step": step, "spec_hash": graph.spec_hashes[step]} for role, step in sorted(spec.roles.items())}
    artifacts_snapshot = catalog.table("artifacts").current_snapshot()
    sources_snapshot = catalog.table("sources").current_snapshot()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_sha256 = _publish_exclusive(folder / MANIFEST_FILE, lambda path: pq.write_table(samples, path), replace_unpublished=True)
    tag = TAG_PREFIX + spec.name
    record = {
        "name": spec.name, "table": "factory.samples", "tag": tag, "manifest": MANIFEST_FILE,
        "manifest_sha256": manifest_sha256, "num_rows": samples.num_rows,
        "num_samples": len(set(samples["sample_id"].to_pylist())), "splits": _split_counts(samples), "roles": role_specs,
        "selection": spec.selection, "val_percent": spec.val_percent,
        "artifacts_snapshot_id": artifacts_snapshot.snapshot_id if artifacts_snapshot else None,
        "sources_snapshot_id": sources_snapshot.snapshot_id if sources_snapshot else None,
        "code_version": package_version(), "created_at": utc_now().isoformat(),
    }
    table = catalog.table("samples")
    properties = {"release": spec.name, "spec_hashes": json.dumps(role_specs, sort_keys=True),
                  "release_digest": record_digest(record)}
    with warnings.catch_warnings():  # overwriting an empty table "matches no records": expected, not news
        warnings.filterwarnings("ignore", "Delete operation did not match any records")
        table.overwrite(samples, snapshot_properties=properties)
    table = catalog.table("samples")
    snapshot_id = table.current_snapshot().snapshot_id
    if tag in table.refs():  # left by a crashed attempt that never published release.json
        table.manage_snapshots().remove_tag(tag).commit()
    table.manage_snapshots().create_tag(snapshot_id, tag).commit()
    record.update(snapshot_id=snapshot_id, metadata_location=table.metadata_location)
    try:
        _publish_exclusive(folder / RELEASE_FILE, lambda path: Path(path).write_text(json.dumps(record, indent=1)))
    except FileExistsError:
        raise ReleaseExistsError(f"release {spec.name!r} was published concurrently by another process") from None
    return record


def _split_counts(samples: pa.Table) -> dict[str, int]:
    per_sample = dict(zip(samples["sample_id"].to_pylist(), samples["split"].to_pylist()))
    return dict(collections.Counter(per_sample.values()))


def _publish_exclusive(path: Path, write: Callable[[str], None], *, replace_unpublished: bool = False) -> str:
    """Write through a temporary file and link it to `path`, failing if `path` exists; returns its sha256.

    `replace_unpublished` allows replacing a file that no release.json refers to yet (a crashed attempt)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if replace_unpublished and path.exists() and not (path.parent / RELEASE_FILE).exists():
            path.unlink()
        os.link(tmp, path)
        return sha256_file(path)
    finally:
        os.unlink(tmp)
