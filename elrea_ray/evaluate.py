"""Stage 5 statistics: per-source accuracy with n and 95% intervals, paired bootstrap differences
against M+Q_base, and the routing figures a small demo can show robustly; and the eval stage's
routing-weights file, which the report reads back. No Ray.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

METHOD_TITLES = {
    "backbone": "backbone M (no adapter)",
    "base": "M+Q_base",
    "elrea": "ELREA",
    "uniform": "uniform weights",
    "moe_merge": "MoE merging",
    "random_clusters": "random clusters (all weights 1)",
    "dataset": "M+Q_dataset (own source's adapter)",
    "embedding": "instruction embedding (MiniLM)",
    "pca": "clusters on PCA-reduced gradients",
    "base_continued": "M+Q_base continued (compute-matched)",
    "elrea_distilled": "ELREA, distilled router",
}


def method_title(method: str) -> str:
    """The paper's name of an eval method ("top3" -> "top-3 experts + base")."""
    if method in METHOD_TITLES:
        return METHOD_TITLES[method]
    if method.startswith("top") and method[3:].isdigit():
        k = int(method[3:])
        return f"top-{k} expert{'s' if k > 1 else ''} + base"
    return method


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (well behaved at 0 and n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b and its 95% percentile interval, resampling items (paired)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    if resamples == 0 or len(diff) == 0:
        return (float(diff.mean()) if len(diff) else float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    return (float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


# The references every other method is compared with (paired, item by item): M+Q_base and the
# compute-matched control, when they were evaluated.
REFERENCES = {"vs_base": "base", "vs_continued": "base_continued"}
REFERENCE_COLUMNS = {"vs_base": "vs M+Q_base", "vs_continued": "vs continued"}  # their table columns


def accuracy_table(sources: list[str], scores: dict[str, list[float]], resamples: int = 1000, seed: int = 0) -> dict:
    """{method: {"per_source": {src: {acc, n, ci, vs_base, vs_continued}}, "micro": {acc, n, ci},
    "vs_base": {diff, ci}, "vs_continued": {diff, ci}}}; a vs_* entry where that reference was
    evaluated and is not the method itself."""
    out: dict = {}
    src = np.asarray(sources)
    for method, s in scores.items():
        s = np.asarray(s, float)
        per = {}
        for name in sorted(set(sources)):
            m = src == name
            k, n = int(s[m].sum()), int(m.sum())
            per[name] = {"acc": k / n if n else float("nan"), "n": n, "ci": wilson_interval(k, n)}
        k, n = int(s.sum()), len(s)
        entry = {"per_source": per, "micro": {"acc": k / n if n else float("nan"), "n": n, "ci": wilson_interval(k, n)}}
        for key, ref in REFERENCES.items():
            if ref not in scores or method == ref:
                continue
            b = np.asarray(scores[ref], float)
            d, lo, hi = paired_bootstrap(s, b, resamples, seed)
            entry[key] = {"diff": d, "ci": (lo, hi)}
            for name in per:  # the same paired bootstrap within each source
                m = src == name
                d, lo, hi = paired_bootstrap(s[m], b[m], resamples, seed)
                per[name][key] = {"diff": d, "ci": (lo, hi)}
        out[method] = entry
    return out


def _two_level_means(values: list[np.ndarray], resamples: int, rng) -> np.ndarray:
    """[resamples] means of a two-level bootstrap: seeds drawn with replacement, then each drawn
    seed's items with replacement (a seed's items are never mixed with another's)."""
    means = np.empty(resamples)
    for r in range(resamples):
        picks = [values[i] for i in rng.integers(0, len(values), len(values))]
        means[r] = np.concatenate([v[rng.integers(0, len(v), len(v))] for v in picks]).mean()
    return means


def pooled_table(runs: dict[int, dict[str, list[float]]], resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy pooled over seeds. runs: {seed: {method: [per-item scores]}}, each seed a whole
    pipeline with its own test items. Returns {method: {"per_seed": {seed: acc}, "pooled": {acc,
    n, ci}, "vs_base": {diff, ci}, "vs_continued": {diff, ci}}}: the pooled accuracy (the mean
    over every seed's items) with a 95% two-level bootstrap interval (seeds, then items within a
    seed), and the paired difference from each reference over the same resamples. Methods
    missing from a seed are left out."""
    seeds = sorted(runs)
    methods = [m for m in runs[seeds[0]] if all(m in runs[s] for s in seeds)]
    out: dict = {}
    for method in methods:
        vals = [np.asarray(runs[s][method], float) for s in seeds]
        flat = np.concatenate(vals)
        entry = {
            "per_seed": {s: float(v.mean()) for s, v in zip(seeds, vals)},
            "pooled": {"acc": float(flat.mean()), "n": len(flat), "ci": (float("nan"), float("nan"))},
        }
        if resamples:
            means = _two_level_means(vals, resamples, np.random.default_rng(seed))
            entry["pooled"]["ci"] = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
        for key, ref in REFERENCES.items():
            if ref not in methods or ref == method:
                continue
            diffs = [v - np.asarray(runs[s][ref], float) for s, v in zip(seeds, vals)]
            d = float(np.concatenate(diffs).mean())
            ci = (float("nan"), float("nan"))
            if resamples:  # the same seed: the same resampled items for both (paired)
                means = _two_level_means(diffs, resamples, np.random.default_rng(seed))
                ci = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
            entry[key] = {"diff": d, "ci": ci}
        out[method] = entry
    return out


def pooled_by_source(runs: dict[int, dict[str, list[float]]], sources: dict[int, list[str]]) -> dict:
    """{source: {"n": items over all seeds, method: pooled accuracy}}: where each method wins or
    loses, the mean over every seed's items of that source (the seeds' own test items)."""
    seeds = sorted(runs)
    methods = [m for m in runs[seeds[0]] if all(m in runs[s] for s in seeds)]
    out: dict = {}
    for src in sorted({x for s in seeds for x in sources[s]}):
        rows = {s: [i for i, x in enumerate(sources[s]) if x == src] for s in seeds}
        entry: dict = {"n": sum(len(r) for r in rows.values())}
        for m in methods:
            entry[m] = float(np.mean([runs[s][m][i] for s in seeds for i in rows[s]]))
        out[src] = entry
    return out


def pooled_by_source_markdown(table: dict) -> str:
    """One row per source, one column per method (pooled accuracy, %)."""
    if not table:
        return ""
    methods = [k for k in next(iter(table.values())) if k != "n"]
    lines = [
        "| source | n | " + " | ".join(method_title(m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for src, e in table.items():
        lines.append(f"| {src} | {e['n']} | " + " | ".join(_pct(e[m]) for m in methods) + " |")
    return "\n".join(lines) + "\n\nAccuracy in % over every seed's test items of the source.\n"


def pooled_markdown(table: dict) -> str:
    """The pooled table: a column per seed's accuracy, the pooled accuracy with its interval and the
    differences from M+Q_base and from the compute-matched control."""
    methods = list(table)
    if not methods:
        return "No method was evaluated in every seed.\n"
    seeds = list(table[methods[0]]["per_seed"])
    refs = [k for k, ref in REFERENCES.items() if ref in table]
    n = table[methods[0]]["pooled"]["n"]
    lines = [
        "| method | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | pooled (n={n})"
        + "".join(f" | {REFERENCE_COLUMNS[k]}" for k in refs)
        + " |",
        "|---|" + "---|" * (len(seeds) + 1 + len(refs)),
    ]
    for m in methods:
        e = table[m]
        p = e["pooled"]
        lines.append(
            f"| {method_title(m)} | "
            + " | ".join(_pct(e["per_seed"][s]) for s in seeds)
            + f" | {_pct(p['acc'])} [{_pct(p['ci'][0])}, {_pct(p['ci'][1])}]"
            + "".join(f" | {_diff_text(e.get(k))}" for k in refs)
            + " |"
        )
    return (
        "\n".join(lines) + "\n\nAccuracy in %; the pooled interval and the differences (points) are 95% "
        "two-level bootstrap intervals: seeds resampled, then each seed's test items, paired across "
        "methods.\n"
    )


def majority_source(labels: np.ndarray, sources: list[str]) -> dict[int, str]:
    """Each cluster's most common training source."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for c, s in zip(labels.tolist(), sources):
        counts[int(c)][s] += 1
    return {c: cnt.most_common(1)[0][0] for c, cnt in counts.items()}


def own_source_routing_rate(
    expert_weights: np.ndarray, test_sources: list[str], cluster_majority: dict[int, str]
) -> dict:
    """How often a test item's top-weighted expert is a cluster whose majority source is its own.

    Chance level is reported beside it: the fraction of clusters whose majority is that source,
    averaged over the test items."""
    top = expert_weights.argmax(axis=1)
    hits = [cluster_majority.get(int(c)) == s for c, s in zip(top, test_sources)]
    C = expert_weights.shape[1]
    chance = [sum(1 for c in range(C) if cluster_majority.get(c) == s) / C for s in test_sources]
    return {
        "rate": float(np.mean(hits)) if hits else float("nan"),
        "n": len(hits),
        "ci": wilson_interval(int(sum(hits)), len(hits)),
        "chance": float(np.mean(chance)) if chance else float("nan"),
    }


def specialisation_table(cluster_of: np.ndarray, alone: dict[str, np.ndarray], base: np.ndarray) -> dict:
    """Does expert k beat the base adapter on its own cluster's test items?

    cluster_of [N]: each test item's routed cluster (the expert with the largest routing weight);
    alone: {expert name: [N] scores of that expert decoded alone}, experts in cluster order; base
    [N]: M+Q_base's scores. Returns {"clusters": [{"cluster", "n", "base", "experts": {name: acc}}],
    "own": [{"expert", "n", "acc", "base", "diff"}]}: every adapter on every cluster's items, and
    each expert against the base on its own cluster (accuracies in [0, 1], nan where n = 0)."""
    cluster_of = np.asarray(cluster_of)
    base = np.asarray(base, float)
    names = list(alone)

    def acc(s: np.ndarray, m: np.ndarray) -> float:
        return float(s[m].mean()) if m.any() else float("nan")

    clusters, own = [], []
    for c, name in enumerate(names):
        m = cluster_of == c
        clusters.append(
            {
                "cluster": c,
                "n": int(m.sum()),
                "base": acc(base, m),
                "experts": {e: acc(np.asarray(alone[e], float), m) for e in names},
            }
        )
        a, b = clusters[-1]["experts"][name], clusters[-1]["base"]
        own.append({"expert": name, "n": int(m.sum()), "acc": a, "base": b, "diff": a - b})
    return {"clusters": clusters, "own": own}


def routing_spread(weights: np.ndarray) -> dict:
    """How peaked the routing is: weights [N, 1 + C] (column 0 the base adapter, the rest the
    expert softmax). The experts' entropy is divided by log C (0: one expert takes all, 1:
    uniform); the base weight 1 - max cos is given by its quartiles."""
    w = np.asarray(weights, float)
    experts, base = w[:, 1:], w[:, 0]
    C = experts.shape[1]
    p = experts / np.clip(experts.sum(1, keepdims=True), 1e-12, None)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(1) / (np.log(C) if C > 1 else 1.0)
    q = np.percentile(base, [0, 25, 50, 75, 100]) if len(base) else [float("nan")] * 5
    return {
        "n": len(w),
        "entropy_mean": float(ent.mean()) if len(w) else float("nan"),
        "entropy_median": float(np.median(ent)) if len(w) else float("nan"),
        "top_weight_mean": float(p.max(1).mean()) if len(w) else float("nan"),
        "base_weight_quartiles": [float(x) for x in q],
    }


def specialisation_markdown(spec: dict) -> list[str]:
    """The specialisation table: a row per cluster (its routed test items), the base and every
    expert alone on them, the own expert's cell in bold; then the own-cluster differences."""
    names = [o["expert"] for o in spec["own"]]
    md = ["| routed cluster | n | M+Q_base | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for row in spec["clusters"]:
        cells = [
            f"**{_pct(row['experts'][e])}**" if k == row["cluster"] else _pct(row["experts"][e])
            for k, e in enumerate(names)
        ]
        md.append(f"| {row['cluster']} | {row['n']} | {_pct(row['base'])} | " + " | ".join(cells) + " |")
    wins = sum(1 for o in spec["own"] if o["n"] and o["diff"] > 0)
    ties = sum(1 for o in spec["own"] if o["n"] and o["diff"] == 0)
    used = sum(1 for o in spec["own"] if o["n"])
    md += [
        "",
        f"Accuracy in % of each adapter decoded alone on the test items routed to each cluster "
        f"(bold: the cluster's own expert). On its own cluster an expert beat M+Q_base in {wins} of "
        f"{used} clusters with test items and tied in {ties}: "
        + "; ".join(f"{o['expert']} {100 * o['diff']:+.1f} points (n={o['n']})" for o in spec["own"] if o["n"])
        + ".",
    ]
    return md


def _pct(x: float) -> str:
    return "nan" if x != x else f"{100 * x:.1f}"


def _diff_text(vs: dict | None) -> str:
    """A paired difference in points with its interval, "+1.2 [-0.5, +2.9]"; "—" where none."""
    if vs is None:
        return "—"
    return f"{100 * vs['diff']:+.1f} [{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}]"


def results_markdown(table: dict, routing: dict | None = None, clusters: dict | None = None) -> str:
    """The results table as markdown: one row per method, a column per source and the micro average."""
    methods = list(table)
    sources = list(next(iter(table.values()))["per_source"]) if table else []
    head = "| method | " + " | ".join(f"{s} (n={table[methods[0]]['per_source'][s]['n']})" for s in sources)
    refs = [k for k, ref in REFERENCES.items() if ref in table]
    head += f" | micro (n={table[methods[0]]['micro']['n']})" if methods else ""
    head += "".join(f" | {REFERENCE_COLUMNS[k]}" for k in refs) + " |\n"
    lines = [head, "|" + "---|" * (len(sources) + 2 + len(refs)) + "\n"]
    for m in methods:
        row = table[m]
        cells = []
        for s in sources:
            e = row["per_source"][s]
            cells.append(f"{_pct(e['acc'])} [{_pct(e['ci'][0])}, {_pct(e['ci'][1])}]")
        mi = row["micro"]
        vs_txt = [_diff_text(row.get(k)) for k in refs]
        lines.append(
            f"| {method_title(m)} | "
            + " | ".join(cells)
            + f" | {_pct(mi['acc'])} [{_pct(mi['ci'][0])}, {_pct(mi['ci'][1])}]"
            + "".join(f" | {t}" for t in vs_txt)
            + " |\n"
        )
    text = "".join(lines)
    text += "\nAccuracy in %, 95% Wilson interval in brackets."
    if refs:
        text += (
            " The last columns are the paired bootstrap differences (points, 95% interval) from "
            + " and from ".join(
                {"vs_base": "M+Q_base", "vs_continued": "the compute-matched M+Q_base continued"}[k] for k in refs
            )
            + "."
        )
    text += "\n"
    if clusters:
        text += (
            f"\nClusters: {clusters['num_clusters']} (sizes {clusters['sizes']}); against the "
            f"sources NMI {clusters['nmi']:.3f}, ARI {clusters['ari']:.3f}, purity {clusters['purity']:.3f}.\n"
        )
    if routing:
        text += (
            f"Own-source routing: the top-weighted expert is a cluster of the item's own source for "
            f"{_pct(routing['rate'])}% of {routing['n']} test items "
            f"[{_pct(routing['ci'][0])}, {_pct(routing['ci'][1])}] (chance {_pct(routing['chance'])}%).\n"
        )
    return text


def write_weights(path: Path, rows: list[dict], weights: dict[str, np.ndarray]) -> None:
    """weights.parquet: example_id, source and w_<method> (its weights per row, column 0 = base)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "example_id": [r["example_id"] for r in rows],
                "source": [r["source"] for r in rows],
                **{f"w_{m}": [w.tolist() for w in weights[m]] for m in weights},
            }
        ),
        path,
    )


def read_weights(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(sources, {method: [N, n] float64}) of a weights.parquet; ([], {}) when there is none."""
    import pyarrow.parquet as pq

    if not path.exists():
        return [], {}
    t = pq.read_table(path)
    return t.column("source").to_pylist(), {
        c[2:]: np.asarray(t.column(c).to_pylist(), dtype=np.float64) for c in t.column_names if c.startswith("w_")
    }
