"""Experiment tracking: each trained adapter's config, loss and learning rate per logged step,
and the evaluation table and report, in TensorBoard (default, files in the run directory),
MLflow (`tracking.uri`, e.g. a tracking server) or Weights & Biases (one W&B run per adapter and
one for the evaluation, grouped under the pipeline run's name).

The driver logs what a stage wrote to the run directory (`train_log.json`, `eval/metrics.json`)
once the stage is complete, so Ray Train workers need no access to the tracking backend and a
resumed run logs a finished stage exactly once (a marker per logged item). Tune trials use Ray's
own callbacks (`ray.tune.logger.TBXLoggerCallback`, `ray.air.integrations.mlflow`,
`ray.air.integrations.wandb`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elrea_ray.config import TRACKING_BACKENDS as BACKENDS
from elrea_ray.config import Config


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def eval_scalars(metrics: dict) -> dict[str, float]:
    """The evaluation table as named numbers (eval/metrics.json): per method its accuracy, the
    interval's ends, the paired difference from M+Q_base, and the accuracy per source."""
    out: dict[str, float] = {}
    for m, v in metrics.get("methods", {}).items():
        micro = v.get("micro", {})
        if "acc" in micro:
            out[f"accuracy.{m}"] = float(micro["acc"])
            lo, hi = micro.get("ci", [None, None])
            if lo is not None:
                out[f"ci_low.{m}"], out[f"ci_high.{m}"] = float(lo), float(hi)
        for ref in ("vs_base", "vs_continued"):  # paired differences from M+Q_base and the control
            if "diff" in v.get(ref, {}):
                out[f"{ref}.{m}"] = float(v[ref]["diff"])
        for src, s in v.get("per_source", {}).items():
            if "acc" in s:
                out[f"accuracy_by_source.{m}.{src}"] = float(s["acc"])
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
    def log_training(self, adapter: str, config: dict, train_log: Path, key: str = "") -> bool:
        """Log an adapter's config and its per-step loss/lr from its train_log.json, once per
        `key` (the stage key that produced it: a retrained adapter is logged again)."""
        item = f"train-{adapter}" + (f"-{key}" if key else "")
        if self.backend == "none" or self._done(item):
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
        elif self.backend == "wandb":
            run = self._wandb_run(adapter, config)
            for e in steps:
                run.log({f"train/{k}": float(e[k]) for k in ("loss", "lr", "epoch") if k in e}, step=e["step"])
            run.finish()
        else:
            import mlflow

            with self._mlflow_run(adapter):
                mlflow.log_params(_flat(config))
                for e in steps:
                    mlflow.log_metrics({k: float(e[k]) for k in ("loss", "lr", "epoch") if k in e}, step=e["step"])
        self._mark(item)
        return True

    def log_eval(self, metrics_file: Path, files: list[Path], key: str = "") -> bool:
        """Log every method's accuracy and the report's files (tables, figures), once per `key`."""
        item = "eval" + (f"-{key}" if key else "")
        if self.backend == "none" or self._done(item):
            return False
        scores = eval_scalars(json.loads(Path(metrics_file).read_text()))
        if self.backend == "tensorboard":
            w = self._tb("eval")
            for tag, value in scores.items():
                w.add_scalar(f"eval/{tag.replace('.', '/')}", value, 0)
            for f in files:
                if f.suffix == ".md" and f.exists():
                    w.add_text(f.name, f.read_text())
            w.close()
        elif self.backend == "wandb":
            import wandb

            run = self._wandb_run("eval")
            run.summary.update(scores)
            art = wandb.Artifact(f"{self.name}-eval", type="evaluation")
            for f in [metrics_file, *files]:
                if Path(f).is_file():
                    art.add_file(str(f))
                elif Path(f).is_dir():
                    art.add_dir(str(f), name=Path(f).name)
            run.log_artifact(art)
            run.finish()
        else:
            import mlflow

            with self._mlflow_run("eval"):
                mlflow.log_metrics(scores)
                for f in [metrics_file, *files]:
                    if Path(f).is_file():
                        mlflow.log_artifact(str(f))
                    elif Path(f).is_dir():
                        mlflow.log_artifacts(str(f), artifact_path=Path(f).name)
        self._mark(item)
        return True

    def tune_callbacks(self) -> list:
        """Ray Tune's own logger callbacks for this backend: one MLflow run per trial with its
        config and reported metrics. (TensorBoard needs none: Tune's default TBXLoggerCallback
        already writes each trial's event files into its trial folder.)"""
        if self.backend == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            return [
                MLflowLoggerCallback(tracking_uri=self.uri or None, experiment_name=self.project, save_artifact=False)
            ]
        if self.backend == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            self._wandb_env()
            return [WandbLoggerCallback(project=self.project, group=self.name, log_config=True)]
        return []

    # -- backends ----------------------------------------------------------------------------
    def _tb(self, sub: str):
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=str(self.dir / "tensorboard" / sub))

    def _wandb_env(self) -> None:
        import os

        if self.uri:
            os.environ["WANDB_BASE_URL"] = self.uri

    def _wandb_run(self, child: str, config: dict | None = None):
        """A W&B run of its own per adapter (W&B has no nested runs), grouped under the pipeline
        run's name; its files under root/tracking/wandb."""
        import wandb

        self._wandb_env()
        folder = self.dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.project,
            group=self.name,
            name=child,
            job_type=child.split("-")[0],
            config=config,
            dir=str(folder),
            reinit="create_new",
        )

    def _mlflow_run(self, child: str):
        """A child run of this pipeline run's parent run. The parent is created once per
        (tracking URI, experiment) and its id kept in the run directory, so a resumed run logs
        into the same parent; one that the backend no longer has is replaced."""
        import mlflow

        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.project)
        where = {"uri": mlflow.get_tracking_uri(), "project": self.project}
        id_file = self.dir / "mlflow_parent.json"
        if self._parent is None and id_file.exists():
            saved = json.loads(id_file.read_text())
            self._parent = saved["run_id"] if {k: saved.get(k) for k in where} == where else None
        if self._parent is not None:
            try:
                mlflow.start_run(run_id=self._parent)
            except Exception:  # deleted, or another backend's id: start a new parent
                self._parent = None
        if self._parent is None:
            mlflow.start_run(run_name=self.name)
            mlflow.set_tag("elrea.run_dir", self.name)
            self._parent = mlflow.active_run().info.run_id
            self.dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(json.dumps({**where, "run_id": self._parent}))
        try:
            child_run = mlflow.start_run(run_name=child, nested=True)
        except BaseException:
            mlflow.end_run()  # the parent, reopened for it
            raise
        return _Nested(child_run)

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

    def __exit__(self, exc_type, *exc):
        import mlflow

        mlflow.end_run("FINISHED" if exc_type is None else "FAILED")  # the child
        mlflow.end_run()  # the parent, reopened for it
        return False


def tracker(cfg: Config, root: Path) -> Tracker:
    """The run's tracker from the config's `tracking` section; the run is named after its folder."""
    t = cfg.tracking
    return Tracker(t.backend, root, Path(root).name, uri=t.uri, project=t.project)


def log_stage(tr: Tracker, cfg: Config, stage: str, root: Path, key: str = "") -> None:
    """Log what a finished stage wrote: each adapter's training log (base, experts, baselines),
    or the evaluation table and report. A tracking failure (an unreachable server) is printed
    and never stops the pipeline."""
    try:
        _log_stage(tr, cfg, stage, Path(root), key)
    except Exception as e:
        print(f"[tracking] could not log stage {stage} to {tr.backend}: {type(e).__name__}: {e}", flush=True)


def _log_stage(tr: Tracker, cfg: Config, stage: str, root: Path, key: str) -> None:
    from dataclasses import asdict

    if stage in ("base", "experts", "baselines"):
        section = {"base": "train", "experts": "experts", "baselines": "train"}[stage]  # the recipe's section
        folder = {
            "base": root / "adapters" / "base",
            "experts": root / "adapters" / "experts",
            "baselines": root / "adapters" / "baselines",
        }[stage]
        logs = [folder / "train_log.json"] if stage == "base" else sorted(folder.glob("*/train_log.json"))
        for log in logs:
            name = "base" if stage == "base" else f"{stage}/{log.parent.name}"
            tr.log_training(
                name.replace("/", "-"),
                {
                    "model": asdict(cfg.model),
                    "train": asdict(cfg.train),
                    section: asdict(getattr(cfg, section)),
                    "seed": cfg.run.seed,
                },
                log,
                key,
            )
    elif stage == "eval":
        ev = root / "eval"
        tr.log_eval(ev / "metrics.json", [ev / "results.md", ev / "report.md", ev / "report.html", ev / "figures"], key)


def pull_tracking(run) -> None:
    """An object-store run: bring its tracking/ folder (markers, the MLflow parent, TensorBoard
    files) into the local mirror, so a resumed run on another machine logs nothing twice."""
    if run.remote is not None:
        from elrea_ray import storage

        folder = run.root / "tracking"
        storage.pull_dir(run.ref(folder), folder, merge=True)


def publish_tracking(run) -> None:
    """An object-store run: upload the tracking/ folder (a few small files per stage)."""
    folder = run.root / "tracking"
    if run.remote is not None and folder.is_dir():
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            run.publish(f)
