"""Helpers for tests that start Ray processes of their own beside the session's local Ray:
free ports, and `ray job submit` retried while the new head's job server comes up."""

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """`ray start` flags giving a node every port of its own: the session's Ray holds the defaults."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]


def submit(cmd: list[str], cwd, env, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a `ray job submit` command, retried for up to a minute while the head's job server is
    not ready yet (Ray answers "No available agent" then)."""
    for _ in range(30):
        job = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in job.stderr + job.stdout:
            return job
        time.sleep(2)
    return job
