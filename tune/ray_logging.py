"""Runs in every Ray worker process of a sweep (Ray's `worker_process_setup_hook`): quiets two Ray Train loggers.

- Ray Train V2 starts a PlacementGroupCleaner for every run; it asks Ray's State API whether the Train controller
  is alive, and that API needs the dashboard, which `ray[tune]` does not install. Without it the cleaner logs
  "Failed to query Ray Train Controller actor state" about once a second for the whole trial. The sweep removes
  ended trials' placement groups itself (`tune.trial.ReleaseWorkers`), so the warning says nothing useful.
- Every worker logs "Reporting training result N: TrainingReport(...)" with the whole metrics dict at each report,
  which repeats what Tune prints. `ray.train.LoggingConfig` quiets the controller's INFO lines but not these: that
  module names its logger after its file path (`logging.getLogger(__file__)`), outside the `ray.train` logger.

Only stdlib imports here: every Ray worker process of the sweep imports this module.
"""

from __future__ import annotations

import logging
import os
import sys

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CONTEXT_FILE = ("train", "v2", "_internal", "execution", "context.py")  # under the ray package


def quiet_ray_train() -> None:
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    ray = sys.modules.get("ray")  # always imported in a Ray worker process; not imported here otherwise
    if ray is not None and ray.__file__:
        logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *CONTEXT_FILE)).setLevel(logging.WARNING)
