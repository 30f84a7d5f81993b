"""What routing a request costs: `Engine.route` (gradient features of the instructions, then
the cosines to the centroids) for batches of 1, 8 and 32 prompts, split into its parts.

    python benchmarks/routing_cost.py                              # builds a small bundle here
    python benchmarks/routing_cost.py --run-dir runs/default       # a finished pipeline run
    python benchmarks/routing_cost.py --model tiny-random-llama    # seconds, for a quick check

Without --run-dir the script builds a bundle of the real format in a temporary folder: the
model (SmolLM2-135M by default, the embedded default's), two base epoch checkpoints after a
few Adam steps each (LoRA dropout 0.1 in the adapter config, as the default run), four expert
adapters and random unit centroids (the routing cost does not depend on their values).

Contenders run side by side in one process, interleaved round by round, so that load from
other processes hits them alike; each figure is the fastest of --rounds rounds (on a shared
machine the other processes only ever add time):
  stacked     Engine.route as served: every epoch checkpoint in ONE forward+backward, the
              batch replicated once per epoch, each copy through its own epoch's LoRA weights
  per_epoch   the same extractor with one forward+backward per epoch checkpoint, the epoch's
              weights copied into the LoRA parameters before each (the earlier serving path)
  forward     a plain no-grad forward of the same prompts through the base adapter (what a
              prefill costs), for scale
The split (forward, backward with its per-example outer products, Adam preconditioning,
projection, adapter weight copies) comes from one extra profiled call per contender and batch
size, from the `features.*` ranges that elrea_ray/gradients.py marks. Lines such as
`per_epoch vs stacked b=8: 1.45x` (time ratios) are meant for scripts. No Ray needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prompts import QUESTIONS  # noqa: E402
from elrea_ray.checkpoints import parameter_layout, save_epoch_checkpoint  # noqa: E402
from elrea_ray.config import ModelConfig, RoutingConfig  # noqa: E402
from elrea_ray.model import load_tokenizer, lora_parameters, new_lora_model  # noqa: E402

PARTS = ("forward", "backward", "outer", "precondition", "project", "swap")


def make_prompts(n: int, seed: int) -> list[list[dict]]:
    """One in four is a long sorting prompt (~120-220 tokens), the others the default families'
    (benchmarks/prompts.py), so a batch mixes lengths as served traffic does."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:  # one in four is a long sorting prompt
            k = rng.randint(12, 40)
            nums = ", ".join(str(rng.randint(-999, 999)) for _ in range(k))
            text = f"Sort these numbers in ascending order and list them separated by commas: {nums}"
        else:
            text = QUESTIONS[i % len(QUESTIONS)].format(a=rng.randint(10, 999), b=rng.randint(2, 99))
        out.append([{"role": "user", "content": text}])
    return out


def build_bundle(root: Path, model: str, prompt_ids: list[list[int]], num_experts: int, d_proj: int) -> None:
    """A serving bundle of the real format: 2 base epoch checkpoints, experts, centroids."""
    from safetensors.numpy import save_file

    from elrea_ray.bundle import BUNDLE_FORMAT_VERSION
    from elrea_ray.projection import ProjectorSpec

    cfg = ModelConfig(name_or_path=model, lora_dropout=0.1, dtype="float32")
    peft_model = new_lora_model(cfg, seed=0)
    params = [p for _, p in lora_parameters(peft_model)]
    opt = torch.optim.Adam(params, lr=1e-3)
    step = 0

    def steps(k: int) -> None:
        nonlocal step
        for _ in range(k):
            x = torch.tensor([prompt_ids[step % len(prompt_ids)]])
            peft_model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1

    epochs = []
    for e in (1, 2):
        steps(3)
        folder = root / "adapters" / "base" / f"epoch-{e}"
        save_epoch_checkpoint(folder, peft_model, opt, step=step, lr=1e-3 / e, mean_lr=1e-3 / e, epoch=e)
        epochs.append(folder)
    experts = {}
    for c in range(num_experts):
        steps(1)
        folder = root / "adapters" / f"expert-{c:02d}"
        peft_model.save_pretrained(str(folder), selected_adapters=["default"])
        experts[f"expert-{c:02d}"] = folder
    layout = parameter_layout(peft_model)
    d_in = sum(int(np.prod(s)) for _, s in layout)
    centroids = np.random.default_rng(0).standard_normal((num_experts, d_proj)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    (root / "clusters").mkdir(parents=True)
    save_file({"centroids": centroids}, str(root / "clusters" / "centroids.safetensors"))
    rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
    bundle = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": dataclasses.asdict(cfg),
        "adapters": {"base": rel(epochs[-1]), **{n: rel(f) for n, f in experts.items()}},
        "epoch_checkpoints": [rel(f) for f in epochs],
        "epoch_weights": [0.75, 0.25],  # mean learning rates of 2 epochs of linear decay
        "projector": ProjectorSpec(kind="countsketch", d_in=d_in, d_proj=d_proj).to_dict(),
        "parameter_layout": layout,
        "centroids": rel(root / "clusters" / "centroids.safetensors"),
        "num_clusters": num_experts,
        "routing": dataclasses.asdict(RoutingConfig()),
        "keys": {},
    }
    (root / "bundle.json").write_text(json.dumps(bundle, indent=1))


class PerEpoch:
    """The earlier serving path, as a contender: per batch of `batch_size` instructions, one
    forward+backward per epoch checkpoint, that epoch's LoRA weights copied into the model's
    parameters before it; the same Adam transform, projection and normalisation."""

    def __init__(self, fx):
        self.fx = fx
        self.grads = torch.empty(fx.batch_size, fx.d_in, device=fx.device)
        self.acc = torch.empty_like(self.grads)

    def features(self, instruction_ids):
        from elrea_ray.gradients import per_example_grads

        fx, out = self.fx, []
        fx.model.set_adapter("default")
        order = sorted(range(len(instruction_ids)), key=lambda i: len(instruction_ids[i]))
        for lo in range(0, len(order), fx.batch_size):
            batch = [instruction_ids[i] for i in order[lo : lo + fx.batch_size]]
            b, t = len(batch), max(map(len, batch))
            ids, mask = torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)
            for i, x in enumerate(batch):
                ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
            acc = self.acc[:b].zero_()
            for i, e in enumerate(fx.epochs):
                fx._set_epoch(i)
                g = per_example_grads(
                    fx.model, ids, mask, ids.masked_fill(mask == 0, -100), out=self.grads, autocast=fx.autocast
                )
                acc.add_(fx._adam(g, e), alpha=e.weight)
            with record_function("features.project"):
                p = fx.projector.project(acc)
            out.append(p / p.norm(dim=1, keepdim=True))
        feats = torch.cat(out).cpu().numpy()
        result = np.empty_like(feats)
        result[order] = feats
        return result


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_parts(fn) -> dict[str, float]:
    """Seconds spent inside each `features.*` range during one call of fn (CPU wall time of the
    ranges; on CUDA the kernels' time is attributed to the range that launched them)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    out = dict.fromkeys(PARTS, 0.0)
    for ev in prof.key_averages():
        if ev.key.startswith("features."):
            part = ev.key.split(".", 1)[1]
            if part in out:
                out[part] += ev.cpu_time_total / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="a run holding bundle.json (default: build a small bundle here)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model of the bundle built here")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-proj", type=int, default=8192)
    ap.add_argument("--no-profile", action="store_true", help="skip the split into parts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        if not args.run_dir:
            tok = load_tokenizer(ModelConfig(name_or_path=args.model))
            from elrea_ray.data import render_prompt

            warm = [render_prompt(tok, p) for p in make_prompts(8, seed=1)]
            build_bundle(run_dir, args.model, warm, num_experts=4, d_proj=args.d_proj)
        run(args, run_dir)


def run(args, run_dir: Path) -> None:
    from elrea_ray.serving import Engine

    device = torch.device(args.device)
    engine = Engine(run_dir, device=args.device)
    fx = engine.fx
    ids = [engine.encode_chat(p) for p in make_prompts(max(args.batches), seed=0)]
    lengths = sorted(map(len, ids))
    print(
        f"bundle {'built here from ' + args.model if not args.run_dir else run_dir}, device {device}, "
        f"threads {torch.get_num_threads()}, D = {fx.d_in:,}, {len(fx.epochs)} epoch checkpoints, "
        f"{engine.centroids.shape[0]} clusters, projector {fx.projector_spec.kind} -> {fx.projector_spec.d_proj}"
    )
    print(f"prompts: {len(ids)}, tokens {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]})")

    per_epoch = PerEpoch(fx)

    def route_with(extractor):
        def go(batch):
            saved = engine.fx
            engine.fx = extractor
            try:
                return engine.route(batch, [None] * len(batch))
            finally:
                engine.fx = saved

        return go

    def prefill(batch):
        t = max(map(len, batch))
        inp = torch.zeros(len(batch), t, dtype=torch.long)
        mask = torch.zeros_like(inp)
        for i, x in enumerate(batch):
            inp[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        engine.model.set_adapter("base")
        with torch.no_grad():
            engine.model(input_ids=inp.to(device), attention_mask=mask.to(device), use_cache=False)

    contenders = {"stacked": route_with(fx), "per_epoch": route_with(per_epoch), "forward": prefill}
    for b in args.batches:
        batch = ids[:b]
        want = contenders["per_epoch"](batch)
        got = contenders["stacked"](batch)  # also the warm-up of both
        diff = float(np.abs(got - want).max())
        times = {k: [] for k in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                times[name].append(timed(lambda fn=fn: fn(batch), device))
        med = {k: min(v) for k, v in times.items()}
        tokens = sum(map(len, batch))
        print(f"\nbatch {b} ({tokens} tokens), max |weight difference| stacked vs per_epoch {diff:.1e}")
        for name, s in med.items():
            print(f"  {name:10s} {s:8.3f} s  {s / b * 1e3:8.1f} ms/prompt  {b / s:7.2f} prompts/s")
        if not args.no_profile:
            for name in ("stacked", "per_epoch"):
                parts = profile_parts(lambda fn=contenders[name]: fn(batch))
                line = ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if v > 0)
                print(f"  {name:10s} parts (s, one profiled call): {line}")
        print(f"per_epoch vs stacked b={b}: {med['per_epoch'] / med['stacked']:.2f}x")
        print(f"stacked vs forward b={b}: {med['stacked'] / med['forward']:.2f}x")


if __name__ == "__main__":
    main()
