"""Several seeds of the whole pipeline, pooled (`eval.seeds: [0, 1, 2]`).

Each seed is a complete run directory of its own, `<run_dir>/seed-<s>` (servable, reportable and
resumable like any run: a rerun skips the seeds and stages already done), built with
`run.seed = s`, which reseeds the data split, the LoRA inits, the projection, the clustering and
the baselines. The pooled table (`<run_dir>/pooled.json`, `pooled.md`) reads each seed's
eval/predictions.parquet: per-method accuracy over every seed's test items with a two-level
bootstrap interval, and the paired differences from M+Q_base and from base_continued.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from elrea_ray import storage
from elrea_ray.artifacts import RunDir
from elrea_ray.config import Config


def seed_config(cfg: Config, seed: int) -> Config:
    """The config of one seed's run: run.seed = seed, its own run directory (and mirror), no seeds."""
    rc = cfg.run
    run_dir = (
        storage.join(rc.run_dir, f"seed-{seed}")
        if storage.is_remote(rc.run_dir)
        else str(Path(rc.run_dir) / f"seed-{seed}")
    )
    local_dir = str(Path(rc.local_dir) / f"seed-{seed}") if rc.local_dir else None
    return cfg.replace(
        run=dataclasses.replace(rc, seed=seed, run_dir=run_dir, local_dir=local_dir),
        eval=dataclasses.replace(cfg.eval, seeds=()),
    )


def run_seeds(cfg: Config, log=print) -> Path:
    """Run (or resume) the pipeline once per seed of eval.seeds, then pool; returns pooled.md."""
    from elrea_ray.pipeline import run_pipeline

    runs = {}
    for i, seed in enumerate(cfg.eval.seeds):
        log(f"seed {seed} ({i + 1} of {len(cfg.eval.seeds)})")
        runs[seed] = run_pipeline(seed_config(cfg, seed), log=log)
    return write_pooled(cfg, runs)


def write_pooled(cfg: Config, runs: dict[int, RunDir]) -> Path:
    """pooled.json and pooled.md beside the seeds' run directories, from their predictions."""
    import pyarrow.parquet as pq

    from elrea_ray.evaluate import pooled_by_source, pooled_by_source_markdown, pooled_markdown, pooled_table

    scores, sources = {}, {}
    for seed, run in runs.items():
        t = pq.read_table(run.eval_file("predictions.parquet")).to_pydict()
        scores[seed] = {m: t[f"score_{m}"] for m in cfg.eval.methods if f"score_{m}" in t}
        sources[seed] = t["source"]
    table = pooled_table(scores, resamples=cfg.eval.bootstrap, seed=cfg.run.seed)
    by_source = pooled_by_source(scores, sources)
    parent = RunDir.at(cfg.run.run_dir, cfg.run.local_dir)
    parent.root.mkdir(parents=True, exist_ok=True)
    md = (
        f"# ELREA over {len(runs)} seeds ({', '.join(map(str, runs))})\n\n"
        + pooled_markdown(table)
        + "\n## Per source\n\n"
        + pooled_by_source_markdown(by_source)
        + "\nEach seed's own report: "
        + ", ".join(f"`seed-{s}/eval/report.md`" for s in runs)
        + ".\n"
    )
    for name, text in (
        ("pooled.json", json.dumps({"seeds": list(runs), "methods": table, "by_source": by_source}, indent=2)),
        ("pooled.md", md),
    ):
        (parent.root / name).write_text(text)
        parent.publish(parent.root / name)
    return parent.root / "pooled.md"
