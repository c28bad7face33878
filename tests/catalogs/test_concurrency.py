"""Two processes committing to the same catalog at the same time, on SQLite and on PostgreSQL: every row lands
exactly once."""

import subprocess
import sys
from pathlib import Path

import pytest

from catalogs.tables import FactoryCatalog

REPO = Path(__file__).resolve().parents[2]
COMMITS, ROWS = 12, 10

WRITER = """
import sys, pyarrow as pa
from catalogs.tables import FactoryCatalog
catalog = FactoryCatalog(sys.argv[1], sys.argv[3] or None)
name = sys.argv[2]
print("ready", flush=True); sys.stdin.readline()  # start together
for c in range({commits}):
    keys = [f"{{name}}-{{c:03d}}-{{r:03d}}" for r in range({rows})]
    catalog.commit_artifacts(pa.table({{"artifact_key": keys, "step": ["s"] * len(keys), "spec_hash": ["h"] * len(keys),
        "asset_id": keys, "source_id": keys, "status": ["ok"] * len(keys)}}), run_id=name)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_commits_lose_and_duplicate_nothing(tmp_path, backend, request):
    uri = request.getfixturevalue("postgres_uri") if backend == "postgresql" else ""
    FactoryCatalog(tmp_path / "data", uri or None)  # tables exist before the race starts
    code = WRITER.format(commits=COMMITS, rows=ROWS)
    writers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data"), name, uri], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    for w in writers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in writers:
        assert w.wait(timeout=600) == 0, w.stderr.read()
    catalog = FactoryCatalog(tmp_path / "data", uri or None)
    keys = catalog.read("artifacts", ("artifact_key",))["artifact_key"].to_pylist()
    expected = {f"{n}-{c:03d}-{r:03d}" for n in "ab" for c in range(COMMITS) for r in range(ROWS)}
    assert len(keys) == len(expected) and set(keys) == expected
    assert len(catalog.table("artifacts").snapshots()) == 2 * COMMITS
