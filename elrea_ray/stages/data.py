"""Stage 0: the train / validation / test splits as Parquet, and what was read (counts.json)."""

from __future__ import annotations

import json

from elrea_ray.stages.common import SPLITS, StageContext

# The canonical row's columns (elrea_ray/data.py), for an empty split's schema.
COLUMNS = ("example_id", "source", "prompt", "response", "answer", "meta")


def run(ctx: StageContext) -> dict:
    """Writes data/{train,validation,test}.parquet and counts.json; returns the counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.data import build_splits_with_report

    cfg, out = ctx.cfg, ctx.out
    splits, report = build_splits_with_report(cfg.data, cfg.run.seed)
    for split in SPLITS:
        rows = splits.get(split, [])
        if rows:
            table = pa.Table.from_pylist(rows)
        else:
            table = pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
        pq.write_table(table, out / f"{split}.parquet")
    (out / "counts.json").write_text(json.dumps(report, indent=2))
    return report
