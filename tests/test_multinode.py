"""The pipeline on three Ray nodes (a head and two workers from `ray.cluster_utils.Cluster`), with
the run directory on a path every node reads; the State API shows stage work on several nodes.
Runs in a subprocess so it does not collide with the session's own `ray.init` (conftest)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_smoke_pipeline_spreads_over_three_nodes(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    temp = Path("/tmp") / f"ray-mn-{os.getpid()}"  # own temp dir (short: socket path limit)
    (temp / "ray").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "ELREA_CACHE": str(model_cache),
        # `ray.init(address="auto")` elsewhere on this machine must not find this cluster
        "RAY_TMPDIR": str(temp),
        "ELREA_RAY_TEMP": str(temp / "ray"),
    }
    env.pop("RAY_ADDRESS", None)
    # Smaller than the smoke profile where it does not matter here: one base epoch, ELREA only.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "multinode_run.py"),
            str(run_dir),
            "train.epochs=1",
            "eval.methods=[elrea]",
            "eval.bootstrap=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE "))
    info = json.loads(line.split(" ", 1)[1])
    assert len(info["nodes"]) == 3
    where = info["where"]
    trainers = set(where["RayTrainWorker"])
    mappers = {n for k, v in where.items() if k.startswith("MapWorker") for n in v}
    stage_nodes = trainers | mappers | set(where.get("_fit_remote", []))
    assert len(stage_nodes) >= 2, where
    # Two expert trainers at once on 1-CPU nodes must sit on two different nodes.
    assert len(trainers) >= 2, where
    assert mappers, where  # the gradient and eval actor pools ran and were recorded
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"elrea"}
