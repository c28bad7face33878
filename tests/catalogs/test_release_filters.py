"""Release filters: bounds on the stats a step recorded, applied in order and counted in release.json."""

import json

import pyarrow.compute as pc
import pytest

from catalogs.commit import StepResult, commit_batch, write_batch
from catalogs.errors import CatalogError
from catalogs.planner import plan
from catalogs.release_reader import Release, release_dir
from catalogs.releases import (
    ReleaseSpec,
    SampleFilter,
    apply_filters,
    create_release,
    record_digest,
    select_samples,
)
from catalogs.verify import verify_published_releases, verify_release, verify_release_record

from .conftest import fake_output, paper_graph, synthetic_sources

ROLES = {"voxels": "voxelize", "images": "render_relight"}
"""Neither role depends on render_lh, so an asset whose render_lh failed is still a complete sample."""

TEXTURED = SampleFilter("render_lh", "has_base_color_texture", equals=True)
VOXELS = SampleFilter("voxelize", "num_voxels", min=1, max=65536)


def _asset(i: int) -> str:
    return f"demo:{i:06d}"


# what each asset's artifacts record; assets 0-10 are complete, 11 is not (its render_relight fails)
RENDER_LH_STATS = {
    **{_asset(i): {"has_base_color_texture": True, "textures": 2} for i in range(6)},
    _asset(6): {"has_base_color_texture": False, "textures": 0},
    _asset(7): {"has_base_color_texture": False, "textures": 1},
    _asset(8): {"textures": 0},  # an older render that did not record the stat
    _asset(10): {"has_base_color_texture": None},
    _asset(11): {"has_base_color_texture": True},
}
FAILED = {("render_lh", _asset(9)), ("render_relight", _asset(11))}
VOXEL_COUNTS = {_asset(0): 0, _asset(1): 70000, _asset(6): 0}  # the rest: 100


def _stats(step: str, asset: str) -> dict:
    if step == "render_lh":
        return RENDER_LH_STATS.get(asset, {})
    if step == "voxelize":
        return {"num_voxels": VOXEL_COUNTS.get(asset, 100)}
    return {}


def _execute_with_stats(catalog, graph) -> None:
    """Every todo key, a pack and a commit per step; results carry `_stats` and the FAILED ones fail."""
    todo = plan(catalog, graph).todo
    for step in dict.fromkeys(todo["step"].to_pylist()):
        rows = todo.filter(pc.equal(todo["step"], step))
        keys, assets = rows["artifact_key"].to_pylist(), rows["asset_id"].to_pylist()
        results = [StepResult(key, reason="render_error", message="synthetic") if (step, asset) in FAILED
                   else StepResult(key, fake_output(step, key), stats=_stats(step, asset))
                   for key, asset in zip(keys, assets)]
        records = write_batch(catalog.data_root, rows, results, "run-1")
        commit_batch(catalog, rows, records, "run-1")


@pytest.fixture
def built(catalog):
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(12))
    _execute_with_stats(catalog, graph)
    return catalog, graph


def _sample_ids(selection) -> list[str]:
    return sorted(set(selection.rows["sample_id"].to_pylist()))


def test_no_filter_keeps_every_complete_sample(built):
    catalog, graph = built
    selection = select_samples(catalog, graph, ReleaseSpec("all", ROLES))
    assert selection.candidates == 11 and selection.filters == []
    assert _sample_ids(selection) == [_asset(i) for i in range(11)]


def test_filters_remove_exactly_their_samples_counted_in_order(built):
    catalog, graph = built
    selection = select_samples(catalog, graph, ReleaseSpec("r", ROLES, filters=(TEXTURED, VOXELS)))
    # textured: 6, 7 are False, 8 lacks the stat, 9 has no ok render_lh, 10 recorded null; voxels: 0 and 1
    assert _sample_ids(selection) == [_asset(i) for i in (2, 3, 4, 5)]
    assert selection.candidates == 11
    assert [f["removed"] for f in selection.filters] == [5, 2]
    assert [f["description"] for f in selection.filters] == [
        "has_base_color_texture == True", "1 <= num_voxels <= 65536"]
    assert selection.rows.num_rows == 4 * len(ROLES)

    swapped = select_samples(catalog, graph, ReleaseSpec("r", ROLES, filters=(VOXELS, TEXTURED)))
    assert _sample_ids(swapped) == _sample_ids(selection)
    assert [f["removed"] for f in swapped.filters] == [3, 4], "each counts what the filters before it kept"


def test_counts_are_recorded_in_release_json_and_the_release_opens(built):
    catalog, graph = built
    record = create_release(catalog, graph, ReleaseSpec("textured", ROLES, filters=(TEXTURED, VOXELS)))
    on_disk = json.loads((release_dir(catalog.data_root, "textured") / "release.json").read_text())
    assert on_disk == record and "selection" not in on_disk
    assert on_disk["candidates"] == 11 and on_disk["num_samples"] == 4
    assert on_disk["filters"] == [
        {"step": "render_lh", "stat": "has_base_color_texture", "min": None, "max": None, "equals": True,
         "description": "has_base_color_texture == True", "removed": 5},
        {"step": "voxelize", "stat": "num_voxels", "min": 1, "max": 65536, "equals": None,
         "description": "1 <= num_voxels <= 65536", "removed": 2},
    ]
    release = Release.open(catalog.data_root, "textured", expected_sha256=record["manifest_sha256"])
    assert release.sample_ids == [_asset(i) for i in (2, 3, 4, 5)]
    assert list(verify_release(release)) == [] and list(verify_release_record(catalog, release)) == []


def test_the_filters_are_covered_by_the_release_digest(built):
    catalog, graph = built
    record = create_release(catalog, graph, ReleaseSpec("textured", ROLES, filters=(TEXTURED,)))
    path = release_dir(catalog.data_root, "textured") / "release.json"
    forged = {**record, "filters": [{**record["filters"][0], "removed": 0}]}
    assert record_digest(forged) != record_digest(record)
    path.write_text(json.dumps(forged, indent=1))
    assert any("changed since it was published" in p.what for p in verify_published_releases(catalog))


def test_a_filter_on_an_unknown_step_or_removing_everything_is_refused(built):
    catalog, graph = built
    typo = SampleFilter("render_lhh", "x", equals=1)
    with pytest.raises(ValueError, match="render_lhh"):
        select_samples(catalog, graph, ReleaseSpec("r", ROLES, filters=(typo,)))
    nothing = SampleFilter("voxelize", "num_voxels", min=10**6)
    with pytest.raises(CatalogError, match=r"removed all 11 complete samples \(num_voxels >= 1000000\)"):
        create_release(catalog, graph, ReleaseSpec("empty", ROLES, filters=(nothing,)))
    assert not (release_dir(catalog.data_root, "empty") / "release.json").exists()


# pure -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sample_filter", "value", "keeps"), [
    (SampleFilter("s", "x", equals=True), True, True),
    (SampleFilter("s", "x", equals=True), 1, False),  # 1 is not True
    (SampleFilter("s", "x", equals=1), True, False),
    (SampleFilter("s", "x", equals=1), 1.0, True),
    (SampleFilter("s", "x", equals="glb"), "glb", True),
    (SampleFilter("s", "x", equals="glb"), "obj", False),
    (SampleFilter("s", "x", equals=False), None, False),  # not recorded
    (SampleFilter("s", "x", min=1, max=3), 1, True),  # bounds are inclusive
    (SampleFilter("s", "x", min=1, max=3), 3.0, True),
    (SampleFilter("s", "x", min=1, max=3), 3.5, False),
    (SampleFilter("s", "x", min=1), True, False),  # a boolean is not a number here
    (SampleFilter("s", "x", min=1), "5", False),
    (SampleFilter("s", "x", max=1), float("nan"), False),
    (SampleFilter("s", "x", equals=4, min=1, max=3), 4, False),
    (SampleFilter("s", "x", max=0), [], True),  # a list is bounded by its length
    (SampleFilter("s", "x", max=0), ["Material.001"], False),
    (SampleFilter("s", "x"), 0, True),  # no bound: recorded is enough
    (SampleFilter("s", "x"), None, False),
])
def test_a_filter_keeps_values_within_every_bound(sample_filter, value, keeps):
    assert sample_filter.keeps(value) is keeps


@pytest.mark.parametrize(("sample_filter", "description"), [
    (SampleFilter("s", "num_voxels", min=1, max=65536), "1 <= num_voxels <= 65536"),
    (SampleFilter("s", "num_voxels", min=1), "num_voxels >= 1"),
    (SampleFilter("s", "faces", max=2.5e5), "faces <= 250000.0"),
    (SampleFilter("s", "format", equals="glb"), "format == 'glb'"),
    (SampleFilter("s", "has_normal_texture", equals=False), "has_normal_texture == False"),
    (SampleFilter("s", "faces"), "faces is recorded"),
])
def test_describe(sample_filter, description):
    assert sample_filter.describe() == description


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="above max"):
        SampleFilter("s", "x", min=3, max=1)
    with pytest.raises(TypeError, match="must be a number"):
        SampleFilter("s", "x", min=True)
    with pytest.raises(TypeError, match="must be a number"):
        SampleFilter("s", "x", max=float("nan"))
    with pytest.raises(TypeError, match="bool, number or string"):
        SampleFilter("s", "x", equals=[1])
    with pytest.raises(TypeError, match="SampleFilter"):
        ReleaseSpec("r", ROLES, filters=({"step": "s", "stat": "x"},))


def test_apply_filters_without_stats_removes():
    stats = {"a": {"x": {"n": 5}, "y": {"n": 1}}}
    filters = [SampleFilter("a", "n", min=2), SampleFilter("b", "n", min=0)]  # no stats at all for step b
    assert apply_filters(["x", "y", "z"], stats, filters) == ([], [2, 1])
    assert apply_filters(["x", "y", "z"], stats, []) == (["x", "y", "z"], [])
