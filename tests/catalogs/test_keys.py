"""Keys: canonical, stable across processes and hash seeds, and invalidating exactly what is downstream."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalogs.keys import SOURCE, StepGraph, StepSpec, artifact_key, canonical_json
from catalogs.planner import target_keys

from .conftest import paper_graph

SOURCE_IDS = ["0" * 64, "ab" * 32, "f" * 64]


@st.composite
def step_graphs(draw) -> tuple[list[dict], int]:
    """Random DAGs: step i reads the source and/or earlier steps; plus the index of the step to change."""
    n = draw(st.integers(1, 7))
    steps = []
    for i in range(n):
        earlier = [f"s{j}" for j in range(i)]
        inputs = draw(st.lists(st.sampled_from([SOURCE, *earlier]), min_size=1, max_size=3, unique=True))
        params = draw(st.dictionaries(st.sampled_from("abc"), st.integers(-3, 3) | st.floats(-1, 1, allow_nan=False), max_size=2))
        steps.append({"name": f"s{i}", "version": "1", "inputs": tuple(inputs), "params": params})
    return steps, draw(st.integers(0, n - 1))


def _keys(graph: StepGraph) -> dict[tuple[str, str], str]:
    return {(sid, step): key for sid in SOURCE_IDS for step, (key, _) in graph.asset_keys(sid).items()}


@settings(max_examples=60, deadline=None)
@given(step_graphs(), st.sampled_from(["params", "version", "models"]))
def test_changing_one_step_changes_exactly_its_keys_and_everything_downstream(drawn, what):
    steps, changed = drawn
    before = StepGraph(StepSpec(**s) for s in steps)
    edited = [dict(s) for s in steps]
    target = edited[changed]
    if what == "params":
        target["params"] = {**target["params"], "changed": True}
    elif what == "version":
        target["version"] = "2"
    else:
        target["models"] = {"weights": "1" * 64}
    after = StepGraph(StepSpec(**s) for s in edited)
    downstream = before.downstream(target["name"])
    old, new = _keys(before), _keys(after)
    for (sid, step), key in old.items():
        assert (key != new[(sid, step)]) == (step in downstream), (step, downstream)


def test_keys_are_stable_across_processes_and_hash_seeds():
    code = ("import json; from tests.catalogs.conftest import paper_graph; g = paper_graph(); "
            "print(json.dumps({s: k for s, (k, _) in g.asset_keys('ab' * 32).items()}))")
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outputs) == 1
    here = {s: k for s, (k, _) in paper_graph().asset_keys("ab" * 32).items()}
    assert json.loads(outputs.pop()) == here


def test_key_derivation_is_pinned_to_its_documented_canonical_form():
    """Keys are persisted in catalogs, so their derivation must never change silently."""
    assert canonical_json({"b": 1.5, "a": [1, "x"]}) == '{"a":[1,"x"],"b":1.5}'
    spec = StepSpec("voxelize", "1", params={"resolution": 64})
    spec_form = '{"env":{},"inputs":["source"],"models":{},"params":{"resolution":64},"step":"voxelize","version":"1"}'
    assert spec.spec_hash == hashlib.sha256(spec_form.encode()).hexdigest()
    key_form = '{"inputs":{"source":"%s"},"kind":"artifact/v1","spec":"%s"}' % ("1" * 64, spec.spec_hash)
    assert artifact_key(spec.spec_hash, {"source": "1" * 64}) == hashlib.sha256(key_form.encode()).hexdigest()


def test_graph_errors_are_clear():
    with pytest.raises(ValueError, match="cycle"):
        StepGraph([StepSpec("a", "1", inputs=("b",)), StepSpec("b", "1", inputs=("a",))])
    with pytest.raises(ValueError, match="neither 'source' nor a step"):
        StepGraph([StepSpec("a", "1", inputs=("nothing",))])
    with pytest.raises(ValueError, match="explicit version"):
        StepSpec("a", "")
    with pytest.raises(ValueError, match="defined twice"):
        StepGraph([StepSpec("a", "1"), StepSpec("a", "2")])
    with pytest.raises(TypeError):
        StepSpec("a", "1", params={"x": object()})


def test_only_skips_a_step_and_every_step_reading_it_for_the_sources_it_rejects():
    chosen = "ab" * 32
    specs = [StepSpec("normalize", "1"), StepSpec("render_eval", "1", ("normalize",), only=lambda s: s == chosen),
             StepSpec("score", "1", ("render_eval", "normalize")), StepSpec("voxelize", "1", ("normalize",))]
    graph = StepGraph(specs)
    assert set(graph.asset_keys(chosen)) == {"normalize", "render_eval", "score", "voxelize"}
    assert set(graph.asset_keys("f" * 64)) == {"normalize", "voxelize"}
    everywhere = StepGraph([dataclasses.replace(s, only=None) for s in specs])
    assert everywhere.spec_hashes == graph.spec_hashes, "which sources a step runs for is not in its spec hash"
    assert everywhere.asset_keys(chosen) == graph.asset_keys(chosen), "nor in the keys it has"
    sources = pa.table({"asset_id": ["a", "b"], "source_id": [chosen, "f" * 64]})
    targets = target_keys(graph, sources)
    assert sorted(zip(targets["asset_id"].to_pylist(), targets["step"].to_pylist())) == [
        ("a", "normalize"), ("a", "render_eval"), ("a", "score"), ("a", "voxelize"), ("b", "normalize"), ("b", "voxelize")]
    with pytest.raises(TypeError, match="only must be a function"):
        StepSpec("render_eval", "1", only=True)
