"""What every stage shares: its context, the config slices its key hashes, and the ONE builder of
an adapter training job (base adapter, experts and trained baselines)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from elrea_ray.artifacts import RunDir
from elrea_ray.config import DISTILL_FIELDS, Config, TrainConfig
from elrea_ray.progress import Progress

SPLITS = ("train", "validation", "test")

# Settings that decide where and how fast a stage runs but not what it computes; they stay out of
# the stage keys, so giving a stage more CPUs or actors does not invalidate finished work.
EXECUTION_ONLY = {
    "cpus_per_worker",
    "cpus_per_actor",
    "num_actors",
    "max_concurrent",
    "logging_steps",
    "checkpoint_every_steps",
    "max_failures",
    "gpus_per_worker",
    "seeds",
}  # eval.seeds repeats whole runs; each seed's run has its own keys


@dataclass(frozen=True)
class StageContext:
    """What a stage's `run` gets: the config, the run directory it reads, every stage's key,
    `out`, the folder it writes (the stage's `.partial`, renamed into place when it returns), and
    `progress`, where it reports its counters (off unless the driver passes one)."""

    cfg: Config
    run: RunDir
    keys: dict[str, str]
    out: Path | None = None
    log: Callable[[str], None] = print
    progress: Progress = field(default_factory=Progress.off)

    def at(self, out: Path) -> "StageContext":
        return dataclasses.replace(self, out=out)


def plain(x: Any) -> dict:
    """A config dataclass as JSON-plain dicts and lists (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(x)))


def config_slice(x: Any) -> dict:
    """The part of a config section that decides what a stage computes (see EXECUTION_ONLY)."""
    return {k: v for k, v in plain(x).items() if k not in EXECUTION_ONLY}


def routing_slice(cfg: Config) -> dict:
    """The routing settings that decide the gradient routing weights (the eval methods' and a sweep
    trial's). The distilled router's fields are left out: they reach a stage's key through the
    router stage's key, so runs without the router keep their keys."""
    return {k: v for k, v in config_slice(cfg.routing).items() if k not in DISTILL_FIELDS}


def expert_recipe(cfg: Config) -> TrainConfig:
    """Experts reuse the base recipe (batch, Adam, schedule) with their own lr, epochs and scaling."""
    ec = cfg.experts
    return dataclasses.replace(
        cfg.train,
        lr=ec.lr,
        epochs=ec.epochs,
        num_workers=ec.num_workers,
        cpus_per_worker=ec.cpus_per_worker,
        use_gpu=ec.use_gpu,
    )


def adapter_job(
    cfg: Config,
    run: RunDir,
    run_name: str,
    name: str,
    seed: int,
    tc: TrainConfig,
    members: list[str] | None,
    init: str | None,
    folder: Path,
    save_epochs: bool = False,
    gpus_per_worker: float = 1.0,
    max_steps: int | None = None,
) -> dict:
    """The `fit_adapter` keyword arguments of one adapter (base, expert or baseline): loop config,
    recipe `tc` (its num_workers / cpus_per_worker / use_gpu are the scaling), resource check.
    members: the training rows' example ids (None: all); max_steps: exactly that many optimiser
    steps in place of tc.epochs (the epochs repeat, the last one cut)."""
    loop = {
        "name": name,
        "seed": seed,
        "model": plain(cfg.model),
        "train": plain(tc),
        "data_file": run.ref(run.data_file("train")),
        "example_ids": members,
        "init_adapter": init,
        "out_dir": run.ref(folder),
        "save_epochs": save_epochs,
        "max_steps": max_steps,
    }
    return {
        "run_name": run_name,
        "loop_cfg": loop,
        "tc": tc,
        "storage": run.ref(run.ray_storage),
        "num_workers": tc.num_workers,
        "cpus_per_worker": tc.cpus_per_worker,
        "use_gpu": tc.use_gpu,
        "gpus_per_worker": gpus_per_worker,
        "check": cfg.ray.check_resources,
        "wait_s": cfg.ray.resource_wait_s,
    }
