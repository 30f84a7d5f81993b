"""Routed-ensemble decoding against one adapter, side by side in one process (issue: inference
at close to single-adapter cost).

Contenders, on the same prompts, adapters and number of new tokens (greedy, EOS ignored so that
every contender produces exactly --new-tokens tokens per prompt):

  single       one adapter, plain PEFT `generate` with a KV cache: the reference every ratio divides by
  stacked      the C+1-adapter ensemble through elrea_ray's stacked multi-adapter forward
               (the prompts' common chat-template prefix prefilled once per adapter)
  stacked_full the same without prefix sharing: every row prefills its whole prompt, as the
               single-adapter reference does
  sparse       the same, with the routing a typical prompt gets after `routing.top_k: 1`
               (its top expert plus the base adapter: 2 of the C+1 adapters run)
  peft_mixed   the ensemble through PEFT's mixed-adapter batch (prompt replicated C+1 times)
  separate     the ensemble as C+1 separate passes, one KV cache per adapter, logits mixed per step

Timings interleave the contenders (round-robin, median of --repeats) so that load from other
processes hits all of them alike. Peak memory of each contender is measured in its own
subprocess (resident set on CPU, torch's peak allocation on CUDA), loading only the adapters
that contender needs. No Ray: this runs wherever torch, transformers and peft do.

    python benchmarks/ensemble_decode.py                       # SmolLM2-135M, CPU
    python benchmarks/ensemble_decode.py --device cuda --dtype bfloat16 --model PATH_OR_ID
    python benchmarks/ensemble_decode.py --bundle runs/default/bundle.json   # a run's adapters

Lines such as `stacked vs single b=1: 1.35x` (time ratios) are meant to be read by scripts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elrea_ray.config import ModelConfig  # noqa: E402
from elrea_ray.ensemble import ensemble_generate  # noqa: E402
from elrea_ray.model import load_backbone, load_tokenizer, lora_config  # noqa: E402

CONTENDERS = ("single", "stacked", "stacked_full", "sparse", "peft_mixed", "separate")

# Prompts in the style of the default data (reasoning-gym families), 30-60 tokens with the template.
PROMPTS = [
    "What is 417 + 89 - 23? Answer with the number only.",
    "Spell this word backward (example: sun -> nus): garden",
    'How many times does the letter "r" appear in the text: "berry farmers rarely rest"?',
    "Solve the following multiplication: 38 * 27. Give only the result.",
    "Calculate 1024 - 512 + 256 - 128 and give only the result.",
    "Spell this word backward (example: sun -> nus): window",
    'How many times does the letter "e" appear in the text: "seven eleven enemies"?',
    "Solve the following multiplication: 91 * 46. Give only the result.",
]


def build_model(args, n_adapters: int):
    """The backbone with `n_adapters` LoRA adapters (named base, expert-00, ...): from a run's
    bundle, or random rank-r adapters on all linear layers (B drawn small but nonzero, so
    that each adapter really changes the output)."""
    from peft import PeftModel, get_peft_model

    if args.bundle:
        bundle = json.loads(Path(args.bundle).read_text())
        root = Path(args.bundle).parent
        cfg = ModelConfig(
            **{
                **bundle["model"],
                "lora_dropout": 0.0,
                "dtype": args.dtype,
                "name_or_path": args.model or bundle["model"]["name_or_path"],
            }
        )
        names = list(bundle["adapters"])[:n_adapters]
        model = PeftModel.from_pretrained(
            load_backbone(cfg, args.device), str(root / bundle["adapters"][names[0]]), adapter_name=names[0]
        )
        for n in names[1:]:
            model.load_adapter(str(root / bundle["adapters"][n]), adapter_name=n)
    else:
        cfg = ModelConfig(
            name_or_path=args.model or "smollm2-135m-instruct",
            dtype=args.dtype,
            lora_r=args.rank,
            lora_alpha=4 * args.rank,
            lora_dropout=0.0,
        )
        names = ["base"] + [f"expert-{i:02d}" for i in range(n_adapters - 1)]
        torch.manual_seed(0)
        model = get_peft_model(load_backbone(cfg, args.device), lora_config(cfg), adapter_name=names[0])
        for n in names[1:]:
            model.add_adapter(n, lora_config(cfg))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    model.set_adapter(names[0])
    model.eval()
    return model, names, cfg


def routing_weights(b: int, n_adapters: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense weights of the shape routing produces (base small, experts softmax-like), and the
    top-1-plus-base sparse version of them."""
    if n_adapters == 1:  # the single-adapter contender
        return np.ones((b, 1)), np.ones((b, 1))
    rng = np.random.default_rng(0)
    experts = rng.dirichlet(np.ones(n_adapters - 1), size=b)
    dense = np.concatenate([np.full((b, 1), 0.05), experts], axis=1)
    sparse = np.zeros_like(dense)
    sparse[:, 0] = dense[:, 0]
    top = dense[:, 1:].argmax(1) + 1
    sparse[np.arange(b), top] = dense[np.arange(b), top]
    return dense, sparse


def encode(tok, b: int) -> list[list[int]]:
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
        for t in texts
    ]


def run_single(model, names, prompts, new_tokens, pad):
    """Plain PEFT generate with one adapter (the reference)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    model.set_adapter(names[0])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return out[:, width:].tolist()


def run_separate(model, names, prompts, weights, new_tokens, pad):
    """C+1 separate passes: each adapter its own forward and KV cache at every step."""
    width = max(map(len, prompts))
    dev = model.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    w = torch.as_tensor(weights, dtype=torch.float32, device=dev)
    caches, results = [None] * len(names), []
    with torch.inference_mode():
        step_ids, step_pos = ids, pos
        for _ in range(new_tokens):
            mixed = 0
            for a, name in enumerate(names):
                model.set_adapter(name)
                out = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    cache=caches[a],
                    use_cache=True,
                    logits_to_keep=1,
                )
                caches[a] = out.cache
                mixed = mixed + w[:, a : a + 1] * out.logits[:, -1, :].float()
            nxt = mixed.argmax(-1)
            results.append(nxt)
            step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    model.set_adapter(names[0])
    return torch.stack(results, 1).tolist()


def run(contender, model, names, prompts, new_tokens, pad):
    dense, sparse = routing_weights(len(prompts), len(names))
    if contender == "single":
        return run_single(model, names, prompts, new_tokens, pad)
    if contender == "separate":
        return run_separate(model, names, prompts, dense, new_tokens, pad)
    backend = "peft" if contender == "peft_mixed" else "stacked"
    w = sparse if contender == "sparse" else dense
    return ensemble_generate(
        model,
        prompts,
        names,
        w,
        new_tokens,
        eos_token_id=None,
        pad_token_id=pad,
        backend=backend,
        share_prefix=contender != "stacked_full",
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(args) -> None:
    """Child process: load what `args.memory_of` needs, decode once at the largest batch, print peak."""
    n = 1 if args.memory_of == "single" else args.adapters
    model, names, cfg = build_model(args, n)
    tok = load_tokenizer(cfg)
    prompts = encode(tok, max(args.batch_sizes))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        # Loading (safetensors reads, dtype casts) peaks above decoding; Linux resets the
        # high-water mark on "5" (proc(5), clear_refs), so the peak below is the decode's,
        # the resident model and adapters included.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    run(args.memory_of, model, names, prompts, args.new_tokens, tok.pad_token_id)
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        status = Path("/proc/self/status")
        if status.exists():
            hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
            peak = int(hwm.split()[1]) / 1024  # kB
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id or folder (default smollm2-135m-instruct, or the bundle's)")
    p.add_argument("--bundle", default=None, help="a run's bundle.json: benchmark its real adapters")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16")
    p.add_argument("--adapters", type=int, default=5, help="C+1: the base adapter plus C experts")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the memory subprocesses (largest batch)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args)

    if args.memory_only:
        args.batch_sizes = args.batch_sizes[-1:]
    else:
        timings(args)
    if not args.no_memory:
        memory(args)


def timings(args) -> None:
    model, names, cfg = build_model(args, args.adapters)
    tok = load_tokenizer(cfg)
    print(
        f"model {cfg.name_or_path}, device {args.device}, dtype {next(model.parameters()).dtype}, "
        f"{len(names)} adapters (rank {args.rank if not args.bundle else 'from bundle'}), "
        f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    ratios: dict[str, float] = {}
    for b in args.batch_sizes:
        prompts = encode(tok, b)
        dense, _ = routing_weights(b, len(names))
        # The stacked path must produce what PEFT's mixed batch produces (same weights, greedy).
        if "stacked" in args.contenders and "peft_mixed" in args.contenders:
            same = run("stacked", model, names, prompts, args.new_tokens, tok.pad_token_id) == run(
                "peft_mixed", model, names, prompts, args.new_tokens, tok.pad_token_id
            )
            print(f"b={b}: stacked tokens identical to peft_mixed: {same}")
        times: dict[str, list[float]] = {c: [] for c in args.contenders}
        for c in args.contenders:  # warm-up
            run(c, model, names, prompts, args.new_tokens, tok.pad_token_id)
        for _ in range(args.repeats):
            for c in args.contenders:
                sync(args.device)
                t0 = time.perf_counter()
                run(c, model, names, prompts, args.new_tokens, tok.pad_token_id)
                sync(args.device)
                times[c].append(time.perf_counter() - t0)
        med = {c: statistics.median(t) for c, t in times.items()}
        for c in args.contenders:
            print(f"b={b} {c}: {b * args.new_tokens / med[c]:.1f} tok/s ({med[c]:.3f} s per batch)")
        if "single" in med:
            for c in args.contenders:
                if c != "single":
                    ratios[f"{c} vs single b={b}"] = med[c] / med["single"]
                    print(f"{c} vs single b={b}: {med[c] / med['single']:.2f}x")
        if "separate" in med and "stacked" in med:
            print(f"stacked speed-up over separate b={b}: {med['separate'] / med['stacked']:.2f}x")


def memory(args) -> None:
    peaks = {}
    for c in args.contenders:
        cmd = [
            sys.executable,
            __file__,
            "--memory-of",
            c,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--adapters",
            str(args.adapters),
            "--rank",
            str(args.rank),
            "--new-tokens",
            str(args.new_tokens),
            "--batch-sizes",
            str(max(args.batch_sizes)),
        ]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--bundle", args.bundle] if args.bundle else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[c] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        print(f"peak memory {c} (b={max(args.batch_sizes)}): {peaks[c]:.0f} MiB")
    for c in args.contenders:
        if c != "single" and "single" in peaks:
            print(f"peak memory {c} vs single: {peaks[c] / peaks['single']:.2f}x")


if __name__ == "__main__":
    main()
