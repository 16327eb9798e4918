"""Starting or joining a Ray cluster for HeriCap runs, and what a run checks about the cluster
before it starts anything on it: that every location its workers read or write is one every node
reaches, and that the cluster has room for the workers, actors or replicas it asks for."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

import ray
import ray.data

from hericap.config.loader import ConfigError, NotEnoughResourcesError
from hericap.data import storage

__all__ = [
    "alive_nodes",
    "check_resources",
    "check_shared_locations",
    "init_ray",
    "ray_session",
]

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
    logger.info(
        "Ray: cluster at %s, %d node(s), %s",
        ray.get_runtime_context().gcs_address,
        len(alive_nodes()),
        ray.cluster_resources(),
    )
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


def alive_nodes() -> list[dict]:
    """The cluster's live nodes (``ray.nodes()`` entries)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_locations(locations: Mapping[str, str | None], what: str) -> None:
    """On a multi-node cluster, refuse a plain path among ``locations`` (config key ->
    location) that processes on other nodes would read or write: it names one machine's disk.

    Raises:
        ConfigError: naming the key and the fix (a URI; ``file://`` for a shared mount).
    """
    nodes = len(alive_nodes())
    if nodes < 2:
        return
    for key, location in locations.items():
        if location and not storage.is_uri(location):
            raise ConfigError(
                f"{key}={location} is a path on this machine, but the Ray cluster has {nodes} "
                f"nodes and {what} runs on all of them: set {key}=s3://BUCKET/PREFIX (any URI "
                f"pyarrow reads), or {key}=file://{storage.resolve(location)} if every node "
                "mounts that path"
            )


def _fits(node: dict, bundle: Mapping[str, float]) -> int:
    """How many ``bundle`` s one node's resources hold."""
    have = node.get("Resources", {})
    counts = [int(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1_000_000


def check_resources(bundle: Mapping[str, float], count: int, what: str, fix: str) -> None:
    """Refuse ``count`` x ``bundle`` (e.g. ``{"CPU": 1, "GPU": 1}`` per worker) when the
    cluster's nodes cannot hold them all, each bundle on one node (Ray would wait forever).

    Raises:
        NotEnoughResourcesError: saying what exists and ``fix``.
    """
    nodes = alive_nodes()
    room = sum(_fits(n, bundle) for n in nodes)
    if room >= count:
        return
    asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
    have = ray.cluster_resources()
    largest = max((n.get("Resources", {}) for n in nodes), key=lambda r: r.get("CPU", 0))
    raise NotEnoughResourcesError(
        f"{what} ask for {count} x ({asked}), but the Ray cluster's {len(nodes)} node(s) hold "
        f"{room} (cluster: {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU; largest "
        f"node: {largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU). {fix}"
    )
