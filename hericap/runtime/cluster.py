"""Starting or joining a Ray cluster for HeriCap runs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
import ray.data

__all__ = ["init_ray", "ray_session"]

logger = logging.getLogger(__name__)


def init_ray(
    address: str | None = None, num_cpus: int | None = None, dashboard: bool = True
) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``, set for ``ray job submit`` drivers; ``auto``: the
    cluster ``ray start`` began on this machine) or start a local cluster of this process's
    own, even when another one runs on the machine; a no-op when Ray is already initialised.

    The dashboard stays on (bound to 127.0.0.1): Ray Train's placement-group cleaner and Tune's
    trial clean-up query its state API, and without it they spin on warnings.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # a `ray job submit` driver: the job manager names the cluster it runs on
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = (
        {"address": address}
        if address
        else {
            # a cluster of our own: never an unrelated one that `ray start` left running
            "address": "local",
            "num_cpus": num_cpus,
            "include_dashboard": dashboard,
            "dashboard_host": "127.0.0.1",
        }
    )
    ray.init(logging_level=logging.WARNING, configure_logging=True, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logger.info("Ray: %s", ray.cluster_resources())
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """:func:`init_ray` for a block; shuts Ray down afterwards only if this block started it."""
    started = init_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
