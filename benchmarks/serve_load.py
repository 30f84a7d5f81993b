"""Load on the Ray Serve app: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients,
for the routed ensemble and for the same app serving the base adapter alone ("adapter": "base"),
in one run, against one replica on a local Ray.

    python benchmarks/serve_load.py --run-dir runs/default          # a finished pipeline run
    python benchmarks/serve_load.py --run-dir runs/smoke --max-tokens 8

Every request is a chat completion over real HTTP with its own prompt; latency is measured at
the client from send to the full response. Lines such as `ensemble vs base c=8: 2.10x` give the
ensemble's mean latency over the base adapter's (time ratio), for scripts to read.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is {a} + {b} - 7? Answer with the number only.",
    "Solve the following multiplication: {a} * {b}. Give only the result.",
    "Spell this word backward (example: sun -> nus): garden{a}",
    "How many times does the letter \"r\" appear in the text: \"berry {a} farmers rarely rest\"?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def load(url: str, concurrency: int, n: int, max_tokens: int, adapter: str | None) -> dict:
    import httpx

    def one(i: int) -> tuple[int, float]:
        q = QUESTIONS[i % len(QUESTIONS)].format(a=10 + i, b=3 + i % 7)
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
        if adapter:
            body["adapter"] = adapter
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        return r.status_code, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [t for code, t in results if code == 200]
    return {"ok": len(lat), "n": n, "rps": len(lat) / wall, "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99), "mean": statistics.mean(lat) if lat else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="a pipeline run holding bundle.json")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x clients))")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the replica then asks for one GPU)")
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from ray import serve

    from serve_apps.elrea_app import build_app

    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"run_dir": str(Path(args.run_dir).resolve()), "num_cpus": 1,
                         "num_gpus": 1 if args.device == "cuda" else 0, "max_batch_size": args.max_batch_size,
                         "max_inflight": 64, "max_ongoing_requests": 64, "request_timeout_s": 600}),
              name="elrea", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    load(url, 1, 2, args.max_tokens, None)  # warm-up (first-call allocations, routing model)
    print(f"run {args.run_dir}, {args.max_tokens} max tokens per request, max batch {args.max_batch_size}, "
          f"one replica, {args.num_cpus} CPUs")
    figures: dict[tuple[str, int], dict] = {}
    for c in args.concurrency:
        n = args.requests or max(8, 2 * c)
        for mode, adapter in (("ensemble", None), ("base", "base")):
            f = figures[mode, c] = load(url, c, n, args.max_tokens, adapter)
            print(f"{mode} c={c}: {f['rps']:.2f} req/s, p50 {f['p50']:.2f} s, p99 {f['p99']:.2f} s "
                  f"({f['ok']}/{f['n']} ok)")
        print(f"ensemble vs base c={c}: {figures['ensemble', c]['mean'] / figures['base', c]['mean']:.2f}x")
    stats = httpx.get(url + "/v1/stats").json()
    print(f"server: {stats['requests_admitted']} requests, {stats['steps']} decoding steps, "
          f"{stats['tokens_generated']} tokens, largest running batch {stats['max_running_seen']}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
