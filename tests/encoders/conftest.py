"""Encoder test fixtures: an offline Hugging Face hub cache, so hub ids load through the real download code."""

import dataclasses
import shutil
from pathlib import Path

import pytest

_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclasses.dataclass(frozen=True)
class HubCache:
    """A hub cache folder in the layout `huggingface_hub` writes, served with HF_HUB_OFFLINE."""

    root: Path

    def publish(self, repo_id: str, source: str | Path, *, path_in_repo: str = "") -> None:
        """Put a file or a folder's files into `repo_id`'s snapshot, under `path_in_repo`."""
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / _COMMIT / path_in_repo
        source = Path(source)
        if source.is_dir():
            shutil.copytree(source, snapshot, dirs_exist_ok=True)
        else:
            snapshot.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, snapshot / source.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(_COMMIT)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    import huggingface_hub.constants as hub_constants

    root = tmp_path / "hf-hub-cache"
    root.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))  # read at import: patch the constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HubCache(root)


@pytest.fixture(scope="session")
def vertex_colors_lh(tmp_path_factory, supervisor, worker_config) -> Path:
    """`lh` renders of a real asset whose base color varies everywhere (17 vertex-coloured meshes, asymmetric):
    24 views at 128^2 with every lh pass; the render set folder."""
    from pipelines.local_render import render_files
    from render_jobs.recipes import recipe_config
    from tests.conftest import SHARED_ASSETS

    asset = SHARED_ASSETS / "gltf-blender-io" / "scenes" / "24_vertex_colors.blend"
    if not asset.exists():
        pytest.skip(f"{asset} is not there")
    recipe = recipe_config("lh", num_views=24, resolution_px=128, samples=4)
    (record,) = render_files(
        [asset], recipe, tmp_path_factory.mktemp("lh_real"), worker=worker_config, supervisor=supervisor
    )
    assert record.result.is_ok, record.result
    return Path(record.result.out_dir)
