"""Stage 2: per-example gradient features of every split (Ray Data over an actor pool).

Each row gets `feature: list<float32>[d_proj]`, the unit-norm projected Adam-preconditioned
gradient of its instruction averaged over the base adapter's epoch checkpoints (ELREA eq. 5.5-5.7).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from elrea_ray.artifacts import ArtifactError, RunDir
from elrea_ray.config import Config
from elrea_ray.stages.common import SPLITS, StageContext, plain

# Rows per Ray Data block (= one actor task) in map batches: progress is visible per block and a lost
# actor redoes little.
BATCHES_PER_BLOCK = 2
SHARD_BYTES = 64 << 20
# Trimming after every batch cost 20% of the stage's speed at 50k examples (pages handed back are
# faulted in again); every 8th batch cost nothing measurable.
TRIM_EVERY = 8
_LIBC = None


def epoch_weights(cfg: Config, run: RunDir) -> list[float]:
    """DESIGN decision: weight epoch e by its mean learning rate (as LESS), since under linear
    decay the end-of-epoch rate of the last epoch is 0; 'equal' or an explicit list also work."""
    from elrea_ray.checkpoints import load_adam_state

    g = cfg.gradients
    if isinstance(g.epoch_weights, str):
        if g.epoch_weights == "equal":
            return [1.0] * cfg.train.epochs
        return [load_adam_state(run.base_epoch(e)).mean_lr for e in range(1, cfg.train.epochs + 1)]
    if len(g.epoch_weights) != cfg.train.epochs:
        raise ValueError(
            f"gradients.epoch_weights has {len(g.epoch_weights)} values but train.epochs is {cfg.train.epochs}"
        )
    return list(g.epoch_weights)


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A long-lived actor that allocates activations of varying size per batch, from several
    threads (Ray Data's actor threads, torch's intra-op pool), can leave glibc holding freed
    memory in fragmented arenas. When each split was a single Ray Data block, trimming every
    `TRIM_EVERY` batches held the actor's heap at 598 MB at 50k examples instead of 1.6 GB
    (`benchmarks/gradient_scale.py`). Since the split streams in blocks, the heap is flat at
    ~408 MB with or without the trim (one run each); the trim is kept as cheap insurance.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def shard_rows(d_proj: int, block_rows: int) -> int:
    """Rows per feature shard: whole blocks, about SHARD_BYTES of float32 features (2,048 rows at
    d_proj 8192), so a large split is neither one huge file nor thousands of tiny ones."""
    return max(1, SHARD_BYTES // (4 * d_proj) // block_rows) * block_rows


class FeatureMapper:
    """Ray Data callable: one model copy per actor; prompt rows in, unit-norm features out."""

    def __init__(
        self,
        model_cfg: dict,
        checkpoints: list[str],
        weights: list[float],
        kind: str,
        d_proj: int,
        seed: int,
        batch_size: int,
        use_gpu: bool,
        threads: int | None = None,
        tally=None,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)  # features are bitwise reproducible per thread count

        from elrea_ray.config import ModelConfig
        from elrea_ray.gradients import FeatureExtractor
        from elrea_ray.model import load_tokenizer
        from elrea_ray.storage import localize

        self.mc = ModelConfig(**model_cfg)
        self.tok = load_tokenizer(self.mc)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        checkpoints = [str(localize(c)) for c in checkpoints]
        self.fx = FeatureExtractor(
            self.mc, checkpoints, weights, kind, d_proj, seed, device=device, batch_size=batch_size
        )
        self.calls = 0
        self.tally = tally  # the driver's progress counter (elrea_ray.progress.Progress.counting)

    def __call__(self, batch):
        import pyarrow as pa

        from elrea_ray.data import instruction_ids
        from elrea_ray.progress import tell

        ids = [instruction_ids(self.tok, p, self.mc.max_length) for p in batch.column("prompt").to_pylist()]
        feats = self.fx.features(ids).astype(np.float32)
        d = feats.shape[1]
        self.calls += 1
        if self.calls % TRIM_EVERY == 0:
            release_freed_memory()
        tell(self.tally, "add", "done", len(ids), wait=True)  # a round trip per batch: nothing next to a backward
        return pa.table(
            {
                "example_id": batch.column("example_id"),
                "source": batch.column("source"),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d),
            }
        )


def _reproducibility(cfg: Config) -> dict:
    """Bitwise-identical features need the same batching and intra-op thread count (float sums
    are reduced in a different order otherwise); the manifest records both."""
    g = cfg.gradients
    map_batch = g.batch_size * 4
    return {
        "batch_size": g.batch_size,
        "map_batch_size": map_batch,
        "block_rows": map_batch * BATCHES_PER_BLOCK,
        "torch_threads": max(1, int(g.cpus_per_actor)),
        "use_gpu": g.use_gpu,
    }


def _feature_dataset(ctx: StageContext, split: str, weights: list[float], rep: dict, tally=None):
    """The Ray Data pipeline of one split: read, re-block, map through the FeatureMapper pool."""
    import ray

    from elrea_ray import storage

    cfg, run, g = ctx.cfg, ctx.run, ctx.cfg.gradients
    src, src_fs = storage.for_ray_data(run.ref(run.data_file(split)))
    ds = ray.data.read_parquet(src, filesystem=src_fs).select_columns(["example_id", "source", "prompt"])
    # Ray 2.60 reads a Parquet file as ONE block (override_num_blocks is not applied to it), so
    # the whole split used to be one actor task: a second actor got no work, a lost actor
    # redid everything, and Ray Data held every output batch in the actor's heap until the
    # split ended (measured: every batch of 32 rows kept its 64 KB of features). Blocks of
    # `block_rows` rows, sliced as they stream, make each block its own task. Shards are in no
    # particular row order (even preserve_order=True let batches swap, measured); readers that
    # need one ask read_features for it.
    ds = ds.repartition(target_num_rows_per_block=rep["block_rows"], strict=True)
    ckpts = [run.ref(run.base_epoch(e)) for e in range(1, cfg.train.epochs + 1)]
    return ds.map_batches(
        FeatureMapper,
        batch_format="pyarrow",
        batch_size=rep["map_batch_size"],
        fn_constructor_kwargs={
            "model_cfg": plain(cfg.model),
            "checkpoints": ckpts,
            "weights": weights,
            "kind": g.projector,
            "d_proj": g.d_proj,
            "seed": g.projector_seed,
            "batch_size": g.batch_size,
            "use_gpu": g.use_gpu,
            "threads": rep["torch_threads"],
            "tally": tally,
        },
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        num_cpus=g.cpus_per_actor,
        num_gpus=1 if g.use_gpu else 0,
    )


def _write_split(ctx: StageContext, feats, split: str, block_rows: int) -> None:
    """Into a fresh folder renamed when complete: Ray's write_parquet appends, so shards left by a
    killed run in the same folder would otherwise be counted twice."""
    from elrea_ray import storage

    run = ctx.run
    tmp = ctx.out / f"{split}.writing"
    if tmp.exists():
        shutil.rmtree(tmp)
    per_file = shard_rows(ctx.cfg.gradients.d_proj, block_rows)
    if run.remote is None:
        feats.write_parquet(str(tmp), min_rows_per_file=per_file)
    else:  # the actors' shards go to the object store; the driver pulls them into its partial
        storage.delete_dir(run.ref(tmp))
        dst, dst_fs = storage.for_ray_data(run.ref(tmp))
        feats.write_parquet(dst, filesystem=dst_fs, min_rows_per_file=per_file)
        storage.pull_dir(run.ref(tmp), tmp)
        storage.delete_dir(run.ref(tmp))  # no rename on S3: the pushed stage holds `dest`
    os.rename(tmp, ctx.out / split)


def run(ctx: StageContext) -> dict:
    """Writes gradients/{train,validation,test}/*.parquet (example_id, source, feature [d_proj])."""
    import pyarrow.parquet as pq

    weights = epoch_weights(ctx.cfg, ctx.run)
    rep = _reproducibility(ctx.cfg)
    info = {
        "epoch_weights": weights,
        "rows": {s: pq.read_metadata(ctx.run.data_file(s)).num_rows for s in SPLITS},
        "reproducibility": rep,
    }
    # Splits with no rows, or written in full before an interruption, have nothing to do.
    todo = [s for s in SPLITS if info["rows"][s] and not (ctx.out / s).exists()]
    total = sum(info["rows"].values())
    with ctx.progress.counting(
        "gradients", "examples featurised", total, start=total - sum(info["rows"][s] for s in todo)
    ) as tally:
        for split in todo:
            _write_split(ctx, _feature_dataset(ctx, split, weights, rep, tally), split, rep["block_rows"])
    return info


def read_features(folder: Path, order: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(example ids, sources, features [N, d_proj]) of a split's shards, in shard order, or in
    `order` (example ids, e.g. the data file's) when given: every id of it must be there once."""
    import pyarrow.parquet as pq

    if not folder.exists():
        raise ArtifactError(f"missing gradient features {folder}")
    t = pq.read_table(folder)
    col = t.column("feature").combine_chunks()
    d = col.type.list_size
    X = col.flatten().to_numpy().reshape(-1, d).astype(np.float32)
    ids, sources = t.column("example_id").to_pylist(), t.column("source").to_pylist()
    if order is None:
        return ids, sources, X
    at = {e: i for i, e in enumerate(ids)}
    missing = [e for e in order if e not in at]
    if missing or len(at) != len(ids) or len(ids) != len(order):
        raise ArtifactError(
            f"gradient features {folder} do not match the data: {len(ids)} rows "
            f"({len(ids) - len(at)} duplicated ids) for {len(order)} examples"
            + (f"; missing e.g. {missing[0]}" if missing else "")
        )
    rows = [at[e] for e in order]
    return list(order), [sources[i] for i in rows], X[rows]
