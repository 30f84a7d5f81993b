"""Small helpers for the entry scripts in `jobs/`: attach to Ray, print where results went."""

from __future__ import annotations

import os

from elrea_ray.artifacts import RunDir
from elrea_ray.config import Config


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS or one started with `ray start` on this
    machine; otherwise start a local Ray in-process (with its dashboard: Train V2 clean-up needs it)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        ray.init(address="local", num_cpus=cfg.ray.num_cpus)
        return
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
        return
    except (ConnectionError, RuntimeError):
        pass
    ray.init(num_cpus=cfg.ray.num_cpus)


def print_results(run: RunDir) -> None:
    results = run.eval_file("results.md")
    if results.exists():
        print()
        print(results.read_text())
    print(f"run directory: {run.root}")
    print(f"  results: {results}")
    print(f"  bundle (for serving): {run.bundle}")
