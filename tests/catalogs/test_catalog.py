"""Iceberg tables, the planner and the commit protocol on a real SQLite catalog."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalogs.commit import ArtifactRecord, StepResult, commit_batch, write_batch
from catalogs.errors import StaleVersionError
from catalogs.keys import StepSpec
from catalogs.planner import plan
from catalogs.tables import static_table

from .conftest import execute, paper_graph, synthetic_sources


def test_incremental_plans_follow_the_rebuild_table(catalog):
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(20), run_id="ingest-1")
    first = plan(catalog, graph)
    assert {s: c["todo"] for s, c in first.counts().items()} == {s: 20 for s in graph.names}
    execute(catalog, first, "run-1", fail=frozenset({"demo:000003"}))

    again = plan(catalog, graph)
    assert again.todo.num_rows == 0, "a no-op rebuild plans nothing (failures are not retried by default)"
    retry = plan(catalog, graph, retry_failed=True)
    assert set(retry.todo["asset_id"].to_pylist()) == {"demo:000003"} and retry.todo.num_rows == len(graph.names)

    catalog.register_sources(synthetic_sources(3, start=20), run_id="ingest-2")  # new assets: only they run
    new_assets = plan(catalog, graph)
    assert set(new_assets.todo["asset_id"].to_pylist()) == {"demo:000020", "demo:000021", "demo:000022"}
    execute(catalog, new_assets, "run-2")

    bumped = paper_graph(voxelize={"params": {"resolution": 128}})  # a step's params: it and its downstream
    todo = plan(catalog, bumped).todo
    assert set(todo["step"].to_pylist()) == {"voxelize", "features", "slat_lh"} and todo.num_rows == 3 * 23


def test_duplicate_rows_after_retries_are_harmless(catalog):
    graph = paper_graph()
    catalog.register_sources(synthetic_sources(4))
    work = plan(catalog, graph)
    execute(catalog, work, "run-1")
    execute(catalog, work, "run-2")  # an at-least-once executor ran the same keys again
    status = catalog.artifact_status()
    assert status.num_rows == 4 * len(graph.names)
    ok = catalog.ok_artifacts()
    assert ok.num_rows == status.num_rows and set(ok["run_id"].to_pylist()) == {"run-1"}, "the earliest ok row wins"
    assert catalog.read("artifacts").num_rows == 2 * status.num_rows


def test_failed_results_are_recorded_with_their_error_and_lineage(catalog):
    graph = paper_graph()
    catalog.register_sources(synthetic_sources(2))
    todo = plan(catalog, graph).todo
    step = todo.filter(pc.equal(todo["step"], "normalize"))
    keys = step["artifact_key"].to_pylist()
    results = [StepResult(keys[0], reason="import_error", message="truncated glb"),
               StepResult(keys[1], {"x": pa.array([1.0]).to_numpy()[:, None]})]
    commit_batch(catalog, step, write_batch(catalog.data_root, step, results, "r"), "r")
    rows = {r["artifact_key"]: r for r in catalog.read("artifacts").to_pylist()}
    assert rows[keys[0]]["status"] == "failed" and rows[keys[0]]["reason"] == "import_error"
    assert "truncated" in rows[keys[0]]["error"] and rows[keys[0]]["pack_path"] is None
    assert rows[keys[1]]["status"] == "ok" and rows[keys[1]]["inputs"] == [{"role": "source", "key": step["source_id"][1].as_py()}]
    with pytest.raises(ValueError, match="planned keys"):
        commit_batch(catalog, step, [ArtifactRecord("f" * 64, reason="import_error")], "r")


def test_tables_scan_to_arrow_with_and_without_the_catalog(catalog):
    catalog.register_sources(synthetic_sources(5))
    execute(catalog, plan(catalog, paper_graph()), "run-1")
    for name in ("sources", "step_specs", "artifacts", "samples"):
        assert isinstance(catalog.table(name).scan().to_arrow(), pa.Table)
    artifacts = catalog.table("artifacts")
    static = static_table(catalog.data_root, artifacts.metadata_location).scan().to_arrow()
    assert static.num_rows == artifacts.scan().to_arrow().num_rows == 30


def test_code_changed_without_a_version_bump_warns_and_fails_in_ci(catalog, tmp_path, monkeypatch, caplog):
    module = tmp_path / "my_step_impl.py"
    module.write_text("def run(): return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = StepSpec("my_step", "1", implementation=("my_step_impl",))
    catalog.register_specs([spec])
    module.write_text("def run(): return 2\n")
    catalog.register_specs([spec], strict=False)
    assert "bump the version" in caplog.text
    with pytest.raises(StaleVersionError, match="my_step"):
        catalog.register_specs([spec], strict=True)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(StaleVersionError):
        catalog.register_specs([spec])
    catalog.register_specs([StepSpec("my_step", "2", implementation=("my_step_impl",))])  # the bump settles it
