"""Stage 1: the base adapter Q_base (Ray Train), keeping every epoch's adapter and Adam state."""

from __future__ import annotations

from elrea_ray.artifacts import ArtifactError, RunDir
from elrea_ray.config import Config
from elrea_ray.stages.common import SPLITS, StageContext, adapter_job


def check_lengths(cfg: Config, run: RunDir) -> dict:
    """Too-long rows per split (an error naming file and row unless data.bad_rows=skip)."""
    import pyarrow.parquet as pq

    from elrea_ray.data import too_long_rows
    from elrea_ray.model import load_tokenizer

    splits = {s: pq.read_table(run.data_file(s)).to_pylist() for s in SPLITS}
    return too_long_rows(load_tokenizer(cfg.model), splits, cfg.model.max_length, cfg.data.bad_rows)


def job(ctx: StageContext) -> dict:
    """The base adapter's training job: the whole train split, every epoch saved."""
    cfg = ctx.cfg
    return adapter_job(
        cfg, ctx.run, f"base-{ctx.keys['base']}", "base", cfg.run.seed, cfg.train, None, None, ctx.out, save_epochs=True
    )


def run(ctx: StageContext) -> dict:
    """Writes adapters/base/epoch-E/ (PEFT adapter + adam_state.safetensors) for E = 1..epochs."""
    import pyarrow.parquet as pq

    from elrea_ray.train import fit_adapter, planned_steps

    too_long = check_lengths(ctx.cfg, ctx.run)  # before any trainer starts
    spec = job(ctx)
    rows = pq.read_metadata(ctx.run.data_file("train")).num_rows
    with ctx.progress.training("base", {"base": planned_steps(spec, rows)}) as tally:
        result = fit_adapter(**spec, tally=tally)
    ctx.run.sync_down(ctx.out)  # rank 0 wrote the epoch checkpoints into the remote partial
    for e in range(1, ctx.cfg.train.epochs + 1):
        if not (ctx.out / f"epoch-{e}" / "adam_state.safetensors").exists():
            raise ArtifactError(f"base adapter: epoch {e} checkpoint missing in {ctx.out}")
    return {**result, "too_long": too_long}
