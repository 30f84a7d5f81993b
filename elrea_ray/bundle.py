"""bundle.json: everything serving needs from a run (written after the experts stage), and its
loader. Paths inside are relative to the run directory; the format carries a version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from elrea_ray.artifacts import RunDir, write_json_atomic
from elrea_ray.config import Config

BUNDLE_FORMAT_VERSION = 1


class BundleError(RuntimeError):
    """The bundle cannot be served (missing files, wrong version, layout mismatch)."""


def write_bundle(cfg: Config, run: RunDir, keys: dict) -> dict:
    """bundle.json: base model, adapters, epoch checkpoints and weights for test gradients,
    projector spec and parameter layout, centroids, routing settings, the distilled router when it
    was trained, and the stage keys."""
    from elrea_ray.projection import ProjectorSpec
    from elrea_ray.stages.common import plain
    from elrea_ray.stages.gradients import epoch_weights

    report = json.loads(run.clusters_file("report.json").read_text())
    C = report["num_clusters"]
    layout = json.loads((run.base_epoch(1) / "parameter_layout.json").read_text())
    d_in = sum(int(np.prod(s)) for _, s in layout)
    rel = lambda p: str(Path(p).relative_to(run.root))  # noqa: E731
    bundle = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": plain(cfg.model),
        "adapters": {
            "base": rel(run.base_epoch(cfg.train.epochs)),
            **{f"expert-{c:02d}": rel(run.expert(c)) for c in range(C)},
        },
        "epoch_checkpoints": [rel(run.base_epoch(e)) for e in range(1, cfg.train.epochs + 1)],
        "epoch_weights": epoch_weights(cfg, run),
        "projector": ProjectorSpec(
            kind=cfg.gradients.projector, d_in=d_in, d_proj=cfg.gradients.d_proj, seed=cfg.gradients.projector_seed
        ).to_dict(),
        "parameter_layout": layout,
        "centroids": rel(run.clusters_file("centroids.safetensors")),
        "num_clusters": C,
        "routing": plain(cfg.routing),  # routing.method says which router serving uses
        "keys": keys,
    }
    if "router" in keys and run.completed_key("router") == keys["router"]:  # the distilled router, when trained
        bundle["router"] = rel(run.stage_dir("router"))
    write_json_atomic(run.bundle, bundle)
    run.publish(run.bundle)
    return bundle


def load_bundle(run_dir: str | Path) -> tuple[Path, dict]:
    """(local root, bundle) of a run; an s3:// run is pulled into its local mirror first."""
    from elrea_ray import storage

    if storage.is_remote(run_dir):
        run = RunDir.at(str(run_dir))
        run.pull(stages=("base", "clusters", "router", "experts"), log=lambda msg: None)  # what serving reads
        root = run.root
    else:
        root = Path(run_dir).expanduser().resolve()
    path = root / "bundle.json"
    if not path.exists():
        raise BundleError(f"no bundle.json in {root}: run jobs/full_pipeline.py until the experts stage")
    bundle = json.loads(path.read_text())
    if bundle.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {bundle.get('format_version')} is not "
            f"{BUNDLE_FORMAT_VERSION}, the one this version serves"
        )
    router = [bundle["router"]] if "router" in bundle else []
    for p in [*bundle["adapters"].values(), *bundle["epoch_checkpoints"], bundle["centroids"], *router]:
        if not (root / p).exists():
            raise BundleError(f"{path} lists {p}, which does not exist under {root}")
    if bundle["routing"].get("method", "gradient") == "distilled" and not router:
        raise BundleError(
            f"{path}: routing.method is distilled but the bundle has no router; rerun "
            "jobs/full_pipeline.py with routing.method=distilled so the router stage trains it"
        )
    return root, bundle
