"""The run directory: the only interface between stages.

Layout (every path comes from `RunDir`; no other module builds artifact paths):

    <run_dir>/
      manifest.json            config, versions, and per stage: key, status, outputs, timings, info
      config.yaml              the fully resolved config of the latest invocation
      run.lock                 held while a pipeline process writes here (stale locks are taken over)
      data/                    train/validation/test .parquet, counts.json
      adapters/base/epoch-E/   PEFT adapter + Adam state per epoch (stage 1)
      gradients/{train,validation,test}/*.parquet   example_id, source, feature[d_proj] (stage 2)
      clusters/                centroids.safetensors, assignments.parquet, report.json (stage 3)
      adapters/expert-XX/      one PEFT adapter per cluster (stage 4)
      bundle.json              everything serving needs (written with stage 4)
      eval/                    predictions.parquet, metrics.json, results.md (stage 5)
      validation/              a sweep trial's objective on the validation split (elrea_ray/sweep.py)
      ray/                     Ray Train storage (mid-epoch checkpoints for resume)

A stage writes into `<output>.partial/`, drops a `_COMPLETE` marker holding its key, and is renamed
into place; the manifest is then updated atomically. A stage is skipped when its output holds a
marker with the same key, so a rerun resumes and a changed setting reruns exactly what depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

MARKER = "_COMPLETE"
STAGES = ("data", "base", "gradients", "clusters", "experts", "eval")


class ArtifactError(RuntimeError):
    """A stage's input is missing or incomplete, or the run directory is in use."""


def stage_key(name: str, config_slice: Any, input_keys: list[str]) -> str:
    """Content address of a stage: its config slice plus the keys of the stages it reads."""
    blob = json.dumps({"stage": name, "config": config_slice, "inputs": input_keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    if not path.exists():
        raise ArtifactError(f"missing artifact {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact {path} is not valid JSON (torn write?): {e}") from None


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "RunDir":
        if "://" in str(path):
            raise ArtifactError(f"run directory {path}: object-store URIs are not supported yet; "
                                "use a local or shared-filesystem path")
        return cls(Path(path).expanduser().resolve())

    # -- paths -------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.json"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    def stage_dir(self, stage: str) -> Path:
        return {"data": self.root / "data", "base": self.root / "adapters" / "base",
                "gradients": self.root / "gradients", "clusters": self.root / "clusters",
                "experts": self.root / "adapters" / "experts", "eval": self.root / "eval",
                "validation": self.root / "validation"}[stage]

    def data_file(self, split: str) -> Path:
        return self.stage_dir("data") / f"{split}.parquet"

    def base_epoch(self, epoch: int) -> Path:
        return self.stage_dir("base") / f"epoch-{epoch}"

    def gradient_dir(self, split: str) -> Path:
        return self.stage_dir("gradients") / split

    def expert(self, c: int) -> Path:
        return self.stage_dir("experts") / f"expert-{c:02d}"

    def clusters_file(self, name: str) -> Path:
        return self.stage_dir("clusters") / name

    def eval_file(self, name: str) -> Path:
        return self.stage_dir("eval") / name

    # -- manifest ----------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        if not self.manifest.exists():
            return {"format_version": 1, "stages": {}}
        return read_json(self.manifest)

    def update_manifest(self, fn: Callable[[dict], None]) -> dict:
        m = self.read_manifest()
        fn(m)
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest, m)
        return m

    def completed_key(self, stage: str) -> str | None:
        marker = self.stage_dir(stage) / MARKER
        return marker.read_text().strip() if marker.exists() else None

    def require(self, stage: str, key: str) -> Path:
        """The output folder of a finished stage, or an ArtifactError naming what is wrong."""
        out = self.stage_dir(stage)
        got = self.completed_key(stage)
        if got is None:
            what = "is missing" if not out.exists() else "is incomplete (no _COMPLETE marker)"
            raise ArtifactError(f"stage {stage!r}: output {out} {what}; rerun the pipeline to rebuild it")
        if got != key:
            raise ArtifactError(f"stage {stage!r}: output {out} was built with key {got}, expected {key}")
        return out

    # -- running a stage ---------------------------------------------------------------------
    def run_stage(self, stage: str, key: str, build: Callable[[Path], dict | None],
                  log: Callable[[str], None] = print) -> tuple[Path, bool]:
        """Build `stage` into `<out>.partial`, mark it and rename it into place.

        Returns (output folder, ran). Skips when the output already holds this key. A `.partial`
        folder left by a killed run with the same key is handed to `build` again, so stages that
        can (stage 1 epochs) resume inside it; with another key it is wiped first.
        """
        out = self.stage_dir(stage)
        if self.completed_key(stage) == key:
            recorded = self.read_manifest()["stages"].get(stage, {}).get("outputs", [])
            lost = [p for p in recorded if not (self.root / p).exists()]
            if lost:
                raise ArtifactError(
                    f"stage {stage!r} is recorded complete but {len(lost)} of its files are missing "
                    f"(e.g. {self.root / lost[0]}); delete {out} to rebuild that stage")
            log(f"[{stage}] up to date (key {key}), skipping")
            return out, False
        partial = out.with_name(out.name + ".partial")
        partial_key = partial / "_KEY"
        if partial.exists() and (not partial_key.exists() or partial_key.read_text().strip() != key):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        partial_key.write_text(key)
        started = time.time()
        self.update_manifest(lambda m: m["stages"].__setitem__(stage, {
            "key": key, "status": "running", "started": started}))
        log(f"[{stage}] running (key {key})")
        info = build(partial) or {}
        partial_key.unlink()
        (partial / MARKER).write_text(key)
        if out.exists():
            shutil.rmtree(out)
        os.rename(partial, out)
        seconds = round(time.time() - started, 1)
        self.update_manifest(lambda m: m["stages"].__setitem__(stage, {
            "key": key, "status": "complete", "started": started, "seconds": seconds,
            "outputs": sorted(str(p.relative_to(self.root)) for p in out.rglob("*") if p.is_file()
                              and p.name != MARKER)[:200], "info": info}))
        log(f"[{stage}] done in {seconds:.0f} s -> {out}")
        return out, True

    # -- one writer at a time ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second pipeline on the same run directory; take over a lock whose owner died."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "run.lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid", -1)):
                    path.unlink(missing_ok=True)  # stale: its owner is gone
                    continue
                raise ArtifactError(
                    f"run directory {self.root} is in use by pid {owner.get('pid')} on "
                    f"{owner.get('host')} (lock {path}); wait for it or choose another run.run_dir")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
