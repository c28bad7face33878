"""Config hashing, typed errors, and finding the render env by configuration."""

import pickle
import subprocess
import sys

import pytest

from infra.environments import RENDER_PYTHON_ENV_VAR, find_render_python
from infra.errors import AssetRejected, ConfigError, Reason
from render_jobs.recipes import recipe_config


def test_config_digest_is_canonical_and_round_trips():
    a = recipe_config("lh", num_views=4)
    assert a.digest() == recipe_config("lh", num_views=4).digest() != recipe_config("lh", num_views=5).digest()
    assert type(a).from_dict(a.to_dict()) == a
    with pytest.raises(ConfigError, match="colour: unknown key"):
        type(a).from_dict({**a.to_dict(), "colour": 1})
    code = "from render_jobs.recipes import recipe_config; print(recipe_config('relight').digest())"
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": s}).stdout for s in ("0", "1")}
    assert digests == {recipe_config("relight").digest() + "\n"}


def test_asset_rejected_survives_pickling():
    err = AssetRejected("local:a.glb", Reason.EMPTY_SCENE, "no meshes")
    back = pickle.loads(pickle.dumps(err))
    assert (back.asset_id, back.reason, back.detail, str(back)) == ("local:a.glb", Reason.EMPTY_SCENE, "no meshes", str(err))


def test_render_python_comes_from_configuration(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv(RENDER_PYTHON_ENV_VAR, str(fake))
    assert find_render_python() == fake
    assert find_render_python(sys.executable) == __import__("pathlib").Path(sys.executable)
    monkeypatch.setenv(RENDER_PYTHON_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        find_render_python()
