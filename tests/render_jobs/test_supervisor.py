"""Robustness of the supervised render child with real processes: hangs, kills, memory, software GL."""

import os
import signal
import tempfile
import threading
import time

import pytest

from pipelines.local_render import render_files
from render_jobs.recipes import recipe_config
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig

pytestmark = [pytest.mark.blender, pytest.mark.slow]

TINY = recipe_config("lh", num_views=1, resolution_px=16, samples=1)


def _hanging_obj(folder) -> "os.PathLike[str]":
    """An OBJ whose material library is a named pipe nobody writes: the importer blocks in open() for ever, the
    way a read from a stalled network file system does. No CPU, no memory: a true hang."""
    folder.mkdir()
    os.mkfifo(folder / "stalled.mtl")
    path = folder / "triangle.obj"
    path.write_text("mtllib stalled.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nusemtl paint\nf 1 2 3\n")
    return path


def test_hung_asset_is_killed_at_its_time_limit_and_the_next_asset_renders(tmp_path, demo_assets, render_python):
    cfg = RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, timeout_s=15)
    out = tmp_path / "out"
    with RenderSupervisor(cfg) as supervisor:
        supervisor.start()
        first_pid = supervisor.child_pid
        started = time.monotonic()
        hung = next(render_files([_hanging_obj(tmp_path / "hung")], TINY, out, worker=cfg, supervisor=supervisor))
        assert hung.result.reason == "timeout" and 15 <= time.monotonic() - started < 45
        assert "15" in hung.result.message
        with pytest.raises(ProcessLookupError):
            os.killpg(first_pid, 0)  # the child's whole process group is gone
        good = next(render_files([demo_assets["rough_cone"]], TINY, out, worker=cfg, supervisor=supervisor))
        assert good.result.is_ok, good.result
        assert supervisor.child_pid != first_pid
    assert not list(out.glob("*partial*")), "a killed child left a half-written folder visible"
    assert not list(out.glob("triangle*"))


def test_sigkilled_child_is_recorded_with_its_stderr_tail_and_the_worker_carries_on(tmp_path, demo_assets, render_python):
    cfg = RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, timeout_s=300)
    slow = recipe_config("lh", num_views=6, resolution_px=64, samples=2)
    with RenderSupervisor(cfg) as supervisor:
        supervisor.start()
        victim = supervisor.child_pid

        def kill_mid_render() -> None:  # once the child has begun writing this asset's (partial) folder
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob(f"*.partial-{victim}/*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_render)
        killer.start()
        killed = next(render_files([demo_assets["metal_torus"]], slow, tmp_path, worker=cfg, supervisor=supervisor))
        killer.join()
        assert killed.result.status == "failed" and killed.result.reason == "worker_crashed"
        assert "SIGKILL" in killed.result.message
        assert killed.result.stderr_tail.strip(), "the failure record must carry the child's stderr tail"
        after = next(render_files([demo_assets["open_box"]], TINY, tmp_path, worker=cfg, supervisor=supervisor))
        assert after.result.is_ok and supervisor.child_pid != victim
    assert not list(tmp_path.glob("*partial*"))


def test_rss_stays_flat_over_many_assets_in_one_child(tmp_path, demo_assets, render_python):
    cfg = RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, max_assets_per_child=1000)
    assets = [demo_assets[name] for name in sorted(demo_assets)] * 5  # 25 assets
    rss_mb = []
    with RenderSupervisor(cfg) as supervisor:
        pid = supervisor.start().pid
        for record in render_files(assets, TINY, tmp_path, worker=cfg, supervisor=supervisor):
            assert record.result.is_ok, record.result
            assert supervisor.child_pid == pid
            rss_mb.append(supervisor.child_rss_bytes() / 2**20)
    warm, last = max(rss_mb[3:8]), max(rss_mb[-5:])
    assert last - warm < 250, f"RSS grew from {warm:.0f} MB to {last:.0f} MB over {len(rss_mb)} assets: {rss_mb}"


def test_software_gl_is_refused_unless_allowed(tmp_path, demo_assets, render_python):
    cfg = RenderWorkerConfig(render_python=str(render_python), allow_software_gl=False)
    with RenderSupervisor(cfg) as supervisor:
        info = supervisor.start()
        record = next(render_files([demo_assets["rough_cone"]], TINY, tmp_path, worker=cfg, supervisor=supervisor))
    if not info.is_software_gl:
        pytest.skip(f"this machine renders on {info.gl_renderer}")
    assert record.result.reason == "gl_software_fallback"
    assert info.gl_renderer in record.result.message


def test_child_temp_folders_are_removed_whatever_ends_them(tmp_path, monkeypatch, demo_assets, render_python):
    """A child ends by SIGKILL (close, recycle, timeout, crash), so it never cleans up after itself: its
    scratch and Blender's `blender_*` session folder must live in a folder the supervisor owns and removes."""
    temp = tmp_path / "system_temp"
    temp.mkdir()
    (temp / "someone_elses").mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = sorted(os.listdir(temp))
    cfg = RenderWorkerConfig(
        render_python=str(render_python), allow_software_gl=True, timeout_s=10, max_assets_per_child=8
    )
    out = tmp_path / "out"
    with RenderSupervisor(cfg) as supervisor:
        supervisor.start()
        (child_temp,) = set(os.listdir(temp)) - set(before)  # one folder per child holds all it writes
        assert child_temp.startswith("near-render-")
        assert any(name.startswith("blender_") for name in os.listdir(temp / child_temp))
        assets = [demo_assets[name] for name in sorted(demo_assets)] * 4  # 20 renders: recycled after 8, 16
        for record in render_files(assets, TINY, out, worker=cfg, supervisor=supervisor):
            assert record.result.is_ok, record.result
        assert supervisor.restarts == 2
        hung_asset = _hanging_obj(tmp_path / "hung")
        (hung,) = render_files([hung_asset], TINY, out, worker=cfg, supervisor=supervisor)
        assert hung.result.reason == "timeout"
        os.kill(supervisor.start().pid, signal.SIGKILL)
        (crashed,) = render_files([demo_assets["rough_cone"]], TINY, out, worker=cfg, supervisor=supervisor)
        assert crashed.result.reason == "worker_crashed"
        supervisor.start()  # and one that close() ends
    assert sorted(os.listdir(temp)) == before
