"""The ELREA pipeline: content-addressed stages over one run directory, run in this order.

    data -> base (Ray Train) -> gradients (Ray Data actors) -> clusters (Ray task) -> [router] (Ray task)
         -> experts (concurrent Ray Train runs) + bundle.json -> [baselines] -> eval (Ray Data actors)

Each stage is a module of `elrea_ray/stages/` whose `run(ctx)` reads only what earlier stages
wrote. Its key hashes the config slice it depends on plus its inputs' keys, so a rerun skips
finished stages and a changed setting reruns exactly the stages downstream of it (see
`artifacts.py`).
"""

from __future__ import annotations

import json
import platform
import time

import yaml

from elrea_ray.artifacts import RunDir, stage_key
from elrea_ray.bundle import write_bundle
from elrea_ray.config import Config
from elrea_ray.progress import Progress
from elrea_ray.stages import base, baselines, clusters, data, evaluate, experts, gradients, router
from elrea_ray.stages.common import StageContext, config_slice, plain, routing_slice
from elrea_ray.tracking import log_stage, publish_tracking, pull_tracking, tracker


def stage_keys(cfg: Config) -> dict[str, str]:
    """Every stage's key, from the config alone (so they are known before anything runs)."""
    k: dict[str, str] = {}
    seed = cfg.run.seed
    data_cfg = plain(cfg.data)
    del data_cfg["bigbench_archive"]  # where the archive lies, not what it holds
    unset_fields = (("benchmarks", {}), ("tasks", []), ("shots", 0), ("eval_shots", {}), ("shot_files", []))
    for name, unset in unset_fields:
        if data_cfg[name] == unset:  # left out when unset: the data key then does not depend on them
            del data_cfg[name]
    k["data"] = stage_key("data", {"data": data_cfg, "seed": seed}, [])
    model = plain(cfg.model)
    train = config_slice(cfg.train)
    k["base"] = stage_key("base", {"model": model, "train": train, "seed": seed}, [k["data"]])
    k["gradients"] = stage_key(
        "gradients", {"model": model, "gradients": config_slice(cfg.gradients)}, [k["data"], k["base"]]
    )
    clustering = config_slice(cfg.clustering)
    del clustering["pca_dim"]  # the pca baseline's, not ELREA's clusters
    k["clusters"] = stage_key("clusters", {"clustering": clustering, "seed": seed}, [k["gradients"]])
    k["experts"] = stage_key(
        "experts", {"experts": config_slice(cfg.experts), "train": train, "seed": seed}, [k["base"], k["clusters"]]
    )
    evals_on = [k["experts"], k["gradients"]]
    trained = baselines.trained_baselines(cfg)
    if trained:  # only then: runs without these baselines keep their keys
        k["baselines"] = stage_key(
            "baselines",
            {
                "methods": trained,
                "experts": config_slice(cfg.experts),
                "train": train,
                "model": model,
                "clustering": config_slice(cfg.clustering),
                "seed": seed,
            },
            [k["base"], k["clusters"]] + ([k["experts"]] if "base_continued" in trained else []),
        )  # its step budget
        evals_on.append(k["baselines"])
    if router.wanted(cfg):  # only then: runs that route by gradients alone keep their keys
        k["router"] = stage_key(
            "router", {"routing": router.config_of(cfg), "seed": seed}, [k["base"], k["gradients"], k["clusters"]]
        )
        evals_on.append(k["router"])  # the report's router section, and the elrea_distilled method
    k["eval"] = stage_key("eval", {"eval": config_slice(cfg.eval), "routing": routing_slice(cfg)}, evals_on)
    return k


# The stages in the order they run: (name, module). The bundle is written after `experts`, so the
# router (which needs only base, gradients and clusters) runs before it and the bundle can list it.
STAGES = (
    ("data", data),
    ("base", base),
    ("gradients", gradients),
    ("clusters", clusters),
    ("router", router),
    ("experts", experts),
    ("baselines", baselines),
    ("eval", evaluate),
)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "ray", "datasets", "scikit-learn", "pyarrow", "reasoning-gym"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_stage_resources(cfg: Config) -> None:
    """Every stage's CPU/GPU demand against the connected cluster, before stage 0 starts: a
    request that can never be placed (GPUs on a CPU cluster, more CPUs than exist) fails now,
    naming the resource and the config keys, instead of a trainer or actor pool waiting forever.
    On an autoscaling cluster only what no node type could ever hold fails here; the training
    stages ask the autoscaler for their workers and wait when they start."""
    from elrea_ray.train import check_resources

    if not cfg.ray.check_resources:
        return
    t, g, x, e = cfg.train, cfg.gradients, cfg.experts, cfg.eval
    check_resources(t.num_workers, t.cpus_per_worker, t.use_gpu, "stage base (Ray Train)", "train", wait=False)
    # The pool's Parquet listing, read, re-blocking and write tasks need a CPU the actors leave free:
    # with every CPU held by actors, the first read task never starts (measured: a hang).
    check_resources(
        g.num_actors,
        g.cpus_per_actor,
        g.use_gpu,
        "stage gradients (Ray Data actors)",
        "gradients",
        spare_cpus=1.0,
        wait=False,
    )
    check_resources(1, 1.0, False, "stage clusters (one Ray task)", wait=False)
    check_resources(
        x.num_workers,
        x.cpus_per_worker,
        x.use_gpu,
        "stage experts (Ray Train)",
        "experts",
        gpus_per_worker=x.gpus_per_worker,
        wait=False,
    )
    check_resources(e.num_actors, e.cpus_per_actor, e.use_gpu, "stage eval (Ray Data actors)", "eval", wait=False)


def _start(cfg: Config, run: RunDir, keys: dict, log) -> None:
    """Before stage 0: resources checked, the mirror up to date, config and manifest recorded."""
    check_stage_resources(cfg)
    run.pull(log=log)  # an object-store run: the mirror catches up (a fresh machine resumes)
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.publish(run.root / "config.yaml")
    run.update_manifest(
        lambda m: m.update({"config": cfg.to_dict(), "versions": _versions(), "keys": keys, "updated": time.time()})
    )


def run_pipeline(cfg: Config, log=print, progress: Progress | None = None) -> RunDir:
    """Run (or resume) every stage; returns the run directory. Needs a connected Ray.
    progress: where stages report their counters (default: lines into `log`; Progress.off())."""
    run = RunDir.at(cfg.run.run_dir, cfg.run.local_dir)
    keys = stage_keys(cfg)
    ctx = StageContext(cfg, run, keys, log=log, progress=Progress(log) if progress is None else progress)
    tracked = tracker(cfg, run.root)
    with run.lock():
        _start(cfg, run, keys, log)
        pull_tracking(run)
        t0 = time.time()
        for name, stage in STAGES:
            if name not in keys:
                continue  # the router and baselines stages run only when the config asks for them
            _, ran = run.run_stage(name, keys[name], lambda out, stage=stage: stage.run(ctx.at(out)), log)
            if name == "experts" and (
                ran or not run.bundle.exists() or json.loads(run.bundle.read_text()).get("keys") != keys
            ):
                write_bundle(cfg, run, keys)
            log_stage(tracked, cfg, name, run.root, keys[name])  # once per stage key; never fails the run
            publish_tracking(run)
        log(f"pipeline finished in {time.time() - t0:.0f} s; run directory {run.root}")
    return run
