import json
import os
import subprocess
import sys

import pytest

from elrea_ray.artifacts import ArtifactError, RunDir, stage_key


def test_stage_key_changes_with_config_and_inputs():
    a = stage_key("x", {"lr": 1}, ["k"])
    assert a == stage_key("x", {"lr": 1}, ["k"])
    assert a != stage_key("x", {"lr": 2}, ["k"]) and a != stage_key("x", {"lr": 1}, ["j"])


def test_run_stage_is_atomic_and_skips_when_done(tmp_path):
    run = RunDir.at(tmp_path)
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text("hi")
        return {"n": 1}

    out, ran = run.run_stage("data", "k1", build, log=lambda s: None)
    assert ran and (out / "x.txt").read_text() == "hi" and not out.with_name("data.partial").exists()
    assert run.read_manifest()["stages"]["data"]["status"] == "complete"
    _, ran = run.run_stage("data", "k1", build, log=lambda s: None)
    assert not ran and len(calls) == 1
    _, ran = run.run_stage("data", "k2", build, log=lambda s: None)  # changed setting: redone
    assert ran and len(calls) == 2 and run.completed_key("data") == "k2"


def test_torn_stage_is_never_read_as_complete(tmp_path):
    run = RunDir.at(tmp_path)

    def crash(out):
        (out / "half.txt").write_text("...")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.run_stage("clusters", "k", crash, log=lambda s: None)
    assert run.completed_key("clusters") is None
    with pytest.raises(ArtifactError, match="clusters"):
        run.require("clusters", "k")
    out, ran = run.run_stage("clusters", "k", lambda out: None, log=lambda s: None)
    assert ran and run.require("clusters", "k") == out


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path):
    run = RunDir.at(tmp_path)
    with run.lock():
        with pytest.raises(ArtifactError, match="in use"):
            with run.lock():
                pass
    # a lock whose owner died (a finished process's pid) is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    import socket

    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with run.lock():
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stages": {')
    with pytest.raises(ArtifactError, match="manifest.json"):
        RunDir.at(tmp_path).read_manifest()


def test_missing_file_of_a_finished_stage_is_named_on_resume(tmp_path):
    run = RunDir.at(tmp_path)
    run.run_stage("data", "k", lambda out: (out / "train.parquet").write_text("x") and None, log=lambda s: None)
    (run.stage_dir("data") / "train.parquet").unlink()
    with pytest.raises(ArtifactError, match="train.parquet"):
        run.run_stage("data", "k", lambda out: None, log=lambda s: None)


# -- faults: kills at every write, locks of dead and live owners -------------------------------

TORN = os.path.join(os.path.dirname(__file__), "torn_writer.py")


def _writer(root, k, version):
    return subprocess.run([sys.executable, TORN, str(root), str(k), version], capture_output=True, text=True)


def _check_state(root, version_keys):
    """Whatever a kill left: the manifest parses, and a stage that carries a marker holds every
    file of exactly that key's build, complete (never half a file, never another key's)."""
    run = RunDir.at(root)
    run.read_manifest()  # raises on a torn manifest
    for stage in ("data", "clusters"):
        key = run.completed_key(stage)
        if key is None:
            with pytest.raises(ArtifactError):
                run.require(stage, version_keys[stage])
            continue
        assert key in {"d1", "c1", "c2"}, key
        out = run.stage_dir(stage)
        for i in range(3):
            assert (out / f"part-{i}.txt").read_text() == f"{stage}:{key}:{i}\n" * 200


def test_a_kill_at_any_write_never_leaves_a_torn_stage_and_the_rerun_redoes_it(tmp_path):
    """Item 4: the writer dies at each of its file-system mutations in turn (first build, then a
    rebuild of one stage over an older version); no state is read as complete unless it is,
    the dead writer's lock is taken over, and the rerun finishes with every stage complete."""
    keys = {"v1": {"data": "d1", "clusters": "c1"}, "v2": {"data": "d1", "clusters": "c2"}}
    clean = tmp_path / "clean"
    n = {}
    for version in ("v1", "v2"):
        r = _writer(clean, 0, version)
        assert r.returncode == 0, r.stderr
        n[version] = int(r.stdout.split()[-1])
    assert n["v1"] >= 15 and n["v2"] >= 8, n
    killed = 0
    for version in ("v1", "v2"):
        for k in range(1, n[version] + 1):
            root = tmp_path / f"{version}-{k}"
            if version == "v2":
                assert _writer(root, 0, "v1").returncode == 0
            r = _writer(root, k, version)
            assert r.returncode == 137, (version, k, r.stdout, r.stderr)
            killed += 1
            _check_state(root, keys[version])
            r = _writer(root, 0, version)  # the same command again
            assert r.returncode == 0, (version, k, r.stderr)
            run = RunDir.at(root)
            _check_state(root, keys[version])
            m = run.read_manifest()
            for stage, key in keys[version].items():
                assert run.completed_key(stage) == key
                assert m["stages"][stage]["status"] == "complete" and m["stages"][stage]["key"] == key
            assert not (root / "run.lock").exists()
            assert not [p for p in root.iterdir() if p.name.endswith((".partial", ".old"))]
    assert killed == n["v1"] + n["v2"]


def test_lock_of_a_reused_pid_is_stale_and_a_live_owner_refuses(tmp_path):
    import socket

    run = RunDir.at(tmp_path)
    # our own (live) pid, but recorded with another start time: the pid was reused after a kill
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "pid_start": "1"}))
    run.check_unlocked()
    with run.lock():
        assert json.loads((tmp_path / "run.lock").read_text())["pid_start"] not in (None, "1")
        with pytest.raises(ArtifactError, match=r"in use by pid \d+ on .*choose another run.run_dir"):
            run.check_unlocked()
    assert not (tmp_path / "run.lock").exists()
    (tmp_path / "run.lock").write_text("")
    with pytest.raises(ArtifactError, match="unreadable lock"):
        with run.lock():
            pass
