"""Stale scratch: a run folder is removed only when every process that claimed it is provably gone."""

import json
import subprocess
import sys
from pathlib import Path

from pipelines import scratch


def _claim_in_a_process_that_exits(run_dir: Path) -> None:
    code = f"from pathlib import Path; from pipelines import scratch; scratch.claim(Path({str(run_dir)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_only_runs_whose_owners_are_gone_are_stale(tmp_path: Path) -> None:
    dead, live, foreign, kept = (tmp_path / name for name in ("dead", "live", "foreign", "kept"))
    _claim_in_a_process_that_exits(dead)
    (dead / "lh" / "asset").mkdir(parents=True)
    (dead / "lh" / "asset" / "view.exr").write_bytes(b"x" * 100)
    _claim_in_a_process_that_exits(live)
    scratch.claim(live)  # this test's own process is alive
    foreign.mkdir()
    _claim_in_a_process_that_exits(foreign)
    claim = next((foreign / scratch.OWNERS).iterdir())
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "host": "another-node"}))
    scratch.release(scratch.claim(kept))  # a finished run that kept its renders: nobody claims it

    stale = scratch.stale_runs(tmp_path)
    assert [run.path.name for run in stale] == ["dead"] and stale[0].size_bytes >= 100
    assert "gone" in stale[0].reason
    scratch.remove_stale_runs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "kept", "live"]
