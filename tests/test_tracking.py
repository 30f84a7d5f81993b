"""Experiment tracking: TensorBoard event files read back with tensorboard's reader, MLflow runs
read back with mlflow.search_runs from a local file store."""

import json

import pytest

from elrea_ray.tracking import Tracker

LOG = {"name": "base", "steps_per_epoch": 3, "total_steps": 6,
       "log": [{"loss": 2.0 - 0.25 * s, "step": s, "epoch": 1 + (s > 3), "lr": 1e-3 * (6 - s) / 6}
               for s in range(1, 7)]}
METRICS = {"methods": {"elrea": {"accuracy": 0.4}, "mq_base": {"accuracy": 0.35}}}


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
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
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
    assert _scalars(run / "tracking" / "tensorboard" / "eval")["eval/accuracy/elrea"][0][1] == pytest.approx(0.4)
    # a resumed run does not log a finished stage twice
    assert not Tracker("tensorboard", run, "run").log_training("base", {}, run / "adapters" / "base" / "train_log.json")


def test_mlflow_runs_read_back_with_losses_and_the_eval_table(run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a switch
    uri = (tmp_path / "mlruns").as_uri()
    t = Tracker("mlflow", run, "run-a", uri=uri, project="elrea-test")
    t.log_training("base", {"train": {"lr": 1e-3, "epochs": 2}}, run / "adapters" / "base" / "train_log.json")
    # a second Tracker (a resumed driver) logs into the same parent run
    Tracker("mlflow", run, "run-a", uri=uri, project="elrea-test").log_eval(
        run / "eval" / "metrics.json", [run / "eval" / "results.md"])
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
    files = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(by_name["eval"]["run_id"])}
    assert {"metrics.json", "results.md"} <= files


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="tracking.backend must be one of none, tensorboard, mlflow"):
        Tracker("wandb", ".", "x")
