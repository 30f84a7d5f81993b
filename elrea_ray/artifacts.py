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
      router/                  the distilled router and its agreement, only when routing asks for it
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

An object-store run directory (`run.run_dir=s3://bucket/prefix`, see `storage.py`) is the
durable record and `root` is a local mirror of it (`run.local_dir`). `pull()` brings the mirror
up to date at the start of a run; `run_stage` builds locally as above, then replaces the remote
stage folder (its marker deleted first and uploaded last). Ray tasks get `ref(path)`, the URI of
what they read or write, so no node needs the driver's disk.
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

from elrea_ray import storage
from elrea_ray.markers import MARKER, ArtifactError

STAGES = ("data", "base", "gradients", "clusters", "experts", "eval")


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


def default_mirror(uri: str) -> Path:
    """Where the driver mirrors an object-store run: <cache>/runs/<bucket>/<prefix>."""
    path = storage.filesystem(uri)[1]
    return storage.cache_root().parent / "runs" / path


@dataclass(frozen=True)
class RunDir:
    root: Path
    remote: str | None = None  # the object-store URI this root mirrors, or None for a local run

    @classmethod
    def at(cls, path: str | Path, local_dir: str | Path | None = None) -> "RunDir":
        """A local run directory, or for a URI the mirror at `local_dir` (default
        `default_mirror`) of a reachable bucket (an ArtifactError naming the URI otherwise)."""
        if storage.is_remote(path):
            uri = str(path).rstrip("/")
            storage.check(uri)
            local = Path(local_dir).expanduser().resolve() if local_dir else default_mirror(uri)
            return cls(local, uri)
        return cls(Path(path).expanduser().resolve())

    # -- object-store mirror (all no-ops for a local run directory) --------------------------
    def ref(self, path: Path) -> str:
        """What a Ray task gets for `path` under root: its URI for a remote run (the task calls
        `storage.localize` to read it, or writes there), else the local path."""
        if self.remote is None:
            return str(path)
        return storage.join(self.remote, Path(path).relative_to(self.root).as_posix())

    def publish(self, path: Path) -> None:
        """Upload one file under root (manifest, config, bundle) to the remote run."""
        if self.remote is not None:
            storage.push_file(path, self.ref(path))

    def sync_down(self, folder: Path) -> None:
        """Merge what Ray tasks wrote under the remote counterpart of `folder` into it."""
        if self.remote is not None:
            storage.pull_dir(self.ref(folder), folder, merge=True)

    def remote_key(self, stage: str) -> str | None:
        text = storage.read_text(self.ref(self.stage_dir(stage) / MARKER))
        return text.strip() if text is not None else None

    def pull(
        self, stages: tuple[str, ...] = (*STAGES, "router", "baselines"), log: Callable[[str], None] = print
    ) -> None:
        """Bring the mirror up to date with the remote run: the manifest and bundle, and every
        stage folder whose remote marker key differs from the local one (a stage without a
        remote marker counts as not built, so its local copy is dropped)."""
        if self.remote is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for f in (self.manifest, self.bundle, self.root / "config.yaml"):
            if storage.exists(self.ref(f)):
                storage.pull_file(self.ref(f), f)
        for stage in stages:
            out = self.stage_dir(stage)
            remote, local = self.remote_key(stage), self.completed_key(stage)
            if remote == local:
                continue
            if remote is None:
                log(f"[{stage}] no {MARKER} at {storage.redact(self.ref(out))}: dropping the local copy")
                shutil.rmtree(out)
            else:
                n = storage.pull_dir(self.ref(out), out)
                log(f"[{stage}] pulled {n} files (key {remote}) from {storage.redact(self.ref(out))}")

    def sync_up(self, stage: str) -> None:
        """Re-publish a finished stage folder after files were added to it (the report)."""
        if self.remote is not None:
            self._push_stage(self.stage_dir(stage))

    def _push_stage(self, out: Path) -> None:
        """Replace the remote stage folder with `out`: marker deleted first (readers then see an
        unfinished stage, never a marker beside old or missing files), old files, new files,
        marker last."""
        uri = self.ref(out)
        storage.delete(storage.join(uri, MARKER))
        storage.delete_dir(uri)
        storage.push_dir(out, uri, last=MARKER)

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
        return {
            "data": self.root / "data",
            "base": self.root / "adapters" / "base",
            "gradients": self.root / "gradients",
            "clusters": self.root / "clusters",
            "router": self.root / "router",
            "experts": self.root / "adapters" / "experts",
            "baselines": self.root / "adapters" / "baselines",
            "eval": self.root / "eval",
            "validation": self.root / "validation",
        }[stage]

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
        self.publish(self.manifest)
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
    def run_stage(
        self, stage: str, key: str, build: Callable[[Path], dict | None], log: Callable[[str], None] = print
    ) -> tuple[Path, bool]:
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
            self._confirm_complete(stage, key, out)
            log(f"[{stage}] up to date (key {key}), skipping")
            return out, False
        partial = self._open_partial(out, key)
        started = time.time()
        self.update_manifest(
            lambda m: m["stages"].__setitem__(stage, {"key": key, "status": "running", "started": started})
        )
        log(f"[{stage}] running (key {key})")
        info = build(partial) or {}
        self._publish(partial, out, key)
        seconds = round(time.time() - started, 1)
        self.update_manifest(
            lambda m: m["stages"].__setitem__(
                stage,
                {
                    "key": key,
                    "status": "complete",
                    "started": started,
                    "seconds": seconds,
                    "outputs": self._outputs(out),
                    "info": info,
                },
            )
        )
        log(f"[{stage}] done in {seconds:.0f} s -> {out}")
        return out, True

    def _confirm_complete(self, stage: str, key: str, out: Path) -> None:
        """A stage whose folder holds this key: its recorded files must all be there, and a
        manifest entry that a kill left behind the folder is brought up to date."""
        entry = self.read_manifest()["stages"].get(stage, {})
        recorded = entry.get("outputs", [])
        lost = [p for p in recorded if not (self.root / p).exists()]
        if lost:
            raise ArtifactError(
                f"stage {stage!r} is recorded complete but {len(lost)} of its files are missing "
                f"(e.g. {self.root / lost[0]}); delete {out} to rebuild that stage"
            )
        if entry.get("status") != "complete" or entry.get("key") != key:
            # Killed between the rename and the manifest update: the folder is complete (it
            # holds the marker), so record it instead of redoing the work.
            self.update_manifest(
                lambda m: m["stages"].__setitem__(
                    stage,
                    {
                        **entry,
                        "key": key,
                        "status": "complete",
                        "outputs": self._outputs(out),
                        "info": entry.get("info", {}),
                        "recovered": True,
                    },
                )
            )

    def _open_partial(self, out: Path, key: str) -> Path:
        """`<out>.partial` for this key: kept (to resume in) when a killed run left it with the
        same key, wiped otherwise; with remote storage, the remote partial likewise."""
        partial = out.with_name(out.name + ".partial")
        partial_key = partial / "_KEY"
        if partial.exists() and (not partial_key.exists() or partial_key.read_text().strip() != key):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        partial_key.write_text(key)
        if self.remote is not None:  # tasks write into the remote partial; resume from it too
            remote_partial = self.ref(partial)
            if storage.read_text(storage.join(remote_partial, "_KEY")) != key:
                storage.delete_dir(remote_partial)
                storage.write_text(storage.join(remote_partial, "_KEY"), key)
            else:
                self.sync_down(partial)
        return partial

    def _publish(self, partial: Path, out: Path, key: str) -> None:
        """Mark the built partial and rename it into place (and push it, with remote storage)."""
        (partial / "_KEY").unlink()
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
        if self.remote is not None:
            self._push_stage(out)
            storage.delete_dir(self.ref(partial))

    def _outputs(self, out: Path) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)[:200]

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
        self._check_remote_lock()

    def _check_remote_lock(self, me: dict | None = None) -> None:
        """An object-store run also has an ADVISORY `run.lock` object: S3 has no atomic
        create-if-absent, so two drivers starting in the same second can both pass this check.
        It stops the common mistake (a second driver on another machine); a lock left by a
        driver that died on another host must be deleted by hand, as the message says."""
        if self.remote is None:
            return
        uri = self.ref(self.lock_file)
        text = storage.read_text(uri)
        if text is None:
            return
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            owner = {}
        if me and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            return
        if isinstance(owner, dict) and owner and _is_stale(owner):
            return
        raise ArtifactError(
            f"run directory {storage.redact(self.remote)} is in use by pid {owner.get('pid')} on "
            f"{owner.get('host')} (advisory lock {storage.redact(uri)}); wait for it to finish, or "
            "delete that object if no pipeline is running on it"
        )

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
            return ArtifactError(
                f"run directory {self.root} has an unreadable lock {self.lock_file}; "
                "if no pipeline is running on it, delete that file"
            )
        return ArtifactError(
            f"run directory {self.root} is in use by pid {owner.get('pid')} on {owner.get('host')} "
            f"(lock {self.lock_file}, since {time.ctime(owner.get('since', 0))}); wait for it to "
            "finish or choose another run.run_dir"
        )

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
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "pid_start": _pid_start(os.getpid()),
        }
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
            if self.remote is not None:
                self._check_remote_lock(me)
                storage.write_text(self.ref(path), json.dumps(me))
            yield
        finally:
            owner = self._lock_owner()
            if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                path.unlink(missing_ok=True)
                if self.remote is not None:
                    if storage.read_text(self.ref(path)) == json.dumps(me):
                        storage.delete(self.ref(path))


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
