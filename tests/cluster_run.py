"""Runs ingest, caption and embed on a Ray cluster of two local nodes (ray.cluster_utils:
a head and a worker node, separate raylets with their own resources on 127.0.0.1), then
prints, as one JSON line, each stage's counts and the nodes its actors ran on.

Run as a subprocess by tests/test_cluster.py (the test process holds its own local Ray):
    python -m tests.cluster_run <config overrides ...>
"""
from __future__ import annotations

import json
import sys


def main(overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipelines.config import load_config
    from pipelines.context import RunContext
    from pipelines.registry import STAGES

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "resources": {"node_head": 1}})
    cluster.add_node(num_cpus=2, resources={"node_worker": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config("conf/demo.yaml", [*overrides, f"ray.address={cluster.address}"])
        nodes = {n["NodeID"]: ("head" if "node_head" in n["Resources"] else "worker") for n in ray.nodes()}
        out = {"nodes": sorted(nodes.values()), "stages": {}}
        for stage in ("ingest", "caption", "embed"):
            s = STAGES[stage].run(RunContext.create(cfg))
            out["stages"][stage] = {"written": s.written, "rejected": s.rejected}
        ran_on: dict[str, set] = {}
        for a in list_actors(detail=True, limit=1000, raise_on_missing_output=False):
            # An actor that never got a node (a pool scaled up, then the work ran out) has none.
            if a.class_name.startswith("MapWorker") and a.node_id:
                ran_on.setdefault(a.class_name, set()).add(nodes.get(a.node_id, a.node_id))
        out["actors"] = {k: sorted(v) for k, v in ran_on.items()}
        print("CLUSTER_RUN " + json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
