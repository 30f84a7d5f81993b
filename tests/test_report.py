"""The evaluation report, the train stage's loss logs and the MoE-merging / top-k baselines, over the
ONE shared smoke run (tests/conftest.py::smoke_run)."""

import base64
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow

FIGURES = {"accuracy", "vs_base", "clusters_by_source", "feature_map", "routing_weights", "training_loss"}


def test_eval_stage_writes_the_report_with_every_figure(smoke_run):
    ev = smoke_run.root / "eval"
    assert {p.stem for p in (ev / "figures").glob("*.png")} == FIGURES
    md = (ev / "report.md").read_text()
    for name in FIGURES:
        assert f"(figures/{name}.png)" in md
    assert "ELREA" in md and "M+Q_base on the micro average" in md and "No training loss log" not in md
    html = (ev / "report.html").read_text()
    images = html.split("data:image/png;base64,")[1:]
    assert len(images) == len(FIGURES)
    for img in images:  # embedded, so the page needs no other file
        assert base64.b64decode(img.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    w = pq.read_table(ev / "weights.parquet")
    assert w.num_rows == pq.read_metadata(smoke_run.data_file("test")).num_rows
    # Why it wins or loses: every expert decoded alone, scored on its routed cluster's items.
    metrics = json.loads((ev / "metrics.json").read_text())
    C = metrics["clusters"]["num_clusters"]
    spec = metrics["specialisation"]
    assert [o["expert"] for o in spec["own"]] == [f"expert-{c:02d}" for c in range(C)]
    assert sum(row["n"] for row in spec["clusters"]) == w.num_rows
    preds = pq.read_table(ev / "predictions.parquet").column_names
    assert all(f"score_alone:expert-{c:02d}" in preds for c in range(C))
    assert 0.0 <= metrics["routing_spread"]["entropy_mean"] <= 1.0
    assert "## Why it wins or loses" in md and "| routed cluster | n | M+Q_base |" in md
    assert "Against the compute-matched control" in md and "more optimiser steps on the whole mix" in md


def test_train_stage_persists_loss_logs(smoke_run):
    root = smoke_run.root
    base = json.loads((root / "adapters" / "base" / "train_log.json").read_text())
    steps = [r["step"] for r in base["log"]]
    assert steps == sorted(steps) and steps[-1] == base["total_steps"]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in base["log"])
    C = json.loads((root / "clusters" / "report.json").read_text())["num_clusters"]
    for c in range(C):
        log = json.loads((root / "adapters" / "experts" / f"expert-{c:02d}" / "train_log.json").read_text())
        assert log["log"] and log["log"][-1]["step"] == log["total_steps"]


def test_report_script_rebuilds_from_artifacts(copy_of_smoke, capsys):
    import importlib.util
    import shutil

    from conftest import ROOT

    ev = copy_of_smoke / "eval"
    shutil.rmtree(ev / "figures")
    (ev / "report.md").unlink()
    (ev / "report.html").unlink()
    spec = importlib.util.spec_from_file_location("report_job", ROOT / "jobs" / "report.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--run-dir", str(copy_of_smoke)]) == 0
    assert {p.stem for p in (ev / "figures").glob("*.png")} == FIGURES
    assert "| M+Q_base |" in (ev / "report.md").read_text()
    assert job.main(["--run-dir", str(copy_of_smoke / "nowhere")]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err


def _mapper(smoke_run, methods):
    from elrea_ray.stages.evaluate import EvalMapper

    bundle = json.loads(smoke_run.bundle.read_text())
    adapters = {n: str(smoke_run.root / p) for n, p in bundle["adapters"].items()}
    return EvalMapper(bundle["model"], adapters, methods, max_new_tokens=4, use_gpu=False), adapters


def test_moe_merge_averages_the_lora_matrices(smoke_run):
    from elrea_ray.merging import merge_adapters, normalized_alphas
    from elrea_ray.model import lora_parameters

    m, adapters = _mapper(smoke_run, ["base"])
    names = list(adapters)
    alphas = normalized_alphas(np.arange(1, len(names) + 1, dtype=float))
    merge_adapters(m.model, names, alphas.tolist(), "merged")
    layer = next(mod for _, mod in m.model.named_modules() if hasattr(mod, "lora_A") and "merged" in mod.lora_A)
    delta = lambda n: layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight  # noqa: E731
    s = layer.scaling[names[0]]
    A = sum(a * layer.lora_A[n].weight for a, n in zip(alphas, names))
    B = sum(a * layer.lora_B[n].weight for a, n in zip(alphas, names))
    # paper: A and B each averaged with alpha, at the adapters' common scale
    assert torch.allclose(delta("merged"), s * B @ A, atol=1e-6)
    merge_adapters(m.model, names, [1.0] + [0.0] * (len(names) - 1), "merged")  # one-hot = that adapter
    assert torch.allclose(delta("merged"), delta(names[0]), atol=1e-6)
    assert len(lora_parameters(m.model)) > 0


def test_eval_mapper_moe_merge_one_hot_equals_base_and_top_k_weights(smoke_run):
    from elrea_ray.config import load_config
    from elrea_ray.stages.evaluate import routing_weights
    from elrea_ray.stages.gradients import read_features

    test = pq.read_table(smoke_run.data_file("test")).to_pylist()[:3]
    m, adapters = _mapper(smoke_run, ["base", "moe_merge"])
    A = len(adapters)
    onehot = np.zeros((len(test), A))
    onehot[:, 0] = 1.0
    batch = {
        k: np.array([r[k] for r in test], dtype=object) for k in ("example_id", "source", "prompt", "answer", "meta")
    }
    batch["w_moe_merge"] = onehot
    out = m(batch)
    assert list(out["pred_moe_merge"]) == list(out["pred_base"])
    assert "__merged__" not in m.model.peft_config  # dropped after each prompt

    cfg = load_config(smoke_run.root / "config.yaml")
    _, _, X = read_features(smoke_run.gradient_dir("test"))
    w = routing_weights(cfg, smoke_run, X, ("top1", "top2", "top99", "moe_merge", "uniform"))
    assert ((w["top1"][:, 1:] > 0).sum(axis=1) == 1).all()
    assert ((w["top2"][:, 1:] > 0).sum(axis=1) == min(2, A - 1)).all()
    np.testing.assert_array_equal(w["top99"], w["elrea"])  # k >= C is all experts
    np.testing.assert_array_equal(w["moe_merge"], w["elrea"])
    np.testing.assert_array_equal(w["top1"][:, 0], w["elrea"][:, 0])  # base kept with its weight


def test_trained_baselines_stage_and_their_methods(copy_of_smoke, ray_local):
    """Random Cluster, M+Q_dataset and Instruction Embedding behind eval.methods: a `baselines`
    stage trains their adapters, the earlier stages are reused, and the eval decodes them."""
    from conftest import smoke_config

    from elrea_ray.pipeline import run_pipeline

    methods = "eval.methods=[base,elrea,random_clusters,dataset,embedding,pca]"
    before = json.loads((copy_of_smoke / "manifest.json").read_text())["stages"]
    run = run_pipeline(smoke_config(copy_of_smoke, methods, "clustering.pca_dim=8"))
    stages = json.loads(run.manifest.read_text())["stages"]
    for s in ("data", "base", "gradients", "clusters", "experts"):
        assert stages[s]["started"] == before[s]["started"], f"stage {s} was rerun"
    info = json.loads((run.stage_dir("baselines") / "baselines.json").read_text())
    clusters = json.loads(run.clusters_file("report.json").read_text())
    assert len(info["groups"]["random_clusters"]) == clusters["num_clusters"]
    sources = sorted({r["source"] for r in pq.read_table(run.data_file("train")).to_pylist()})
    assert sorted(info["groups"]["dataset"]) == sources
    for name, rel in info["adapters"].items():
        assert (run.stage_dir("baselines") / rel / "adapter_config.json").exists(), name
    # Random clusters have ELREA's sizes but other members
    a = pq.read_table(run.clusters_file("assignments.parquet")).to_pylist()
    log = json.loads((run.stage_dir("baselines") / "random-00" / "train_log.json").read_text())
    assert log["log"]
    m = json.loads(run.eval_file("metrics.json").read_text())
    assert set(m["methods"]) == {"base", "elrea", "random_clusters", "dataset", "embedding", "pca"}
    assert m["embedding_clusters"]["num_clusters"] >= 1
    # PCA ablation: its own clusters (of 8-d reduced gradients here), one expert each, routed as ELREA
    assert m["pca_clusters"]["pca_dim"] == 8 and len(info["groups"]["pca"]) == m["pca_clusters"]["num_clusters"]
    assert sum(m["pca_clusters"]["sizes"]) == len(a)
    w = pq.read_table(run.eval_file("weights.parquet")).to_pylist()
    test_src = [r["source"] for r in w]
    for r, src in zip(w, test_src):  # M+Q_dataset: exactly its own source's adapter
        names = ["base", *info["groups"]["dataset"].values()]
        assert names[int(np.argmax(r["w_dataset"]))] == info["groups"]["dataset"][src]
        assert sum(r["w_dataset"]) == 1.0
        assert r["w_random_clusters"] == [1.0] * (1 + clusters["num_clusters"])
        assert len(r["w_pca"]) == 1 + m["pca_clusters"]["num_clusters"] and np.isclose(sum(r["w_pca"][1:]), 1.0)
    assert len(a) == sum(clusters["sizes"])


def test_seeds_run_in_their_own_folders_and_pool_from_predictions(smoke_run, copy_of_smoke, tmp_path):
    import pyarrow as pa
    from conftest import smoke_config

    from elrea_ray.artifacts import RunDir
    from elrea_ray.seeds import seed_config, write_pooled

    cfg = smoke_config(tmp_path / "seeds", "eval.seeds=[0,7]")
    one = seed_config(cfg, 7)
    assert one.run.seed == 7 and one.eval.seeds == () and one.run.run_dir == str(tmp_path / "seeds" / "seed-7")
    remote = seed_config(smoke_config("s3://bucket/runs/x", "eval.seeds=[1]"), 1)
    assert remote.run.run_dir == "s3://bucket/runs/x/seed-1"
    # Seed 7 plays a run whose ELREA got every item right: the pooled table reads the predictions.
    preds = pq.read_table(copy_of_smoke / "eval" / "predictions.parquet")
    ones = pa.array(np.ones(preds.num_rows))
    pq.write_table(
        preds.set_column(preds.column_names.index("score_elrea"), "score_elrea", ones),
        copy_of_smoke / "eval" / "predictions.parquet",
    )
    out = write_pooled(cfg, {0: smoke_run, 7: RunDir.at(copy_of_smoke)})
    pooled = json.loads((out.parent / "pooled.json").read_text())
    assert pooled["seeds"] == [0, 7] and out.read_text().startswith("# ELREA over 2 seeds (0, 7)")
    e = pooled["methods"]["elrea"]
    base0 = float(np.mean(pq.read_table(smoke_run.eval_file("predictions.parquet")).column("score_elrea")))
    assert e["per_seed"] == {"0": base0, "7": 1.0}
    assert np.isclose(e["pooled"]["acc"], (base0 + 1.0) / 2)
    assert "vs_continued" in e and "| seed 0 | seed 7 |" in out.read_text()
    n_items = sum(v["n"] for v in pooled["by_source"].values())
    assert n_items == 2 * preds.num_rows and "## Per source" in out.read_text()
