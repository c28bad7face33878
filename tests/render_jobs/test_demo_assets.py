"""Demo assets are deterministic by seed down to their bytes, so their `source_id`s are too."""

import hashlib
import json

import pytest

from pipelines.demo import generate_demo_assets

pytestmark = pytest.mark.blender


def test_same_seed_same_bytes_other_seed_other_assets(tmp_path, demo_assets, render_python):
    again = generate_demo_assets(tmp_path / "again", seed=0, render_python=str(render_python))
    other = generate_demo_assets(tmp_path / "other", seed=1, render_python=str(render_python))

    def digests(paths):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    assert digests(again) == digests(demo_assets.values())
    assert set(digests(other).values()).isdisjoint(digests(again).values())
    manifest = json.loads((tmp_path / "other" / "demo_assets.json").read_text())
    assert manifest["seed"] == 1 and set(manifest["assets"]) == {p.stem for p in other}
