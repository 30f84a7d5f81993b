"""Stage 3: balanced BIRCH (or k-means) fitted on a sample in one Ray task, every row assigned in
streamed batches, without holding the feature table.

Two passes over the gradient shards, a batch at a time: the first gathers the fit sample (at most
`fit_sample` rows, drawn by position in data-file order), the second assigns every row to its
nearest centroid and sums the members of each cluster for the final centroids (ELREA eq. 5.8). The
driver holds the sample, one batch, the [C, d] sums and O(n) ids and labels, so its memory does not
grow with the feature table (200k x 8192 float32 is 6.5 GB). `cluster_streamed` uses no Ray: the
caller decides where the fit runs (`run` sends it to a Ray task).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from elrea_ray.artifacts import ArtifactError
from elrea_ray.clustering import ClusteringResult, assign
from elrea_ray.stages.common import StageContext, plain

# Rows per streamed batch: 1,024 x 8192 float32 = 32 MB, about half a shard at that width.
BATCH_ROWS = 1024


@dataclass(frozen=True)
class StreamedClusters:
    """Everything the stage writes; ids, sources and labels in data-file order."""

    ids: list[str]
    sources: list[str]
    labels: np.ndarray  # [N] int64, clusters 0..C-1, none empty
    centroids: np.ndarray  # [C, d] float32, unit rows, means over ALL members
    fit: ClusteringResult
    fit_sample: int


def feature_batches(folder: Path, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[list, list, np.ndarray]]:
    """(ids, sources, features [b, d] float32) per batch of at most batch_rows rows, shard by shard."""
    import pyarrow.dataset as pads

    if not Path(folder).exists():
        raise ArtifactError(f"missing gradient features {folder}")
    ds = pads.dataset(str(folder), format="parquet")
    # One shard and a couple of batches in flight: the scanner's default read-ahead holds several shards.
    for batch in ds.to_batches(
        columns=["example_id", "source", "feature"], batch_size=batch_rows, batch_readahead=2, fragment_readahead=1
    ):
        if batch.num_rows == 0:
            continue
        col = batch.column("feature")
        d = col.type.list_size
        X = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
        yield batch.column("example_id").to_pylist(), batch.column("source").to_pylist(), X


def _positions(folder: Path, ids: list[str], at: dict[str, int], seen: np.ndarray) -> np.ndarray:
    pos = np.empty(len(ids), dtype=np.int64)
    for i, e in enumerate(ids):
        p = at.get(e)
        if p is None:
            raise ArtifactError(
                f"gradient features {folder} do not match the data: example id {e!r} is not in the data file"
            )
        if seen[p]:
            raise ArtifactError(f"gradient features {folder} do not match the data: example id {e!r} appears twice")
        seen[p] = True
        pos[i] = p
    return pos


def cluster_streamed(
    folder: Path,
    data_ids: list[str],
    fit_sample: int,
    seed: int,
    fit: Callable[[np.ndarray], ClusteringResult],
    batch_rows: int = BATCH_ROWS,
    pca_dim: int = 0,
) -> StreamedClusters:
    """Fit `fit` on a sample of at most fit_sample rows, then assign all rows in streamed batches.

    The sample is the one the in-memory stage draws (positions in data-file order, seeded), so when
    it covers every row the result equals fitting on the whole table. pca_dim > 0 (the paper's
    PCA ablation): the fit and the assignment see the features reduced to that many principal
    components of the sample; the final centroids are still the members' means in the full space,
    which routing compares prompts with.
    """
    n = len(data_ids)
    at = {e: i for i, e in enumerate(data_ids)}
    if len(at) != n:
        raise ArtifactError(f"the train data file has duplicated example ids ({n - len(at)})")
    rng = np.random.default_rng(seed)
    # Paper: fit on 5,000 randomly sampled training points, then assign every point.
    sample = np.sort(rng.choice(n, size=min(fit_sample, n), replace=False))
    in_sample = np.full(n, -1, dtype=np.int64)
    in_sample[sample] = np.arange(len(sample))

    Xs = None
    seen = np.zeros(n, dtype=bool)
    for ids, _, X in feature_batches(folder, batch_rows):
        if Xs is None:
            Xs = np.zeros((len(sample), X.shape[1]), dtype=np.float32)
        slot = in_sample[_positions(folder, ids, at, seen)]
        keep = slot >= 0
        Xs[slot[keep]] = X[keep]
    if Xs is None or not seen.all():
        missing = data_ids[int(np.argmin(seen))] if n else None
        raise ArtifactError(
            f"gradient features {folder} do not match the data: "
            f"{int(seen.sum())} rows for {n} examples" + (f"; missing e.g. {missing}" if missing is not None else "")
        )
    reducer = None
    if pca_dim:
        from elrea_ray.clustering import PcaReducer

        reducer = PcaReducer.fit(Xs, pca_dim, seed)
        Xs = reducer.transform(Xs)
    result = fit(Xs)
    del Xs

    C0 = len(result.centroids)
    raw = np.empty(n, dtype=np.int64)
    sources: list = [None] * n
    sums = None
    for ids, src, X in feature_batches(folder, batch_rows):
        pos = np.fromiter((at[e] for e in ids), dtype=np.int64, count=len(ids))
        lab = assign(X if reducer is None else reducer.transform(X), result.centroids)
        if sums is None:
            sums = np.zeros((C0, X.shape[1]), dtype=np.float64)
        raw[pos] = lab
        for p, s in zip(pos.tolist(), src):
            sources[p] = s
        for c in np.unique(lab).tolist():
            sums[c] += X[lab == c].sum(axis=0, dtype=np.float64)
    # Re-number so clusters are 0..C-1 with no empty ones; centroids over all members (eq. 5.8).
    used = np.unique(raw)
    remap = np.full(C0, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    sums = sums[used]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return StreamedClusters(
        ids=list(data_ids),
        sources=sources,
        labels=remap[raw],
        centroids=centroids,
        fit=result,
        fit_sample=int(len(sample)),
    )


def fit(X: np.ndarray, cc: dict, seed: int) -> ClusteringResult:
    """The configured clustering (`cc`: the clustering section as a dict) fitted on X [n, d]."""
    from elrea_ray.clustering import fit_clusters

    if cc["method"] == "kmeans":
        return fit_clusters(X, "kmeans", num_clusters=cc["initial_clusters"], seed=seed)
    return fit_clusters(
        X,
        "balanced_birch",
        initial_clusters=cc["initial_clusters"],
        max_ratio=cc["max_ratio"],
        max_iterations=cc["max_iterations"],
        min_cluster_size=cc["min_cluster_size"],
        threshold=cc["threshold"],
        seed=seed,
        part_cap=cc["part_cap"],
    )


def run(ctx: StageContext) -> dict:
    """Writes clusters/centroids.safetensors [C, d_proj], assignments.parquet (example_id, source,
    cluster) and report.json (sizes, rounds, threshold, NMI/ARI/purity against the sources)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from safetensors.numpy import save_file

    from elrea_ray.clustering import cluster_source_report

    cfg, run_dir, out = ctx.cfg, ctx.run, ctx.out
    # In data-file order: the fit sample is drawn by position, whatever order the shards have. The
    # features stream shard by shard (the driver never holds the table); only the sample is fitted.
    data_ids = pq.read_table(run_dir.data_file("train"), columns=["example_id"]).column("example_id").to_pylist()
    cc = cfg.clustering
    fit_task = ray.remote(num_cpus=1)(fit)
    res = cluster_streamed(
        run_dir.gradient_dir("train"),
        data_ids,
        cc.fit_sample,
        cfg.run.seed,
        fit=lambda Xs: ray.get(fit_task.remote(Xs, plain(cc), cfg.run.seed)),
    )
    labels, C = res.labels, len(res.centroids)
    save_file({"centroids": res.centroids}, str(out / "centroids.safetensors"))
    pq.write_table(
        pa.table({"example_id": res.ids, "source": res.sources, "cluster": labels}), out / "assignments.parquet"
    )
    report = {
        "num_clusters": C,
        "sizes": np.bincount(labels, minlength=C).tolist(),
        "rounds": res.fit.rounds,
        "threshold": res.fit.threshold,
        "fit_sample": res.fit_sample,
        "method": cc.method,
    }
    report.update(cluster_source_report(labels, res.sources))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return {k: report[k] for k in ("num_clusters", "sizes", "nmi", "ari", "purity") if k in report}
