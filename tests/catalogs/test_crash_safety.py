"""SIGKILL a real writer process at each point of the commit protocol: nothing committed is lost, nothing
half-written becomes visible, a rerun completes the work and GC collects exactly the debris."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalogs.gc import collect_garbage, find_garbage
from catalogs.planner import plan
from catalogs.release_reader import Release
from catalogs.releases import ReleaseSpec, create_release
from catalogs.tables import FactoryCatalog
from catalogs.verify import verify_catalog, verify_release

from .conftest import execute, paper_graph, synthetic_sources

REPO = Path(__file__).resolve().parents[2]


def _start_writer(data_root: Path | str, mode: str, catalog_uri: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.catalogs.crash_writer", str(data_root), mode, *filter(None, [catalog_uri])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _kill_after(writer: subprocess.Popen, word: str, delay_s: float = 0.0) -> None:
    for line in writer.stdout:
        if line.strip() == word:
            break
    else:
        pytest.fail(f"writer exited before {word!r}: {writer.stderr.read()}")
    time.sleep(delay_s)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)


def _assert_consistent_and_recoverable(data_root: Path | str, catalog_uri: str | None = None) -> int:
    catalog = FactoryCatalog(data_root, catalog_uri)  # a new process's view: opens, scans
    assert list(verify_catalog(catalog, deep=True)) == [], "a committed row names a missing or changed pack"
    execute(catalog, plan(catalog, paper_graph()), "rerun")
    assert plan(catalog, paper_graph()).todo.num_rows == 0, "the rerun completes the work"
    release = create_release(catalog, paper_graph(), ReleaseSpec("after-crash", {"slat_lh": "slat_lh"}))
    garbage = find_garbage(catalog, grace_s=0)
    collect_garbage(catalog, garbage)
    assert list(verify_release(Release.open(data_root, "after-crash"))) == [] and release["num_samples"] == 8
    assert list(verify_catalog(catalog, deep=True)) == []
    assert find_garbage(catalog, grace_s=0) == []
    return len(garbage)


def _registered(data_root: Path | str, catalog_uri: str | None = None) -> FactoryCatalog:
    catalog = FactoryCatalog(data_root, catalog_uri)
    catalog.register_specs(paper_graph().specs)
    catalog.register_sources(synthetic_sources(8))
    return catalog


@pytest.fixture
def data_root(tmp_path) -> Path:
    return _registered(tmp_path / "data").data_root


@pytest.mark.parametrize("mode, word, delay_s, debris", [
    ("after_pack", "packed", 0.0, 1),       # the pack is on disk, its rows are not: one orphan
    ("after_commit", "committed", 0.0, 0),  # nothing is pending
    ("during_pack", "writing", 0.5, 1),     # killed while writing: an unfinished .tmp pack
])
def test_sigkill_at_each_protocol_point(data_root, mode, word, delay_s, debris):
    _kill_after(_start_writer(data_root, mode), word, delay_s)
    if mode == "during_pack":
        assert list(data_root.glob("packs/*/*/.tmp-*")), "the kill should land while the pack is written"
    assert _assert_consistent_and_recoverable(data_root) == debris


def test_sigkill_at_random_moments_of_a_busy_writer(data_root):
    for delay_s in (1.1, 0.7, 1.9):
        writer = _start_writer(data_root, "run")
        _kill_after(writer, "committed", delay_s)
        catalog = FactoryCatalog(data_root)
        assert list(verify_catalog(catalog, deep=True)) == []
    _assert_consistent_and_recoverable(data_root)


@pytest.mark.parametrize("mode, word, delay_s", [("after_pack", "packed", 0.0), ("during_pack", "writing", 0.5)])
def test_sigkill_on_an_object_store_root(s3_root, tmp_path, mode, word, delay_s):
    """S3 has no rename: a pack is written in place, so a killed writer leaves a partial pack at its final path.
    No committed row names it, so no read ever sees it, and gc collects it."""
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    packs = _registered(s3_root, catalog_uri).data_root / "packs"
    _kill_after(_start_writer(s3_root, mode, catalog_uri), word, delay_s)
    assert len(list(packs.glob("*/*/*"))) == 1, "the kill should leave the one pack it was writing or had written"
    assert _assert_consistent_and_recoverable(s3_root, catalog_uri) == 1
