"""The `worker_process_setup_hook` of a local Ray that `near train` starts (`training.ray_train`).

Every worker process of the job runs `setup_local_worker` when it starts, so this module imports nothing heavy
(`ray` is loaded in a worker already).
"""

import logging
import os

from infra.logs import quiet_library_notices

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
"""Ray Train's `PlacementGroupCleaner` actor: a detached helper that removes the run's placement group if the
Train controller dies."""


def setup_local_worker() -> None:
    """Point this worker's State API calls at its own cluster, keep only the errors of Ray Train's
    PlacementGroupCleaner, and silence the library notices the CLI silences.

    The cleaner asks the State API once a second whether the Train controller still lives. In a worker of a
    local cluster the State API finds its cluster by looking for running GCS processes; with two Ray
    instances on the host (another user's, another run's) it raises in the cleaner's thread, which prints a
    traceback and ends the watch. `RAY_ADDRESS` set to the worker's own GCS avoids that search. The cluster's
    State API itself is off (a local Ray runs without its dashboard, 1 GB of processes), so every ask still
    fails and logs a WARNING, one line a second for the whole run; only the cleaner's errors are kept. The
    cleaner cannot act either way, and a local cluster ends with the driver, placement groups included.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    quiet_library_notices()
