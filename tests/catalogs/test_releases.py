"""Releases: pinned by name and sha256, readable with pyarrow + zarr alone, never overwritten, never collected."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalogs.gc import collect_garbage, find_garbage
from catalogs.packs import write_pack
from catalogs.planner import plan
from catalogs.release_reader import Release, ReleaseIntegrityError, release_dir
from catalogs.releases import ReleaseExistsError, ReleaseSpec, create_release
from catalogs.tables import static_table
from catalogs.verify import verify_release

from .conftest import execute, fake_output, paper_graph, synthetic_sources

ROLES = {"slat_lh": "slat_lh", "images": "render_relight"}


@pytest.fixture
def released(catalog):
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(12))
    execute(catalog, plan(catalog, graph), "run-1", fail=frozenset({"demo:000005"}), batch=5)
    record = create_release(catalog, graph, ReleaseSpec("r1", ROLES, val_percent=25))
    return catalog, graph, record


def test_release_reads_with_pyarrow_and_zarr_only(released):
    catalog, _, record = released
    assert record["num_samples"] == 11, "the failed asset is left out"
    code = f"""
import sys, json
from catalogs.release_reader import Release
r = Release.open({str(catalog.data_root)!r}, "r1", expected_sha256={record['manifest_sha256']!r})
out = {{s: {{k: v.tolist() for k, v in r.read(s, "slat_lh", verify=True).items()}} for s in r.sample_ids[:3]}}
heavy = sorted(m for m in ("pyiceberg", "sqlalchemy", "ray", "torch") if m in sys.modules)
print(json.dumps({{"heavy": heavy, "splits": [len(r.split("train")), len(r.split("val"))], "out": out}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["heavy"] == []
    assert sum(result["splits"]) == 11 and result["splits"][1] >= 1
    manifest = Release.open(catalog.data_root, "r1").manifest.to_pylist()
    slat_keys = {row["sample_id"]: row["artifact_key"] for row in manifest if row["role"] == "slat_lh"}
    for sample, arrays in result["out"].items():
        expected = fake_output("slat_lh", slat_keys[sample])
        np.testing.assert_array_equal(np.array(arrays["feats"], np.float32), expected["feats"])


def test_tampered_manifest_or_wrong_pin_is_refused(released):
    catalog, _, record = released
    folder = release_dir(catalog.data_root, "r1")
    with pytest.raises(ReleaseIntegrityError, match="caller's pin"):
        Release.open(catalog.data_root, "r1", expected_sha256="0" * 64)
    table = pq.read_table(folder / "manifest.parquet")
    pq.write_table(table.slice(1), folder / "manifest.parquet")  # a sample silently dropped
    with pytest.raises(ReleaseIntegrityError, match="release.json"):
        Release.open(catalog.data_root, "r1")


def test_release_names_are_never_reused(released):
    catalog, graph, record = released
    with pytest.raises(ReleaseExistsError):
        create_release(catalog, graph, ReleaseSpec("r1", ROLES))
    samples = catalog.table("samples")
    samples.manage_snapshots().remove_tag("rel-r1").commit()  # even with the Iceberg tag gone
    with pytest.raises(ReleaseExistsError):
        create_release(catalog, graph, ReleaseSpec("r1", ROLES))
    assert json.loads((release_dir(catalog.data_root, "r1") / "release.json").read_text()) == record


def test_the_iceberg_snapshot_reproduces_the_manifest_without_the_catalog(released):
    catalog, _, record = released
    rows = static_table(catalog.data_root, record["metadata_location"]).scan(snapshot_id=record["snapshot_id"]).to_arrow()
    rows = rows.sort_by([("sample_id", "ascending"), ("role", "ascending")])
    assert rows.equals(Release.open(catalog.data_root, "r1").manifest)


def test_gc_collects_orphans_after_the_grace_period_and_never_what_a_release_references(released):
    catalog, graph, _ = released
    orphan = write_pack(catalog.data_root, "slat_lh", graph.spec_hashes["slat_lh"], "crashed", [("k" * 64, fake_output("slat_lh", "a" * 64))])
    assert find_garbage(catalog, grace_s=3600) == [], "a fresh orphan may be a batch on its way to its commit"
    # a newer spec: new packs; the old ones stay referenced by release r1
    bumped = paper_graph(slat_lh={"version": "2"})
    execute(catalog, plan(catalog, bumped), "run-2")
    create_release(catalog, bumped, ReleaseSpec("r2", ROLES))
    garbage = find_garbage(catalog, grace_s=0)
    assert [g.pack_path for g in garbage] == [orphan[0].pack_path] and "never committed" in garbage[0].reason
    collect_garbage(catalog, garbage)
    assert not (catalog.data_root / orphan[0].pack_path).exists()
    for name in ("r1", "r2"):
        assert list(verify_release(Release.open(catalog.data_root, name))) == []
