"""The evaluation's tables over arrays: the paired differences from both references, the
specialisation table and the routing spread."""

import numpy as np

from elrea_ray.evaluate import (
    accuracy_table,
    results_markdown,
    routing_spread,
    specialisation_markdown,
    specialisation_table,
)


def test_every_method_is_compared_with_m_q_base_and_the_compute_matched_control():
    rng = np.random.default_rng(0)
    sources = ["a"] * 50 + ["b"] * 50
    base = rng.integers(0, 2, 100).astype(float)
    continued = base.copy()
    continued[:10] = 1.0  # right on 10 more items, at most
    elrea = continued.copy()
    elrea[50:60] = 0.0
    table = accuracy_table(
        sources, {"base": base.tolist(), "base_continued": continued.tolist(), "elrea": elrea.tolist()}, resamples=200
    )
    assert "vs_base" not in table["base"] and "vs_continued" not in table["base_continued"]
    assert np.isclose(table["elrea"]["vs_continued"]["diff"], elrea.mean() - continued.mean())
    assert np.isclose(table["base_continued"]["vs_base"]["diff"], continued.mean() - base.mean())
    assert np.isclose(
        table["elrea"]["per_source"]["b"]["vs_continued"]["diff"], elrea[50:].mean() - continued[50:].mean()
    )
    md = results_markdown(table)
    assert "| vs M+Q_base | vs continued |" in md.splitlines()[0]
    assert all(line.count("|") == md.splitlines()[0].count("|") for line in md.splitlines()[:5])


def test_specialisation_table_puts_each_expert_against_the_base_on_its_own_cluster():
    cluster_of = np.array([0, 0, 0, 0, 1, 1, 1, 2])  # cluster 3 gets no test item
    base = np.array([0, 0, 1, 1, 1, 1, 0, 0], float)
    alone = {
        "expert-00": np.array([1, 1, 1, 0, 0, 0, 0, 1], float),  # 3/4 on its own cluster
        "expert-01": np.array([0, 0, 0, 0, 0, 0, 1, 1], float),  # 1/3 on its own
        "expert-02": np.array([0, 0, 0, 0, 0, 0, 0, 1], float),
        "expert-03": np.zeros(8),
    }
    spec = specialisation_table(cluster_of, alone, base)
    own = {o["expert"]: o for o in spec["own"]}
    assert own["expert-00"]["n"] == 4 and np.isclose(own["expert-00"]["diff"], 0.75 - 0.5)
    assert np.isclose(own["expert-01"]["diff"], 1 / 3 - 2 / 3)
    assert own["expert-02"]["acc"] == 1.0 and own["expert-02"]["base"] == 0.0
    assert own["expert-03"]["n"] == 0 and np.isnan(own["expert-03"]["acc"])
    assert np.isclose(spec["clusters"][0]["experts"]["expert-01"], 0.0)
    md = "\n".join(specialisation_markdown(spec))
    assert "| 0 | 4 | 50.0 | **75.0** | 0.0 |" in md
    assert "beat M+Q_base in 2 of 3 clusters with test items" in md


def test_routing_spread_is_zero_for_one_hot_routing_and_one_for_uniform():
    one_hot = np.array([[0.1, 1.0, 0.0, 0.0], [0.3, 0.0, 0.0, 1.0]])
    uniform = np.array([[0.2, 1 / 3, 1 / 3, 1 / 3]] * 3)
    a, b = routing_spread(one_hot), routing_spread(uniform)
    assert abs(a["entropy_mean"]) < 1e-6 and a["top_weight_mean"] == 1.0
    assert np.isclose(b["entropy_mean"], 1.0) and np.isclose(b["top_weight_mean"], 1 / 3)
    assert a["base_weight_quartiles"][0] == 0.1 and a["base_weight_quartiles"][-1] == 0.3


def test_pooled_table_pools_seeds_with_paired_two_level_intervals():
    from elrea_ray.evaluate import pooled_by_source, pooled_by_source_markdown, pooled_markdown, pooled_table

    rng = np.random.default_rng(1)
    runs = {}
    for s, n in ((0, 60), (1, 80), (2, 70)):
        base = rng.integers(0, 2, n).astype(float)
        elrea = np.where(rng.random(n) < 0.15, 1.0, base)  # base, plus some items right
        runs[s] = {"base": base.tolist(), "elrea": elrea.tolist(), "base_continued": base.tolist()}
    t = pooled_table(runs, resamples=300)
    flat = lambda m: np.concatenate([runs[s][m] for s in runs])  # noqa: E731
    assert t["elrea"]["pooled"]["n"] == 210 and np.isclose(t["elrea"]["pooled"]["acc"], flat("elrea").mean())
    assert t["elrea"]["per_seed"][1] == np.mean(runs[1]["elrea"])
    lo, hi = t["elrea"]["pooled"]["ci"]
    assert lo < t["elrea"]["pooled"]["acc"] < hi
    d = t["elrea"]["vs_base"]
    assert np.isclose(d["diff"], (flat("elrea") - flat("base")).mean()) and d["ci"][0] > 0  # never worse
    assert t["base_continued"]["vs_base"] == {"diff": 0.0, "ci": (0.0, 0.0)}  # identical: paired
    md = pooled_markdown(t)
    assert md.splitlines()[0] == "| method | seed 0 | seed 1 | seed 2 | pooled (n=210) | vs M+Q_base | vs continued |"
    sources = {s: ["a" if i % 3 else "b" for i in range(len(runs[s]["base"]))] for s in runs}
    by = pooled_by_source(runs, sources)
    for src in ("a", "b"):
        items = [(s, i) for s in runs for i, x in enumerate(sources[s]) if x == src]
        assert by[src]["n"] == len(items)
        assert np.isclose(by[src]["elrea"], np.mean([runs[s]["elrea"][i] for s, i in items]))
    assert by["a"]["n"] + by["b"]["n"] == 210
    header = "| source | n | M+Q_base | ELREA | M+Q_base continued (compute-matched) |"
    assert pooled_by_source_markdown(by).splitlines()[0] == header
    runs[1].pop("elrea")
    assert "elrea" not in pooled_table(runs, resamples=0)  # not in every seed
