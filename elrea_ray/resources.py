"""Resource checks that understand autoscaling clusters.

A fresh KubeRay or `ray up` cluster shows a head with 0 GPUs (often 0 CPUs); comparing a stage's
request with the resources present now would fail every job. So before a stage waits, it asks the
autoscaler for its bundles (`ray.autoscaler.sdk.request_resources`), waits up to
`ray.resource_wait_s` while saying what it waits for, and fails at once only for requests that no
node type could ever satisfy. Without an autoscaler the live nodes are all there will be.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from typing import Iterator


def worker_bundle(cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float = 1.0) -> dict[str, float]:
    """What one Ray Train worker reserves (a fractional GPU lets several experts share one)."""
    return {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}


def _names(keys: str | None) -> tuple[str | None, str | None]:
    if not keys:
        return None, None
    per = "worker" if keys in ("train", "experts") else "actor"
    return f"{keys}.num_{per}s", f"{keys}.cpus_per_{per}"


def resource_problem(
    num_workers: int,
    bundle: dict[str, float],
    total: dict[str, float],
    nodes: list[dict[str, float]],
    keys: str | None = None,
    spare_cpus: float = 0.0,
) -> str | None:
    """Why a group of `num_workers` x `bundle` cannot start on `nodes` (totals `total`), or None.

    Two checks: the whole group against the totals, and one worker against the largest node,
    since a worker's bundle cannot span nodes. `keys` is the config section the numbers come
    from (e.g. "train"), named in the message. `spare_cpus`: CPUs that must stay free beside the
    group (a Ray Data actor pool's read and write tasks)."""
    workers, cpu_key = _names(keys)
    for res, amount in bundle.items():
        extra = spare_cpus if res == "CPU" else 0.0
        need, have = num_workers * amount + extra, total.get(res, 0.0)
        if have < need:
            named = f"; {workers}, {cpu_key}" if keys and res == "CPU" else ""
            plus = f" + {extra:g} for Ray Data's read and write tasks" if extra else ""
            hint = (
                f"; set {keys + '.' if keys else ''}use_gpu=false on a CPU cluster"
                if res == "GPU" and have == 0
                else ""
            )
            have_s = "unlimited" if have >= sys.maxsize else f"{have:g}"
            return (
                f"needs {need:g} {res}s ({num_workers} x {amount:g}{named}{plus}) but the Ray cluster "
                f"has {have_s} {res}s{hint}"
            )
    if not any(all(n.get(r, 0.0) >= a for r, a in bundle.items()) for n in nodes):
        biggest = ", ".join(f"{r} {max((n.get(r, 0.0) for n in nodes), default=0.0):g}" for r in bundle)
        return (
            "one worker needs "
            + ", ".join(f"{a:g} {r}" for r, a in bundle.items())
            + (f" ({cpu_key})" if cpu_key else "")
            + f" on a single node, but no node has that much (largest: {biggest})"
        )
    return None


def capacity(
    live_nodes: list[dict[str, float]], node_types: list[dict] | None
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The most the cluster could ever offer: (totals, one resource dict per node shape).

    `node_types`: the autoscaler's node types, each {"resources": {...}, "max_count": n}
    (-1: no limit), or None without an autoscaler (then the live nodes are all there will be).
    Live nodes count beside the node types (a head is usually not a scalable type)."""
    total: dict[str, float] = {}
    for n in live_nodes:
        for r, a in n.items():
            total[r] = total.get(r, 0.0) + a
    shapes = list(live_nodes)
    for t in node_types or []:
        res, count = dict(t.get("resources", {})), t.get("max_count", -1)
        if count == 0 or not res:
            continue
        shapes.append(res)
        for r, a in res.items():
            total[r] = float(sys.maxsize) if count < 0 else total.get(r, 0.0) + a * count
    return total, shapes


def impossible(
    num_workers: int,
    bundle: dict[str, float],
    live_nodes: list[dict[str, float]],
    node_types: list[dict] | None,
    keys: str | None = None,
    spare_cpus: float = 0.0,
) -> str | None:
    """Why the request could never be met, whatever the autoscaler adds, or None."""
    total, shapes = capacity(live_nodes, node_types)
    return resource_problem(num_workers, bundle, total, shapes, keys, spare_cpus)


def autoscaler_node_types() -> list[dict] | None:
    """The autoscaler's configured node types from the GCS, or None when no autoscaler reported one."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS or no autoscaler: behave as a fixed cluster
        return None
    if not config or not config.node_group_configs:
        return None
    return [
        {"resources": {k: float(v) for k, v in g.resources.items()}, "max_count": int(g.max_count)}
        for g in config.node_group_configs
    ]


def _offer(node_types: list[dict]) -> str:
    return "; ".join(
        ", ".join(f"{r} {a:g}" for r, a in t["resources"].items())
        + f" x{'unlimited' if t['max_count'] < 0 else t['max_count']}"
        for t in node_types
    )


def _live() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return ray.cluster_resources(), nodes


# `request_resources` replaces the previous request of the same driver, so concurrent stages (the
# experts train side by side) publish the union of what they all still wait for or run on, and a
# stage withdraws its part when it ends; the last one out clears the request.
_demand_lock = threading.Lock()
_demands: dict[int, list[dict[str, float]]] = {}
_tokens = itertools.count()


def _publish() -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[b for bundles in _demands.values() for b in bundles])


def outstanding_demand() -> list[dict[str, float]]:
    """The bundles this driver asks the autoscaler for now (all stages together)."""
    with _demand_lock:
        return [dict(b) for bundles in _demands.values() for b in bundles]


@contextlib.contextmanager
def autoscaler_demand(bundles: list[dict[str, float]]) -> Iterator[None]:
    """Ask the autoscaler for `bundles` beside every other stage's, until the block ends."""
    with _demand_lock:
        token = next(_tokens)
        _demands[token] = [dict(b) for b in bundles]
    try:
        with _demand_lock:
            _publish()
        yield
    finally:
        with _demand_lock:
            del _demands[token]
            try:
                _publish()
            except Exception as e:  # the autoscaler keeps the old request; the stage's own error wins
                print(f"could not withdraw the autoscaler request: {type(e).__name__}: {e}", flush=True)


def _wait_until_fits(
    num_workers: int,
    bundle: dict[str, float],
    what: str,
    keys: str | None,
    spare_cpus: float,
    wait_s: float,
    report_every_s: float,
    problem: str,
) -> None:
    start = last = time.monotonic()
    print(f"{what}: waiting up to {wait_s:g} s for the autoscaler: {problem}", flush=True)
    while True:
        time.sleep(min(1.0, max(report_every_s, 0.1)))
        total, live = _live()
        problem = resource_problem(num_workers, bundle, total, live, keys, spare_cpus)
        if problem is None:
            return
        now = time.monotonic()
        if now - start >= wait_s:
            raise RuntimeError(
                f"{what}: waited {wait_s:g} s (ray.resource_wait_s) and the cluster still "
                f"{problem.replace('but the Ray cluster has', 'has')}"
            )
        if now - last >= report_every_s:
            last = now
            have = ", ".join(f"{r} {total.get(r, 0.0):g}" for r in bundle)
            print(f"{what}: still waiting ({now - start:.0f} s): {problem}; cluster now: {have}", flush=True)


@contextlib.contextmanager
def resources_for(
    num_workers: int,
    bundle: dict[str, float],
    what: str,
    keys: str | None = None,
    spare_cpus: float = 0.0,
    wait_s: float = 300.0,
    report_every_s: float = 15.0,
    node_types: list[dict] | None = None,
) -> Iterator[None]:
    """Make sure `num_workers` x `bundle` can start, and keep asking the autoscaler for it while
    the block runs (the job placing its workers), so that nodes it started for us are not taken
    back as idle before the job lands on them.

    Fails at once when the request never could be met; else, when the cluster lacks it now, asks
    the autoscaler and waits up to `wait_s` seconds, printing every `report_every_s` what is
    missing. `node_types` overrides what the autoscaler reports (None: read it from the GCS)."""
    total, live = _live()
    types = node_types if node_types is not None else autoscaler_node_types()
    if types is None:  # a fixed cluster: what is there now is all there will be
        problem = resource_problem(num_workers, bundle, total, live, keys, spare_cpus)
        if problem:
            raise RuntimeError(f"{what}: {problem}")
        yield
        return
    never = impossible(num_workers, bundle, live, types, keys, spare_cpus)
    if never:
        raise RuntimeError(f"{what}: {never} (autoscaler node types: {_offer(types)})")
    problem = resource_problem(num_workers, bundle, total, live, keys, spare_cpus)
    if problem is None:
        yield
        return
    if wait_s <= 0:
        raise RuntimeError(f"{what}: {problem} (ray.resource_wait_s=0: no waiting for the autoscaler)")
    bundles = [dict(bundle) for _ in range(num_workers)] + ([{"CPU": spare_cpus}] if spare_cpus else [])
    with autoscaler_demand(bundles):
        _wait_until_fits(num_workers, bundle, what, keys, spare_cpus, wait_s, report_every_s, problem)
        yield


def check_resources(
    num_workers: int,
    bundle: dict[str, float],
    what: str,
    keys: str | None = None,
    spare_cpus: float = 0.0,
    wait_s: float = 300.0,
    report_every_s: float = 15.0,
    node_types: list[dict] | None = None,
    wait: bool = True,
) -> None:
    """`resources_for` without a block: returns once the request fits (its autoscaler request is
    withdrawn then). `wait=False`: only the never-satisfiable check (a stage checked before the
    run starts)."""
    if not wait:
        total, live = _live()
        types = node_types if node_types is not None else autoscaler_node_types()
        problem = (
            resource_problem(num_workers, bundle, total, live, keys, spare_cpus)
            if types is None
            else impossible(num_workers, bundle, live, types, keys, spare_cpus)
        )
        if problem is None:
            return
        if types is not None:
            problem += f" (autoscaler node types: {_offer(types)})"
        raise RuntimeError(f"{what}: {problem}")
    with resources_for(num_workers, bundle, what, keys, spare_cpus, wait_s, report_every_s, node_types):
        pass


def cluster_offer() -> dict[str, float]:
    """The most CPUs/GPUs the connected cluster could ever offer: its live nodes plus, on an
    autoscaling cluster, every node type at its maximum count (sys.maxsize: no limit)."""
    _, live = _live()
    return capacity(live, autoscaler_node_types())[0]
