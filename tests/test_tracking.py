"""Experiment tracking: TensorBoard event files read back with tensorboard's reader, MLflow runs
read back with mlflow.search_runs from a local file store."""

import json

import pytest

from elrea_ray.tracking import Tracker

LOG = {
    "name": "base",
    "steps_per_epoch": 3,
    "total_steps": 6,
    "log": [{"loss": 2.0 - 0.25 * s, "step": s, "epoch": 1 + (s > 3), "lr": 1e-3 * (6 - s) / 6} for s in range(1, 7)],
}
# eval/metrics.json's shape
METRICS = {
    "methods": {
        "elrea": {
            "micro": {"acc": 0.4, "n": 20, "ci": [0.2, 0.6]},
            "vs_base": {"diff": 0.05, "ci": [-0.1, 0.2]},
            "per_source": {"sums": {"acc": 0.5, "n": 10}, "words": {"acc": 0.3, "n": 10}},
        },
        "mq_base": {"micro": {"acc": 0.35, "n": 20, "ci": [0.15, 0.55]}},
    }
}


@pytest.fixture()
def run(tmp_path):
    root = tmp_path / "run"
    (root / "adapters" / "base").mkdir(parents=True)
    (root / "adapters" / "base" / "train_log.json").write_text(json.dumps(LOG))
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps(METRICS))
    (root / "eval" / "results.md").write_text("| method | accuracy |\n|---|---|\n| elrea | 40.0 |\n")
    return root


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the TensorBoard event files in `folder`: TFRecord framing
    (length, crc, Event proto, crc) decoded with the Event proto tensorboardX ships."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_loss_lr_and_the_eval_table_once(run):
    t = Tracker("tensorboard", run, "run")
    assert t.log_training("base", {"train": {"lr": 1e-3}}, run / "adapters" / "base" / "train_log.json")
    assert t.log_eval(run / "eval" / "metrics.json", [run / "eval" / "results.md"])
    got = _scalars(run / "tracking" / "tensorboard" / "base")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert got["train/loss"][-1][1] == pytest.approx(0.5) and got["train/lr"][0][1] == pytest.approx(1e-3 * 5 / 6)
    ev = _scalars(run / "tracking" / "tensorboard" / "eval")
    assert ev["eval/accuracy/elrea"][0][1] == pytest.approx(0.4)
    assert ev["eval/vs_base/elrea"][0][1] == pytest.approx(0.05)
    assert ev["eval/accuracy_by_source/elrea/words"][0][1] == pytest.approx(0.3)
    # a resumed run does not log a finished stage twice
    assert not Tracker("tensorboard", run, "run").log_training("base", {}, run / "adapters" / "base" / "train_log.json")


def _wandb_records(folder) -> list[dict]:
    """Every offline W&B run under `folder`, read from its run-<id>.wandb file: W&B's LevelDB-style
    log (a 7-byte header, then 32 KiB blocks of chunks: crc32, length, type 1 full / 2 first /
    3 middle / 4 last) of `Record` protos, decoded with the proto wandb ships."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for f in sorted(folder.rglob("run-*.wandb")):
        data, i, pending, records = f.read_bytes(), 7, b"", []
        while i + 7 <= len(data):
            left = 32768 - (i % 32768)
            if left < 7:  # a block's tail too short for a chunk header is padding
                i += left
                continue
            _, n, kind = struct.unpack("<IHB", data[i : i + 7])
            pending += data[i + 7 : i + 7 + n]
            i += 7 + n
            if kind in (1, 4):
                records.append(pb.Record.FromString(pending))
                pending = b""
        run = {"history": [], "summary": {}, "config": {}, "artifacts": []}
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(name=r.run.display_name, group=r.run.run_group)
                run["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
            elif kind == "history":
                run["history"].append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                )
            elif kind == "summary":
                run["summary"].update(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update}
                )
            elif kind == "artifact":
                run["artifacts"].append((r.artifact.type, sorted(e.path for e in r.artifact.manifest.contents)))
        runs.append(run)
    return runs


def test_wandb_runs_read_back_with_losses_and_the_eval_table(run, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # no server: the runs stay in <run>/tracking/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker("wandb", run, "run", project="elrea-test")
    assert t.log_training("base", {"train": {"lr": 1e-3}}, run / "adapters" / "base" / "train_log.json")
    assert t.log_eval(run / "eval" / "metrics.json", [run / "eval" / "results.md"])
    wandb.teardown()  # the W&B service writes a finished run's file out by the time it stops
    runs = {r["name"]: r for r in _wandb_records(run / "tracking" / "wandb")}
    assert set(runs) == {"base", "eval"} and {r["group"] for r in runs.values()} == {"run"}
    base = runs["base"]
    assert base["config"]["train"] == {"lr": 1e-3}
    assert [h["_step"] for h in base["history"]] == [1, 2, 3, 4, 5, 6]
    assert base["history"][-1]["train/loss"] == pytest.approx(0.5)
    assert runs["eval"]["summary"]["accuracy.elrea"] == pytest.approx(0.4)
    assert runs["eval"]["summary"]["vs_base.elrea"] == pytest.approx(0.05)
    assert runs["eval"]["artifacts"] == [("evaluation", ["metrics.json", "results.md"])]
    assert not Tracker("wandb", run, "run").log_training("base", {}, run / "adapters" / "base" / "train_log.json")


def test_mlflow_runs_read_back_with_losses_and_the_eval_table(run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a switch
    uri = (tmp_path / "mlruns").as_uri()
    t = Tracker("mlflow", run, "run-a", uri=uri, project="elrea-test")
    t.log_training("base", {"train": {"lr": 1e-3, "epochs": 2}}, run / "adapters" / "base" / "train_log.json")
    # a second Tracker (a resumed driver) logs into the same parent run
    Tracker("mlflow", run, "run-a", uri=uri, project="elrea-test").log_eval(
        run / "eval" / "metrics.json", [run / "eval" / "results.md"]
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["elrea-test"])
    by_name = {r["tags.mlflow.runName"]: r for _, r in runs.iterrows()}
    assert set(by_name) == {"run-a", "base", "eval"}
    parent = by_name["run-a"]["run_id"]
    assert by_name["base"]["tags.mlflow.parentRunId"] == by_name["eval"]["tags.mlflow.parentRunId"] == parent
    assert by_name["base"]["params.train.lr"] == "0.001"
    history = mlflow.tracking.MlflowClient().get_metric_history(by_name["base"]["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6] and history[-1].value == pytest.approx(0.5)
    assert by_name["eval"]["metrics.accuracy.elrea"] == pytest.approx(0.4)
    assert by_name["eval"]["metrics.ci_low.mq_base"] == pytest.approx(0.15)
    files = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(by_name["eval"]["run_id"])}
    assert {"metrics.json", "results.md"} <= files


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="tracking.backend must be one of none, tensorboard, mlflow, wandb"):
        Tracker("neptune", ".", "x")


def test_the_smoke_run_writes_tensorboard_events_by_default(smoke_run):
    tb = smoke_run.root / "tracking" / "tensorboard"
    base = _scalars(tb / "base")
    log = json.loads((smoke_run.root / "adapters" / "base" / "train_log.json").read_text())["log"]
    assert [s for s, _ in base["train/loss"]] == [e["step"] for e in log]
    experts = sorted(p.name for p in tb.glob("experts-expert-*"))
    assert experts and all("train/loss" in _scalars(tb / e) for e in experts)
    assert "eval/accuracy/elrea" in _scalars(tb / "eval")


def test_a_run_with_mlflow_logs_every_adapter_and_the_eval_table(copy_of_smoke, tmp_path, monkeypatch):
    import mlflow
    from conftest import smoke_config

    from elrea_ray.pipeline import run_pipeline

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    # every stage is finished in the copy (tracking is in no stage key): the run only logs them
    run_pipeline(
        smoke_config(copy_of_smoke, "tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.project=elrea-smoke")
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["elrea-smoke"])
    names = set(runs["tags.mlflow.runName"])
    experts = {p.name for p in (copy_of_smoke / "adapters" / "experts").glob("expert-*")}
    assert {"run", "base", "eval"} | {f"experts-{e}" for e in experts} <= names
    base = runs[runs["tags.mlflow.runName"] == "base"].iloc[0]
    assert float(base["params.train.lr"]) > 0 and base["metrics.loss"] > 0
    ev = runs[runs["tags.mlflow.runName"] == "eval"].iloc[0]
    metrics = json.loads((copy_of_smoke / "eval" / "metrics.json").read_text())["methods"]
    assert ev["metrics.accuracy.elrea"] == pytest.approx(metrics["elrea"]["micro"]["acc"])
    files = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(ev["run_id"])}
    assert {"metrics.json", "results.md", "report.html", "figures"} <= files


def test_a_tracking_failure_is_reported_and_never_stops_the_run(run, tmp_path, monkeypatch, capsys):
    from elrea_ray.config import load_config
    from elrea_ray.tracking import log_stage

    # MLflow 3 refuses a plain-folder store without its switch: the backend fails at once
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = load_config("jobs/configs/smoke.yaml", [])
    log_stage(Tracker("mlflow", run, "run", uri=(tmp_path / "mlruns").as_uri()), cfg, "eval", run, "k1")
    assert "[tracking] could not log stage eval to mlflow" in capsys.readouterr().out
    assert not (run / "tracking" / "logged").exists()  # nothing marked: a later run tries again


def test_a_new_stage_key_is_logged_again(run):
    t = Tracker("tensorboard", run, "run")
    log = run / "adapters" / "base" / "train_log.json"
    assert t.log_training("base", {}, log, key="a") and not t.log_training("base", {}, log, key="a")
    assert t.log_training("base", {}, log, key="b")  # the base adapter was retrained


def test_tune_sweeps_log_through_rays_own_callbacks(run):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    (cb,) = Tracker("wandb", run, "sweep", project="elrea-sweeps").tune_callbacks()
    assert isinstance(cb, WandbLoggerCallback) and cb.project == "elrea-sweeps" and cb.group == "sweep"
    assert isinstance(Tracker("mlflow", run, "sweep").tune_callbacks()[0], MLflowLoggerCallback)
    assert Tracker("tensorboard", run, "sweep").tune_callbacks() == []  # Tune's default logger writes them
