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
      adapters/baselines/      adapters of the trained baselines, only when eval.methods asks for them
      bundle.json              everything serving needs (written with stage 4)
      eval/                    predictions.parquet, metrics.json, results.md (stage 5)
      validation/              a sweep trial's objective on the validation split (elrea_ray/sweep.py)
      ray/                     Ray Train storage (mid-epoch checkpoints for resume)

A stage writes into `<output>.partial/`, drops a `_COMPLETE` marker holding its key, and is renamed
into place (an older version is renamed to `<output>.old` first and deleted after); the manifest
is then updated atomically. A stage is skipped when its output holds a
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
    """Write beside, flush to disk, rename over: readers see the old file or the new one, never
    half of one (also after a power cut, hence the fsync)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=str))
        f.flush()
        os.fsync(f.fileno())
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
                "experts": self.root / "adapters" / "experts",
                "baselines": self.root / "adapters" / "baselines", "eval": self.root / "eval",
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
        old = out.with_name(out.name + ".old")
        if old.exists():  # a replaced version whose deletion was interrupted
            shutil.rmtree(old)
        if self.completed_key(stage) == key:
            entry = self.read_manifest()["stages"].get(stage, {})
            recorded = entry.get("outputs", [])
            lost = [p for p in recorded if not (self.root / p).exists()]
            if lost:
                raise ArtifactError(
                    f"stage {stage!r} is recorded complete but {len(lost)} of its files are missing "
                    f"(e.g. {self.root / lost[0]}); delete {out} to rebuild that stage")
            if entry.get("status") != "complete" or entry.get("key") != key:
                # Killed between the rename and the manifest update: the folder is complete (it
                # holds the marker), so record it instead of redoing the work.
                self.update_manifest(lambda m: m["stages"].__setitem__(stage, {
                    **entry, "key": key, "status": "complete", "outputs": self._outputs(out),
                    "info": entry.get("info", {}), "recovered": True}))
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
        # Swap by renames: an older version is moved aside whole (deleting it in place could be
        # cut short, leaving its marker beside half its files) and deleted once replaced.
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
        seconds = round(time.time() - started, 1)
        self.update_manifest(lambda m: m["stages"].__setitem__(stage, {
            "key": key, "status": "complete", "started": started, "seconds": seconds,
            "outputs": self._outputs(out), "info": info}))
        log(f"[{stage}] done in {seconds:.0f} s -> {out}")
        return out, True

    def _outputs(self, out: Path) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in out.rglob("*")
                      if p.is_file() and p.name != MARKER)[:200]

    # -- one writer at a time ----------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    def check_unlocked(self) -> None:
        """Raise the lock's ArtifactError now if a live pipeline holds this run directory (the
        entry script calls it before starting Ray, so a second run is refused in a second)."""
        owner = self._lock_owner()
        if owner is not None and not _is_stale(owner):
            raise self._in_use(owner)

    def _lock_owner(self) -> dict | None:
        try:
            text = self.lock_file.read_text()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
            return owner if isinstance(owner, dict) else {}
        except json.JSONDecodeError:
            return {}

    def _in_use(self, owner: dict) -> ArtifactError:
        if not owner:
            return ArtifactError(f"run directory {self.root} has an unreadable lock {self.lock_file}; "
                                 "if no pipeline is running on it, delete that file")
        return ArtifactError(
            f"run directory {self.root} is in use by pid {owner.get('pid')} on {owner.get('host')} "
            f"(lock {self.lock_file}, since {time.ctime(owner.get('since', 0))}); wait for it to "
            "finish or choose another run.run_dir")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Refuse a second pipeline on the same run directory; take over a lock whose owner died.

        The lock's content is written to a private file first and hard-linked into place, so
        the lock appears atomically and complete (link fails if it already exists): a process
        killed while taking it leaves no empty lock behind. Owner = host, pid and the pid's start
        time, so a pid reused by an unrelated process after a kill is not mistaken for the owner.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.lock_file
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "pid_start": _pid_start(os.getpid())}
        tmp = path.with_name(f".run.lock.{os.getpid()}")
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    owner = self._lock_owner()
                    if owner is None:
                        continue  # released in between
                    if not _is_stale(owner):
                        raise self._in_use(owner) from None
                    path.unlink(missing_ok=True)  # stale: its owner is gone
            else:
                raise ArtifactError(f"could not take the lock {path} (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)
        try:
            yield
        finally:
            owner = self._lock_owner()
            if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                path.unlink(missing_ok=True)


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat(5), counted after the comm field


def _is_stale(owner: dict) -> bool:
    """A lock is stale when its owner ran on this host and that process no longer exists."""
    if not owner or owner.get("host") != socket.gethostname():
        return False  # unreadable, or another host's process we cannot check
    pid = owner.get("pid", -1)
    if not _pid_alive(pid):
        return True
    start = owner.get("pid_start")
    return start is not None and _pid_start(pid) not in (None, start)


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
