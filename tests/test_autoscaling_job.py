"""A cluster as a fresh KubeRay or `ray up` cluster starts: a head with 0 CPUs whose autoscaler has
reported its node types, and no workers. `ray job submit` of the smoke pipeline must wait for a
worker node and then finish; a request no node type could hold must fail within seconds.

The test plays the autoscaler: it writes the node types into the GCS where Ray's autoscaler reports
them (the `__autoscaler_cluster_config` key that `ray._private.state.get_cluster_config` reads),
and it starts the worker node itself once the job has said what it waits for. Everything runs in
processes of this test's own cluster (its own ports and temp dir), stopped by the test alone."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_processes import free_port, node_ports, submit

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

REPORT_NODE_TYPES = """
import sys
import ray
import ray._raylet as raylet
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_put

ray.init(address=sys.argv[1], log_to_driver=False)
config = autoscaler_pb2.ClusterConfig()
group = config.node_group_configs.add()
group.name, group.max_count = "cpu-worker", 2
group.resources["CPU"] = 4
_internal_kv_put(raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                 namespace=raylet.GCS_AUTOSCALER_STATE_NAMESPACE)
print(ray._private.state.state.get_cluster_config().node_group_configs[0].max_count)
"""


@pytest.fixture
def zero_cpu_head():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"ray-as-{os.getpid()}"  # short: Ray's socket paths have a length limit
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--num-cpus=0",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            *node_ports(),
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", REPORT_NODE_TYPES, f"127.0.0.1:{gcs}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("2"), out.stderr[-2000:]
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        # Stop only this cluster (`ray stop` would also end the test session's own local Ray).
        subprocess.run(["pkill", "-f", str(temp)], capture_output=True, timeout=60)
        time.sleep(5)
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True, timeout=60)


def _submit(cluster, run_dir: Path, *overrides: str, wait: bool) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={cluster['dashboard']}",
        "--working-dir",
        ".",
        *([] if wait else ["--no-wait"]),
        "--",
        "python",
        "jobs/full_pipeline.py",
        "--config",
        "jobs/configs/smoke.yaml",
        "--run-dir",
        str(run_dir),
        *overrides,
    ]
    return submit(cmd, ROOT, cluster["env"])


def _logs(cluster, job_id: str) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", "logs", f"--address={cluster['dashboard']}", job_id],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout + out.stderr


def _status(cluster, job_id: str) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", "status", f"--address={cluster['dashboard']}", job_id],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (out.stdout + out.stderr).lower()  # "... succeeded" / "failed" / "running"


def test_job_on_a_zero_cpu_head_waits_for_a_worker_node_then_finishes(zero_cpu_head, tmp_path):
    cluster = zero_cpu_head
    run_dir = tmp_path / "run"
    job = _submit(cluster, run_dir, "ray.resource_wait_s=600", wait=False)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", job.stdout + job.stderr).group(0)

    deadline, logs = time.monotonic() + 300, ""
    while time.monotonic() < deadline and "waiting up to 600 s for the autoscaler" not in logs:
        time.sleep(3)
        logs = _logs(cluster, job_id)
        assert "failed" not in _status(cluster, job_id), logs[-3000:]
    assert "waiting up to 600 s for the autoscaler" in logs, logs[-3000:]
    assert "succeeded" not in _status(cluster, job_id)  # it cannot have run anything on 0 CPUs

    # The autoscaler's part: a worker node of the reported type joins.
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            f"--address={cluster['gcs']}",
            "--num-cpus=4",
            "--disable-usage-stats",
            *node_ports(),
        ],
        env=cluster["env"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    deadline, status = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        status = _status(cluster, job_id)
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = _logs(cluster, job_id)
    assert "succeeded" in status, status + logs[-4000:]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"backbone", "base", "elrea", "uniform", "top1", "base_continued"}


def test_a_request_no_node_type_could_hold_fails_within_seconds(zero_cpu_head, tmp_path):
    start = time.monotonic()
    job = _submit(zero_cpu_head, tmp_path / "run", "train.cpus_per_worker=16", wait=True)
    took = time.monotonic() - start
    out = job.stdout + job.stderr
    assert job.returncode != 0, out[-3000:]
    assert "stage base (Ray Train)" in out and "16 CPUs" in out, out[-3000:]
    assert "autoscaler node types: CPU 4 x2" in out, out[-3000:]
    assert took < 120, f"the impossible request took {took:.0f} s to fail"  # a hang guard, not a timing
