"""Routed-ensemble greedy decoding in ONE batched forward per step (paper step 5, eq. 5.10).

At every step the next token of prompt b is

    argmax_v  sum_a weights[b, a] * logits_a(v | prompt_b, generated so far)

(pre-softmax logits; the weights are fixed for the whole generation and need not sum to 1),
and it is appended to the context of every adapter. The A streams of a prompt run in the same
forward: the prompt is replicated A times along the batch (row b*A + a carries adapter a,
through PEFT's mixed-adapter batch `adapter_names=[...]`), left padded, with a KV cache, so
the prompt is prefilled once and each step feeds one token per row (paper §5 efficiency trick).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from elrea_ray.checkpoints import unwrap

BACKBONE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def _eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]


def ensemble_generate(peft_model, prompts: Sequence[Sequence[int]], adapter_names: Sequence[str],
                      weights: np.ndarray, max_new_tokens: int | Sequence[int],
                      eos_token_id: int | Sequence[int] | None, pad_token_id: int,
                      sampler: Callable | None = None) -> list[list[int]]:
    """Greedy routed-ensemble decoding of B prompts over A adapters.

    prompts: B token id lists (chat-formatted, generation prompt included); adapter_names: A
    adapters loaded in `peft_model` ("__base__" = the bare backbone); weights: [B, A] logit
    weights. Returns B lists of generated ids, without the prompt, stopped at the first EOS
    (which is not included) or after max_new_tokens (one number, or one per prompt). Adapters
    whose weight is 0 for every prompt are not run. A prompt that reaches EOS leaves the batch.
    `sampler(mixed_logits [B_active, V], prompt_indices) -> ids [B_active]` replaces argmax.
    """
    results: list[list[int]] = [[] for _ in prompts]
    for step in ensemble_stream(peft_model, prompts, adapter_names, weights, max_new_tokens,
                                eos_token_id, pad_token_id, sampler):
        for b, tok in step:
            results[b].append(tok)
    return results


def ensemble_stream(peft_model, prompts: Sequence[Sequence[int]], adapter_names: Sequence[str],
                    weights: np.ndarray, max_new_tokens: int | Sequence[int],
                    eos_token_id: int | Sequence[int] | None, pad_token_id: int,
                    sampler: Callable | None = None) -> Iterator[list[tuple[int, int]]]:
    """`ensemble_generate` one step at a time: yields [(prompt index, new token id), ...] for the
    prompts still generating (for streaming responses)."""
    b_total, names = len(prompts), list(adapter_names)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (b_total, len(names)):
        raise ValueError(f"weights must have shape [num_prompts={b_total}, num_adapters={len(names)}], "
                         f"got {list(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    limits = [int(max_new_tokens)] * b_total if np.isscalar(max_new_tokens) else [int(m) for m in max_new_tokens]
    if len(limits) != b_total or any(m < 1 for m in limits):
        raise ValueError(f"max_new_tokens must be >= 1 (one value or one per prompt), got {max_new_tokens}")
    if b_total == 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model = unwrap(peft_model)
    unknown = sorted(set(names) - set(getattr(model, "peft_config", {})) - {BACKBONE})
    if unknown:
        raise ValueError(f"adapters {unknown} are not loaded; loaded: {sorted(model.peft_config)} (or {BACKBONE!r})")
    used = [a for a in range(len(names)) if np.any(w[:, a] != 0)]
    if not used:
        raise ValueError("every adapter has weight 0 for every prompt; nothing to decode with")
    was_training = model.training
    model.eval()  # PEFT refuses adapter_names in training mode; greedy decoding wants no dropout
    try:
        with torch.inference_mode():
            yield from _decode(model, [list(map(int, p)) for p in prompts], [names[a] for a in used],
                               w[:, used], limits, _eos_set(eos_token_id), int(pad_token_id), sampler)
    finally:
        if was_training:
            model.train()


def _decode(model, prompts: list[list[int]], names: list[str], w: np.ndarray, limits: list[int],
            eos: list[int], pad_token_id: int, sampler) -> Iterator[list[tuple[int, int]]]:
    device = next(model.parameters()).device
    n_adapters, width = len(names), max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every row's next token sits at the last column
        ids[b, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    ids, mask = ids.repeat_interleave(n_adapters, 0).to(device), mask.repeat_interleave(n_adapters, 0).to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as HF generate: pads get 0, tokens 0..len-1
    weights = torch.as_tensor(w, dtype=torch.float32, device=device)  # [B_active, A]
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    active = list(range(len(prompts)))  # prompt index of each active prompt, in row order
    produced = [0] * len(prompts)

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                adapter_names=names * len(active), logits_to_keep=1)
    cache, last_pos = out.cache, position_ids[:, -1]
    for _ in range(max(limits)):
        logits = out.logits[:, -1, :].float().view(len(active), n_adapters, -1)
        mixed = torch.einsum("ba,bav->bv", weights, logits)  # eq. 5.10
        next_ids = mixed.argmax(-1) if sampler is None else sampler(mixed, active).to(device)
        done = torch.isin(next_ids, eos_t)
        emitted = []
        for i, (b, tok, fin) in enumerate(zip(active, next_ids.tolist(), done.tolist())):
            if not fin:
                emitted.append((b, tok))
                produced[b] += 1
                if produced[b] >= limits[b]:
                    done[i] = True
        yield emitted
        if bool(done.all()):
            break
        if bool(done.any()):  # drop finished prompts (all A rows of each) from the batch and cache
            alive = (~done).nonzero().flatten()
            rows = (alive[:, None] * n_adapters + torch.arange(n_adapters, device=device)).flatten()
            cache.batch_select_indices(rows)
            mask, last_pos, weights, next_ids = mask[rows], last_pos[rows], weights[alive], next_ids[alive]
            active = [active[i] for i in alive.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=next_ids.repeat_interleave(n_adapters)[:, None], attention_mask=mask,
                    position_ids=last_pos[:, None], cache=cache, use_cache=True,
                    adapter_names=names * len(active))
        cache = out.cache


def single_generate(peft_model, prompts: Sequence[Sequence[int]], adapter_name: str, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None, pad_token_id: int) -> list[list[int]]:
    """Greedy decoding with one adapter ("__base__": the backbone alone), same conventions as
    `ensemble_generate` (the base-only and backbone-only baselines)."""
    return ensemble_generate(peft_model, prompts, [adapter_name], np.ones((len(prompts), 1)),
                             max_new_tokens, eos_token_id, pad_token_id)
