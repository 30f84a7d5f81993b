"""Run by tests/test_multinode.py in a subprocess (its own Ray, apart from the session's): the smoke
pipeline on a `ray.cluster_utils.Cluster` of a head and two worker nodes, one CPU each, then a
JSON line saying on which nodes each stage's actors and tasks ran (from the State API).

    python tests/multinode_run.py RUN_DIR [section.key=value ...]
"""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ray_processes import free_port  # noqa: E402


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_nodes, list_tasks

    from elrea_ray.config import load_config
    from elrea_ray.pipeline import run_pipeline

    run_dir, overrides = sys.argv[1], sys.argv[2:]
    # One CPU per node: the two expert trainers that run at once (experts.max_concurrent=2) can
    # only be placed on two different nodes, so spreading does not depend on scheduler heuristics.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "temp_dir": os.environ["ELREA_RAY_TEMP"],
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    k: os.environ[k]
                    for k in ("ELREA_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
                    if k in os.environ
                }
            },
        )
        cfg = load_config(ROOT / "jobs" / "configs" / "smoke.yaml", [f"run.run_dir={run_dir}", *overrides])
        run_pipeline(cfg)
        where: dict[str, set] = defaultdict(set)
        for a in list_actors(address=cluster.address, limit=10000, detail=True, raise_on_missing_output=False):
            if a.node_id:  # None: never placed
                where[a.class_name].add(a.node_id)
        for t in list_tasks(address=cluster.address, limit=10000, detail=True, raise_on_missing_output=False):
            if t.type == "NORMAL_TASK" and t.node_id:
                where[t.name].add(t.node_id)
        nodes = [
            n.node_id for n in list_nodes(address=cluster.address, raise_on_missing_output=False) if n.state == "ALIVE"
        ]
        print(
            "MULTINODE " + json.dumps({"nodes": nodes, "where": {k: sorted(v) for k, v in where.items()}}), flush=True
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
