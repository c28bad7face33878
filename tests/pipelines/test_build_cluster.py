"""The build on several nodes (`ray.cluster_utils.Cluster`, two nodes on this machine) and under faults."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from catalogs.release_reader import Release
from catalogs.tables import FactoryCatalog
from catalogs.verify import verify_catalog
from pipelines.build import run_build
from pipelines.build_config import BuildConfig
from pipelines.demo import write_demo_models

pytestmark = [pytest.mark.ray, pytest.mark.blender, pytest.mark.slow]

TINY = {"resolution_px": 48, "samples": 1}


@pytest.fixture(scope="module")
def two_nodes():
    """Two Ray nodes, each declaring one render slot."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"render_slot": 1}})
    cluster.add_node(num_cpus=4, resources={"render_slot": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _config(root: Path, assets: Path) -> BuildConfig:
    models = write_demo_models(root / "models", seed=0)
    return BuildConfig.from_dict(
        {
            "data_root": str(root / "data"),
            "source": {"kind": "local", "path": str(assets)},
            "recipes": {
                "lh": {**TINY, "num_views": 4},
                "input": {**TINY, "num_views": 1},
                "relight": {**TINY, "num_views": 1, "lightings_per_view": 1},
            },
            "models": {name: str(path) for name, path in models.items()},
            "shaded": {"sampler": {"steps": 2}},  # Z_s on CPU: few flow steps
            "release": {"name": "v1"},
            "execution": {"allow_software_gl": True, "max_in_flight": 4, "encoders_per_node": 2},
        }
    )


def _assets(root: Path, demo_assets: dict[str, Path], names: tuple[str, ...]) -> Path:
    folder = root / "assets"
    folder.mkdir()
    for name in names:
        shutil.copy(demo_assets[name], folder)
    return folder


def test_work_spreads_over_nodes_into_one_consistent_catalog(two_nodes, tmp_path, demo_assets) -> None:
    names = ("textured_cube", "diffuse_sphere", "open_box", "rough_cone")
    config = _config(tmp_path, _assets(tmp_path, demo_assets, names))
    record = run_build(config)
    assert record.failures == []
    catalog = FactoryCatalog(config.data_root)
    ok = catalog.ok_artifacts()
    nodes = {
        json.loads(stats)["node"]
        for stats, step in zip(ok["stats_json"].to_pylist(), ok["step"].to_pylist())
        if step in ("render_lh", "render_input", "render_relight")
    }
    assert len(nodes) == 2, "renders ran on both nodes"
    assert list(verify_catalog(catalog, deep=True)) == []
    assert len(Release.open(config.data_root, "v1").sample_ids) == len(names)


def _render_worker_processes() -> list[psutil.Process]:
    """The Ray worker processes of render actors that are rendering now (they have a render child)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "render_jobs.worker" in cmdline:
            try:
                parent = process.parent()
            except psutil.NoSuchProcess:
                continue
            if parent is not None and "RenderActor" in " ".join(parent.cmdline()):
                found.append(parent)
    return found


def test_a_killed_render_worker_is_restarted_and_the_build_completes(
    two_nodes, tmp_path, demo_assets
) -> None:
    config = _config(tmp_path, _assets(tmp_path, demo_assets, ("textured_cube", "metal_torus")))
    killed: list[int] = []

    def kill_one_render_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for worker in _render_worker_processes():
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(worker.pid)
                break
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_render_worker)
    killer.start()
    record = run_build(config)
    killer.join()
    assert killed, "a render worker was killed mid-render"
    assert record.failures == [], "the actor restarted and its call was retried"
    assert list(verify_catalog(FactoryCatalog(config.data_root), deep=True)) == []
    assert len(Release.open(config.data_root, "v1").sample_ids) == 2
