"""Experiment tracking: each trained adapter's config, loss and learning rate per logged step,
and the evaluation table and report, in TensorBoard (default, files in the run directory) or
MLflow (`tracking.uri`, e.g. a tracking server).

The driver logs what a stage wrote to the run directory (`train_log.json`, `eval/metrics.json`)
once the stage is complete, so Ray Train workers need no access to the tracking backend and a
resumed run logs a finished stage exactly once (a marker per logged item). Tune trials use Ray's
own callbacks (`ray.tune.logger.TBXLoggerCallback`, `ray.air.integrations.mlflow`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BACKENDS = ("none", "tensorboard", "mlflow")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


class Tracker:
    """Logs one pipeline run. `root`: the run directory (markers and TensorBoard files live under
    root/tracking); `name`: the run's name in the backend (the run directory's name)."""

    def __init__(self, backend: str, root: Path, name: str, uri: str = "", project: str = "elrea-ray"):
        if backend not in BACKENDS:
            raise ValueError(f"tracking.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend, self.root, self.name, self.uri, self.project = backend, Path(root), name, uri, project
        self.dir = self.root / "tracking"
        self._parent: str | None = None

    # -- what the pipeline calls -------------------------------------------------------------
    def log_training(self, adapter: str, config: dict, train_log: Path) -> bool:
        """Log an adapter's config and its per-step loss/lr from its train_log.json, once."""
        if self.backend == "none" or self._done(f"train-{adapter}"):
            return False
        log = json.loads(Path(train_log).read_text())
        steps = [e for e in log.get("log", []) if "loss" in e]
        if self.backend == "tensorboard":
            w = self._tb(adapter)
            w.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")
            for e in steps:
                w.add_scalar("train/loss", e["loss"], e["step"])
                if "lr" in e:
                    w.add_scalar("train/lr", e["lr"], e["step"])
            w.close()
        else:
            import mlflow

            with self._mlflow_run(adapter):
                mlflow.log_params(_flat(config))
                for e in steps:
                    mlflow.log_metrics({k: float(e[k]) for k in ("loss", "lr", "epoch") if k in e}, step=e["step"])
        self._mark(f"train-{adapter}")
        return True

    def log_eval(self, metrics_file: Path, files: list[Path]) -> bool:
        """Log every method's accuracy and the report's files (tables, figures), once."""
        if self.backend == "none" or self._done("eval"):
            return False
        metrics = json.loads(Path(metrics_file).read_text())
        scores = {m: v["accuracy"] for m, v in metrics.get("methods", {}).items() if "accuracy" in v}
        if self.backend == "tensorboard":
            w = self._tb("eval")
            for m, acc in scores.items():
                w.add_scalar(f"eval/accuracy/{m}", acc, 0)
            for f in files:
                if f.suffix == ".md" and f.exists():
                    w.add_text(f.name, f.read_text())
            w.close()
        else:
            import mlflow

            with self._mlflow_run("eval"):
                mlflow.log_metrics({f"accuracy.{m}": float(a) for m, a in scores.items()})
                for f in [metrics_file, *files]:
                    if Path(f).is_file():
                        mlflow.log_artifact(str(f))
                    elif Path(f).is_dir():
                        mlflow.log_artifacts(str(f), artifact_path=Path(f).name)
        self._mark("eval")
        return True

    def tune_callbacks(self, sweep_dir: Path) -> list:
        """Ray Tune's own logger callbacks for this backend (TensorBoard event files under
        sweep_dir/tracking, or one MLflow run per trial)."""
        if self.backend == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            return [TBXLoggerCallback()]
        if self.backend == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            return [MLflowLoggerCallback(tracking_uri=self.uri or None, experiment_name=self.project,
                                         save_artifact=False)]
        return []

    # -- backends ----------------------------------------------------------------------------
    def _tb(self, sub: str):
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=str(self.dir / "tensorboard" / sub))

    def _mlflow_run(self, child: str):
        """A child run of this pipeline run's parent run (created once, its id kept in the run
        directory so a resumed run logs into the same parent)."""
        import mlflow

        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.project)
        id_file = self.dir / "mlflow_parent_run_id"
        if self._parent is None and id_file.exists():
            self._parent = id_file.read_text().strip()
        if self._parent is None:
            with mlflow.start_run(run_name=self.name) as parent:
                mlflow.set_tag("elrea.run_dir", self.name)
                self._parent = parent.info.run_id
            self.dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self._parent)
        mlflow.start_run(run_id=self._parent)
        return _Nested(mlflow.start_run(run_name=child, nested=True))

    # -- once per item -----------------------------------------------------------------------
    def _marker(self, item: str) -> Path:
        return self.dir / "logged" / f"{self.backend}-{item}"

    def _done(self, item: str) -> bool:
        return self._marker(item).exists()

    def _mark(self, item: str) -> None:
        m = self._marker(item)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()


class _Nested:
    """Ends the child run, then the parent run it was opened under."""

    def __init__(self, child):
        self.child = child

    def __enter__(self):
        return self.child

    def __exit__(self, *exc):
        import mlflow

        mlflow.end_run()  # the child
        mlflow.end_run()  # the parent, reopened for it
        return False
