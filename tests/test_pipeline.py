"""Integration tests over the ONE shared smoke run (tests/conftest.py::smoke_run), plus the few
that rerun stages in a private copy of it."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import smoke_config

pytestmark = pytest.mark.slow

METHODS = ("backbone", "base", "elrea", "uniform", "top1", "base_continued")


def _files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_smoke_run_writes_exactly_the_expected_artifacts(smoke_run):
    root = smoke_run.root
    files = {f for f in _files(root) if not f.startswith("ray/")}
    report = json.loads((root / "clusters" / "report.json").read_text())
    C = report["num_clusters"]
    expected = {
        "manifest.json",
        "config.yaml",
        "bundle.json",
        "data/train.parquet",
        "data/validation.parquet",
        "data/test.parquet",
        "data/counts.json",
        "clusters/centroids.safetensors",
        "clusters/assignments.parquet",
        "clusters/report.json",
        "eval/predictions.parquet",
        "eval/metrics.json",
        "eval/results.md",
        "eval/weights.parquet",
        "eval/report.md",
        "eval/report.html",
        "adapters/base/train_log.json",
    }
    expected |= {
        f"eval/figures/{n}.png"
        for n in ("accuracy", "vs_base", "clusters_by_source", "feature_map", "routing_weights", "training_loss")
    }
    for e in (1, 2):
        expected |= {
            f"adapters/base/epoch-{e}/{n}"
            for n in (
                "adapter_config.json",
                "adapter_model.safetensors",
                "adam_state.safetensors",
                "optimizer_state.json",
                "parameter_layout.json",
            )
        }
    expected |= {f"adapters/base/final/{n}" for n in ("adapter_config.json", "adapter_model.safetensors")}
    expected |= {
        f"adapters/experts/expert-{c:02d}/{n}"
        for c in range(C)
        for n in ("adapter_config.json", "adapter_model.safetensors", "train_log.json")
    }
    # the compute-matched control (eval.methods has base_continued by default)
    expected |= {"adapters/baselines/baselines.json"}
    expected |= {
        f"adapters/baselines/continued/{n}"
        for n in ("adapter_config.json", "adapter_model.safetensors", "train_log.json")
    }
    stage_markers = {
        f"{d}/_COMPLETE"
        for d in ("data", "adapters/base", "gradients", "clusters", "adapters/experts", "adapters/baselines", "eval")
    }
    # experiment tracking (tensorboard by default): one marker per logged item and stage key, and
    # one folder of event files per adapter and for the evaluation
    keys = json.loads((root / "manifest.json").read_text())["keys"]
    experts = [f"experts-expert-{c:02d}" for c in range(C)]
    expected |= {
        f"tracking/logged/tensorboard-train-base-{keys['base']}",
        f"tracking/logged/tensorboard-eval-{keys['eval']}",
    }
    expected |= {f"tracking/logged/tensorboard-train-{e}-{keys['experts']}" for e in experts}
    expected |= {f"tracking/logged/tensorboard-train-baselines-continued-{keys['baselines']}"}
    events = {f for f in files if f.startswith("tracking/tensorboard/")}
    assert {f.split("/")[2] for f in events} == {"base", "eval", *experts, "baselines-continued"}
    assert all(f.split("/")[3].startswith("events.out.tfevents.") for f in events)
    expected |= events
    got = {f for f in files if "README.md" not in f and not (f.startswith("gradients/") and f != "gradients/_COMPLETE")}
    assert expected | stage_markers <= got, sorted((expected | stage_markers) - got)
    extra = got - expected - stage_markers
    assert not extra, sorted(extra)
    for split in ("train", "validation", "test"):
        assert any(f.startswith(f"gradients/{split}/") and f.endswith(".parquet") for f in files)
    assert not any(".partial" in f for f in files)


def test_features_cover_every_example_once_and_are_unit_norm(smoke_run):
    import numpy as np

    from elrea_ray.stages.gradients import read_features

    for split in ("train", "test"):
        ids, _, X = read_features(smoke_run.gradient_dir(split))
        data_ids = pq.read_table(smoke_run.data_file(split)).column("example_id").to_pylist()
        assert sorted(ids) == sorted(data_ids) and len(set(ids)) == len(ids)
        assert read_features(smoke_run.gradient_dir(split), order=data_ids)[0] == data_ids
        assert X.shape[1] == 512
        assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-4)


def test_gradient_split_streams_in_blocks_over_an_actor_pool(smoke_run, tmp_path, monkeypatch):
    """A split is many Ray Data blocks (one actor task each), not the one block Ray's Parquet
    reader makes of a file: with one shard per block the shards show the blocks. Two actors, and
    every example's feature equals the shared run's (whose batches were 4x larger, so to float
    tolerance); read_features puts them in data-file order."""
    import math

    import numpy as np

    from elrea_ray.stages import gradients
    from elrea_ray.stages.common import StageContext
    from elrea_ray.stages.gradients import read_features

    monkeypatch.setattr(gradients, "SHARD_BYTES", 1)  # shard_rows -> one block per file
    cfg = smoke_config(smoke_run.root, "gradients.batch_size=2", "gradients.num_actors=2")
    out = tmp_path / "gradients"
    out.mkdir()
    info = gradients.run(StageContext(cfg, smoke_run, {}, out))  # reads the smoke run, writes only into tmp_path
    block = info["reproducibility"]["block_rows"]
    assert block == 2 * 4 * gradients.BATCHES_PER_BLOCK
    for split in ("train", "validation", "test"):
        rows = info["rows"][split]
        shards = sorted((out / split).glob("*.parquet"))
        assert len(shards) == math.ceil(rows / block), (split, rows, [s.name for s in shards])
        assert [pq.read_metadata(s).num_rows for s in shards[:-1]] == [block] * (len(shards) - 1)
        data_ids = pq.read_table(smoke_run.data_file(split)).column("example_id").to_pylist()
        ids, _, X = read_features(out / split, order=data_ids)
        assert ids == data_ids
        _, _, ref = read_features(smoke_run.gradient_dir(split), order=data_ids)
        assert np.allclose(X, ref, atol=1e-5), split
    assert info["rows"]["train"] > block  # the train split really is several blocks


def test_read_features_in_a_given_order_names_what_does_not_match(tmp_path):
    import numpy as np
    import pyarrow as pa

    from elrea_ray.artifacts import ArtifactError
    from elrea_ray.stages.gradients import read_features

    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    pq.write_table(
        pa.table(
            {
                "example_id": ["b", "c", "a"],
                "source": ["s1", "s2", "s3"],
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 4),
            }
        ),
        tmp_path / "part-0.parquet",
    )
    ids, sources, got = read_features(tmp_path, order=["a", "b", "c"])
    assert ids == ["a", "b", "c"] and sources == ["s3", "s1", "s2"] and np.array_equal(got, X[[2, 0, 1]])
    with pytest.raises(ArtifactError, match="3 rows .* for 4 examples; missing e.g. d"):
        read_features(tmp_path, order=["a", "b", "c", "d"])
    with pytest.raises(ArtifactError, match="3 rows .* for 2 examples"):
        read_features(tmp_path, order=["a", "b"])


def test_feature_shards_hold_whole_blocks_of_about_64_mib():
    from elrea_ray.stages.gradients import shard_rows

    assert shard_rows(8192, 64) == 2048 and shard_rows(512, 64) == 32768
    assert shard_rows(10**7, 64) == 64  # never less than one block
    assert shard_rows(1000, 48) % 48 == 0


def test_metrics_have_every_method_with_n_and_intervals(smoke_run):
    m = json.loads((smoke_run.root / "eval" / "metrics.json").read_text())
    assert set(m["methods"]) == set(METHODS)
    n_test = pq.read_metadata(smoke_run.data_file("test")).num_rows
    for method in METHODS:
        micro = m["methods"][method]["micro"]
        assert micro["n"] == n_test and 0.0 <= micro["acc"] <= 1.0
        lo, hi = micro["ci"]
        assert lo <= micro["acc"] <= hi
    assert 0.0 <= m["own_source_routing"]["rate"] <= 1.0
    assert "nmi" in m["clusters"]
    text = (smoke_run.root / "eval" / "results.md").read_text()
    assert "ELREA" in text and "M+Q_base" in text and "NMI" in text


def test_base_continued_takes_as_many_optimiser_steps_as_the_experts_together(smoke_run):
    """The compute-matched control: Q_base trained on the whole mix for the experts' total steps
    (epochs repeat, the last one cut), from the final base adapter, with the experts' lr."""
    from elrea_ray.data import length_bucketed_batches

    experts = sorted((smoke_run.stage_dir("experts")).glob("expert-*/train_log.json"))
    logs = [json.loads(f.read_text()) for f in experts]
    steps = sum(g["total_steps"] for g in logs)
    cont = json.loads((smoke_run.stage_dir("baselines") / "continued" / "train_log.json").read_text())
    n = pq.read_metadata(smoke_run.data_file("train")).num_rows
    assert cont["examples"] == n and cont["total_steps"] == steps
    assert cont["log"][-1]["step"] == steps and cont["log"][-1]["lr"] == 0.0  # the schedule ended there
    per_epoch = -(-n // 8)  # smoke: batch 8
    assert steps > per_epoch  # more than one pass over the mix, so the repeat-and-cut path ran
    # rows seen: whole epochs, then the first batches of the next epoch's order (seed + epoch)
    # (batch sizes depend only on n and the batch: every batch is full but an epoch's last)
    rest = length_bucketed_batches([0] * n, 8, seed=0)[: steps - per_epoch]
    assert cont["examples_seen"] == n + sum(len(b) for b in rest)
    info = json.loads((smoke_run.stage_dir("baselines") / "baselines.json").read_text())
    assert info["continued"]["steps"] == steps == info["continued"]["continued_steps"]
    assert info["continued"]["examples_seen"] == sum(g["examples_seen"] for g in logs) == n  # experts: 1 epoch
    report = (smoke_run.root / "eval" / "report.md").read_text()
    assert f"trained {steps} more optimiser steps" in report and "Against the compute-matched control" in report


def test_bundle_lists_everything_serving_needs(smoke_run):
    b = json.loads(smoke_run.bundle.read_text())
    assert b["format_version"] == 1
    assert set(b["adapters"]) == {"base"} | {f"expert-{c:02d}" for c in range(b["num_clusters"])}
    for p in list(b["adapters"].values()) + b["epoch_checkpoints"] + [b["centroids"]]:
        assert (smoke_run.root / p).exists(), p
    assert b["projector"]["kind"] == "countsketch" and b["projector"]["d_proj"] == 512
    assert b["parameter_layout"] and b["projector"]["d_in"] == sum(
        int(__import__("math").prod(s)) for _, s in b["parameter_layout"]
    )


def test_rerun_skips_finished_stages(smoke_run):
    from elrea_ray.pipeline import run_pipeline

    before = json.loads(smoke_run.manifest.read_text())["stages"]
    lines = []
    run_pipeline(smoke_config(smoke_run.root), log=lines.append)
    after = json.loads(smoke_run.manifest.read_text())["stages"]
    assert {s: v["started"] for s, v in before.items()} == {s: v["started"] for s, v in after.items()}
    assert sum("skipping" in ln for ln in lines) == 7


def test_changed_expert_setting_reruns_only_experts_their_control_and_eval(copy_of_smoke):
    from elrea_ray.pipeline import run_pipeline

    lines = []
    run_pipeline(smoke_config(copy_of_smoke, "experts.lr=3e-3"), log=lines.append)
    ran = {ln.split("]")[0].strip("[") for ln in lines if "running (key" in ln}
    assert ran == {"experts", "baselines", "eval"}  # base_continued uses the experts' recipe and steps


def test_resource_settings_do_not_change_stage_keys(tmp_path):
    from elrea_ray.pipeline import stage_keys

    a = stage_keys(smoke_config(tmp_path))
    b = stage_keys(
        smoke_config(
            tmp_path,
            "train.cpus_per_worker=2",
            "gradients.num_actors=2",
            "experts.max_concurrent=1",
            "eval.cpus_per_actor=0.5",
        )
    )
    assert a == b
    c = stage_keys(smoke_config(tmp_path, "gradients.d_proj=256"))
    assert [s for s in a if a[s] != c[s]] == ["gradients", "clusters", "experts", "baselines", "eval"]


def test_the_router_stage_and_its_fields_change_only_the_keys_of_runs_that_train_it(tmp_path):
    from elrea_ray.pipeline import stage_keys

    a = stage_keys(smoke_config(tmp_path))
    assert "router" not in a  # gradient routing: no router stage
    assert stage_keys(smoke_config(tmp_path, "routing.distill_epochs=5", "routing.distill_hidden=8")) == a
    d = stage_keys(smoke_config(tmp_path, "routing.method=distilled"))
    assert [s for s in d if a.get(s) != d[s]] == ["router", "eval"]
    assert stage_keys(smoke_config(tmp_path, "eval.methods=[elrea,elrea_distilled]"))["router"] == d["router"]
    e = stage_keys(smoke_config(tmp_path, "routing.method=distilled", "routing.distill_epochs=5"))
    assert [s for s in d if d[s] != e[s]] == ["router", "eval"]
    f = stage_keys(smoke_config(tmp_path, "routing.method=distilled", "routing.top_k=1"))
    assert [s for s in d if d[s] != f[s]] == ["eval"]  # top_k applies to either router's weights afterwards


def test_distilled_router_trains_evaluates_reports_and_serves(copy_of_smoke):
    """routing.method=distilled with elrea_distilled evaluated: only the router stage and eval run;
    the eval uses the router's weights, the report has its section, and the served bundle routes
    with it: the weights equal DistilledRouter.predict on the prompts' pooled hidden states."""
    import numpy as np

    from elrea_ray.artifacts import RunDir
    from elrea_ray.bundle import BundleError
    from elrea_ray.data import instruction_ids
    from elrea_ray.decoding import GenRequest
    from elrea_ray.distill import DistilledRouter, pooled_hidden_states
    from elrea_ray.evaluate import read_weights
    from elrea_ray.model import load_adapters
    from elrea_ray.pipeline import run_pipeline
    from elrea_ray.routing import sparsify
    from elrea_ray.serving import Engine

    lines = []
    methods = ",".join((*METHODS, "elrea_distilled"))
    run = run_pipeline(
        smoke_config(copy_of_smoke, "routing.method=distilled", f"eval.methods=[{methods}]"), log=lines.append
    )
    assert {ln.split("]")[0].strip("[") for ln in lines if "running (key" in ln} == {"router", "eval"}
    folder = run.stage_dir("router")
    assert {p.name for p in folder.iterdir()} == {
        "router.json",
        "router.safetensors",
        "weights.parquet",
        "router_eval.json",
        "_COMPLETE",
    }
    ev = json.loads((folder / "router_eval.json").read_text())
    n_test = pq.read_metadata(run.data_file("test")).num_rows
    assert ev["train"]["n"] == pq.read_metadata(run.data_file("train")).num_rows and ev["test"]["n"] == n_test
    assert all(0 <= ev[s]["top1_agreement"] <= 1 and ev[s]["mean_abs_base_diff"] >= 0 for s in ("train", "test"))
    assert ev["seconds_per_prompt"]["gradient"] > 0 and ev["seconds_per_prompt"]["distilled"] > 0
    _, stage_w = read_weights(folder / "weights.parquet")
    _, eval_w = read_weights(run.stage_dir("eval") / "weights.parquet")
    np.testing.assert_array_equal(eval_w["elrea_distilled"], stage_w["distilled"])  # smoke: top_k unset
    np.testing.assert_allclose(stage_w["gradient"], eval_w["elrea"], atol=1e-9)
    metrics = json.loads((run.stage_dir("eval") / "metrics.json").read_text())
    assert (
        metrics["methods"]["elrea_distilled"]["micro"]["n"] == n_test
        and "vs_base" in metrics["methods"]["elrea_distilled"]
    )
    assert set(metrics["distilled_vs_elrea"]) == {"diff", "ci"}
    assert "| ELREA, distilled router |" in (run.stage_dir("eval") / "results.md").read_text()
    report = (run.stage_dir("eval") / "report.md").read_text()
    assert "## Distilled router" in report and f"{100 * ev['test']['top1_agreement']:.1f}% of them" in report
    assert "distilled minus gradient" in report and "Routing cost per prompt" in report

    bundle = json.loads(run.bundle.read_text())
    assert bundle["router"] == "router" and bundle["routing"]["method"] == "distilled"
    engine = Engine(RunDir.at(copy_of_smoke).root)
    test = pq.read_table(run.data_file("test")).to_pylist()
    ids = [instruction_ids(engine.tok, r["prompt"], engine.max_context) for r in test]
    served = engine.route(ids, [None] * len(ids))
    base = load_adapters(engine.model_cfg, {"base": str(run.base_epoch(2))})
    ew, bw = DistilledRouter.load(folder).predict(pooled_hidden_states(base, ids, engine.tok.pad_token_id))
    np.testing.assert_allclose(served[:, 1:], ew, atol=1e-6)
    np.testing.assert_allclose(served[:, 0], bw, atol=1e-6)
    np.testing.assert_allclose(served, stage_w["distilled"], atol=1e-5)  # the stage's Ray task, the same
    top1 = engine.route(ids, [1] * len(ids))  # a request's top_k applies to the distilled weights
    want_e, want_b = sparsify(served[:, 1:], served[:, 0], top_k=1)
    np.testing.assert_array_equal(top1[:, 1:], want_e)
    np.testing.assert_array_equal(top1[:, 0], want_b)
    forced = engine._weights([GenRequest(prompt_ids=ids[0], adapter="expert-00"), GenRequest(prompt_ids=ids[0])])
    assert forced[0].tolist() == [0.0, 1.0] + [0.0] * (forced.shape[1] - 2)  # a forced adapter, as before
    np.testing.assert_allclose(forced[1], served[0], atol=1e-5)  # alone vs in a batch: to rounding
    # the app's routing_method overrides the bundle's: gradient routing on the same bundle
    by_gradient = Engine(RunDir.at(copy_of_smoke).root, routing_method="gradient")
    assert by_gradient.router is None
    np.testing.assert_allclose(by_gradient.route(ids, [None] * len(ids)), stage_w["gradient"], atol=1e-5)
    with pytest.raises(BundleError, match="routing_method must be one of gradient, distilled, got 'knn'"):
        Engine(RunDir.at(copy_of_smoke).root, routing_method="knn")

    from elrea_ray.export import export_run

    out = export_run(copy_of_smoke, copy_of_smoke.parent / "export")  # the PEFT export carries the router
    assert json.loads((out / "routing" / "routing.json").read_text())["router"] == "routing/router"
    again = DistilledRouter.load(out / "routing" / "router").predict(
        pooled_hidden_states(base, ids, engine.tok.pad_token_id)
    )
    np.testing.assert_array_equal(again[0], ew)
