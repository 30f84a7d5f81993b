"""Stage 4: one expert adapter per cluster (ELREA §4.3), warm-started from the final base adapter,
trained concurrently (`experts.max_concurrent` Ray Train runs at a time)."""

from __future__ import annotations

from elrea_ray.stages.common import StageContext, adapter_job, expert_recipe


def jobs(ctx: StageContext, assignments: list[dict]) -> list[dict]:
    """The training jobs of the experts not yet finished (a rerun after an interruption skips
    those whose adapter is complete). assignments: rows of clusters/assignments.parquet."""
    cfg, run = ctx.cfg, ctx.run
    C = max(r["cluster"] for r in assignments) + 1
    tc = expert_recipe(cfg)
    init = run.ref(run.base_epoch(cfg.train.epochs))
    out = []
    for c in range(C):
        folder = ctx.out / f"expert-{c:02d}"
        if (folder / "adapter_config.json").exists():
            continue  # finished before an interruption
        members = [r["example_id"] for r in assignments if r["cluster"] == c]
        out.append(
            adapter_job(
                cfg,
                run,
                f"expert-{ctx.keys['experts']}-{c:02d}",
                f"expert-{c:02d}",
                cfg.run.seed + 1 + c,
                tc,
                members,
                init,
                folder,
                gpus_per_worker=cfg.experts.gpus_per_worker,
            )
        )
    return out


def run(ctx: StageContext) -> dict:
    """Writes adapters/experts/expert-XX/ (PEFT adapter) for every cluster XX."""
    import pyarrow.parquet as pq

    from elrea_ray.train import fit_many, planned_steps

    assignments = pq.read_table(ctx.run.clusters_file("assignments.parquet")).to_pylist()
    todo = jobs(ctx, assignments)
    C = max(r["cluster"] for r in assignments) + 1
    planned = {j["loop_cfg"]["name"]: planned_steps(j) for j in todo}
    with ctx.progress.training("experts", planned, "experts", runs_before=C - len(todo)) as tally:
        results = fit_many(todo, ctx.cfg.experts.max_concurrent, tally)
    ctx.run.sync_down(ctx.out)  # each expert's rank 0 wrote its adapter into the remote partial
    return {"num_experts": C, "trained_now": len(todo), "final_loss": [r.get("final_loss") for r in results]}
