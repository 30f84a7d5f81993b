"""One SFT training step (forward + backward) with the LM head over every position against
the head over response positions only (`elrea_ray.train.response_cross_entropy`), in one process,
on the same batches and model.

    python benchmarks/train_step.py                       # SmolLM2, the default data's batches
    python benchmarks/train_step.py --model tiny-random-llama --data runs/smoke/data/train.parquet

Prints milliseconds per step for each, a line `sliced head vs full logits: 0.81x` (time ratio,
for scripts to read) and the largest loss difference between the two on the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from elrea_ray.config import ModelConfig
    from elrea_ray.data import collate, length_bucketed_batches
    from elrea_ray.model import load_tokenizer, lora_parameters, new_lora_model
    from elrea_ray.train import _load_examples, response_cross_entropy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--data",
        default=str(ROOT / "runs/default/data/train.parquet"),
        help="a pipeline run's train.parquet (prompt, response columns)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if not Path(args.data).exists():
        sys.exit(
            f"--data {args.data} does not exist: run the pipeline first or point it at a "
            "train.parquet with prompt and response columns"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc = ModelConfig(name_or_path=args.model, lora_dropout=0.0)
    tok = load_tokenizer(mc)
    ids, labels, _ = _load_examples(args.data, None, tok, mc.max_length)
    batches = length_bucketed_batches([len(x) for x in ids], args.batch_size, seed=0)[: args.steps + 1]
    batches = [
        {
            k: v.to(args.device)
            for k, v in collate([ids[i] for i in b], [labels[i] for i in b], tok.pad_token_id).items()
        }
        for b in batches
    ]
    model = new_lora_model(mc, seed=0).to(args.device)
    model.train()
    params = [q for _, q in lora_parameters(model)]
    opt = torch.optim.Adam(params, lr=1e-4)

    def full(net, b):
        logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )

    contenders = {"full logits": full, "sliced head": response_cross_entropy}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i, b in enumerate(batches):
        for name, loss_fn in contenders.items():  # interleaved, so drift hits both alike
            t0 = time.perf_counter()
            loss = loss_fn(model, b)
            loss.backward()
            opt.zero_grad(set_to_none=True)  # no step: both contenders see the same weights
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        diff = max(abs(full(model, b).item() - response_cross_entropy(model, b).item()) for b in batches)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    resp = statistics.mean(int((b["labels"] != -100).sum()) for b in batches)
    print(
        f"model {args.model}, batch {args.batch_size}, {tokens:.0f} tokens per batch of which {resp:.0f} "
        f"response, {args.steps} timed steps, {args.threads} threads, {args.device}"
    )
    for name, ts in times.items():
        print(f"{name}: {1000 * statistics.median(ts):.0f} ms per step (forward + backward)")
    ratio = statistics.median(times["sliced head"]) / statistics.median(times["full logits"])
    print(f"sliced head vs full logits: {ratio:.2f}x")
    print(f"largest loss difference (summed CE): {diff:.2e}")


if __name__ == "__main__":
    main()
