"""Real catalogs on disk (SQLite + Iceberg warehouse + Zarr packs) filled with small synthetic tensors."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalogs.commit import StepResult, commit_batch, write_batch
from catalogs.keys import StepGraph, StepSpec
from catalogs.planner import Plan
from catalogs.tables import FactoryCatalog
from infra.errors import Reason


def paper_graph(**overrides: dict) -> StepGraph:
    """The six build steps with small params; `overrides` maps a step to replacement fields."""
    specs = {
        "normalize": dict(version="1", inputs=("source",), params={"bbox": 0.5}),
        "voxelize": dict(version="1", inputs=("normalize",), params={"resolution": 64}),
        "render_lh": dict(version="1", inputs=("normalize",), params={"views": 150, "px": 512}),
        "features": dict(version="1", inputs=("voxelize", "render_lh"), models={"dinov2": "d" * 64}),
        "slat_lh": dict(version="1", inputs=("features",), models={"slat_encoder": "e" * 64}),
        "render_relight": dict(version="1", inputs=("normalize",), params={"views": 12, "lights": 16}),
    }
    for step, fields in overrides.items():
        specs[step] = {**specs[step], **fields}
    return StepGraph(StepSpec(name, **fields) for name, fields in specs.items())


def synthetic_sources(n: int, start: int = 0) -> pa.Table:
    ids = [f"demo:{i:06d}" for i in range(start, start + n)]
    return pa.table({"asset_id": ids, "source_id": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
                     "uri": [f"memory://{i}" for i in ids], "size": [1000] * n, "kind": ["glb"] * n, "origin": ["test"] * n})


def fake_output(step: str, key: str) -> dict[str, np.ndarray]:
    """Small deterministic tensors standing in for a step's output (ragged: the row count varies by key)."""
    rng = np.random.default_rng(int(key[:12], 16))
    n = int(rng.integers(1, 40))
    if step.startswith("render"):
        return {"images": rng.integers(0, 255, (4, 8, 8, 4), dtype=np.uint8)}
    return {"coords": rng.integers(0, 64, (n, 3), dtype=np.uint8), "feats": rng.normal(size=(n, 8)).astype(np.float32)}


def execute(catalog: FactoryCatalog, plan: Plan, run_id: str, *, fail: frozenset[str] = frozenset(), batch: int = 64) -> None:
    """Run every todo key step by step (assets in `fail` fail), a pack and a commit per batch."""
    for step in dict.fromkeys(plan.todo["step"].to_pylist()):
        rows = plan.todo.filter(pc.equal(plan.todo["step"], step))
        for start in range(0, rows.num_rows, batch):
            todo = rows.slice(start, batch)
            results = [StepResult(key, reason=Reason.IMPORT_ERROR.value, message="synthetic failure") if asset in fail
                       else StepResult(key, fake_output(step, key))
                       for key, asset in zip(todo["artifact_key"].to_pylist(), todo["asset_id"].to_pylist())]
            commit_batch(catalog, todo, write_batch(catalog.data_root, todo, results, run_id), run_id)


@pytest.fixture
def catalog(tmp_path) -> FactoryCatalog:
    return FactoryCatalog(tmp_path / "data")
