"""`near catalog` end to end as a user runs it."""

import subprocess
import sys

from catalogs.packs import write_pack
from catalogs.planner import plan
from catalogs.release_reader import release_dir
from catalogs.releases import ReleaseSpec, create_release

from .conftest import execute, fake_output, paper_graph, synthetic_sources


def _near(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, check=check,
                          env={"COLUMNS": "200", "PATH": ""})


def test_log_show_diff_verify_gc(catalog):
    root = str(catalog.data_root)
    graph = paper_graph()
    catalog.register_specs(graph.specs)
    catalog.register_sources(synthetic_sources(6))
    execute(catalog, plan(catalog, graph), "run-1", fail=frozenset({"demo:000002"}))
    create_release(catalog, graph, ReleaseSpec("first", {"slat_lh": "slat_lh"}))
    catalog.register_sources(synthetic_sources(2, start=6))
    bumped = paper_graph(slat_lh={"version": "2"})
    execute(catalog, plan(catalog, bumped), "run-2", fail=frozenset({"demo:000002"}))
    create_release(catalog, bumped, ReleaseSpec("second", {"slat_lh": "slat_lh"}))

    shown = _near("catalog", "--root", root, "show").stdout
    assert "slat_lh" in shown and "failed" in shown and "first" in shown and "second" in shown
    log = _near("catalog", "--root", root, "log").stdout
    assert "run-1" in log and "run-2" in log and "artifacts" in log
    diff = _near("catalog", "--root", root, "diff", "first", "second").stdout
    row = next(line for line in diff.splitlines() if line.strip("│ ").startswith("slat_lh"))
    assert [c.strip() for c in row.split("│") if c.strip()] == ["slat_lh", "2", "0", "5", "0"], diff
    assert "spec" in diff

    assert _near("catalog", "--root", root, "verify", "first").returncode == 0
    assert "0 problems" in _near("catalog", "--root", root, "verify", "--deep").stdout
    orphan = write_pack(root, "slat_lh", "0" * 64, "crashed", [("k" * 64, fake_output("slat_lh", "b" * 64))])[0]
    listed = _near("catalog", "--root", root, "gc", "--grace-hours", "0").stdout
    assert orphan.pack_path in listed and "dry run" in listed and (catalog.data_root / orphan.pack_path).exists()
    _near("catalog", "--root", root, "gc", "--grace-hours", "0", "--delete")
    assert not (catalog.data_root / orphan.pack_path).exists()

    manifest = release_dir(root, "first") / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-9] + b"tampered!")
    bad = _near("catalog", "--root", root, "verify", "first", check=False)
    assert bad.returncode == 1 and "does not match" in bad.stdout
    refused = _near("catalog", "--root", root, "gc", "--grace-hours", "0", "--delete", check=False)
    assert refused.returncode == 2 and "not collecting" in refused.stderr
