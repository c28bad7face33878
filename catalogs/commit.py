"""The commit protocol: bytes first (packs, written by whoever executed the step), then registry rows (one
commit per batch, by the build's driver), as Iceberg's writers and committer split the work.

A crash between the two leaves only unreferenced packs, which `gc` collects; the rerun's planner still sees
the keys as missing and executes them again under fresh pack ids.
"""

import dataclasses
import json
import os
import socket
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalogs.packs import PackedAsset, write_pack
from catalogs.tables import FactoryCatalog


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What executing one step on one asset gave, in memory: arrays (ok) or a reason and message (failed)."""

    artifact_key: str
    arrays: Mapping[str, np.ndarray] | None = None
    reason: str | None = None
    """`infra.errors.Reason` value of a failure."""
    message: str = ""
    stats: Mapping[str, object] = dataclasses.field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.arrays is not None


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    """One executed artifact as the registry records it: where its bytes are (ok) or why it failed. Small: it is
    all that travels from a worker to the driver."""

    artifact_key: str
    packed: PackedAsset | None = None
    reason: str | None = None
    message: str = ""
    stderr_tail: str = ""
    stats: Mapping[str, object] = dataclasses.field(default_factory=dict)
    duration_s: float = 0.0
    worker: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if (self.packed is None) == (self.reason is None):
            raise ValueError(f"{self.artifact_key}: an artifact record has a pack (ok) or a reason (failed)")

    @property
    def ok(self) -> bool:
        return self.packed is not None


def write_batch(data_root: str | os.PathLike[str], todo: pa.Table, results: Sequence[StepResult],
                run_id: str) -> list[ArtifactRecord]:
    """Write one pack holding the ok results and return the records of every result; `todo` holds the planner's
    rows of these keys, all of one step. (The build's actors write a pack per call themselves.)"""
    steps = set(todo["step"].to_pylist())
    if len(steps) != 1:
        raise ValueError(f"a batch is one step; got {sorted(steps)}")
    ok = [(r.artifact_key, r.arrays) for r in results if r.ok]
    packed = write_pack(data_root, steps.pop(), todo["spec_hash"][0].as_py(), run_id, ok) if ok else []
    where = {p.artifact_key: p for p in packed}
    return [ArtifactRecord(r.artifact_key, where.get(r.artifact_key), None if r.ok else r.reason or "unknown",
                           r.message, stats=r.stats, duration_s=r.duration_s) for r in results]


def commit_batch(catalog: FactoryCatalog, todo: pa.Table, records: Sequence[ArtifactRecord], run_id: str) -> int:
    """One registry commit with a row per record (planner rows of the same keys in `todo`); returns the
    snapshot id."""
    index = pc.index_in(pa.array([r.artifact_key for r in records], pa.string()), value_set=todo["artifact_key"])
    if pc.any(pc.is_null(index)).as_py():
        raise ValueError("every record must be one of the batch's planned keys")
    planned = todo.take(index).select(["artifact_key", "step", "spec_hash", "asset_id", "source_id", "inputs"])
    rows = planned.append_column("status", pa.array(["ok" if r.ok else "failed" for r in records], pa.string()))
    for name, values in {
        "error": [r.message or None if not r.ok else None for r in records],
        "reason": [r.reason for r in records],
        "stderr_tail": [r.stderr_tail or None for r in records],
        "pack_path": [r.packed.pack_path if r.ok else None for r in records],
        "arrays": [[a.to_dict() for a in r.packed.arrays] if r.ok else None for r in records],
        "content_digest": [r.packed.content_digest if r.ok else None for r in records],
        "stats_json": [json.dumps(dict(r.stats), sort_keys=True) for r in records],
        "worker": [r.worker for r in records],
        "duration_s": [r.duration_s for r in records],
    }.items():
        rows = rows.append_column(name, pa.array(values))
    return catalog.commit_artifacts(rows, run_id)
