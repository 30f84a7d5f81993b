"""Stage 5: every eval method decoded side by side on the test split (Ray Data over an actor pool
running the routed ensemble), scored, tabulated with intervals and reported.

Writes eval/weights.parquet (each weighted method's [1 + C] weights per test item),
predictions.parquet, metrics.json, results.md and the report (elrea_ray/report.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

import numpy as np

from elrea_ray.artifacts import ArtifactError, RunDir
from elrea_ray.config import Config, EvalConfig
from elrea_ray.stages.common import StageContext

if TYPE_CHECKING:
    import pandas as pd


def _share_groups(sets: dict[str, np.ndarray]) -> list[tuple[list[int], list[str]]]:
    """Methods whose adapter sets nest (column 0, the bare backbone, is free) share one decoding
    call; others get their own, so that no row pays for the rank blocks of adapters its group
    never uses (a stacked row computes every adapter of its call; see elrea_ray.stacked).
    Returns (columns of the call: 0 and the group's adapters, the group's methods) per call."""
    groups: list[tuple[set[int], list[str]]] = []
    for m, w in sets.items():
        used = {int(a) for a in np.flatnonzero(w.any(0)) if a}
        for g in groups:
            if used <= g[0] or g[0] <= used:
                g[0].update(used)
                g[1].append(m)
                break
        else:
            groups.append((used, [m]))
    return [([0, *sorted(used)], methods) for used, methods in groups]


ALONE = "alone:"  # "alone:expert-00": that adapter decoded by itself on every test item


class EvalMapper:
    """Ray Data callable: the backbone with all C+1 adapters loaded once per actor; decodes every
    method for a batch of test prompts (ensembles as ONE batched forward with a KV cache)."""

    def __init__(
        self, model_cfg: dict, adapters: dict[str, str], methods: list[str], max_new_tokens: int, use_gpu: bool
    ):
        import torch

        from elrea_ray.config import ModelConfig
        from elrea_ray.model import load_adapters, load_tokenizer
        from elrea_ray.storage import localize

        self.mc = ModelConfig(**model_cfg)
        self.tok = load_tokenizer(self.mc)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        adapters = {n: str(localize(p)) for n, p in adapters.items()}
        self.model = load_adapters(self.mc, adapters, device)
        self.names = list(adapters)  # "base", "expert-00", ...
        self.methods = methods
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        from elrea_ray.data import instruction_ids, stop_ids
        from elrea_ray.ensemble import ensemble_generate_many
        from elrea_ray.scorers import score
        from elrea_ray.stacked import BACKBONE

        prompts = [instruction_ids(self.tok, p, self.mc.max_length) for p in batch["prompt"]]
        eos, pad = stop_ids(self.tok), self.tok.pad_token_id
        out = {"example_id": batch["example_id"], "source": batch["source"]}
        rows = [
            {"answer": a, "meta": m, "source": s} for a, m, s in zip(batch["answer"], batch["meta"], batch["source"])
        ]
        # Every method but MoE merging decodes in ONE call over [backbone, adapters...]: the
        # methods share each (prompt, adapter) prefill (ensemble_generate_many).
        names = [BACKBONE, *self.names]
        sets = {}
        for method in self.methods:
            if method == "moe_merge":
                continue
            w = np.zeros((len(prompts), len(names)))
            if method in ("backbone", "base"):
                w[:, names.index(BACKBONE if method == "backbone" else "base")] = 1.0
            elif method.startswith(ALONE):  # one adapter alone (the specialisation table)
                w[:, names.index(method[len(ALONE) :])] = 1.0
            else:
                w[:, 1:] = np.stack([np.asarray(x, dtype=np.float64) for x in batch[f"w_{method}"]])
            sets[method] = w
        gens = {}
        for cols, group in _share_groups(sets):  # methods over nested adapter sets decode together
            gens.update(
                ensemble_generate_many(
                    self.model,
                    prompts,
                    [names[a] for a in cols],
                    {m: sets[m][:, cols] for m in group},
                    self.max_new_tokens,
                    eos,
                    pad,
                )
            )
        for method in self.methods:
            if method == "moe_merge":
                gen = self._merged_generate(prompts, batch["w_moe_merge"], eos, pad)
            else:
                gen = gens[method]
            text = [self.tok.decode(g, skip_special_tokens=True) for g in gen]
            out[f"pred_{method}"] = np.array(text, dtype=object)
            out[f"score_{method}"] = np.array([score(r, t) for r, t in zip(rows, text)], dtype=np.float64)
        return out

    def _merged_generate(self, prompts, weights, eos, pad):
        """MoE Merging: per prompt, one adapter averaged with its normalised routing weights."""
        from elrea_ray.ensemble import single_generate
        from elrea_ray.merging import drop_adapter, merge_adapters, normalized_alphas

        gen = []
        for p, w in zip(prompts, weights):
            alphas = normalized_alphas(np.asarray(w, dtype=np.float64))
            name = merge_adapters(self.model, self.names, alphas.tolist(), "__merged__")
            gen.extend(single_generate(self.model, [p], name, self.max_new_tokens, eos, pad))
            drop_adapter(self.model, name)
        return gen


def routing_weights(
    cfg: Config,
    run: RunDir,
    features: np.ndarray,
    methods: tuple[str, ...] = ("elrea", "uniform", "top1"),
    distilled: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """[N, 1 + C] weight matrices (column 0 = base adapter) for every weighted method asked for:
    elrea (routing.top_k as configured), uniform, top<k> (k capped at C: top-all is ELREA),
    moe_merge (the ELREA weights, merged into one adapter per prompt) and elrea_distilled (the
    distilled router's dense weights `distilled` [N, 1 + C], with routing.top_k as configured)."""
    from safetensors.numpy import load_file

    from elrea_ray.config import top_k_of
    from elrea_ray.routing import route, sparsify, uniform_weights

    centroids = load_file(str(run.clusters_file("centroids.safetensors")))["centroids"]
    N, C = len(features), centroids.shape[0]
    rc = cfg.routing
    out = {}
    ew, bw = route(features, centroids, temperature=rc.temperature, top_k=rc.top_k, min_weight=rc.min_weight)
    out["elrea"] = np.concatenate([bw[:, None], ew], axis=1)
    for m in methods:
        k = top_k_of(m)
        if k is not None:
            ek, bk = route(features, centroids, temperature=rc.temperature, top_k=min(k, C))
            out[m] = np.concatenate([bk[:, None], ek], axis=1)
    if "uniform" in methods:
        uw, ub = uniform_weights(N, C)
        out["uniform"] = np.concatenate([ub[:, None], uw], axis=1)
    if "moe_merge" in methods:
        out["moe_merge"] = out["elrea"]
    if "elrea_distilled" in methods:
        if distilled is None or distilled.shape != (N, 1 + C):
            raise ArtifactError(
                f"eval method elrea_distilled needs the router stage's weights of the {N} items "
                f"over 1 + {C} adapters, got {None if distilled is None else distilled.shape}"
            )
        ek, bk = sparsify(distilled[:, 1:], distilled[:, 0], top_k=rc.top_k, min_weight=rc.min_weight)
        out["elrea_distilled"] = np.concatenate([bk[:, None], ek], axis=1)
    return out


def decode_split(
    ec: EvalConfig,
    model_cfg: dict,
    adapters: dict[str, str],
    rows: list[dict],
    weights: dict[str, np.ndarray],
    methods: list[str],
    done: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Decode and score `methods` on data rows over an EvalMapper actor pool (evaluation on the
    test split, sweep trials on the validation split). weights: [len(rows), n] per weighted
    method over `adapters` in order (column 0 = base). Returns the predictions DataFrame in row
    order: example_id, source, pred_<method>, score_<method>. `done(n)` hears the items decoded
    so far as the pool's output blocks stream back."""
    import pandas as pd
    import ray

    items = []
    for i, r in enumerate(rows):
        item = {k: r[k] for k in ("example_id", "source", "prompt", "answer", "meta")}
        for m, w in weights.items():
            item[f"w_{m}"] = w[i].tolist()
        items.append(item)
    preds = ray.data.from_items(items).map_batches(
        EvalMapper,
        batch_size=ec.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_cfg": model_cfg,
            "adapters": adapters,
            "methods": methods,
            "max_new_tokens": ec.max_new_tokens,
            "use_gpu": ec.use_gpu,
        },
        compute=ray.data.ActorPoolStrategy(size=ec.num_actors),
        num_cpus=ec.cpus_per_actor,
        num_gpus=1 if ec.use_gpu else 0,
    )
    parts = []
    for part in preds.iter_batches(batch_size=None, batch_format="pandas"):  # one per output block
        parts.append(part)
        if done is not None:
            done(sum(len(p) for p in parts))
    preds = pd.concat(parts, ignore_index=True) if parts else preds.to_pandas()
    return preds.set_index("example_id").loc[[r["example_id"] for r in rows]].reset_index()


def _weights(
    cfg: Config, run: RunDir, test: list[dict], adapters: dict[str, str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(weights, wide): every weighted method's weights as routed ([N, 1 + C] over base and the
    experts; a trained baseline's over its own adapters), and the same over ALL adapters loaded
    (`adapters`, extended here with the trained baselines'; 0 = not run)."""
    from elrea_ray.evaluate import read_weights
    from elrea_ray.stages import baselines
    from elrea_ray.stages.gradients import read_features

    _, _, feats = read_features(run.gradient_dir("test"), order=[r["example_id"] for r in test])
    distilled = None
    if "elrea_distilled" in cfg.eval.methods:  # the router stage's weights, in test data-file order
        distilled = read_weights(run.stage_dir("router") / "weights.parquet")[1].get("distilled")
    weights = routing_weights(cfg, run, feats, cfg.eval.methods, distilled)
    wide = dict(weights)
    if not baselines.trained_baselines(cfg):
        return weights, wide
    info = baselines.read_info(run)
    adapters.update({n: run.ref(run.stage_dir("baselines") / p) for n, p in info["adapters"].items()})
    names = list(adapters)
    routed = list(weights)
    for m, b in baselines.weights(cfg, run, test, info).items():
        weights[m] = b["w"]
        wide[m] = np.zeros((len(test), len(names)))
        wide[m][:, [names.index(n) for n in b["names"]]] = b["w"]
    for m in routed:
        wide[m] = np.concatenate([weights[m], np.zeros((len(test), len(names) - weights[m].shape[1]))], 1)
    return weights, wide


def _metrics(cfg: Config, run: RunDir, preds, weights: dict[str, np.ndarray], test: list[dict]) -> dict:
    """metrics.json: the accuracy table, own-source routing, the clusters' figures, how peaked
    the routing is and (eval.specialisation) each expert alone on each routed cluster."""
    import pyarrow.parquet as pq

    from elrea_ray.evaluate import (
        accuracy_table,
        majority_source,
        own_source_routing_rate,
        paired_bootstrap,
        routing_spread,
        specialisation_table,
    )
    from elrea_ray.stages import baselines

    ec = cfg.eval
    table = accuracy_table(
        preds["source"].tolist(),
        {m: preds[f"score_{m}"].tolist() for m in ec.methods},
        resamples=ec.bootstrap,
        seed=cfg.run.seed,
    )
    assignments = pq.read_table(run.clusters_file("assignments.parquet"))
    majority = majority_source(
        np.asarray(assignments.column("cluster").to_pylist()), assignments.column("source").to_pylist()
    )
    routing = own_source_routing_rate(weights["elrea"][:, 1:], [r["source"] for r in test], majority)
    clusters = json.loads(run.clusters_file("report.json").read_text())
    metrics = {
        "methods": table,
        "own_source_routing": routing,
        "clusters": {k: clusters.get(k) for k in ("num_clusters", "sizes", "nmi", "ari", "purity")},
        "cluster_majority_source": {str(k): v for k, v in majority.items()},
        "mean_base_weight": float(weights["elrea"][:, 0].mean()),
        "routing_spread": routing_spread(weights["elrea"]),
    }
    alone = {c[len("score_" + ALONE) :]: preds[c].to_numpy() for c in preds.columns if c.startswith("score_" + ALONE)}
    if alone:
        metrics["specialisation"] = specialisation_table(
            weights["elrea"][:, 1:].argmax(1), alone, preds["score_base"].to_numpy()
        )
    if "elrea" in ec.methods and "elrea_distilled" in ec.methods:  # the two routers, item by item
        d, lo, hi = paired_bootstrap(
            preds["score_elrea_distilled"].to_numpy(), preds["score_elrea"].to_numpy(), ec.bootstrap, cfg.run.seed
        )
        metrics["distilled_vs_elrea"] = {"diff": d, "ci": (lo, hi)}
    if baselines.trained_baselines(cfg):
        info = baselines.read_info(run)
        for key in ("embedding_clusters", "pca_clusters"):
            if info.get(key):
                metrics[key] = info[key]
    return metrics


def run(ctx: StageContext) -> dict:
    """Decodes every eval method on the test split and writes the eval folder (see above)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elrea_ray.evaluate import results_markdown, write_weights
    from elrea_ray.report import write_report

    cfg, run_dir, out = ctx.cfg, ctx.run, ctx.out
    bundle = json.loads(run_dir.bundle.read_text())
    test = pq.read_table(run_dir.data_file("test")).to_pylist()
    adapters = {n: run_dir.ref(run_dir.root / p) for n, p in bundle["adapters"].items()}
    weights, wide = _weights(cfg, run_dir, test, adapters)
    write_weights(out / "weights.parquet", test, weights)
    # the specialisation table compares each expert alone with M+Q_base: without base, no table
    wanted = cfg.eval.specialisation and "base" in cfg.eval.methods
    alone = [ALONE + n for n in bundle["adapters"] if n != "base"] if wanted else []
    counter = ctx.progress.counter("eval", "items decoded")
    preds = decode_split(
        cfg.eval,
        bundle["model"],
        adapters,
        test,
        wide,
        list(cfg.eval.methods) + alone,
        done=lambda n: counter.update(n, len(test)),
    )
    pq.write_table(pa.Table.from_pandas(preds, preserve_index=False), out / "predictions.parquet")
    metrics = _metrics(cfg, run_dir, preds, weights, test)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = results_markdown(metrics["methods"], metrics["own_source_routing"], metrics["clusters"])
    (out / "results.md").write_text("# ELREA evaluation (test split)\n\n" + md)
    write_report(run_dir, out)
    table = metrics["methods"]
    return {
        "micro": {m: table[m]["micro"]["acc"] for m in table},
        "own_source_routing": metrics["own_source_routing"]["rate"],
    }
