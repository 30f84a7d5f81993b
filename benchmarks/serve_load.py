"""Load on the Ray Serve app: requests/s, p50/p99 latency and time to first token at 1, 8 and
32 concurrent clients, in one run on one bundle and a private local Ray, for three contenders:
the gradient-routed ensemble, the same app serving the base adapter alone ("adapter": "base"),
and, when the run trained a distilled router, the app redeployed on the same bundle with
`routing_method: distilled` (one replica, one app at a time).

    python benchmarks/serve_load.py --run-dir runs/default          # a finished pipeline run
    python benchmarks/serve_load.py --run-dir runs/smoke --workload short

Two workloads: `short` (max_tokens 16; these prompts are answered in a few tokens, so a request
is mostly routing and prefill) and `long` (max_tokens 64 with vLLM's ignore_eos, so every
contender decodes 64 tokens and decoding dominates, as in chat use). Every request is a
streaming chat completion over real HTTP with its own prompt; latency is measured at the client
from send to the last event, time to first token to the first content event. After each level
the server's own split of its time (routing, the rest of admission, decoding steps) is printed.
Lines such as `ensemble vs base short c=8: 2.10x` (and `distilled vs base ...`) give a routed
contender's mean latency over the base adapter's (time ratio), for scripts to read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prompts import QUESTIONS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


WORKLOADS = {"short": {"max_tokens": 16}, "long": {"max_tokens": 64, "ignore_eos": True}}


def load(url: str, concurrency: int, n: int, extra: dict, adapter: str | None) -> dict:
    import httpx

    def one(i: int) -> tuple[int, float, float]:
        q = QUESTIONS[i % len(QUESTIONS)].format(a=10 + i, b=3 + i % 7)
        body = {"messages": [{"role": "user", "content": q}], "stream": True, **extra}
        if adapter:
            body["adapter"] = adapter
        t0 = time.perf_counter()
        first = None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
            for line in r.iter_lines():
                if first is None and line.startswith("data: {") and '"content"' in line:
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        first = time.perf_counter() - t0
            code = r.status_code
        total = time.perf_counter() - t0
        return code, total, first if first is not None else total

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [t for code, t, _ in results if code == 200]
    ttft = [f for code, _, f in results if code == 200]
    return {
        "ok": len(lat),
        "n": n,
        "rps": len(lat) / wall,
        "p50": percentile(lat, 0.5),
        "p99": percentile(lat, 0.99),
        "mean": statistics.mean(lat) if lat else float("nan"),
        "ttft_p50": percentile(ttft, 0.5) if ttft else float("nan"),
    }


def _split(before: dict, after: dict) -> str:
    d = {k: after[k] - before[k] for k in ("routing_s", "admission_s", "decode_s")}
    total = d["admission_s"] + d["decode_s"] or 1.0
    return (
        f"routing {d['routing_s']:.1f} s ({100 * d['routing_s'] / total:.0f}%), prefill and joining "
        f"{d['admission_s'] - d['routing_s']:.1f} s, decoding {d['decode_s']:.1f} s "
        f"({100 * d['decode_s'] / total:.0f}%)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="a pipeline run holding bundle.json")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x clients))")
    p.add_argument("--workload", choices=("short", "long", "both"), default="both")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the replica then asks for one GPU)")
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from ray import serve

    from serve_apps.elrea_app import build_app

    ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_dir = Path(args.run_dir).resolve()
    url = f"http://127.0.0.1:{port}"
    # routing method of the app -> its contenders (name, adapter field). The base adapter is the
    # gradient app with "adapter": "base" (no routing); the distilled router, when the run trained
    # one, is the same bundle redeployed with routing_method=distilled. One app is up at a time.
    apps = {"gradient": [("ensemble", None), ("base", "base")]}
    if "router" in json.loads((run_dir / "bundle.json").read_text()):
        apps["distilled"] = [("distilled", None)]
    else:
        print("no distilled router in this run (routing.method=distilled trains one); its contender is left out")
    print(f"run {args.run_dir}, max batch {args.max_batch_size}, one replica, {args.num_cpus} CPUs")
    workloads = ["short", "long"] if args.workload == "both" else [args.workload]
    figures: dict[tuple[str, str, int], dict] = {}
    for method, contenders in apps.items():
        app_args = {
            "run_dir": str(run_dir),
            "num_cpus": 1,
            "num_gpus": 1 if args.device == "cuda" else 0,
            "max_batch_size": args.max_batch_size,
            "max_inflight": 64,
            "max_ongoing_requests": 64,
            "request_timeout_s": 600,
            "routing_method": method,
        }
        serve.run(build_app(app_args), name="elrea", route_prefix="/")
        load(url, 1, 2, WORKLOADS["short"], None)  # warm-up (first-call allocations, routing model)
        for w in workloads:
            for c in args.concurrency:
                n = args.requests or max(8, 2 * c)
                for mode, adapter in contenders:
                    before = httpx.get(url + "/v1/stats").json()
                    f = figures[w, mode, c] = load(url, c, n, WORKLOADS[w], adapter)
                    print(
                        f"{mode} {w} c={c}: {f['rps']:.2f} req/s, p50 {f['p50']:.2f} s, p99 {f['p99']:.2f} s, "
                        f"first token p50 {f['ttft_p50']:.2f} s ({f['ok']}/{f['n']} ok); server: "
                        f"{_split(before, httpx.get(url + '/v1/stats').json())}"
                    )
        s = httpx.get(url + "/v1/stats").json()
        print(
            f"server ({method} routing): {s['requests_admitted']} requests, {s['steps']} decoding steps, "
            f"{s['tokens_generated']} tokens, largest running batch {s['max_running_seen']}"
        )
        serve.delete("elrea")
    for w in workloads:
        for c in args.concurrency:
            for mode in ("ensemble", "distilled"):
                if (w, mode, c) in figures:
                    ratio = figures[w, mode, c]["mean"] / figures[w, "base", c]["mean"]
                    print(f"{mode} vs base {w} c={c}: {ratio:.2f}x")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
