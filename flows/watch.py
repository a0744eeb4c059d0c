"""The scheduled watch: one pass over a batch's models, building those whose upstream revision changed.

Deployed as ``quantmill-watch/<batch>`` with the batch's cron (``quantmill deploy``, or prefect.yaml). A worker
runs it in a directory of its own, so it first moves to the project whose conf/ it reads: relative paths in
conf/ (the store, local models) mean there what they mean to the CLI.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow

from quantmill import constants as C


@flow(name=C.WATCH_FLOW, log_prints=False, validate_parameters=False)
def watch(batch: str, conf_dir: str | None = None) -> dict[str, Any]:
    from quantmill.batches.watch import watch_once
    from quantmill.config import find_conf_dir
    from quantmill.prefect.launch import run_here

    directory = find_conf_dir(conf_dir)
    os.chdir(directory.parent)
    return watch_once(directory, batch, run_here)
