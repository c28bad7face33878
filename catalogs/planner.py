"""What a build must run: every target key from sources x steps, minus what the registry already holds.

Keys come from `keys.StepGraph` alone, so planning reads only the `sources` and the (key, status) columns of
`artifacts`, never a tensor. work = targets - ok - (failed, unless retrying); running a key twice is harmless
(readers keep the earliest `ok` row of a key).
"""

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from catalogs.keys import StepGraph
from catalogs.tables import FactoryCatalog

TARGET_SCHEMA = pa.schema([
    ("asset_id", pa.string()), ("source_id", pa.string()), ("step", pa.string()), ("spec_hash", pa.string()),
    ("artifact_key", pa.string()), ("inputs", pa.list_(pa.struct([("role", pa.string()), ("key", pa.string())]))),
])


@dataclasses.dataclass(frozen=True)
class Plan:
    targets: pa.Table
    """Every (asset, step) key: TARGET_SCHEMA plus `status` (ok, failed or null for never run)."""
    todo: pa.Table
    """The targets to execute, in step order."""

    def counts(self) -> dict[str, dict[str, int]]:
        """step -> {targets, ok, failed, todo}."""
        out: dict[str, dict[str, int]] = {}
        for step in dict.fromkeys(self.targets["step"].to_pylist()):
            rows = self.targets.filter(pc.equal(self.targets["step"], step))
            status = rows["status"]
            out[step] = {
                "targets": rows.num_rows,
                "ok": pc.sum(pc.equal(status, "ok")).as_py() or 0,
                "failed": pc.sum(pc.equal(status, "failed")).as_py() or 0,
                "todo": pc.sum(pc.equal(self.todo["step"], step)).as_py() or 0,
            }
        return out


def target_keys(graph: StepGraph, sources: pa.Table) -> pa.Table:
    """TARGET_SCHEMA rows for every (source in `sources`, step of `graph` over its kind) that the step runs for
    (`StepSpec.only`), step-major in dependency order. Sources without a `kind` column are assets."""
    per_step: dict[str, list[tuple]] = {name: [] for name in graph.names}
    kinds = sources["kind"].to_pylist() if "kind" in sources.column_names else ["asset"] * sources.num_rows
    steps_of = {kind: graph.over(kind) for kind in set(kinds)}
    for asset_id, source_id, kind in zip(sources["asset_id"].to_pylist(), sources["source_id"].to_pylist(), kinds):
        for step, (key, inputs) in graph.keys_of(source_id, steps_of[kind]).items():
            per_step[step].append((asset_id, source_id, step, graph.spec_hashes[step], key,
                                   [{"role": r, "key": k} for r, k in inputs.items()]))
    rows = [row for step_rows in per_step.values() for row in step_rows]
    return pa.table([list(column) for column in zip(*rows)] if rows else [[] for _ in TARGET_SCHEMA], schema=TARGET_SCHEMA)


def plan(catalog: FactoryCatalog, graph: StepGraph, sources: pa.Table | None = None, *, retry_failed: bool = False) -> Plan:
    """The work of a build over `sources` (default: the current revision of every registered source)."""
    sources = catalog.current_sources() if sources is None else sources
    targets = target_keys(graph, sources)
    status = catalog.artifact_status()
    index = pc.index_in(targets["artifact_key"], value_set=status["artifact_key"])
    targets = targets.append_column("status", pc.take(status["status"], index))
    done = pc.equal(targets["status"], "ok") if retry_failed else pc.is_in(targets["status"], pa.array(["ok", "failed"]))
    return Plan(targets, targets.filter(pc.invert(pc.fill_null(done, False))))
