"""Shared fixtures. Blender renders are expensive on a CPU (seconds per tiny frame), so every render a test
needs is made once per session here and shared."""

import json
from pathlib import Path

import pytest
from jaxtyping import install_import_hook

install_import_hook(["encoders"], "beartype.beartype")  # runtime shape checks (STYLE rule 3), before any import


from infra.environments import find_render_python
from infra.errors import ConfigError
from pipelines.demo import generate_demo_assets
from pipelines.local_render import AssetRecord, render_files
from render_jobs.recipes import ALL_PASSES, recipe_config
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def render_python() -> Path:
    try:
        return find_render_python()
    except ConfigError as err:
        pytest.skip(f"render env not available: {err}")


@pytest.fixture(scope="session")
def worker_config(render_python: Path) -> RenderWorkerConfig:
    return RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, timeout_s=600)


@pytest.fixture(scope="session")
def supervisor(worker_config: RenderWorkerConfig):
    with RenderSupervisor(worker_config) as sup:
        yield sup


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory, render_python: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo_assets")
    paths = generate_demo_assets(out, seed=0, render_python=str(render_python))
    return {p.stem: p for p in paths}


@pytest.fixture(scope="session")
def demo_manifest(demo_assets: dict[str, Path]) -> dict:
    return json.loads((next(iter(demo_assets.values())).parent / "demo_assets.json").read_text())


def _render(paths, recipe, out, supervisor, worker_config) -> dict[str, AssetRecord]:
    records = list(render_files(paths, recipe, out, worker=worker_config, supervisor=supervisor))
    return {Path(r.path).stem: r for r in records}


@pytest.fixture(scope="session")
def demo_lh_renders(tmp_path_factory, demo_assets, supervisor, worker_config) -> dict[str, AssetRecord]:
    """The `lh` recipe with every pass on, 2 views at 128^2, for the physics and geometry tests."""
    recipe = recipe_config("lh", num_views=2, resolution_px=128, samples=4, passes=ALL_PASSES)
    names = ["diffuse_sphere", "textured_cube", "rough_cone", "open_box"]
    return _render([demo_assets[n] for n in names], recipe, tmp_path_factory.mktemp("lh"), supervisor, worker_config)
