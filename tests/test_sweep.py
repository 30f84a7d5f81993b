"""The Tune sweep (elrea_ray/sweep.py): search space and resource checks without Ray, the
build-once locking of shared levels with threads, and one small real sweep whose trials reuse the
shared stage 1-2 outputs of the session's smoke run."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import SMOKE

from elrea_ray import sweep
from elrea_ray.artifacts import ArtifactError, RunDir
from elrea_ray.config import ConfigError, load_config
from elrea_ray.pipeline import stage_keys


def test_grid_points_and_trial_configs(tmp_path):
    cfg = load_config(SMOKE, ["sweep.initial_clusters=[2,4]", "sweep.temperature=[0.5,1,2]", "sweep.top_k=[1,null]"])
    points = sweep.grid_points(cfg)
    assert len(points) == 12 and points[1] == {
        "clustering.initial_clusters": 2,
        "routing.temperature": 0.5,
        "routing.top_k": None,
    }
    trial = sweep.with_params(cfg.to_dict(), points[-1])
    assert (trial.clustering.initial_clusters, trial.routing.temperature, trial.routing.top_k) == (4, 2.0, None)


def test_only_stage_1_2_settings_change_the_shared_upstream_key(tmp_path):
    cfg = load_config(SMOKE)
    base = cfg.to_dict()
    key = lambda p: stage_keys(sweep.with_params(base, p))  # noqa: E731
    a, b = (
        key({"routing.temperature": 0.5}),
        key({"routing.temperature": 2.0, "clustering.initial_clusters": 5, "experts.lr": 1e-4}),
    )
    assert a["gradients"] == b["gradients"] and a["experts"] != b["experts"]
    assert key({"train.lr": 1e-4})["gradients"] != a["gradients"]


def test_bad_sweep_settings_fail_before_anything_runs():
    with pytest.raises(ConfigError, match="sweep.temperature"):
        load_config(SMOKE, ["sweep.temperature=[1,-2]"])
    with pytest.raises(ConfigError, match="nothing to search"):
        sweep.check_space(load_config(SMOKE, ["sweep.initial_clusters=[]", "sweep.temperature=[]"]))


def test_concurrent_trials_from_resources_and_infeasible_is_named():
    cfg = load_config(SMOKE)  # experts: 2 trainers x 1 worker x 1 CPU at a trial's peak
    assert sweep.trial_demand(cfg) == {"CPU": 2.0, "GPU": 0.0}
    assert sweep.max_concurrent_trials(cfg, {"CPU": 4}) == 2
    assert sweep.max_concurrent_trials(cfg, {"CPU": 9}) == 4
    capped = load_config(SMOKE, ["sweep.max_concurrent_trials=1"])
    assert sweep.max_concurrent_trials(capped, {"CPU": 9}) == 1
    with pytest.raises(RuntimeError, match="needs 2 CPU .* has 1 CPU"):
        sweep.max_concurrent_trials(cfg, {"CPU": 1})
    gpu = load_config(SMOKE, ["experts.use_gpu=true"])
    with pytest.raises(RuntimeError, match="needs 2 GPU .* has 0 GPU"):
        sweep.max_concurrent_trials(gpu, {"CPU": 8})


def test_trials_reaching_a_shared_level_together_build_it_once(tmp_path):
    run = RunDir.at(tmp_path / "level")
    calls, ran = [], []

    def build(out):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough that the other thread arrives while this one builds
        (out / "x.txt").write_text("x")

    def trial():
        with sweep.building(run):
            ran.append(run.run_stage("data", "k1", build, log=lambda s: None)[1])

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(ran) == [False, False, True]


def test_links_point_at_the_real_folders(tmp_path):
    src = RunDir.at(tmp_path / "a")
    src.stage_dir("data").mkdir(parents=True)
    mid, dst = RunDir.at(tmp_path / "b"), RunDir.at(tmp_path / "c")
    sweep.link_stages(mid, src, ("data",))
    sweep.link_stages(dst, mid, ("data",))  # a link to a link resolves to the real folder
    assert dst.stage_dir("data").resolve() == src.stage_dir("data")
    assert not dst.stage_dir("data").readlink().is_absolute()


@pytest.mark.slow
def test_sweep_reuses_shared_stages_and_its_best_config_runs(smoke_run, tmp_path):
    from elrea_ray.pipeline import run_pipeline

    root = tmp_path / "sweep"
    cfg = load_config(SMOKE, [f"sweep.dir={root}", "sweep.initial_clusters=[]", "sweep.temperature=[0.5,2.0]"])
    keys = stage_keys(cfg)
    # Stages 0-2 with these settings were built by the session's smoke run: seed the sweep's shared
    # upstream level with them (as `tune_sweep.py --from-run` does); no trial may build them again.
    up = root / "upstream" / keys["gradients"]
    assert sweep.seed_from_run(cfg, smoke_run.root, experts=False, log=lambda s: None) == [str(up)]
    assert sweep.seed_from_run(cfg, smoke_run.root, experts=False, log=lambda s: None) == []  # idempotent
    before = json.loads((smoke_run.root / "manifest.json").read_text())["stages"]

    out = sweep.run_sweep(cfg, log=lambda s: None)
    rows = out["rows"]
    assert len(rows) == 2 and {r["routing.temperature"] for r in rows} == {0.5, 2.0}
    # Both trials share the clustering/expert settings: exactly one of them built that level.
    assert sorted(r["built"] for r in rows) == ["clusters,experts,validation", "validation"]
    assert all(r["upstream_dir"] == str(up) for r in rows)
    after = json.loads((up / "manifest.json").read_text())["stages"]
    assert {s: after[s]["started"] for s in ("data", "base", "gradients")} == {
        s: before[s]["started"] for s in ("data", "base", "gradients")
    }
    for r in rows:
        assert 0.0 <= r["objective"] <= 1.0 and r["validation_n"] == 12  # 4 sources x 3 validation
        m = json.loads((Path(r["trial_dir"]) / "validation" / "metrics.json").read_text())
        assert m["split"] == "validation"

    csv_lines = (root / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "objective" in csv_lines[0]
    md = (root / "results.md").read_text()
    assert "validation split" in md and sum(ln.startswith("| ") for ln in md.splitlines()) == 3
    assert (root / "objective_vs_clusters.png").read_bytes()[:4] == b"\x89PNG"

    best = load_config(out["best"])
    assert best.run.run_dir == rows[0]["trial_dir"]
    assert best.routing.temperature == rows[0]["routing.temperature"]
    assert "sweep" not in yaml.safe_load((root / "best.yaml").read_text())
    lines = []
    run_pipeline(best, log=lines.append)  # the best config runs: only the compute-matched control
    ran = {ln.split("]")[0].strip("[") for ln in lines if "running (key" in ln}  # and the test eval are new
    assert ran == {"baselines", "eval"}
    assert json.loads((Path(best.run.run_dir) / "eval" / "metrics.json").read_text())["methods"]


def test_seed_from_run_fills_matching_levels_and_refuses_a_foreign_run(smoke_run, tmp_path):
    cfg = load_config(
        SMOKE, [f"sweep.dir={tmp_path / 'sweep'}", "sweep.initial_clusters=[]", "sweep.temperature=[0.5,2.0]"]
    )
    keys = stage_keys(cfg)
    seeded = sweep.seed_from_run(cfg, smoke_run.root, log=lambda s: None)
    up, ex = RunDir.at(seeded[0]), RunDir.at(seeded[1])
    assert (up.root.name, ex.root.name) == (keys["gradients"], keys["experts"])
    for stage in ("data", "base", "gradients"):
        assert up.completed_key(stage) == keys[stage]
        assert ex.stage_dir(stage).is_symlink() and ex.stage_dir(stage).resolve() == up.stage_dir(stage)
    assert ex.completed_key("clusters") == keys["clusters"] and ex.completed_key("experts") == keys["experts"]
    # hard links where the filesystem allows (tmp_path and the smoke run share one here)
    f = next(p for p in ex.stage_dir("experts").rglob("*.safetensors"))
    assert os.path.samefile(f, smoke_run.root / f.relative_to(ex.root))
    assert json.loads(up.manifest.read_text())["stages"]["base"]["seeded_from"] == str(smoke_run.root)

    other = load_config(SMOKE, [f"sweep.dir={tmp_path / 'sweep2'}", "sweep.temperature=[1.0]", "train.lr=3e-3"])
    with pytest.raises(ArtifactError, match="matches no trial: its gradients stage has key"):
        sweep.seed_from_run(other, smoke_run.root, log=lambda s: None)
    with pytest.raises(ArtifactError, match="matches no trial: its stages data, base, gradients are not complete"):
        sweep.seed_from_run(cfg, tmp_path, log=lambda s: None)
