"""Node-local scratch of builds, `<scratch_dir>/<run_id>/`, and how stale runs are found and removed.

A build removes its scratch when it finishes, but a killed one never does, and transient `lh` sets of thousands of
assets fill a node's disk. So every process that writes into a run folder (the driver, each render actor) first
claims it: `<run_id>/.owners/<host>-<pid>.json` with the process's start time. A run folder is stale when every
owner ran on this host and is gone (no such pid, or a newer process under it); an owner on another host, or a
folder without owners (kept renders), cannot be proven dead and is left alone.
"""

import dataclasses
import json
import logging
import shutil
import socket
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

OWNERS = ".owners"


@dataclasses.dataclass(frozen=True)
class StaleRun:
    path: Path
    reason: str
    size_bytes: int


def claim(run_dir: Path) -> Path:
    """Record this process as a writer of `run_dir` (made if absent); returns the claim, for `release`."""
    me = psutil.Process()
    owners = run_dir / OWNERS
    owners.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}
    path = owners / f"{record['host']}-{me.pid}.json"
    path.write_text(json.dumps(record))
    return path


def release(claimed: Path) -> None:
    """Withdraw a claim: a run folder nobody claims (kept renders) is never taken for a dead run's debris."""
    claimed.unlink(missing_ok=True)


def stale_runs(scratch_dir: Path) -> list[StaleRun]:
    """Run folders under `scratch_dir` whose every owner is provably gone."""
    found = []
    for run_dir in sorted(scratch_dir.glob("*/")) if scratch_dir.is_dir() else []:
        owners = sorted((run_dir / OWNERS).glob("*.json"))
        if owners and all(_is_gone(path) for path in owners):
            size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
            found.append(StaleRun(run_dir, f"its build ({', '.join(p.stem for p in owners)}) is gone", size))
    return found


def remove_stale_runs(scratch_dir: Path) -> list[StaleRun]:
    """Delete the stale run folders under `scratch_dir`; returns what was deleted."""
    stale = stale_runs(scratch_dir)
    for run in stale:
        shutil.rmtree(run.path, ignore_errors=True)
        logger.info("removed stale scratch %s (%.1f MiB): %s", run.path, run.size_bytes / 2**20, run.reason)
    return stale


def _is_gone(owner: Path) -> bool:
    try:
        record = json.loads(owner.read_text())
    except (OSError, ValueError):
        return False  # unreadable: cannot prove anything
    if record.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(record["pid"]).create_time() != record["started"]
    except psutil.NoSuchProcess:
        return True
