"""Faults on a real local Ray: a SIGKILLed driver, a crashed Train worker, a killed
Ray Data actor, infeasible resources and bad rows. The session's smoke run
(tests/conftest.py::smoke_run) is the uninterrupted reference with the same seeds.

Figures are printed as `FIGURE ...` lines (run pytest with -s to see them)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SMOKE, smoke_config

pytestmark = pytest.mark.slow

SPLITS = ("train", "validation", "test")
LATER = ("gradients", "clusters", "experts", "eval")


def _figure(line: str) -> None:
    print(f"FIGURE {line}", flush=True)


def _features(run_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    from elrea_ray.stages.gradients import read_features

    ids, _, X = read_features(Path(run_dir) / "gradients" / split)
    order = np.argsort(ids)
    return [ids[i] for i in order], X[order]


# -- item 1 (and 5): the driver SIGKILLed in stage 2 and in stage 4 --------------------------------


def _tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries our tag: the driver and every Ray process it started."""
    needle = f"ELREA_FAULT_TAG={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


class Driver:
    """`python jobs/full_pipeline.py --config smoke.yaml` in its own session with its own local Ray
    (ray.address=local, a private RAY_TMPDIR), so the test's Ray is not touched."""

    def __init__(self, run_dir: Path, logs: Path):
        self.run_dir, self.logs, self.tag = run_dir, logs, uuid.uuid4().hex
        self.tmp = tempfile.mkdtemp(prefix="elr", dir="/tmp")  # short: Ray's socket paths
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(
            {
                "PYTHONPATH": str(ROOT),
                "RAY_TMPDIR": self.tmp,
                "ELREA_FAULT_TAG": self.tag,
                "RAY_AUTH_MODE": "disabled",
                "HF_HUB_OFFLINE": "1",
            }
        )
        self.n = 0

    @property
    def cmd(self) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "jobs" / "full_pipeline.py"),
            "--config",
            str(SMOKE),
            "--run-dir",
            str(self.run_dir),
            "ray.address=local",
        ]

    def start(self) -> subprocess.Popen:
        self.n += 1
        self.log = self.logs / f"driver-{self.n}.log"
        with open(self.log, "w") as f:
            return subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )

    def wait_for(self, proc: subprocess.Popen, what: str, pred, timeout: float = 300) -> None:
        t0 = time.time()
        while not pred():
            if proc.poll() is not None:
                raise AssertionError(
                    f"driver exited ({proc.returncode}) before {what}:\n" + self.log.read_text()[-3000:]
                )
            if time.time() - t0 > timeout:
                raise AssertionError(f"timed out waiting for {what}:\n" + self.log.read_text()[-3000:])
            time.sleep(0.1)

    def kill(self, proc: subprocess.Popen) -> int:
        """SIGKILL the driver's process group, then any Ray process it left (found by the tag)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _tagged_pids(self.tag)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while _tagged_pids(self.tag) and time.time() - t0 < 30:
            time.sleep(0.2)
        assert not _tagged_pids(self.tag), "Ray processes of the killed driver survive"
        return len(left)

    def cleanup(self) -> None:
        for pid in _tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _stage(run_dir: Path, stage: str) -> dict:
    from elrea_ray.artifacts import RunDir

    return RunDir.at(run_dir).read_manifest()["stages"].get(stage, {})


def test_driver_killed_in_gradients_and_in_experts_resumes_to_identical_results(smoke_run, tmp_path):
    from elrea_ray.artifacts import RunDir

    run_dir = tmp_path / "run"
    # The state a run killed after stage 1 leaves (data and base finished), taken from the shared
    # smoke run so this test does not pay for a second base training.
    shutil.copytree(smoke_run.root, run_dir, ignore=shutil.ignore_patterns("ray"))
    run = RunDir.at(run_dir)
    for stage in LATER:
        shutil.rmtree(run.stage_dir(stage))
    run.bundle.unlink()
    run.update_manifest(lambda m: [m["stages"].pop(s) for s in LATER])
    started = {s: _stage(run_dir, s)["started"] for s in ("data", "base")}
    drv = Driver(run_dir, tmp_path)
    try:
        # run 1: killed in stage 2 once the train split's shards are written (mid-stage)
        p = drv.start()
        drv.wait_for(p, "gradients running", lambda: _stage(run_dir, "gradients").get("status") == "running")
        # item 5: the same command on the same run directory is refused, naming the owner
        t0 = time.time()
        second = subprocess.run(drv.cmd, env=drv.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        refused_s = time.time() - t0
        assert second.returncode != 0 and f"is in use by pid {p.pid}" in second.stderr, second.stderr[-2000:]
        _figure(f"second driver refused after {refused_s:.1f} s: " + second.stderr.strip().splitlines()[-1][:200])
        partial = run_dir / "gradients.partial"
        drv.wait_for(p, "train shards written", lambda: any((partial / "train").glob("*.parquet")))
        left = drv.kill(p)
        assert _stage(run_dir, "gradients")["status"] == "running" and run.completed_key("gradients") is None
        assert (run_dir / "run.lock").exists()  # the dead driver's lock, stale now
        _figure(f"run 1 killed in stage gradients; {left} Ray processes it left were killed")

        # run 2: takes the stale lock over, redoes stage 2, killed in stage 4 after >= 1 expert
        p = drv.start()
        experts_partial = run_dir / "adapters" / "experts.partial"
        drv.wait_for(
            p,
            "an expert finished",
            lambda: any((d / "adapter_config.json").exists() for d in experts_partial.glob("expert-*")),
        )
        done_before_kill = sorted(d.name for d in experts_partial.glob("expert-*"))
        left = drv.kill(p)
        assert run.completed_key("experts") is None and run.completed_key("clusters") is not None
        mid = {s: _stage(run_dir, s)["started"] for s in ("gradients", "clusters")}
        _figure(f"run 2 killed in stage experts with {done_before_kill} finished; {left} Ray processes killed")

        # run 3: the same command again finishes
        p = drv.start()
        assert p.wait(timeout=400) == 0, drv.log.read_text()[-3000:]
    finally:
        drv.cleanup()
    log3 = drv.log.read_text()
    m = run.read_manifest()["stages"]
    assert all(m[s]["status"] == "complete" for s in ("data", "base", *LATER))
    # finished stages were skipped, not redone
    assert {s: m[s]["started"] for s in started} == started
    assert {s: m[s]["started"] for s in mid} == mid
    assert "[gradients] up to date" in log3 and "[clusters] up to date" in log3
    info = m["experts"]["info"]
    assert info["trained_now"] == info["num_experts"] - len(done_before_kill) < info["num_experts"]
    # the features are bit-identical to the uninterrupted run's, and the settings are recorded
    rep = m["gradients"]["info"]["reproducibility"]
    assert rep == json.loads(smoke_run.manifest.read_text())["stages"]["gradients"]["info"]["reproducibility"]
    assert {"batch_size", "map_batch_size", "torch_threads", "block_rows"} <= set(rep)
    for split in SPLITS:
        ids, X = _features(run_dir, split)
        ref_ids, ref = _features(smoke_run.root, split)
        assert ids == ref_ids and X.dtype == ref.dtype and np.array_equal(X, ref), split
    # ... and so are the experts and the metrics
    got = json.loads((run_dir / "eval" / "metrics.json").read_text())
    want = json.loads((smoke_run.root / "eval" / "metrics.json").read_text())
    assert got == want
    assert pq.read_table(run_dir / "eval" / "predictions.parquet").equals(
        pq.read_table(smoke_run.root / "eval" / "predictions.parquet")
    )
    _figure(
        f"resumed run: features of {sum(len(_features(run_dir, s)[0]) for s in SPLITS)} examples "
        f"bit-identical, metrics.json equal; experts retrained {info['trained_now']}/{info['num_experts']}; "
        f"stage seconds: " + ", ".join(f"{s} {m[s].get('seconds')}" for s in LATER)
    )


# -- item 2: a Train worker crashes in stage 1 ---------------------------------------------------


def test_train_worker_crash_resumes_from_the_last_checkpoint_with_the_same_loss(smoke_run, tmp_path):
    from safetensors.torch import load_file

    from elrea_ray.stages.common import plain
    from elrea_ray.train import fit_adapter

    cfg = smoke_config(smoke_run.root)
    tc = cfg.train
    assert tc.max_failures >= 1 and tc.checkpoint_every_steps == 4
    marker = tmp_path / "fault-fired"
    out = tmp_path / "base"
    # the base stage's own loop config (stages.base.job), plus the test hook: rank 0's process
    # dies (os._exit) after step 5, once; the last checkpoint before it is step 4. The hook waits
    # 3 s first: Ray Train V2's controller collects reported checkpoints when it polls the
    # workers (every 2 s, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and one reported less than a poll
    # before a crash is lost (measured: the retry then started from step 0).
    loop = {
        "name": "base",
        "seed": cfg.run.seed,
        "model": plain(cfg.model),
        "train": plain(tc),
        "data_file": str(smoke_run.data_file("train")),
        "example_ids": None,
        "init_adapter": None,
        "out_dir": str(out),
        "save_epochs": True,
        "fault": {"after_step": 5, "rank": 0, "marker": str(marker), "wait_s": 3.0},
    }
    result = fit_adapter("base-crash", loop, tc, tmp_path / "ray", 1, 1.0, False)
    clean = json.loads(smoke_run.manifest.read_text())["stages"]["base"]["info"]
    assert marker.read_text() == "5"  # the worker did die
    assert result["resumed_from_step"] == 4  # from the last checkpoint, not from step 0
    assert result["steps"] == clean["steps"]
    # Stated tolerance: 1e-6 relative on CPU (RNG state is checkpointed per rank, so it is exact here)
    assert result["final_loss"] == pytest.approx(clean["final_loss"], rel=1e-6)
    diffs = []
    for e in (1, 2):
        a = load_file(str(out / f"epoch-{e}" / "adapter_model.safetensors"))
        b = load_file(str(smoke_run.base_epoch(e) / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        diffs.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    assert max(diffs) <= 1e-6, diffs
    _figure(
        f"train worker crash after step 5: resumed from step {result['resumed_from_step']}, "
        f"final loss {result['final_loss']!r} vs clean {clean['final_loss']!r} "
        f"(rel diff {abs(result['final_loss'] - clean['final_loss']) / abs(clean['final_loss']):.2e}); "
        f"max |adapter diff| per epoch {diffs}"
    )


# -- item 3: a gradient actor killed mid-stage ----------------------------------------------------


def test_gradient_actor_killed_mid_stage_every_example_once(smoke_run, tmp_path):
    import ray
    from ray.util.state import list_actors

    from elrea_ray.stages import gradients
    from elrea_ray.stages.common import StageContext

    cfg = smoke_config(smoke_run.root)
    out = tmp_path / "gradients"
    out.mkdir()
    killed: list[tuple[int, float]] = []
    done = threading.Event()
    t_start = time.time()

    errors: list[str] = []
    gcs = ray.get_runtime_context().gcs_address  # this session's cluster, even if others run here

    def killer():
        while not done.is_set():
            try:
                alive = [
                    a
                    for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")])
                    if "FeatureMapper" in a.class_name and a.pid
                ]
            except Exception as e:  # the state API can time out on a loaded machine: try again
                errors.append(repr(e))
                alive = []
            if alive:
                time.sleep(0.2)  # into its first batch
                try:
                    os.kill(alive[0].pid, signal.SIGKILL)
                except ProcessLookupError:  # that pool already finished its split: wait for the next
                    continue
                killed.append((alive[0].pid, time.time() - t_start))
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    # reads the smoke run's data and base adapters, writes only into tmp_path
    info = gradients.run(StageContext(cfg, smoke_run, {}, out))
    done.set()
    t.join(timeout=5)
    seconds = time.time() - t_start
    assert killed and killed[0][1] < seconds, f"the actor was not killed while the stage ran {errors[-3:]}"
    for split in SPLITS:
        from elrea_ray.stages.gradients import read_features

        ids, _, X = read_features(out / split)
        counts = Counter(ids)
        want = pq.read_table(smoke_run.data_file(split)).column("example_id").to_pylist()
        assert set(counts) == set(want) and set(counts.values()) == {1}, split
        assert info["rows"][split] == len(ids)
        order = np.argsort(ids)
        ref_ids, ref = _features(smoke_run.root, split)
        assert [ids[i] for i in order] == ref_ids and np.array_equal(X[order], ref), split
    _figure(
        f"gradient actor pid {killed[0][0]} SIGKILLed {killed[0][1]:.1f} s into a {seconds:.1f} s stage: "
        f"{sum(info['rows'].values())} examples, each exactly once, features bit-identical to the clean run"
    )


# -- item 6: bad rows, switch error/skip, counts in the manifest -------------------------------------


def _bad_files(tmp_path: Path) -> tuple[Path, Path]:
    good = [{"instruction": f"Add {i} and 1.", "response": str(i + 1)} for i in range(6)]
    bad = [
        {"response": "no instruction"},  # missing field
        {"instruction": 7, "response": "x"},  # wrong type
        {"instruction": "Say it.", "response": "   "},  # empty text
        {"instruction": "Repeat.", "response": "word " * 400},
    ]  # longer than max_length=256
    train = tmp_path / "mix.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in good + bad), encoding="utf-8")
    test = tmp_path / "exam.jsonl"
    test.write_text(
        "".join(json.dumps({"instruction": f"Add {i} and 2.", "response": str(i + 2)}) + "\n" for i in range(3)),
        encoding="utf-8",
    )
    return train, test


def test_bad_rows_are_skipped_and_counted_in_the_manifest_or_named(tmp_path):
    from elrea_ray.artifacts import RunDir
    from elrea_ray.data import DataError
    from elrea_ray.pipeline import stage_keys
    from elrea_ray.stages import data
    from elrea_ray.stages.base import check_lengths
    from elrea_ray.stages.common import StageContext

    train, test = _bad_files(tmp_path)
    files = [
        "data.kind=files",
        f"data.train_files=[{train}]",
        f"data.test_files=[{test}]",
        "data.validation_per_source=1",
    ]
    cfg = smoke_config(tmp_path / "skip", *files, "data.bad_rows=skip")
    run = RunDir.at(cfg.run.run_dir)
    run.run_stage(
        "data", stage_keys(cfg)["data"], lambda out: data.run(StageContext(cfg, run, {}, out)), log=lambda s: None
    )
    counts = run.read_manifest()["stages"]["data"]["info"]["files"][str(train)]
    assert counts["read"] == 10 and counts["kept"] == 7
    assert counts["skipped"] == {"missing_field": 1, "wrong_type": 1, "empty_text": 1}
    assert check_lengths(cfg, run) == {"train": 1, "validation": 0, "test": 0}  # into stages.base.info

    cfg = smoke_config(tmp_path / "error", *files)  # data.bad_rows: error (the default)
    with pytest.raises(DataError, match=r"mix\.jsonl, line 7: missing field 'instruction'"):
        data.run(StageContext(cfg, None, {}, tmp_path))
    train.write_text("\n".join(train.read_text().splitlines()[:6] + train.read_text().splitlines()[9:]) + "\n")
    run = RunDir.at(cfg.run.run_dir)
    run.run_stage(
        "data", stage_keys(cfg)["data"], lambda out: data.run(StageContext(cfg, run, {}, out)), log=lambda s: None
    )
    with pytest.raises(DataError, match=r"mix\.jsonl, line 7: longer than model\.max_length=256 tokens"):
        check_lengths(cfg, run)


def test_smoke_manifest_records_too_long_counts(smoke_run):
    info = json.loads(smoke_run.manifest.read_text())["stages"]["base"]["info"]
    assert set(info["too_long"]) == set(SPLITS) and all(v == 0 for v in info["too_long"].values())


# -- item 7: infeasible resources --------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,match",
    [
        (
            "train.use_gpu=true",
            r"stage base.*needs 1 GPUs \(1 x 1\) but the Ray cluster has 0 GPUs; set train\.use_gpu=false",
        ),
        ("gradients.use_gpu=true", r"stage gradients.*GPUs; set gradients\.use_gpu=false"),
        (
            "train.num_workers=8",
            r"stage base.*needs 8 CPUs \(8 x 1; train\.num_workers, train\.cpus_per_worker\) "
            r"but the Ray cluster has 4 CPUs",
        ),
        ("eval.num_actors=5", r"stage eval.*needs 5 CPUs.*eval\.num_actors"),
        # every CPU held by actors: the pool's read task could never start
        (
            "gradients.num_actors=4",
            r"stage gradients.*needs 5 CPUs \(4 x 1; gradients\.num_actors, "
            r"gradients\.cpus_per_actor \+ 1 for Ray Data's read and write tasks\)",
        ),
        ("experts.cpus_per_worker=6", r"stage experts.*needs 6 CPUs"),
    ],
)
def test_infeasible_resources_fail_before_any_stage(ray_local, tmp_path, override, match):
    from elrea_ray.pipeline import run_pipeline

    t0 = time.time()
    with pytest.raises(RuntimeError, match=match):
        run_pipeline(smoke_config(tmp_path / "run", override), log=lambda s: None)
    assert time.time() - t0 < 20
    assert not (tmp_path / "run" / "ray").exists()  # no trainer ever started
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run" / "run.lock").exists()
