"""`ray start --head` then `ray job submit -- python jobs/full_pipeline.py --config smoke.yaml`:
the entry script runs unchanged as a Ray job against a separately started cluster."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_processes import free_port, node_ports, submit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_ray_job_submit_runs_the_smoke_pipeline(tmp_path):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # Every port of its own: another Ray on this machine (the test session's) holds the defaults.
    ports = [*node_ports(), f"--ray-client-server-port={free_port()}"]
    temp = Path("/tmp") / f"ray-job-{os.getpid()}"  # short: Ray's socket paths have a length limit
    subprocess.run(
        [
            str(bindir / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            *ports,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        run_dir = tmp_path / "run"
        cmd = [
            str(bindir / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/full_pipeline.py",
            "--config",
            "jobs/configs/smoke.yaml",
            "--run-dir",
            str(run_dir),
        ]
        job = submit(cmd, ROOT, env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"backbone", "base", "elrea", "uniform", "top1", "base_continued"}
        assert "ELREA" in job.stdout  # the results table was printed by the job
    finally:
        # Stop only this cluster (`ray stop` would also end the test session's own local Ray).
        subprocess.run(["pkill", "-f", str(temp)], capture_output=True, timeout=60)
        time.sleep(5)  # then SIGKILL what ignored SIGTERM (a gcs_server was once left running)
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True, timeout=60)
