"""Driver peak memory of the cluster stage against the number of examples.

Writes synthetic feature shards in the gradient stage's layout (example_id, source, feature:
fixed list of float32 [d_proj], shard_rows() rows per file, rows shuffled across shards) for each
size, runs the stage's streamed clustering in a fresh subprocess per size, and prints the child's
peak RSS (ru_maxrss) and the ratio largest/smallest. The goal is flat within 20%: the driver holds
the fit sample, one batch and O(n) ids, never the table (200k x 8192 float32 = 6.5 GB).

    python benchmarks/cluster_memory.py                       # 10k, 50k, 200k at d_proj 8192
    python benchmarks/cluster_memory.py --sizes 2000 10000 --d-proj 1024 --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GROUPS = 8  # planted directions, one `source` each


def write_features(folder: Path, n: int, d: int, seed: int = 0) -> list[str]:
    """n unit features around GROUPS directions, written shard by shard; returns ids in data order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.stages.gradients import BATCHES_PER_BLOCK, shard_rows

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    mus = rng.standard_normal((GROUPS, d)).astype(np.float32)
    mus /= np.linalg.norm(mus, axis=1, keepdims=True)
    per = shard_rows(d, 64 * BATCHES_PER_BLOCK)  # the default gradient batch (16 x 4) per block
    order = rng.permutation(n)  # shards hold rows in no particular order
    for k, i in enumerate(range(0, n, per)):
        rows = order[i : i + per]
        g = rows % GROUPS
        X = mus[g] + rng.standard_normal((len(rows), d), dtype=np.float32) / np.sqrt(d)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        pq.write_table(
            pa.table(
                {
                    "example_id": [f"ex-{r:07d}" for r in rows],
                    "source": [f"src{j}" for j in g],
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), d),
                }
            ),
            folder / f"part-{k:05d}.parquet",
        )
    return [f"ex-{r:07d}" for r in range(n)]


def child(folder: str, n: int, fit_sample: int, method: str) -> None:
    """Runs in a fresh process: the stage's clustering on the shards, then prints peak RSS."""
    from elrea_ray.clustering import cluster_source_report, fit_clusters
    from elrea_ray.stages.clusters import cluster_streamed

    ids = [f"ex-{r:07d}" for r in range(n)]
    kw = {"num_clusters": GROUPS} if method == "kmeans" else {"initial_clusters": 5}
    t = time.perf_counter()
    res = cluster_streamed(Path(folder), ids, fit_sample, 0, fit=lambda Xs: fit_clusters(Xs, method, seed=0, **kw))
    secs = time.perf_counter() - t
    rep = cluster_source_report(res.labels, res.sources)
    print(
        json.dumps(
            {
                "n": n,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds": round(secs, 1),
                "num_clusters": len(res.centroids),
                "nmi": round(rep["nmi"], 3),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--d-proj", type=int, default=8192)
    ap.add_argument("--fit-sample", type=int, default=5000)
    ap.add_argument("--method", default="balanced_birch", choices=["balanced_birch", "kmeans"])
    ap.add_argument("--workdir", default=None, help="where the shards go (default: a fresh temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.fit_sample, a.method)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cluster-memory-"))
    rows = []
    try:
        for n in a.sizes:
            folder = work / f"n{n}"
            t = time.perf_counter()
            write_features(folder, n, a.d_proj)
            gb = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
            print(f"n={n}: wrote {gb:.2f} GB of shards in {time.perf_counter() - t:.0f} s", flush=True)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(folder),
                    str(n),
                    "--fit-sample",
                    str(a.fit_sample),
                    "--method",
                    a.method,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            shutil.rmtree(folder)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'n':>8} {'peak RSS MB':>12} {'s':>7} {'C':>3} {'NMI':>6}")
    for r in rows:
        print(f"{r['n']:>8} {r['peak_rss_mb']:>12.0f} {r['seconds']:>7} {r['num_clusters']:>3} {r['nmi']:>6}")
    if len(rows) > 1:
        print(f"peak RSS ratio {rows[-1]['n']}/{rows[0]['n']}: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
