"""Projector fidelity on real gradient features: each projector against the dense Rademacher JL
(the paper's R, eq. 5.6) and against the exact, unprojected preconditioned gradients.

Each example's sum_e w_e gamma_e (eq. 5.5-5.7 before R) is computed ONCE from a finished run's
epoch checkpoints (epoch weights = mean LR, as the pipeline), then every projector is applied to
the same [N, D] matrix. The dense projection is done over all N rows at once, tile by tile, so
its sign generation is paid once. Per projector: Pearson and Spearman correlation of the
N(N-1)/2 pairwise cosines, and the ARI between the clusters (elrea_ray.clustering, the run's
clustering settings) of its features and those of the dense / exact features.

    python benchmarks/projector_fidelity.py --run runs/default --per-source 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import adjusted_rand_score

from elrea_ray.checkpoints import load_adam_state
from elrea_ray.config import ModelConfig
from elrea_ray.gradients import FeatureExtractor
from elrea_ray.model import load_tokenizer
from elrea_ray.projection import ProjectorSpec, RademacherProjector, make_projector
from elrea_ray.stages.clusters import fit


def encode(tok, messages: list[dict], max_length: int) -> list[int]:
    return list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )[:max_length]


def dense_all_rows(x: torch.Tensor, spec: ProjectorSpec) -> torch.Tensor:
    """x @ R / sqrt(d_proj) for all rows at once: the same R as RademacherProjector (its tiles),
    multiplied by GEMM instead of one GEMV per row (row-wise batch independence is not needed
    here, and GEMM amortises each generated tile over all N rows)."""
    p = RademacherProjector(spec)
    out = torch.zeros(x.shape[0], spec.d_proj)
    rows = 8192
    for r0 in range(0, spec.d_in, rows):
        r1 = min(r0 + rows, spec.d_in)
        out += x[:, r0:r1] @ p.signs(r0, r1, 0, spec.d_proj, torch.device("cpu"))
    return out / spec.d_proj**0.5


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair_cosines(x: np.ndarray) -> np.ndarray:
    u = unit(x.astype(np.float64))
    iu = np.triu_indices(len(u), 1)
    return (u @ u.T)[iu]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run",
        default=str(Path(__file__).resolve().parents[1] / "runs/default"),
        help="a finished pipeline run folder",
    )
    ap.add_argument("--per-source", type=int, default=40, help="training examples per source")
    ap.add_argument("--d-proj", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="projector seeds per sketch (spread)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    mc = ModelConfig(**cfg["model"])
    cc = cfg["clustering"]
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "data/train.parquet", columns=["source", "prompt"]).to_pylist()
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    picked = [r for src in sorted(by_source) for r in by_source[src][: args.per_source]]
    sources = np.array([r["source"] for r in picked])
    tok = load_tokenizer(mc)
    ids = [encode(tok, json.loads(r["prompt"]), mc.max_length) for r in picked]
    epochs = sorted((run / "adapters/base").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = [load_adam_state(e).mean_lr for e in epochs]
    print(
        f"{len(ids)} training examples of {run} ({len(by_source)} sources), epochs "
        f"{[e.name for e in epochs]} weights {[round(w, 6) for w in weights]}, d_proj {args.d_proj}"
    )

    t0 = time.perf_counter()
    fx = FeatureExtractor(mc, [str(e) for e in epochs], weights, "countsketch", args.d_proj, batch_size=args.batch_size)
    G = fx.preconditioned_gradients(ids)  # [N, D] float32: 2 GB for N = 200 on SmolLM2
    print(f"preconditioned gradients [{G.shape[0]}, {G.shape[1]:,}] in {time.perf_counter() - t0:.0f} s")
    del fx

    def cluster(x: np.ndarray) -> np.ndarray:
        """The run's clustering settings (the clusters stage's own fit), on unit-norm features."""
        return fit(unit(x).astype(np.float32), cc, seed=0).labels

    # Exact features as coordinates in the span of the N gradients: C C^T = the exact Gram matrix,
    # so every cosine and distance (all that the clustering sees) is exact, in N dimensions
    # instead of D (BIRCH on [200, 2.4M] needed > 20 GB).
    gram = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64)
    for lo in range(0, G.shape[1], 1 << 18):
        block = G[:, lo : lo + (1 << 18)].double()
        gram += block @ block.T
    evals, evecs = torch.linalg.eigh(gram)
    coords = (evecs * evals.clamp_min(0).sqrt()).numpy()
    feats: dict[str, np.ndarray] = {"exact (no projection)": coords}
    seconds: dict[str, float] = {}
    spec = ProjectorSpec("rademacher", G.shape[1], args.d_proj, seed=0)
    t0 = time.perf_counter()
    feats["rademacher (dense)"] = dense_all_rows(G, spec).numpy()
    seconds["rademacher (dense)"] = time.perf_counter() - t0
    for kind in ("countsketch", "sparse_jl"):
        for seed in range(args.seeds):
            name = f"{kind} seed {seed}"
            t0 = time.perf_counter()
            feats[name] = make_projector(ProjectorSpec(kind, G.shape[1], args.d_proj, seed=seed)).project(G).numpy()
            seconds[name] = time.perf_counter() - t0
    dense_seed1 = "rademacher (dense) seed 1"
    if args.seeds > 1:
        t0 = time.perf_counter()
        feats[dense_seed1] = dense_all_rows(G, ProjectorSpec("rademacher", G.shape[1], args.d_proj, seed=1)).numpy()
        seconds[dense_seed1] = time.perf_counter() - t0
    del G

    cos = {k: pair_cosines(v) for k, v in feats.items()}
    labels = {k: cluster(v) for k, v in feats.items()}
    ref_d, ref_x = "rademacher (dense)", "exact (no projection)"
    print(
        f"pairwise cosines of exact features: mean {cos[ref_x].mean():.3f}, sd {cos[ref_x].std():.3f}, "
        f"range [{cos[ref_x].min():.3f}, {cos[ref_x].max():.3f}]"
    )
    head = (
        f"| projector | Pearson vs dense | Spearman vs dense | ARI vs dense | Pearson vs exact | "
        f"Spearman vs exact | ARI vs exact | max abs cos err vs exact | clusters | ARI vs source | "
        f"project s ({len(ids)} rows) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for k in feats:
        print(
            f"| {k} | {pearsonr(cos[k], cos[ref_d])[0]:.4f} | {spearmanr(cos[k], cos[ref_d])[0]:.4f} | "
            f"{adjusted_rand_score(labels[ref_d], labels[k]):.3f} | {pearsonr(cos[k], cos[ref_x])[0]:.4f} | "
            f"{spearmanr(cos[k], cos[ref_x])[0]:.4f} | {adjusted_rand_score(labels[ref_x], labels[k]):.3f} | "
            f"{np.abs(cos[k] - cos[ref_x]).max():.4f} | {len(set(labels[k].tolist()))} | "
            f"{adjusted_rand_score(sources, labels[k]):.3f} | "
            f"{seconds.get(k, float('nan')):.2f} |"
        )


if __name__ == "__main__":
    main()
