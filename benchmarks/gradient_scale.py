"""Memory of the Ray Data gradient stage as the dataset grows: driver and actor RSS stay flat.

For each size N, a fresh driver process builds a run folder (a tiny-random-llama epoch
checkpoint and an N-row train split of generated chat prompts, plus 256-row validation and test
splits), starts a local Ray and runs the pipeline's own stage, `elrea_ray.stages.gradients.run`, which
reads Parquet in blocks, maps `FeatureMapper` actors over them and writes features for all three
splits (test prompts go through the same actors and code). A thread samples RSS every 0.25 s:
the driver's RSS, and the USS (private memory) and RSS of every Ray Data map worker (the actors
holding the model).

    python benchmarks/gradient_scale.py --sizes 1000 10000 50000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n: int, workdir: Path, d_proj: int, actor_env: dict[str, str]) -> dict:
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from elrea_ray.artifacts import RunDir
    from elrea_ray.checkpoints import save_epoch_checkpoint
    from elrea_ray.config import load_config
    from elrea_ray.model import lora_parameters, new_lora_model
    from elrea_ray.stages import gradients
    from elrea_ray.stages.common import StageContext
    from elrea_ray.stages.gradients import read_features

    cfg = load_config(
        ROOT / "jobs/configs/smoke.yaml",
        ["train.epochs=1", f"gradients.d_proj={d_proj}", "ray.num_cpus=2", "gradients.cpus_per_actor=1"],
    )
    run = RunDir.at(workdir)
    model = new_lora_model(cfg.model, seed=0)
    opt = torch.optim.Adam([p for _, p in lora_parameters(model)], lr=1e-3)
    ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_epoch_checkpoint(run.base_epoch(1), model, opt, step=2, lr=1e-3, mean_lr=1e-3, epoch=1)
    del model, opt
    rng = random.Random(n)
    run.stage_dir("data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", n), ("validation", 256), ("test", 256)):
        prompts = [
            json.dumps(
                [
                    {
                        "role": "user",
                        "content": "State the final answer to the following "
                        "arithmetic problem: "
                        + " + ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 8)))
                        + " =",
                    }
                ]
            )
            for _ in range(rows)
        ]
        pq.write_table(
            pa.table(
                {
                    "example_id": [f"{split}-{i:06d}" for i in range(rows)],
                    "source": ["chain_sum"] * rows,
                    "prompt": prompts,
                }
            ),
            run.data_file(split),
        )

    me = psutil.Process()
    peaks = {"driver": me.memory_info().rss, "actor": 0}
    trace: list[tuple[float, int, int, int]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            actor = anon_now = 0
            for p in psutil.process_iter(["cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "MapWorker" in cmd and "FeatureMapper" in cmd:
                        # USS: memory private to the actor. RSS also counts pages of Ray's shared
                        # object store that the actor has touched (measured: RSS rose to 1.8 GB at 50k).
                        full = p.memory_full_info()
                        actor = max(actor, full.uss)
                        peaks["actor_rss"] = max(peaks.get("actor_rss", 0), full.rss)
                        # USS splits into the actor's own heap (RssAnon) and pages of shared
                        # memory only it has touched (RssShmem: Ray's object store, whose size
                        # is capped by object_store_memory, not by the dataset).
                        anon, shm = _status_kb(p.pid, "RssAnon"), _status_kb(p.pid, "RssShmem")
                        anon_now = max(anon_now, anon)
                        peaks["actor_anon"] = max(peaks.get("actor_anon", 0), anon)
                        peaks["actor_shmem"] = max(peaks.get("actor_shmem", 0), shm)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            drv = me.memory_info().rss
            peaks["driver"], peaks["actor"] = max(peaks["driver"], drv), max(peaks["actor"], actor)
            trace.append((time.perf_counter() - t0, drv, actor, anon_now))
            stop.wait(0.25)

    ray.init(
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": actor_env} if actor_env else None,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    threading.Thread(target=sample, daemon=True).start()
    out = run.stage_dir("gradients")
    out.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    info = gradients.run(StageContext(cfg, run, {}, out))
    seconds = time.perf_counter() - t1
    stop.set()
    ray.shutdown()
    got = {s: len(read_features(run.gradient_dir(s))[0]) for s in ("train", "validation", "test")}
    if got != info["rows"]:
        raise RuntimeError(f"feature rows {got} differ from input rows {info['rows']}")
    # RSS over the middle and last thirds of the stage: flat means no growth from one to the other.
    mid = [t for t in trace if t[0] >= t1 - t0]
    third = max(1, len(mid) // 3)
    return {
        "n": n,
        "seconds": round(seconds, 1),
        "rows": got,
        "driver_peak_mb": peaks["driver"] / 2**20,
        "actor_peak_mb": peaks["actor"] / 2**20,
        "actor_rss_peak_mb": peaks.get("actor_rss", 0) / 2**20,
        "actor_mb_2nd_third": max((t[2] for t in mid[third : 2 * third]), default=0) / 2**20,
        "actor_mb_last_third": max((t[2] for t in mid[2 * third :]), default=0) / 2**20,
        "actor_anon_peak_mb": peaks.get("actor_anon", 0) / 2**10,
        "actor_shmem_peak_mb": peaks.get("actor_shmem", 0) / 2**10,
        "actor_anon_2nd_third": max((t[3] for t in mid[third : 2 * third]), default=0) / 2**10,
        "actor_anon_last_third": max((t[3] for t in mid[2 * third :]), default=0) / 2**10,
    }


def _status_kb(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in kB (0 where the kernel does not report it)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--d-proj", type=int, default=512)
    ap.add_argument(
        "--actor-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the Ray workers, e.g. allocator settings (MALLOC_ARENA_MAX=2)",
    )
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        env = dict(kv.split("=", 1) for kv in args.actor_env)
        print("RESULT " + json.dumps(child(args.child, Path(args.workdir), args.d_proj, env)), flush=True)
        return
    print(
        f"{'examples':>9s} {'seconds':>8s} {'ex/s':>7s} {'driver RSS peak MB':>19s} {'actor USS peak MB':>18s} "
        f"{'actor USS MB 2nd/3rd third':>27s} {'actor RSS peak MB':>18s} {'actor heap (RssAnon) peak MB':>29s} "
        f"{'heap MB 2nd/3rd third':>22s} {'actor RssShmem peak MB':>23s}"
    )
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(n),
                    "--workdir",
                    tmp,
                    "--d-proj",
                    str(args.d_proj),
                    "--actor-env",
                    *args.actor_env,
                ],
                capture_output=True,
                text=True,
            )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"size {n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT ") :])
        total = sum(r["rows"].values())
        print(
            f"{n:9d} {r['seconds']:8.1f} {total / r['seconds']:7.0f} {r['driver_peak_mb']:19.0f} "
            f"{r['actor_peak_mb']:18.0f} {r['actor_mb_2nd_third']:15.0f} / {r['actor_mb_last_third']:<9.0f} "
            f"{r['actor_rss_peak_mb']:18.0f} {r['actor_anon_peak_mb']:29.0f} "
            f"{r['actor_anon_2nd_third']:10.0f} / {r['actor_anon_last_third']:<9.0f} "
            f"{r['actor_shmem_peak_mb']:23.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
