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


def accuracy_table(sources: list[str], scores: dict[str, list[float]], resamples: int = 1000,
                   seed: int = 0) -> dict:
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
        entry = {"per_source": per, "micro": {"acc": k / n if n else float("nan"), "n": n,
                                              "ci": wilson_interval(k, n)}}
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


def majority_source(labels: np.ndarray, sources: list[str]) -> dict[int, str]:
    """Each cluster's most common training source."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for c, s in zip(labels.tolist(), sources):
        counts[int(c)][s] += 1
    return {c: cnt.most_common(1)[0][0] for c, cnt in counts.items()}


def own_source_routing_rate(expert_weights: np.ndarray, test_sources: list[str],
                            cluster_majority: dict[int, str]) -> dict:
    """How often a test item's top-weighted expert is a cluster whose majority source is its own.

    Chance level is reported beside it: the fraction of clusters whose majority is that source,
    averaged over the test items."""
    top = expert_weights.argmax(axis=1)
    hits = [cluster_majority.get(int(c)) == s for c, s in zip(top, test_sources)]
    C = expert_weights.shape[1]
    chance = [sum(1 for c in range(C) if cluster_majority.get(c) == s) / C for s in test_sources]
    return {"rate": float(np.mean(hits)) if hits else float("nan"), "n": len(hits),
            "ci": wilson_interval(int(sum(hits)), len(hits)),
            "chance": float(np.mean(chance)) if chance else float("nan")}


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
    ref_titles = {"vs_base": "vs M+Q_base", "vs_continued": "vs continued"}
    head += f" | micro (n={table[methods[0]]['micro']['n']})" if methods else ""
    head += "".join(f" | {ref_titles[k]}" for k in refs) + " |\n"
    lines = [head, "|" + "---|" * (len(sources) + 2 + len(refs)) + "\n"]
    for m in methods:
        row = table[m]
        cells = []
        for s in sources:
            e = row["per_source"][s]
            cells.append(f"{_pct(e['acc'])} [{_pct(e['ci'][0])}, {_pct(e['ci'][1])}]")
        mi = row["micro"]
        vs_txt = [_diff_text(row.get(k)) for k in refs]
        lines.append(f"| {method_title(m)} | " + " | ".join(cells)
                     + f" | {_pct(mi['acc'])} [{_pct(mi['ci'][0])}, {_pct(mi['ci'][1])}]"
                     + "".join(f" | {t}" for t in vs_txt) + " |\n")
    text = "".join(lines)
    text += "\nAccuracy in %, 95% Wilson interval in brackets."
    if refs:
        text += (" The last columns are the paired bootstrap differences (points, 95% interval) from "
                 + " and from ".join({"vs_base": "M+Q_base", "vs_continued": "the compute-matched M+Q_base "
                                      "continued"}[k] for k in refs) + ".")
    text += "\n"
    if clusters:
        text += (f"\nClusters: {clusters['num_clusters']} (sizes {clusters['sizes']}); against the "
                 f"sources NMI {clusters['nmi']:.3f}, ARI {clusters['ari']:.3f}, purity {clusters['purity']:.3f}.\n")
    if routing:
        text += (f"Own-source routing: the top-weighted expert is a cluster of the item's own source for "
                 f"{_pct(routing['rate'])}% of {routing['n']} test items "
                 f"[{_pct(routing['ci'][0])}, {_pct(routing['ci'][1])}] (chance {_pct(routing['chance'])}%).\n")
    return text


def write_weights(path: Path, rows: list[dict], weights: dict[str, np.ndarray]) -> None:
    """weights.parquet: example_id, source and w_<method> (its weights per row, column 0 = base)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"example_id": [r["example_id"] for r in rows], "source": [r["source"] for r in rows],
                             **{f"w_{m}": [w.tolist() for w in weights[m]] for m in weights}}), path)


def read_weights(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(sources, {method: [N, n] float64}) of a weights.parquet; ([], {}) when there is none."""
    import pyarrow.parquet as pq

    if not path.exists():
        return [], {}
    t = pq.read_table(path)
    return t.column("source").to_pylist(), {c[2:]: np.asarray(t.column(c).to_pylist(), dtype=np.float64)
                                            for c in t.column_names if c.startswith("w_")}
