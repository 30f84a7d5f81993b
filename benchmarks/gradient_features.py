"""Gradient features: ours against the LESS way and against a plain training step, one process.

Contenders, all on the same examples, the same model and ONE epoch checkpoint:
  (a) LESS way: batch size 1, `loss.backward()`, the flattened full gradient (torch.cat of the
      .grad's), LESS's Adam transform, a dense Rademacher projection regenerated per call
      (TRAK's BasicProjector way). ~30 s/example on 2 CPU cores, so it
      runs on --less-examples examples only. Also timed: one projection call over 16 buffered
      gradients (LESS's project_interval), reported as a second, kinder LESS figure.
  (b) ours at batch size 1 with the default projector (separates batching from the projector).
  (c) ours batched (FeatureExtractor) with each projector; the dense one on one batch only.
  (d) a plain training step: forward + HF mean loss + backward into .grad, no per-example work,
      over the same batches of tokens.
Timings of (b)-(d) are interleaved over --rounds rounds and the median round is reported, so
that load from other processes hits every contender alike.

Needs torch, transformers and peft only (no Ray). Default data: the prompts of a finished run's
train split if present, else generated arithmetic prompts. Default checkpoint: built here from
a few Adam steps on the same prompts (the real epoch-checkpoint format).

    python benchmarks/gradient_features.py --threads 2
    python benchmarks/gradient_features.py --checkpoint runs/default/adapters/base/epoch-1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elrea_ray.checkpoints import load_adam_state, save_epoch_checkpoint
from elrea_ray.config import GradientConfig, ModelConfig
from elrea_ray.gradients import FeatureExtractor
from elrea_ray.model import load_tokenizer, lora_parameters, new_lora_model
from elrea_ray.projection import KINDS, ProjectorSpec, make_projector

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "runs/default/data/train.parquet"
GENERATED = "generated"


def prompts(path: str | None, n: int, seed: int) -> list[list[dict]]:
    """n chat prompts: spread over a pipeline data file (its `prompt` column) or generated
    (path "generated", or when no run's data file exists)."""
    for p in [] if path == GENERATED else [Path(path)] if path else [DEFAULT_DATA]:
        if p.exists():
            import pyarrow.parquet as pq

            rows = pq.read_table(p, columns=["prompt"]).column("prompt").to_pylist()
            step = max(1, len(rows) // n)
            return [json.loads(r) for r in rows[::step][:n]]
        if path:
            raise FileNotFoundError(f"--data {path} does not exist")
    rng = random.Random(seed)
    return [
        [
            {
                "role": "user",
                "content": "State the final answer to the following arithmetic problem: "
                + " + ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(3, 6)))
                + " =",
            }
        ]
        for _ in range(n)
    ]


def encode(tok, messages: list[dict], max_length: int) -> list[int]:
    """The pipeline's instruction tokens: chat template with the generation prompt."""
    return list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )[:max_length]


def pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(batch):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def build_checkpoint(cfg: ModelConfig, ids: list[list[int]], folder: Path, device) -> Path:
    """An epoch checkpoint after 3 Adam steps on the benchmark's prompts (B != 0, real moments)."""
    model = new_lora_model(cfg, device, seed=0)
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for step in range(3):
        inp, mask, lab = (t.to(device) for t in pad(ids[step * 4 : (step + 1) * 4] or ids[:4]))
        model(input_ids=inp, attention_mask=mask, labels=lab).loss.backward()
        opt.step()
        opt.zero_grad()
    save_epoch_checkpoint(folder, model, opt, step=3, lr=1e-3, mean_lr=1e-3, epoch=1)
    del model, opt
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def less_way(fx: FeatureExtractor, ids: list[list[int]], d_proj: int, buffer: int, device) -> dict:
    """LESS's collect_grad_reps loop (batch 1, backward, cat, Adam, dense projection)."""
    model, params = fx.model, fx._params
    state = load_adam_state(fx.epochs[0].folder)
    names = [n for n, _ in fx.layout]
    m = torch.cat([state.exp_avg[n].reshape(-1) for n in names]).to(device)
    v = torch.cat([state.exp_avg_sq[n].reshape(-1) for n in names]).to(device)
    b1, b2, eps = state.beta1, state.beta2, state.eps
    dense = make_projector(ProjectorSpec("rademacher", fx.d_in, d_proj, seed=0), device)

    def gradient(x: list[int]) -> torch.Tensor:
        inp = torch.tensor([x], device=device)
        model.zero_grad(set_to_none=True)
        model(input_ids=inp, labels=inp).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        # LESS's transform (no bias correction, eps inside the sqrt); same cost as ours.
        return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)

    backward_s, project_s = [], []
    for x in ids:
        grad_holder = []
        backward_s.append(timed(lambda: grad_holder.append(gradient(x)), device))
        project_s.append(timed(lambda: dense.project(grad_holder[0]), device))
    stacked = torch.stack([gradient(x) for x in (ids * buffer)[:buffer]])
    buffered_s = timed(lambda: dense.project(stacked), device)
    model.zero_grad(set_to_none=True)
    return {
        "backward": statistics.mean(backward_s),
        "project": statistics.mean(project_s),
        "buffered_project": buffered_s / buffer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--d-proj", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--less-examples", type=int, default=2, help="examples the LESS way runs on")
    ap.add_argument("--less-buffer", type=int, default=16, help="gradients per buffered LESS projection")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds for (b)-(d)")
    ap.add_argument(
        "--projector",
        default=GradientConfig().projector,
        choices=KINDS,
        help="'ours' = batched with this projector (default: the pipeline default)",
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for ours and the training step")
    ap.add_argument("--checkpoint", help="an epoch checkpoint folder (default: build one here)")
    ap.add_argument(
        "--data",
        help=f"a pipeline data Parquet with a prompt column, or '{GENERATED}' (arithmetic prompts; no pyarrow needed)",
    )
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    if min(args.batch_size, args.examples, args.less_examples, args.rounds, args.less_buffer) < 1:
        ap.error("--batch-size, --examples, --less-examples, --less-buffer and --rounds must be >= 1")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(name_or_path=args.model, lora_dropout=0.0, dtype="float32" if not args.bf16 else "auto")
    tok = load_tokenizer(cfg)
    ids = [encode(tok, p, args.max_length) for p in prompts(args.data, args.examples, seed=0)]
    ids.sort(key=len)  # the length grouping FeatureExtractor.features does; batches below match it
    batches = [ids[i : i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    tokens = sum(map(len, ids))
    print(
        f"model {args.model}, device {device}, threads {torch.get_num_threads()}, "
        f"{len(ids)} examples ({tokens / len(ids):.1f} tokens mean, {min(map(len, ids))}-"
        f"{max(map(len, ids))}), batch {args.batch_size}, d_proj {args.d_proj}, bf16 {args.bf16}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(build_checkpoint(cfg, ids, Path(tmp) / "epoch-1", device))
        print(f"epoch checkpoint: {ckpt if args.checkpoint else 'built here (3 Adam steps)'}")
        run(args, cfg, ids, batches, ckpt, device)


def run(
    args, cfg: ModelConfig, ids: list[list[int]], batches: list[list[list[int]]], ckpt: str, device: torch.device
) -> None:
    base = FeatureExtractor(
        cfg, [ckpt], [1.0], args.projector, args.d_proj, 0, device, args.batch_size, mixed_precision=args.bf16
    )
    print(f"D = {base.d_in:,} LoRA parameters")
    ours = {k: base.variant(projector=k) for k in KINDS}
    bs1 = base.variant(batch_size=1)

    def train_step() -> None:
        amp = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if args.bf16
            else torch.autocast(device.type, enabled=False)
        )
        for b in batches:
            inp, mask, lab = (t.to(device) for t in pad(b))
            base.model.zero_grad(set_to_none=True)
            with amp:
                loss = base.model(input_ids=inp, attention_mask=mask, labels=lab).loss
            loss.backward()
        base.model.zero_grad(set_to_none=True)

    contenders = {
        "(b) ours, batch 1, " + args.projector: (lambda: bs1.features(ids), len(ids)),
        **{
            f"(c) ours, batch {args.batch_size}, {k}": (lambda k=k: ours[k].features(ids), len(ids))
            for k in KINDS
            if k != "rademacher"
        },
        # The dense projection costs ~30 s per call on 2 cores: one batch is enough to time it.
        f"(c) ours, batch {args.batch_size}, rademacher": (
            lambda: ours["rademacher"].features(batches[0]),
            len(batches[0]),
        ),
        "(d) training step": (train_step, len(ids)),
    }
    for name, (fn, _) in contenders.items():  # warm-up (allocator, first-call costs)
        if "rademacher" not in name:
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name, (fn, n) in contenders.items():
            if "rademacher" in name and r > 0:
                continue  # one round of the dense one
            times[name].append(timed(fn, device) / n)
    per_example = {k: statistics.median(v) for k, v in times.items()}

    less_ids = ids[: args.less_examples]
    print(f"(a) LESS way on {len(less_ids)} of the {len(ids)} examples only (~30 s/example on CPU) ...", flush=True)
    less = less_way(base, less_ids, args.d_proj, args.less_buffer, device)
    less_s = less["backward"] + less["project"]
    less_buffered_s = less["backward"] + less["buffered_project"]

    print(f"{'contender':44s} {'s/example':>10s} {'examples/s':>11s}")
    print(
        f"{'(a) LESS way':44s} {less_s:10.3f} {1 / less_s:11.3f}   (backward+Adam {less['backward']:.3f} s, "
        f"projection {less['project']:.2f} s)"
    )
    print(
        f"{'(a) LESS, projection over ' + str(args.less_buffer) + ' buffered':44s} {less_buffered_s:10.3f} "
        f"{1 / less_buffered_s:11.3f}"
    )
    for name, s in per_example.items():
        print(f"{name:44s} {s:10.4f} {1 / s:11.2f}")
    mine = per_example[f"(c) ours, batch {args.batch_size}, {args.projector}"]
    step = per_example["(d) training step"]
    print(f"ours = batch {args.batch_size}, {args.projector}; median of {args.rounds} interleaved rounds")
    print(f"ours vs LESS: {less_s / mine:.1f}x")
    print(f"ours vs LESS (projection buffered {args.less_buffer} per call): {less_buffered_s / mine:.1f}x")
    print(f"ours vs batch 1 (same projector): {per_example['(b) ours, batch 1, ' + args.projector] / mine:.2f}x")
    print(f"ours vs training step: {mine / step:.2f}x")


if __name__ == "__main__":
    main()
