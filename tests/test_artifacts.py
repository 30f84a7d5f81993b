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
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
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
    run.run_stage("data", "k", lambda out: (out / "train.parquet").write_text("x") and None,
                  log=lambda s: None)
    (run.stage_dir("data") / "train.parquet").unlink()
    with pytest.raises(ArtifactError, match="train.parquet"):
        run.run_stage("data", "k", lambda out: None, log=lambda s: None)
