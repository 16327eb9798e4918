"""A real multi-node Ray cluster on this machine, for tests: a head with ``num_cpus=0`` (as the
shipped KubeRay head) and worker nodes of their own raylets (``ray.cluster_utils.Cluster``),
in its own temp folder, on free ports, with the dashboard (job API) on 127.0.0.1. (The nodes
take the machine's address, as the session's local cluster does: a Ray driver resolves
127.0.0.1 to it.)

Run as a process of its own (a process joins one Ray cluster at most, and the test session
already has its local one): it prints one JSON line (GCS address, dashboard URL, temp folder)
once every node is up, then holds the cluster until its stdin closes or it gets SIGTERM.

    python tests/multinode_cluster.py --temp-dir DIR --dashboard-port P [--workers 2 --cpus 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading

from helpers import free_ports
from ray._private.services import get_node_ip_address
from ray._private.utils import write_ray_address
from ray.cluster_utils import Cluster

# per node: Ray's default of 30% of RAM each would over-commit this machine
OBJECT_STORE_BYTES = 256 * 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--dashboard-port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus", type=int, default=3, help="logical CPUs per worker node")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    # every node's dashboard agent (the job API's agent) on a port of its own: Ray's default,
    # 52365 for all, goes to whichever agent starts first on this machine (the test session's
    # own local cluster, say), and a head whose agent lost it accepts no job
    agent_ports = free_ports(1 + args.workers)
    # Ray processes that look for "the" cluster (Ray Train's placement-group cleaner does) find
    # this one, not the test session's own local cluster beside it
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "gcs_server_port": port,
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": args.dashboard_port,
            "temp_dir": args.temp_dir,
            "object_store_memory": OBJECT_STORE_BYTES,
            "dashboard_agent_listen_port": agent_ports[0],
        },
    )
    for agent_port in agent_ports[1:]:
        cluster.add_node(
            num_cpus=args.cpus,
            object_store_memory=OBJECT_STORE_BYTES,
            dashboard_agent_listen_port=agent_port,
        )
    cluster.wait_for_nodes()
    # as `ray start --temp-dir` does: the cluster's address in its own temp folder, where the
    # job agent looks for "the" cluster of its node when it starts a job's driver. Without it
    # (ray.cluster_utils writes only /tmp/ray's), the agent picks any GCS running on the machine:
    # with the test session's local cluster beside this one, the driver joined that one about
    # half the time (training ran on 1 node, and the test split's actors never started)
    write_ray_address(cluster.address, args.temp_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(
        json.dumps(
            {
                "address": cluster.address,
                "dashboard": f"http://127.0.0.1:{args.dashboard_port}",
                "temp_dir": args.temp_dir,
                "nodes": 1 + args.workers,
            }
        ),
        flush=True,
    )
    stop.wait()
    cluster.shutdown()


if __name__ == "__main__":
    main()
