"""The evaluation report of a run: `eval/report.md` (figures as PNG files beside it) and
`eval/report.html` (the same, figures embedded as base64 PNG, readable offline).

Built from the run directory's artifacts alone (no model, no Ray), through the same readers the
pipeline uses, so `python jobs/report.py --run-dir DIR` rebuilds it for any finished run, and the
eval stage writes it as its last step.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

from elrea_ray.artifacts import RunDir
from elrea_ray.evaluate import majority_source, method_title, read_weights, results_markdown, specialisation_markdown

MAP_POINTS = 3000  # the 2-D feature map shows at most this many training points (seeded sample)


# -- reading artifacts ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _train_features(run: RunDir) -> tuple[list[str], list[str], np.ndarray] | None:
    """The training split's gradient features, as the pipeline reads them, or None when absent."""
    from elrea_ray.stages.gradients import read_features

    folder = run.gradient_dir("train")
    return read_features(folder) if folder.exists() and any(folder.glob("*.parquet")) else None


def _loss_logs(run: RunDir) -> dict[str, dict]:
    logs = {}
    base = _read_json(run.stage_dir("base") / "train_log.json")
    if base:
        logs["base"] = base
    for p in sorted(run.stage_dir("experts").glob("expert-*/train_log.json")):
        logs[p.parent.name] = json.loads(p.read_text())
    return logs


def _clusters(run: RunDir) -> tuple[dict[int, str], dict[str, int]]:
    """(each cluster's majority training source, each training example's cluster)."""
    import pyarrow.parquet as pq

    path = run.clusters_file("assignments.parquet")
    if not path.exists():
        return {}, {}
    a = pq.read_table(path).to_pylist()
    majority = majority_source(np.array([r["cluster"] for r in a]), [r["source"] for r in a])
    return majority, {r["example_id"]: int(r["cluster"]) for r in a}


# -- figures --------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 110})
    return plt


def _save(fig, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    _plt().close(fig)
    return path


def fig_accuracy(table: dict, folder: Path) -> Path:
    """Grouped bars: accuracy per source (and micro average) per method, with 95% Wilson intervals."""
    plt = _plt()
    methods = list(table)
    sources = list(next(iter(table.values()))["per_source"])
    groups = sources + ["micro average"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups) * max(1, len(methods)) / 3), 4.2))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        entries = [table[m]["per_source"][s] for s in sources] + [table[m]["micro"]]
        acc = np.array([100 * e["acc"] for e in entries])
        lo = np.array([100 * e["ci"][0] for e in entries])
        hi = np.array([100 * e["ci"][1] for e in entries])
        x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, acc, width, label=method_title(m), color=cmap(j % 10))
        ax.errorbar(x, acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for xi, a in zip(x, acc):  # the value, so that a 0% bar is visible too
            ax.text(
                xi,
                1,
                f"{a:.0f}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
                color="white" if a >= 8 else "black",
            )
    n = [table[methods[0]]["per_source"][s]["n"] for s in sources] + [table[methods[0]]["micro"]["n"]]
    ax.set_xticks(np.arange(len(groups)), [f"{g}\n(n={k})" for g, k in zip(groups, n)])
    ax.axvline(len(sources) - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    legend_rows = -(-len(methods) // 5)
    ax.set_title("Accuracy per source and method (whiskers: 95% Wilson interval)", pad=12 + 16 * legend_rows)
    ax.legend(ncol=min(5, len(methods)), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _save(fig, folder, "accuracy")


def fig_vs_base(table: dict, folder: Path) -> Path | None:
    """Each method's micro-average difference from M+Q_base with its paired-bootstrap 95% interval."""
    rows = [(m, table[m]["vs_base"]) for m in table if "vs_base" in table[m]]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.3))
    y = np.arange(len(rows))[::-1]
    d = np.array([100 * v["diff"] for _, v in rows])
    lo = np.array([100 * v["ci"][0] for _, v in rows])
    hi = np.array([100 * v["ci"][1] for _, v in rows])
    colors = ["tab:green" if a > 0 else "tab:red" if b < 0 else "tab:grey" for a, b in zip(lo, hi)]
    ax.hlines(y, lo, hi, color=colors, lw=2)
    ax.scatter(d, y, color=colors, zorder=3)
    for yi, di, low, h in zip(y, d, lo, hi):
        ax.annotate(
            f"{di:+.1f} [{low:+.1f}, {h:+.1f}]", (h, yi), xytext=(6, -3), textcoords="offset points", fontsize=8
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [method_title(m) for m, _ in rows])
    ax.set_xlabel("difference from M+Q_base, micro average (accuracy points)")
    span = max(1.0, np.nanmax(np.abs(np.concatenate([lo, hi]))))
    ax.set_xlim(-1.15 * span, 1.6 * span)
    ax.set_title("Difference from M+Q_base (95% paired bootstrap; green/red: interval excludes 0)")
    return _save(fig, folder, "vs_base")


def fig_cluster_heatmap(counts: dict, majority: dict, metrics: dict, folder: Path) -> Path:
    """Clusters (rows) by training source (columns), counts annotated."""
    plt = _plt()
    clusters = sorted(int(c) for c in counts)
    sources = sorted({s for c in counts.values() for s in c})
    M = np.array(
        [[counts[str(c)].get(s, 0) if str(c) in counts else counts[c].get(s, 0) for s in sources] for c in clusters]
    )
    fig, ax = plt.subplots(figsize=(1.3 * len(sources) + 2.5, 0.45 * len(clusters) + 1.6))
    im = ax.imshow(M, cmap="Blues", aspect="auto")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(
                j,
                i,
                str(M[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if M[i, j] > 0.6 * M.max() else "black",
            )
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_yticks(range(len(clusters)), [f"cluster {c} (n={M[i].sum()})" for i, c in enumerate(clusters)])
    ax.set_xlabel("training source")
    fig.colorbar(im, ax=ax, label="training examples")
    ax.set_title(
        f"Clusters by source: NMI {metrics.get('nmi', float('nan')):.3f}, "
        f"ARI {metrics.get('ari', float('nan')):.3f}, purity {metrics.get('purity', float('nan')):.3f}"
    )
    return _save(fig, folder, "clusters_by_source")


def fig_feature_map(
    ids: list[str], sources: list[str], X: np.ndarray, cluster_of: dict[str, int], folder: Path, seed: int = 0
) -> tuple[Path, float]:
    """PCA of the training gradient features to 2-D, coloured by cluster and by source."""
    from sklearn.decomposition import PCA

    plt = _plt()
    idx = np.arange(len(X))
    if len(idx) > MAP_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(X), MAP_POINTS, replace=False))
    pca = PCA(n_components=2, random_state=seed)
    P = pca.fit_transform(X[idx])
    explained = float(pca.explained_variance_ratio_.sum())
    cl = np.array([cluster_of.get(ids[i], -1) for i in idx])
    src = np.array([sources[i] for i in idx])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    cmap = plt.get_cmap("tab10" if max(len(set(cl)), len(set(src))) <= 10 else "tab20")
    for ax, labels, title in ((axes[0], cl, "coloured by cluster"), (axes[1], src, "coloured by source")):
        for k, lab in enumerate(sorted(set(labels.tolist()), key=str)):
            m = labels == lab
            name = f"cluster {lab}" if title.endswith("cluster") else str(lab)
            ax.scatter(P[m, 0], P[m, 1], s=9, alpha=0.7, color=cmap(k % cmap.N), label=f"{name} ({m.sum()})")
        ax.set_title(f"Gradient features, PCA 2-D, {title}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, markerscale=1.5, frameon=False, loc="best")
    fig.suptitle(
        f"{len(idx)} training examples; the two components explain {100 * explained:.1f}% of the variance",
        fontsize=9,
        y=0.0,
    )
    return _save(fig, folder, "feature_map"), explained


def fig_routing(test_sources: list[str], W: np.ndarray, majority: dict[int, str], folder: Path) -> Path:
    """ELREA's weights per test source: mean weight of every adapter (heatmap) and the spread of the
    base weight and of the top expert's weight (box plots)."""
    plt = _plt()
    sources = sorted(set(test_sources))
    src = np.asarray(test_sources)
    C = W.shape[1] - 1
    cols = ["base"] + [f"expert-{c:02d} ({majority.get(c, '?')})" for c in range(C)]
    mean = np.array([W[src == s].mean(axis=0) for s in sources])
    fig, axes = plt.subplots(
        1,
        2,
        figsize=(max(11, 0.9 * (C + 1) + 7), 0.5 * len(sources) + 3),
        gridspec_kw={"width_ratios": [max(3, C + 1), 4]},
    )
    ax = axes[0]
    im = ax.imshow(mean, cmap="viridis", aspect="auto", vmin=0, vmax=max(1e-9, mean.max()))
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            ax.text(
                j,
                i,
                f"{mean[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if mean[i, j] > 0.6 * mean.max() else "white",
            )
    ax.set_xticks(range(C + 1), cols, fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), [f"{s} (n={(src == s).sum()})" for s in sources])
    ax.set_xlabel("adapter (expert: majority training source of its cluster)")
    ax.set_ylabel("test source")
    ax.set_title("Mean ELREA weight per test source")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[1]
    top = W[:, 1:].max(axis=1)
    rng = np.random.default_rng(0)
    for i, s in enumerate(sources):
        m = src == s
        jitter = rng.uniform(-0.15, 0.15, m.sum())
        ax.scatter(
            i - 0.2 + jitter,
            W[m, 0],
            s=10,
            alpha=0.6,
            color="tab:orange",
            label="base weight 1 - max cos" if i == 0 else None,
        )
        ax.scatter(
            i + 0.2 + jitter, top[m], s=10, alpha=0.6, color="tab:blue", label="top expert's weight" if i == 0 else None
        )
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("weight (one dot per test item)")
    ax.set_title("Spread of the weights per test source")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.tight_layout()
    return _save(fig, folder, "routing_weights")


def fig_loss(logs: dict[str, dict], folder: Path, majority: dict[int, str] | None = None) -> Path | None:
    """Training loss (response tokens) against the step, base adapter and every expert."""
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    base = logs.get("base")
    ax = axes[0]
    if base and base["log"]:
        steps = [r["step"] for r in base["log"]]
        ax.plot(steps, [r["loss"] for r in base["log"]], marker="o", ms=3, color="black")
        spe = base.get("steps_per_epoch")
        if spe:
            for e in range(1, int(max(steps) // spe) + 1):
                ax.axvline(e * spe, color="grey", ls=":", lw=0.8)
                ax.text(
                    e * spe,
                    max(r["loss"] for r in base["log"]),
                    f" end of epoch {e}",
                    fontsize=7,
                    color="grey",
                    va="top",
                )
    else:
        ax.text(0.5, 0.5, "no loss log for the base adapter", ha="center", transform=ax.transAxes)
    ax.set_title("Base adapter Q_base (all training data)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax = axes[1]
    experts = {k: v for k, v in logs.items() if k != "base"}
    cmap = plt.get_cmap("tab10" if len(experts) <= 10 else "tab20")
    for k, (name, log) in enumerate(sorted(experts.items())):
        c = int(name.split("-")[-1]) if name.split("-")[-1].isdigit() else None
        label = f"{name} ({majority[c]})" if majority and c in majority else name
        ax.plot(
            [r["step"] for r in log["log"]],
            [r["loss"] for r in log["log"]],
            marker="o",
            ms=2,
            color=cmap(k % cmap.N),
            label=label,
        )
    if not experts:
        ax.text(0.5, 0.5, "no loss logs for the experts", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.set_title("Experts (warm-started from Q_base; legend: cluster's majority source)", fontsize=10)
    ax.set_xlabel("optimizer step (of that expert)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    return _save(fig, folder, "training_loss")


# -- text -----------------------------------------------------------------------------------------


def headline(table: dict) -> str:
    """Plain sentences: did ELREA beat M+Q_base (and the compute-matched M+Q_base continued, when
    evaluated), by how much, and is it beyond the interval."""
    if "elrea" not in table or "base" not in table or "vs_base" not in table["elrea"]:
        return "ELREA or M+Q_base was not evaluated, so there is no headline comparison."
    text = _versus(table, "base", "M+Q_base", "vs_base")
    if "vs_continued" in table["elrea"]:
        text += " Against the compute-matched control: " + _versus(
            table, "base_continued", "M+Q_base continued for the experts' steps", "vs_continued"
        )
    return text


def _versus(table: dict, ref: str, title: str, key: str) -> str:
    e, b, v = table["elrea"]["micro"], table[ref]["micro"], table["elrea"][key]
    d, lo, hi = 100 * v["diff"], 100 * v["ci"][0], 100 * v["ci"][1]
    verdict = "beat" if d > 0 else "did not beat" if d < 0 else "tied with"
    if lo != lo:
        beyond = "no interval was computed (eval.bootstrap = 0)"
    elif lo > 0 or hi < 0:
        beyond = "the 95% interval excludes 0, so the difference is larger than its interval"
    else:
        beyond = "the 95% interval includes 0, so the difference is within noise at this test size"
    return (
        f"ELREA {verdict} {title} on the micro average: {100 * e['acc']:.1f}% vs {100 * b['acc']:.1f}% "
        f"over n={e['n']} test items, a difference of {d:+.1f} points [95% paired bootstrap "
        f"{lo:+.1f}, {hi:+.1f}]; {beyond}."
    )


# The paper's comparison methods (Tables 5.2-5.3, Figure 5.3b) and what this code calls them.
PAPER_METHODS = {
    "backbone": "backbone M",
    "base": "M+Q_base",
    "dataset": "M+Q_dataset",
    "moe_merge": "MoE Merging",
    "embedding": "Instruction Embedding",
    "random_clusters": "Random Cluster",
    "uniform": "Uniform Weights",
    "top1": "top-1",
    "top3": "top-3",
}
NOT_IMPLEMENTED = ("MoE Routing (layer-level mixing)", "MoLE", "LoRA Ensembles", "Self-Consistency")


def coverage(methods: list[str]) -> str:
    """Which of the paper's comparisons this run has, which it left out, which the code lacks."""
    missing = [v for k, v in PAPER_METHODS.items() if k not in methods]
    text = f"Compared here: {', '.join(method_title(m) for m in methods)}."
    if missing:
        text += f" Not in this run (add to eval.methods): {', '.join(missing)}."
    return text + f" Not implemented: {', '.join(NOT_IMPLEMENTED)}."


def _stage_times(manifest: dict) -> list[tuple[str, float | None]]:
    return [(name, st.get("seconds")) for name, st in (manifest.get("stages") or {}).items()]


def _examples(run: RunDir, eval_dir: Path, methods: list[str], per_source: int = 2) -> list[dict]:
    import pyarrow.parquet as pq

    p = eval_dir / "predictions.parquet"
    test = run.data_file("test")
    if not p.exists() or not test.exists():
        return []
    preds = {r["example_id"]: r for r in pq.read_table(p).to_pylist()}
    seen: dict[str, int] = {}
    out = []
    for r in pq.read_table(test, columns=["example_id", "source", "prompt", "answer"]).to_pylist():
        if seen.get(r["source"], 0) >= per_source or r["example_id"] not in preds:
            continue
        seen[r["source"]] = seen.get(r["source"], 0) + 1
        msgs = json.loads(r["prompt"])
        user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        pr = preds[r["example_id"]]
        out.append(
            {
                "source": r["source"],
                "prompt": user,
                "answer": r["answer"],
                "preds": {m: (pr.get(f"pred_{m}"), pr.get(f"score_{m}")) for m in methods},
            }
        )
    return out


def _short(s: str, n: int = 160) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


# -- the report -----------------------------------------------------------------------------------


def _figures(run: RunDir, eval_dir: Path, table: dict, clusters: dict, seed: int) -> tuple[dict[str, Path], dict]:
    """Every figure the run's artifacts allow, into eval_dir/figures; returns (figures, facts the
    text cites: majority source per cluster, variance the feature map explains)."""
    folder = eval_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    majority, cluster_of = _clusters(run)
    figures = {"accuracy": fig_accuracy(table, folder), "vs_base": fig_vs_base(table, folder)}
    if clusters.get("counts"):
        figures["clusters_by_source"] = fig_cluster_heatmap(clusters["counts"], majority, clusters, folder)
    feats = _train_features(run)
    explained = None
    if feats is not None:
        figures["feature_map"], explained = fig_feature_map(*feats, cluster_of, folder, seed=seed)
    test_sources, weights = read_weights(eval_dir / "weights.parquet")
    if "elrea" in weights:
        figures["routing_weights"] = fig_routing(test_sources, weights["elrea"], majority, folder)
    figures["training_loss"] = fig_loss(_loss_logs(run), folder, majority)
    return {k: v for k, v in figures.items() if v}, {"majority": majority, "explained": explained}


def _md_results(run: RunDir, config: dict, table: dict, clusters: dict) -> list[str]:
    """Title line, headline, the accuracy table, coverage and per-source differences."""
    methods = list(table)
    model = config.get("model", {}).get("name_or_path", "?")
    data = config.get("data", {})
    sources = list(next(iter(table.values()))["per_source"]) if table else []
    md: list[str] = ["# ELREA evaluation report", ""]
    md += [
        f"Run `{run.root}` · model `{model}` · data `{data.get('kind', '?')}` with sources "
        f"{', '.join(sources)} · {clusters.get('num_clusters', '?')} clusters · built "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]
    md += ["## Headline", "", headline(table), ""]
    md += ["## Results", "", results_markdown(table), ""]
    md += [coverage(methods), ""]
    continued = (_read_json(run.stage_dir("baselines") / "baselines.json") or {}).get("continued")
    if continued and "base_continued" in table:
        md += [
            f"The compute-matched control M+Q_base continued is Q_base trained {continued['continued_steps']} "
            f"more optimiser steps on the whole mix ({continued['continued_examples_seen']} rows), with the "
            f"experts' recipe; the {continued['experts']} experts took {continued['steps']} steps together "
            f"({continued['examples_seen']} rows).",
            "",
        ]
    md += ["Per-source differences from M+Q_base (points, 95% paired bootstrap):", ""]
    md += ["| method | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for m in methods:
        per = table[m]["per_source"]
        if not all("vs_base" in per[s] for s in sources):
            continue
        md.append(
            f"| {method_title(m)} | "
            + " | ".join(
                f"{100 * per[s]['vs_base']['diff']:+.1f} [{100 * per[s]['vs_base']['ci'][0]:+.1f}, "
                f"{100 * per[s]['vs_base']['ci'][1]:+.1f}]"
                for s in sources
            )
            + " |"
        )
    return md


def _md_cluster_table(clusters: dict, majority: dict[int, str]) -> list[str]:
    rounds = clusters.get("rounds")
    md = [
        f"{clusters.get('num_clusters')} clusters (method {clusters.get('method')}, "
        f"{len(rounds) if isinstance(rounds, list) else rounds} balancing rounds, sizes {clusters.get('sizes')}). "
        f"Against the training sources: NMI {clusters.get('nmi', float('nan')):.3f}, ARI "
        f"{clusters.get('ari', float('nan')):.3f}, purity {clusters.get('purity', float('nan')):.3f}.",
        "",
    ]
    counts = clusters.get("counts") or {}
    srcs = sorted({s for c in counts.values() for s in c})
    md += ["| cluster | majority source | " + " | ".join(srcs) + " |", "|---|---|" + "---|" * len(srcs)]
    for c in sorted(counts, key=int):
        md.append(f"| {c} | {majority.get(int(c), '?')} | " + " | ".join(str(counts[c].get(s, 0)) for s in srcs) + " |")
    return md + ["", "![clusters by source](figures/clusters_by_source.png)", ""]


def _md_clusters(clusters: dict, metrics: dict, figures: dict, facts: dict) -> list[str]:
    """Cluster sizes and agreement with the sources, the embedding baseline's, own-source routing,
    the feature map and the routing weights."""
    md = ["## Clusters", ""]
    if clusters:
        md += _md_cluster_table(clusters, facts["majority"])
    emb = metrics.get("embedding_clusters")
    if emb:
        md += [
            f"Instruction-embedding baseline: {emb['num_clusters']} clusters of the MiniLM embeddings "
            f"(sizes {emb['sizes']}), NMI {emb['nmi']:.3f}, ARI {emb['ari']:.3f}, purity "
            f"{emb['purity']:.3f} against the sources.",
            "",
        ]
    pca = metrics.get("pca_clusters")
    if pca:
        md += [
            f"PCA baseline: {pca['num_clusters']} clusters of the gradient features reduced to {pca['pca_dim']} "
            f"principal components (sizes {pca['sizes']}), NMI {pca['nmi']:.3f}, ARI {pca['ari']:.3f}, purity "
            f"{pca['purity']:.3f} against the sources.",
            "",
        ]
    routing = metrics.get("own_source_routing") or {}
    if routing:
        md += [
            f"Own-source top expert: for {100 * routing['rate']:.1f}% of {routing['n']} test items the "
            f"highest-weighted expert is a cluster whose majority training source is the item's own "
            f"[95% {100 * routing['ci'][0]:.1f}, {100 * routing['ci'][1]:.1f}]; chance "
            f"{100 * routing['chance']:.1f}%.",
            "",
        ]
    if "feature_map" in figures:
        md += [
            f"Gradient features in 2-D (PCA of the unit-norm projected Adam features; the two "
            f"components explain {100 * facts['explained']:.1f}% of the variance, so distances in the map "
            "are only indicative):",
            "",
            "![feature map](figures/feature_map.png)",
            "",
        ]
    if "routing_weights" in figures:
        md += [
            "## Routing weights",
            "",
            "ELREA's weights per test item (eval/weights.parquet). Expert weights are a softmax over the "
            "standardised cosines (they sum to 1); the base adapter adds 1 - max cos (paper eq. 5.9-5.10).",
            "",
            "![routing weights](figures/routing_weights.png)",
            "",
        ]
    return md


def _md_why(metrics: dict) -> list[str]:
    """How peaked ELREA's routing is, and whether each expert beats M+Q_base on its own cluster."""
    spread, spec = metrics.get("routing_spread"), metrics.get("specialisation")
    if not spread and not spec:
        return []
    md = ["## Why it wins or loses", ""]
    if spread:
        q = spread["base_weight_quartiles"]
        md += [
            f"Routing: the expert weights' entropy is {spread['entropy_mean']:.2f} of its maximum on average "
            f"(median {spread['entropy_median']:.2f}; 0 = one expert takes all, 1 = uniform) and the top "
            f"expert's share {100 * spread['top_weight_mean']:.1f}%; the base adapter's weight 1 - max cos "
            f"has quartiles {q[1]:.3f} / {q[2]:.3f} / {q[3]:.3f} (min {q[0]:.3f}, max {q[4]:.3f}) over "
            f"{spread['n']} test items. A base weight near 0 leaves the mix to the experts.",
            "",
        ]
    if spec:
        md += specialisation_markdown(spec) + [""]
    return md


def _md_router(run: RunDir, metrics: dict) -> list[str]:
    """The distilled router (beyond the paper), when the run trained it: how closely it follows the
    gradient router, both routers' accuracy with their paired difference, each one's routing cost."""
    ev = _read_json(run.stage_dir("router") / "router_eval.json")
    if ev is None:
        return []
    test, goal = ev["test"], ev["goal_top1_agreement"]
    head = f"one-layer (width {ev['hidden']})" if ev["hidden"] else "linear"
    md = [
        "## Distilled router",
        "",
        f"A {head} head on the prompt's pooled "
        f"hidden state (base model + final base adapter) fitted to the gradient routing weights of "
        f"{ev['train']['n']} training prompts (routing.method: distilled; not in the paper). On the "
        f"{test['n']} test prompts its top expert is the gradient router's for {100 * test['top1_agreement']:.1f}% "
        f"of them (goal >= {100 * goal:.0f}%: {'met' if test['top1_agreement'] >= goal else 'not met'}; train "
        f"{100 * ev['train']['top1_agreement']:.1f}%), and its base weight differs by "
        f"{test['mean_abs_base_diff']:.3f} on average.",
        "",
    ]
    table = metrics.get("methods", {})
    vs = metrics.get("distilled_vs_elrea")
    if vs is not None and "elrea" in table and "elrea_distilled" in table:
        md += [
            f"Accuracy, micro average: gradient router (ELREA) {100 * table['elrea']['micro']['acc']:.1f}%, "
            f"distilled router {100 * table['elrea_distilled']['micro']['acc']:.1f}%; distilled minus gradient "
            f"{100 * vs['diff']:+.1f} points [95% paired bootstrap {100 * vs['ci'][0]:+.1f}, "
            f"{100 * vs['ci'][1]:+.1f}].",
            "",
        ]
    else:
        md += ["Its accuracy was not measured: add elrea and elrea_distilled to eval.methods.", ""]
    cost = ev.get("seconds_per_prompt") or {}
    if cost.get("gradient") == cost.get("gradient") and cost.get("distilled"):
        md += [
            f"Routing cost per prompt, measured in the router stage on one device: gradient "
            f"{1000 * cost['gradient']:.1f} ms (features of {ev['cost_rows']['gradient']} test prompts), "
            f"distilled {1000 * cost['distilled']:.1f} ms ({ev['cost_rows']['distilled']} prompts), so the "
            f"distilled router routes {cost['gradient'] / cost['distilled']:.1f}x faster.",
            "",
        ]
    return md


def _md_training(figures: dict, manifest: dict) -> list[str]:
    """The loss curves and each stage's seconds."""
    md = ["## Training", ""]
    if "training_loss" in figures:
        md += ["![training loss](figures/training_loss.png)", ""]
    stage_times = _stage_times(manifest)
    if stage_times:
        md += ["| stage | seconds |", "|---|---|"] + [
            f"| {n} | {'' if t is None else f'{t:.0f}'} |" for n, t in stage_times
        ]
        md += [f"| total | {sum(t for _, t in stage_times if t):.0f} |", ""]
    return md


def _md_examples(run: RunDir, eval_dir: Path, methods: list[str]) -> list[str]:
    """A few test items per source with every method's answer, marked right or wrong."""
    examples = _examples(run, eval_dir, methods)
    if not examples:
        return []
    md = [
        "## Examples",
        "",
        "| source | prompt | gold | " + " | ".join(method_title(m) for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for ex in examples:
        cells = [f"{'✓' if s == 1.0 else '✗'} `{_short(p, 40)}`" for p, s in ex["preds"].values()]
        md.append(
            f"| {ex['source']} | {_short(ex['prompt'], 90)} | `{_short(ex['answer'], 30)}` | "
            + " | ".join(c.replace("|", "\\|") for c in cells)
            + " |"
        )
    return md + [""]


def write_report(run: RunDir, eval_dir: Path | None = None) -> dict:
    """Write report.md, report.html and figures/*.png into `eval_dir` (default: the run's eval
    folder) from the run's artifacts. Returns {"markdown", "html", "figures": {name: path}, "notes"}."""
    eval_dir = Path(eval_dir) if eval_dir is not None else run.stage_dir("eval")
    metrics = _read_json(eval_dir / "metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"{eval_dir / 'metrics.json'} is missing: run the eval stage first")
    manifest = _read_json(run.manifest) or {}
    clusters = _read_json(run.clusters_file("report.json")) or {}
    config = manifest.get("config", {})
    table = metrics["methods"]
    figures, facts = _figures(run, eval_dir, table, clusters, seed=config.get("run", {}).get("seed", 0))
    notes = (
        []
        if "training_loss" in figures
        else ["No training loss log (adapters/base/train_log.json, adapters/experts/expert-XX/train_log.json)."]
    )
    md = _md_results(run, config, table, metrics.get("clusters") or {})
    md += ["", "![accuracy](figures/accuracy.png)", ""]
    if "vs_base" in figures:
        md += ["![difference from M+Q_base](figures/vs_base.png)", ""]
    md += (
        _md_clusters(clusters, metrics, figures, facts)
        + _md_why(metrics)
        + _md_router(run, metrics)
        + _md_training(figures, manifest)
    )
    md += _md_examples(run, eval_dir, list(table))
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(md)
    (eval_dir / "report.md").write_text(text)
    (eval_dir / "report.html").write_text(_html(text, eval_dir / "figures"))
    return {"markdown": eval_dir / "report.md", "html": eval_dir / "report.html", "figures": figures, "notes": notes}


# -- markdown subset -> HTML (tables, headings, paragraphs, images, code spans) ---------------------


def _inline(s: str) -> str:
    s = html.escape(s, quote=False)
    out, code = [], False
    for part in s.split("`"):
        out.append(f"<code>{part}</code>" if code else part)
        code = not code
    return "".join(out)


def _html(markdown: str, figs_dir: Path) -> str:
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in r.strip().strip("|").split(" | ")] for r in rows]
            head, rest = cells[0], [c for c in cells[1:] if not all(set(x) <= {"-"} for x in c)]
            body.append(
                "<table><thead><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                + "</tbody></table>"
            )
            continue
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            png = figs_dir / Path(src.rstrip(")")).name
            data = base64.b64encode(png.read_bytes()).decode() if png.exists() else ""
            body.append(
                f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(alt)}</figcaption></figure>"
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:0.85em}"
        "code{background:#f5f5f5;padding:0 3px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ELREA evaluation report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
