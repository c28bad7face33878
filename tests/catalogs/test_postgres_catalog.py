"""The catalog on a real PostgreSQL server (pyiceberg's SQL catalog): what several machines share on a cluster,
where a SQLite file on a network filesystem is not safe."""

import pytest

from catalogs.errors import CatalogMismatch
from catalogs.planner import plan
from catalogs.tables import FactoryCatalog

from .conftest import execute, paper_graph, synthetic_sources


def test_builds_plan_and_commit_on_postgresql_and_a_second_client_sees_them(tmp_path, postgres_uri):
    graph = paper_graph()
    catalog = FactoryCatalog(tmp_path / "data", postgres_uri)
    assert catalog.uri.startswith("postgresql+psycopg2://")
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(6), run_id="ingest-1")
    execute(catalog, plan(catalog, graph), "run-1", fail=frozenset({"demo:000002"}))

    other = FactoryCatalog(tmp_path / "data", postgres_uri)  # another process or node: its own connection
    assert plan(other, graph).todo.num_rows == 0, "everything is committed, the failure recorded"
    statuses = other.read("artifacts", ("asset_id", "status")).to_pylist()
    assert len(statuses) == 6 * len(graph.names)
    assert {r["asset_id"] for r in statuses if r["status"] == "failed"} == {"demo:000002"}


def test_a_postgresql_catalog_refuses_a_data_root_it_does_not_belong_to(tmp_path, postgres_uri):
    catalog = FactoryCatalog(tmp_path / "data", postgres_uri)
    catalog.register_sources(synthetic_sources(2), run_id="ingest-1")
    with pytest.raises(CatalogMismatch, match="belongs to data root"):
        FactoryCatalog(tmp_path / "elsewhere", postgres_uri)
