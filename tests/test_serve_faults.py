"""Serving under faults, over real HTTP against the app from the shared smoke
run's bundle: a replica SIGKILLed under 32 concurrent clients, graceful shutdown with requests
in flight, and a request over its timeout. Figures are printed as `FIGURE ...` lines (-s)."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.ray_processes import free_port

pytestmark = pytest.mark.slow

APP = "elrea-ft"


def _figure(line: str) -> None:
    print(f"FIGURE {line}", flush=True)


def _replicas(app: str) -> list:
    import ray
    from ray.util.state import list_actors

    # the address: this session's cluster, even when another Ray runs on the machine
    gcs = ray.get_runtime_context().gcs_address
    return [
        a
        for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")])
        if a.class_name == f"ServeReplica:{app}:ELREAServer"
    ]


def _running(app: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return 0
    return st.deployments["ELREAServer"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def server(smoke_run):
    from ray import serve

    from serve_apps.elrea_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "run_dir": str(smoke_run.root),
                "num_replicas": 2,
                "num_cpus": 0.25,
                "max_ongoing_requests": 8,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.05,
            }
        ),
        name=APP,
        route_prefix="/ft",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_replica_killed_under_32_clients_loses_at_most_1_percent_and_comes_back(server):
    N, CLIENTS = 1200, 32
    url = server + "/ft/v1/completions"
    lock = threading.Lock()
    state = {"sent": 0, "ok": 0, "failed": [], "kill_at": None}
    before = {a.actor_id for a in _replicas(APP)}
    assert len(before) == 2

    def client(c):
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    if state["sent"] >= N:
                        return
                    state["sent"] += 1
                    i = state["sent"]
                try:
                    r = http.post(url, json={"prompt": f"What is {i} + 1?", "max_tokens": 2})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    if code == 200:
                        state["ok"] += 1
                    else:
                        state["failed"].append(code)

    t0 = time.time()
    with ThreadPoolExecutor(CLIENTS) as ex:
        futs = [ex.submit(client, c) for c in range(CLIENTS)]
        while state["ok"] < N // 4:
            time.sleep(0.05)
        victim = _replicas(APP)[0]
        os.kill(victim.pid, signal.SIGKILL)  # the replica's process dies mid-load
        t_kill = time.time()
        state["kill_at"] = state["ok"] + len(state["failed"])
        for f in futs:
            f.result()
    load_s = time.time() - t0
    while not (_running(APP) == 2 and {a.actor_id for a in _replicas(APP)} - before):
        assert time.time() - t_kill < 90, "the killed replica was not replaced within 90 s"
        time.sleep(0.5)
    back_s = time.time() - t_kill
    failed = state["failed"]
    rate = len(failed) / N
    _figure(
        f"replica SIGKILLed after {state['kill_at']} of {N} requests ({CLIENTS} clients, "
        f"{load_s:.1f} s): {len(failed)} failed ({rate:.2%}; codes {sorted(set(map(str, failed)))}), "
        f"replacement RUNNING {back_s:.1f} s after the kill"
    )
    assert state["ok"] + len(failed) == N
    assert rate <= 0.01
    r = httpx.post(server + "/ft/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_graceful_shutdown_finishes_requests_in_flight(server):
    from ray import serve

    url = server + "/ft/v1/completions"
    n = 16  # = 2 replicas x max_ongoing_requests 8: all of them are on a replica, none queued

    def one(i):
        return httpx.post(url, json={"prompt": f"Spell word {i} backward.", "max_tokens": 48}, timeout=120)

    with ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        time.sleep(0.5)
        t0 = time.time()
        serve.delete(APP)  # blocks until the replicas are gone
        deleted_s = time.time() - t0
        codes = [f.result().status_code for f in futs]
    late = httpx.post(url, json={"prompt": "hi", "max_tokens": 2}, timeout=30).status_code
    _figure(
        f"serve.delete with {n} requests in flight: codes {sorted(set(codes))} "
        f"({codes.count(200)}/{n} 200), delete took {deleted_s:.1f} s; a request after it got {late}"
    )
    assert codes == [200] * n
    assert late == 404


def test_request_over_its_timeout_gets_504_not_a_hang(server, smoke_run):
    from ray import serve

    from serve_apps.elrea_app import build_app

    # A lone request waits batch_wait_timeout_s (0.5 s) for company before decoding starts, so it
    # is always over a 0.05 s timeout.
    serve.run(
        build_app(
            {"run_dir": str(smoke_run.root), "num_cpus": 0.25, "request_timeout_s": 0.05, "batch_wait_timeout_s": 0.5}
        ),
        name="slow",
        route_prefix="/slow",
    )
    try:
        t0 = time.time()
        r = httpx.post(server + "/slow/v1/completions", json={"prompt": "hi", "max_tokens": 200}, timeout=60)
        took = time.time() - t0
        _figure(f"request over a 0.05 s timeout: HTTP {r.status_code} after {took:.2f} s")
        assert r.status_code in (408, 504) and r.json()["error"]["code"] == "timeout"
        assert took < 10
        # a stream has sent its status line: it ends with an error event of the same shape, then [DONE]
        events = httpx.post(
            server + "/slow/v1/completions", timeout=60, json={"prompt": "hi", "max_tokens": 200, "stream": True}
        ).text.split("\n\n")
        err = json.loads([e for e in events if '"error"' in e][0][len("data: ") :])["error"]
        assert err["code"] == "timeout" and err["type"] == "server_error" and events[-2] == "data: [DONE]"
        assert httpx.get(server + "/slow/health", timeout=10).status_code == 200  # the replica lives
    finally:
        serve.delete("slow")
