"""Make a release: select samples, overwrite `samples`, tag the snapshot, export the pinned manifest.

Order (bytes, then rows, then the release): the manifest is written (whole or not at all), the `samples`
snapshot is committed with the digest of the whole release record in its summary and tagged `rel-<name>`, and
`release.json` (the commit point: readers require it) is written last, exclusively (`storage.write_exclusive`:
a link locally, a conditional put in an object store), so a name can never be silently reused. A crash before
`release.json` leaves no release; retrying the same name then replaces only the unpublished pieces. The catalog's tagged snapshot is the witness `verify` checks a release against: its rows
are the manifest's, and its `release_digest` covers every field of release.json but the snapshot's own id and
metadata file (`record_digest`).
"""

import collections
import dataclasses
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalogs.errors import CatalogError, ReleaseExistsError, check_release_name
from catalogs.keys import StepGraph, digest, package_version
from catalogs.planner import target_keys
from catalogs.release_reader import MANIFEST_FILE, RELEASE_FILE, SHARED_SPLIT, release_dir
from catalogs.splits import TEST, SplitRule
from catalogs.storage import RootPath, write_exclusive
from catalogs.tables import SCHEMAS, FactoryCatalog, utc_now

logger = logging.getLogger(__name__)

TAG_PREFIX = "rel-"
SNAPSHOT_FIELDS = ("snapshot_id", "metadata_location")
"""Fields of release.json known only once the snapshot exists, so outside `record_digest`."""


@dataclasses.dataclass(frozen=True)
class SampleFilter:
    """Keep a sample only if the stat `stat` recorded by its `step` artifact satisfies every bound given.

    A sample whose `step` has no `ok` artifact, or whose stats lack `stat` (or hold null), is removed. Bounds
    are inclusive and apply to numbers (not booleans) and to lists, by their length; `equals` matches booleans
    only to booleans. With no bound at all, the filter keeps the samples that recorded the stat.

    Examples:
        >>> SampleFilter("measure", "num_voxels", min=1, max=65536).describe()
        '1 <= num_voxels <= 65536'
        >>> SampleFilter("import", "has_base_color_texture", equals=True).describe()
        'has_base_color_texture == True'
    """

    step: str
    """The step whose `ok` artifact (for the sample's asset) holds the stat in its stats_json."""
    stat: str
    """Top-level key of that stats_json."""
    min: float | None = None
    max: float | None = None
    equals: bool | int | float | str | None = None

    def __post_init__(self) -> None:
        if not self.step or not self.stat:
            raise ValueError(f"a sample filter needs a step and a stat, got {self.step!r}, {self.stat!r}")
        for name in ("min", "max"):
            bound = getattr(self, name)
            if bound is None:
                continue
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
                raise TypeError(f"filter {self.stat}: {name} must be a number, got {bound!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filter {self.stat}: min {self.min} is above max {self.max}")
        if self.equals is not None and not isinstance(self.equals, (bool, int, float, str)):
            raise TypeError(f"filter {self.stat}: equals must be a bool, number or string: {self.equals!r}")

    def keeps(self, value: Any) -> bool:
        """Whether a recorded value (None: not recorded) satisfies every bound."""
        if value is None:
            return False
        if self.equals is not None:
            if isinstance(self.equals, bool) or isinstance(value, bool):
                if value is not self.equals:
                    return False
            elif value != self.equals:
                return False
        if self.min is None and self.max is None:
            return True
        if isinstance(value, list):  # a recorded list (the materials rebuilt, ...) is bounded by its length
            value = len(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = []
        if self.equals is not None:
            parts.append(f"{self.stat} == {self.equals!r}")
        if self.min is not None and self.max is not None:
            parts.append(f"{self.min} <= {self.stat} <= {self.max}")
        elif self.min is not None:
            parts.append(f"{self.stat} >= {self.min}")
        elif self.max is not None:
            parts.append(f"{self.stat} <= {self.max}")
        return " and ".join(parts) or f"{self.stat} is recorded"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What `select_samples` found: the samples rows and how the filters narrowed the candidates."""

    rows: pa.Table
    """SCHEMAS["samples"] rows, one per kept sample and role."""
    candidates: int
    """Samples with an `ok` artifact for every role their split needs, before the filters."""
    filters: list[dict[str, Any]]
    """Per filter, in order: its to_dict(), its `description` and how many samples it `removed`."""


@dataclasses.dataclass(frozen=True)
class ReleaseSpec:
    """Which artifacts form a sample, which samples are in, and which split each is in.

    Examples:
        >>> spec = ReleaseSpec("v1", {"latents": "slat_lh", "eval": "render_eval"}, test_roles=frozenset({"eval"}))
        >>> spec.split
        SplitRule(test_percent=1.0, val_percent=5.0)
    """

    name: str
    roles: Mapping[str, str]
    """Role in the release -> step whose `ok` artifact fills it (e.g. {"latents": "encode"})."""
    _: dataclasses.KW_ONLY
    split: SplitRule = SplitRule()
    """train / val / test of each sample, by its source_id (`catalogs.splits`): keep `test_percent` fixed across
    releases, so that no test asset is ever trained on."""
    filters: tuple[SampleFilter, ...] = ()
    """Applied in order to the complete samples; recorded in release.json with what each removed."""
    shared_roles: frozenset[str] = frozenset()
    """Roles with a row per item of their own (the env maps), split `shared`, not per sample."""
    test_roles: frozenset[str] = frozenset()
    """Roles that only test samples have and need (render_eval's ground truth, made for test assets only): a
    test sample is complete only with them, and no other sample gets their rows."""
    held_out_env_maps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """File name -> sha256 of the env maps held out for evaluation (Stage 2 never trains on them), recorded in
    release.json so training and `near eval` read one list."""

    def __post_init__(self) -> None:
        check_release_name(self.name)
        if not self.roles:
            raise ValueError("a release needs at least one role")
        if not isinstance(self.split, SplitRule):
            raise TypeError(f"release split must be a SplitRule, got {self.split!r}")
        object.__setattr__(self, "filters", tuple(self.filters))
        wrong = [f for f in self.filters if not isinstance(f, SampleFilter)]
        if wrong:
            raise TypeError(f"release filters must be SampleFilter, got {wrong!r}")
        for name in ("shared_roles", "test_roles"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"release {name} must be a set of role names, got the string {value!r}")
            object.__setattr__(self, name, frozenset(value))
        unknown = sorted(self.test_roles - set(self.roles))
        if unknown:
            raise ValueError(f"release test_roles {unknown} are not roles of the release ({sorted(self.roles)})")
        if self.test_roles & self.shared_roles:
            raise ValueError(f"roles {sorted(self.test_roles & self.shared_roles)} cannot be both shared and test-only")
        if not set(self.roles) - self.shared_roles - self.test_roles:
            raise ValueError(f"release {self.name!r} needs a role that every sample has, "
                             f"not only shared or test roles ({sorted(self.roles)})")


def record_digest(record: Mapping) -> str:
    """The digest a release's tagged snapshot carries: every field of release.json but SNAPSHOT_FIELDS."""
    return digest({key: value for key, value in record.items() if key not in SNAPSHOT_FIELDS})


def select_samples(catalog: FactoryCatalog, graph: StepGraph, spec: ReleaseSpec) -> Selection:
    """Samples rows (one per sample and role) of every current source with an `ok` artifact for every role its
    split needs (`spec.split` of its source_id; the test roles for test samples only) and that every filter of
    `spec` keeps. Raises ValueError if a filter names a step the graph lacks."""
    unknown = sorted({f.step for f in spec.filters} - set(graph.names))
    if unknown:
        raise ValueError(f"release {spec.name!r} filters on steps {unknown} that the graph lacks "
                         f"(it has {sorted(graph.names)})")
    sources = catalog.current_sources()
    steps = set(spec.roles.values())
    targets = target_keys(graph, sources)
    filter_steps = pa.array(sorted({f.step for f in spec.filters}), pa.string())
    filter_targets = targets.filter(pc.is_in(targets["step"], filter_steps))
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
    shared = pc.is_in(candidates["role"], pa.array(sorted(spec.shared_roles), pa.string()))
    shared_rows, candidates = candidates.filter(shared), candidates.filter(pc.invert(shared))
    candidates, full = _complete_samples(candidates, spec)
    kept, removed = apply_filters(full, _stats_by_step(filter_targets, ok), spec.filters)
    rows = candidates.filter(pc.is_in(candidates["asset_id"], pa.array(kept, pa.string())))
    if kept:  # a release of no sample needs no shared rows (and is refused as empty)
        rows = pa.concat_tables([
            rows, shared_rows.append_column("split", pa.array([SHARED_SPLIT] * shared_rows.num_rows, pa.string()))])
    rows = rows.rename_columns({"asset_id": "sample_id"})
    rows = rows.append_column("weight", pa.array([1.0] * rows.num_rows, pa.float32()))
    rows = rows.select(SCHEMAS["samples"].names).cast(SCHEMAS["samples"]).sort_by([("sample_id", "ascending"), ("role", "ascending")])
    filters = [{**f.to_dict(), "description": f.describe(), "removed": n}
               for f, n in zip(spec.filters, removed)]
    return Selection(rows, candidates=len(full), filters=filters)


def _complete_samples(candidates: pa.Table, spec: ReleaseSpec) -> tuple[pa.Table, list[str]]:
    """The per-sample rows with their `split` column (test-role rows of samples not in test dropped), and the
    sorted ids of the samples complete for their split: every per-sample role, plus the test roles in test."""
    source_ids = candidates["source_id"].to_pylist()
    split_by_source = {source_id: spec.split.split_of(source_id) for source_id in set(source_ids)}
    candidates = candidates.append_column("split", pa.array([split_by_source[s] for s in source_ids], pa.string()))
    test_role = pc.is_in(candidates["role"], pa.array(sorted(spec.test_roles), pa.string()))
    candidates = candidates.filter(pc.or_(pc.invert(test_role), pc.equal(candidates["split"], TEST)))
    per_sample = len(set(spec.roles) - spec.shared_roles - spec.test_roles)
    needed = {False: per_sample, True: per_sample + len(spec.test_roles)}
    asset_ids, roles = candidates["asset_id"].to_pylist(), candidates["role"].to_pylist()
    is_test = {asset_id: split == TEST for asset_id, split in zip(asset_ids, candidates["split"].to_pylist())}
    counts = collections.Counter(asset_ids)
    full = sorted(a for a, n in counts.items() if n == needed[is_test[a]])
    if spec.test_roles:  # complete but for a test role: the build's rule (StepSpec.only) may not be the release's
        plain = collections.Counter(a for a, role in zip(asset_ids, roles) if role not in spec.test_roles)
        lacking = sum(1 for a, n in plain.items() if is_test[a] and n == per_sample and counts[a] < needed[True])
        if lacking:
            logger.warning("release %s: %d test samples lack a test role %s and are left out (was the build's "
                           "split rule the release's %s?)", spec.name, lacking, sorted(spec.test_roles), spec.split)
    return candidates, full


def apply_filters(sample_ids: Sequence[str], stats_by_step: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  filters: Sequence[SampleFilter]) -> tuple[list[str], list[int]]:
    """The samples every filter keeps (in the given order) and how many each filter removed of what the
    filters before it kept.

    Args:
        sample_ids: candidate samples (their asset ids).
        stats_by_step: step -> sample id -> the stats of that step's `ok` artifact for the sample; a sample
            missing here has no `ok` artifact of that step, and every filter on the step removes it.
        filters: applied in order.

    Examples:
        >>> f = SampleFilter("measure", "num_voxels", min=2)
        >>> stats = {"measure": {"a": {"num_voxels": 5}, "b": {"num_voxels": 1}}}  # c: no ok measure
        >>> apply_filters(["a", "b", "c"], stats, [f])
        (['a'], [2])
    """
    kept, removed = list(sample_ids), []
    for sample_filter in filters:
        stats = stats_by_step.get(sample_filter.step, {})
        passed = [s for s in kept if sample_filter.keeps(stats.get(s, {}).get(sample_filter.stat))]
        removed.append(len(kept) - len(passed))
        kept = passed
    return kept, removed


def _stats_by_step(targets: pa.Table, ok: pa.Table) -> dict[str, dict[str, dict[str, Any]]]:
    """step -> asset id -> stats_json of the `ok` artifact at the asset's target key (absent when not ok)."""
    index = pc.index_in(targets["artifact_key"], value_set=ok["artifact_key"])
    found = pc.is_valid(index)
    stats_json = pc.take(ok["stats_json"], index.filter(found)).to_pylist()
    out: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    found_targets = targets.filter(found)
    steps, asset_ids = found_targets["step"].to_pylist(), found_targets["asset_id"].to_pylist()
    for step, asset_id, text in zip(steps, asset_ids, stats_json):
        out[step][asset_id] = json.loads(text) if text else {}
    return dict(out)


def create_release(catalog: FactoryCatalog, graph: StepGraph, spec: ReleaseSpec) -> dict:
    """Publish release `spec.name`; returns its release.json record. Raises ReleaseExistsError if it exists."""
    folder = release_dir(catalog.data_root, spec.name)
    if (folder / RELEASE_FILE).exists():
        raise ReleaseExistsError(f"release {spec.name!r} already exists ({folder / RELEASE_FILE}); pick a new name")
    selection = select_samples(catalog, graph, spec)
    samples = selection.rows
    if not samples.num_rows and selection.candidates:
        described = "; ".join(f["description"] for f in selection.filters)
        raise CatalogError(f"release {spec.name!r} would be empty: the filters removed all "
                           f"{selection.candidates} complete samples ({described})")
    if not samples.num_rows:
        raise CatalogError(f"release {spec.name!r} would be empty: no source has ok artifacts for every role {dict(spec.roles)}")
    role_specs = {role: {"step": step, "spec_hash": graph.spec_hashes[step]} for role, step in sorted(spec.roles.items())}
    artifacts_snapshot = catalog.table("artifacts").current_snapshot()
    sources_snapshot = catalog.table("sources").current_snapshot()
    manifest = pa.BufferOutputStream()
    pq.write_table(samples, manifest)
    manifest_sha256 = _publish_exclusive(folder / MANIFEST_FILE, manifest.getvalue().to_pybytes(),
                                         replace_unpublished=True)
    tag = TAG_PREFIX + spec.name
    record = {
        "name": spec.name, "table": "factory.samples", "tag": tag, "manifest": MANIFEST_FILE,
        "manifest_sha256": manifest_sha256, "num_rows": samples.num_rows,
        "num_samples": len(kept_samples(samples)), "splits": _split_counts(samples), "roles": role_specs,
        "candidates": selection.candidates, "filters": selection.filters,
        "split_rule": spec.split.to_dict(), "test_roles": sorted(spec.test_roles),
        "held_out_env_maps": dict(sorted(spec.held_out_env_maps.items())),
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
        _publish_exclusive(folder / RELEASE_FILE, json.dumps(record, indent=1).encode())
    except FileExistsError:
        raise ReleaseExistsError(f"release {spec.name!r} was published concurrently by another process") from None
    return record


def kept_samples(samples: pa.Table) -> set[str]:
    """The sample ids of a release's rows, not counting its shared rows."""
    return set(samples.filter(pc.not_equal(samples["split"], SHARED_SPLIT))["sample_id"].to_pylist())


def _split_counts(samples: pa.Table) -> dict[str, int]:
    per_sample = dict(zip(samples["sample_id"].to_pylist(), samples["split"].to_pylist()))
    return dict(collections.Counter(per_sample.values()))


def _publish_exclusive(path: RootPath, data: bytes, *, replace_unpublished: bool = False) -> str:
    """Write `data` to `path`, failing if `path` exists; returns its sha256.

    `replace_unpublished` allows replacing a file that no release.json refers to yet (a crashed attempt)."""
    if replace_unpublished and path.exists() and not (path.parent / RELEASE_FILE).exists():
        path.unlink()
    write_exclusive(path, data)
    return hashlib.sha256(data).hexdigest()
