"""The commit protocol of one executed batch: bytes first (one pack), then registry rows (one commit).

A crash between the two leaves only an unreferenced pack, which `gc` collects; the rerun's planner still sees
the keys as missing and executes them again under a fresh pack id.
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
    """What executing one step on one asset gave: arrays (ok) or an error (failed)."""

    artifact_key: str
    arrays: Mapping[str, np.ndarray] | None = None
    error: str = ""
    stats: Mapping[str, object] = dataclasses.field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.arrays is not None


def write_batch(data_root: str | os.PathLike[str], todo: pa.Table, results: Sequence[StepResult], run_id: str) -> list[PackedAsset]:
    """Write the batch's pack (ok results only); `todo` holds the planner's rows of these keys, all one step."""
    steps = set(todo["step"].to_pylist())
    if len(steps) != 1:
        raise ValueError(f"a batch is one step; got {sorted(steps)}")
    ok = [(r.artifact_key, r.arrays) for r in results if r.ok]
    if not ok:
        return []
    return write_pack(data_root, steps.pop(), todo["spec_hash"][0].as_py(), run_id, ok)


def commit_batch(catalog: FactoryCatalog, todo: pa.Table, results: Sequence[StepResult], packed: Sequence[PackedAsset],
                 run_id: str) -> int:
    """One registry commit with a row per result; returns the snapshot id."""
    index = pc.index_in(pa.array([r.artifact_key for r in results], pa.string()), value_set=todo["artifact_key"])
    if pc.any(pc.is_null(index)).as_py():
        raise ValueError("every result must be one of the batch's planned keys")
    planned = todo.take(index).select(["artifact_key", "step", "spec_hash", "asset_id", "source_id", "inputs"])
    where = {p.artifact_key: p for p in packed}
    worker = f"{socket.gethostname()}:{os.getpid()}"
    rows = planned.append_column("status", pa.array(["ok" if r.ok else "failed" for r in results], pa.string()))
    for name, values in {
        "error": [r.error or None for r in results],
        "pack_path": [where[r.artifact_key].pack_path if r.ok else None for r in results],
        "arrays": [[a.to_dict() for a in where[r.artifact_key].arrays] if r.ok else None for r in results],
        "content_digest": [where[r.artifact_key].content_digest if r.ok else None for r in results],
        "stats_json": [json.dumps(dict(r.stats), sort_keys=True) for r in results],
        "worker": [worker] * len(results),
        "duration_s": [r.duration_s for r in results],
    }.items():
        rows = rows.append_column(name, pa.array(values))
    return catalog.commit_artifacts(rows, run_id)
