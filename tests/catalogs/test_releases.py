"""Releases: pinned by name and sha256, readable with pyarrow + zarr alone, never overwritten, never collected."""

import json
import logging
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from catalogs.gc import collect_garbage, find_garbage
from catalogs.keys import StepGraph, StepSpec
from catalogs.packs import write_pack
from catalogs.planner import Plan, plan, target_keys
from catalogs.release_reader import Release, ReleaseIntegrityError, release_dir
from catalogs.releases import ReleaseExistsError, ReleaseSpec, create_release
from catalogs.splits import TEST, TRAIN, VAL, SplitRule
from catalogs.tables import static_table
from catalogs.verify import verify_published_releases, verify_release, verify_release_record

from .conftest import execute, fake_output, paper_graph, synthetic_sources

ROLES = {"slat_lh": "slat_lh", "images": "render_relight"}
RULE = SplitRule(test_percent=20, val_percent=25)
"""Of the 12 synthetic assets, 0, 4 and 11 are test: enough test samples for a small catalog."""
TEST_ASSETS = ["demo:000000", "demo:000004", "demo:000011"]


@pytest.fixture
def released(catalog):
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(12))
    execute(catalog, plan(catalog, graph), "run-1", fail=frozenset({"demo:000005"}), batch=5)
    record = create_release(catalog, graph, ReleaseSpec("r1", ROLES, split=RULE))
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
splits = [len(r.split(name)) for name in ("train", "val", "test")]
print(json.dumps({{"heavy": heavy, "splits": splits, "rule": r.split_rule, "out": out}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["heavy"] == []
    assert sum(result["splits"]) == 11 and result["splits"][1] >= 1 and result["splits"][2] == 3
    assert result["rule"] == RULE.to_dict()
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


# splits ----------------------------------------------------------------------------------------------------------


def _splits(release: Release) -> dict[str, set[str]]:
    return {name: set(release.split(name)) for name in (TRAIN, VAL, TEST)}


def test_the_test_set_is_the_same_in_every_release_and_never_trained_on(released):
    catalog, graph, record = released
    assert record["split_rule"] == RULE.to_dict() and "val_percent" not in record
    more_val = SplitRule(test_percent=RULE.test_percent, val_percent=40)
    create_release(catalog, graph, ReleaseSpec("r2-more-val", ROLES, split=more_val))
    first, second = (Release.open(catalog.data_root, name) for name in ("r1", "r2-more-val"))
    a, b = _splits(first), _splits(second)
    assert a[TEST] == b[TEST] == set(TEST_ASSETS)
    for splits in (a, b):
        assert not splits[TEST] & (splits[TRAIN] | splits[VAL]) and not splits[TRAIN] & splits[VAL]
    assert a[VAL] < b[VAL], "more val takes samples from train only"
    sources = dict(zip(first.manifest["sample_id"].to_pylist(), first.manifest["source_id"].to_pylist()))
    assert a[TEST] == {s for s, source_id in sources.items() if RULE.is_test(source_id)}
    assert second.split_rule == more_val.to_dict() and second.test_roles == frozenset()
    assert list(verify_published_releases(catalog)) == []


def test_verify_rederives_every_split_from_the_recorded_rule(released):
    catalog, _, _ = released
    folder = release_dir(catalog.data_root, "r1")
    info = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**info, "split_rule": SplitRule(0, 25).to_dict()}))
    problems = [p.what for p in verify_release_record(catalog, Release.open(catalog.data_root, "r1"))]
    assert any("changed since it was published" in p for p in problems)
    assert any("3 samples are not in the split" in p for p in problems), problems
    (folder / "release.json").write_text(json.dumps({**info, "split_rule": {**RULE.to_dict(), "rule": "md5"}}))
    problems = [p.what for p in verify_release_record(catalog, Release.open(catalog.data_root, "r1"))]
    assert any("split rule this code cannot check" in p for p in problems), problems


def test_test_only_roles_complete_test_samples_and_never_reach_the_others(catalog, caplog):
    """render_eval's ground truth exists for test assets only: a test sample needs it, the others never get it."""
    evaluate = StepSpec("render_eval", "1", ("normalize",), {"views": 4}, only=RULE.is_test)
    graph = StepGraph([*paper_graph().specs, evaluate])
    everywhere = StepGraph([*paper_graph().specs, StepSpec("render_eval", "1", ("normalize",), {"views": 4})])
    catalog.register_specs(everywhere.specs)
    catalog.register_sources(synthetic_sources(12))
    targets = target_keys(graph, catalog.current_sources())
    assert targets.filter(pc.equal(targets["step"], "render_eval"))["asset_id"].to_pylist() == TEST_ASSETS
    work = plan(catalog, everywhere)  # render_eval for every asset, but for test asset 4
    lost = pc.and_(pc.equal(work.todo["step"], "render_eval"), pc.equal(work.todo["asset_id"], TEST_ASSETS[1]))
    execute(catalog, Plan(work.targets, work.todo.filter(pc.invert(lost))), "run-1")
    assert plan(catalog, graph).todo["artifact_key"].to_pylist() == work.todo.filter(lost)["artifact_key"].to_pylist(), (
        "a step's keys do not depend on which sources it runs for")

    spec = ReleaseSpec("eval", {"slat_lh": "slat_lh", "eval": "render_eval"}, split=RULE, test_roles={"eval"})
    with caplog.at_level(logging.WARNING, logger="catalogs.releases"):
        record = create_release(catalog, graph, spec)
    assert "1 test samples lack a test role ['eval']" in caplog.text
    release = Release.open(catalog.data_root, "eval")
    assert TEST_ASSETS[1] not in release.sample_ids and len(release.sample_ids) == 11
    assert release.split(TEST) == [TEST_ASSETS[0], TEST_ASSETS[2]]
    evaluated = release.manifest.filter(pc.equal(release.manifest["role"], "eval"))["sample_id"].to_pylist()
    assert evaluated == release.split(TEST), "train and val samples never carry a test-only role"
    assert record["test_roles"] == ["eval"] and release.test_roles == {"eval"}
    assert record["candidates"] == 11 and record["splits"][TEST] == 2
    assert list(verify_release_record(catalog, release)) == [] and list(verify_release(release)) == []


def test_a_release_spec_refuses_unknown_or_conflicting_test_roles():
    with pytest.raises(ValueError, match=r"test_roles \['eval'\] are not roles"):
        ReleaseSpec("r", ROLES, test_roles={"eval"})
    with pytest.raises(ValueError, match="both shared and test-only"):
        ReleaseSpec("r", {**ROLES, "env": "env_map_rgb"}, shared_roles={"env"}, test_roles={"env"})
    with pytest.raises(ValueError, match="needs a role that every sample has"):
        ReleaseSpec("r", {"eval": "render_eval"}, test_roles={"eval"})
    with pytest.raises(TypeError, match="SplitRule"):
        ReleaseSpec("r", ROLES, split={"test_percent": 1})
    with pytest.raises(TypeError, match="the string 'eval'"):
        ReleaseSpec("r", {**ROLES, "eval": "render_eval"}, test_roles="eval")
    with pytest.raises(TypeError):
        ReleaseSpec("r", ROLES, 5)  # the old positional val_percent: options are keyword-only
