"""A build writer for the crash tests: `python -m tests.catalogs.crash_writer DATA_ROOT MODE [CATALOG_URI]`.

It executes the plan batch by batch and announces each protocol step on stdout ("writing", "packed",
"committed") before doing the next, pausing at the point MODE names so the test can SIGKILL it there:
    after_pack     between a pack written and its rows committed
    after_commit   right after the first commit
    during_pack    no pause, the first pack is large; the test kills it while the pack is written
    run            no pause: batches of one asset as fast as possible (the test kills at a random time)
"""

import sys
import time

import numpy as np
import pyarrow.compute as pc

from catalogs.commit import StepResult, commit_batch, write_batch
from catalogs.planner import plan
from catalogs.tables import FactoryCatalog

from .conftest import fake_output, paper_graph


def _say(word: str) -> None:
    print(word, flush=True)


def main(data_root: str, mode: str, catalog_uri: str | None = None) -> None:
    catalog = FactoryCatalog(data_root, catalog_uri)
    work = plan(catalog, paper_graph())
    batch = 1 if mode == "run" else 4
    for step in dict.fromkeys(work.todo["step"].to_pylist()):
        rows = work.todo.filter(pc.equal(work.todo["step"], step))
        for start in range(0, rows.num_rows, batch):
            todo = rows.slice(start, batch)
            results = [StepResult(k, fake_output(step, k)) for k in todo["artifact_key"].to_pylist()]
            if mode == "during_pack":
                big = np.random.default_rng(0).normal(size=(6_000_000, 8)).astype(np.float32)
                results[0] = StepResult(results[0].artifact_key, {**results[0].arrays, "feats": big} if "feats" in results[0].arrays
                                        else results[0].arrays)
            _say("writing")
            packed = write_batch(catalog.data_root, todo, results, f"crash-{mode}")
            _say("packed")
            if mode == "after_pack":
                time.sleep(600)
            commit_batch(catalog, todo, packed, f"crash-{mode}")
            _say("committed")
            if mode == "after_commit":
                time.sleep(600)


if __name__ == "__main__":
    main(*sys.argv[1:])
