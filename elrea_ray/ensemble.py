"""Routed-ensemble decoding: C+1 adapters, one batched forward per step (paper step 5, eq. 5.10).

At every step the next token of prompt b is

    argmax_v  sum_a weights[b, a] * logits_a(v | prompt_b, generated so far)

(pre-softmax logits; the weights are fixed for the whole generation and need not sum to 1),
and it is appended to the context of every adapter. Prompt b gets one batch row per adapter it
uses (weight != 0), left padded, with a KV cache, so each prompt is prefilled once per adapter
and each step feeds one token per row (paper §5 efficiency trick). Two back-ends run the rows:

* "stacked" (default): every LoRA module runs all rows' adapters in three fixed ops
  (`elrea_ray.stacked`), and since the LM head is linear, sum_a w_a (W h_a) = W (sum_a w_a h_a):
  the rows' final hidden states are mixed first and the head runs once per prompt, not once
  per adapter. Rows are per (prompt, adapter) pair, so a prompt whose weight for an expert is
  exactly 0 does not run that expert at all (sparse routing: `routing.min_weight`, top-k).
* "peft": PEFT's mixed-adapter batch (`adapter_names=[...]`), every prompt on every adapter
  that any prompt uses; the reference the stacked path is tested against.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from elrea_ray.checkpoints import unwrap
from elrea_ray.stacked import BACKBONE, UnsupportedAdapter, stacked_for

BACKENDS = ("auto", "stacked", "peft")


def _eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]


def ensemble_generate(
    peft_model,
    prompts: Sequence[Sequence[int]],
    adapter_names: Sequence[str],
    weights: np.ndarray,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    sampler: Callable | None = None,
    backend: str = "auto",
    share_prefix: bool = True,
) -> list[list[int]]:
    """Routed-ensemble decoding of B prompts over A adapters (greedy unless `sampler`).

    prompts: B token id lists (chat-formatted, generation prompt included); adapter_names: A
    adapters loaded in `peft_model` ("__base__" = the bare backbone); weights: [B, A] logit
    weights. Returns B lists of generated ids, without the prompt, stopped at the first EOS
    (which is not included) or after max_new_tokens (one number, or one per prompt). A weight of
    exactly 0 means the adapter is not run for that prompt (stacked back-end) or, for the PEFT
    back-end, not run when it is 0 for every prompt. A prompt that reaches EOS leaves the batch.
    `sampler(mixed_logits [B_active, V], prompt_indices) -> ids [B_active]` replaces argmax.
    backend: "stacked", "peft", or "auto" (stacked unless the adapters use a LoRA feature it
    does not implement, such as DoRA). share_prefix: on the stacked back-end, prefill the
    prompts' common leading tokens (the chat template's system turn) once per adapter.
    """
    results: list[list[int]] = [[] for _ in prompts]
    for step in ensemble_stream(
        peft_model,
        prompts,
        adapter_names,
        weights,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        sampler,
        backend,
        share_prefix=share_prefix,
    ):
        for b, tok in step:
            results[b].append(tok)
    return results


def ensemble_generate_many(
    peft_model,
    prompts: Sequence[Sequence[int]],
    adapter_names: Sequence[str],
    weight_sets: dict[str, np.ndarray],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    backend: str = "auto",
) -> dict[str, list[list[int]]]:
    """Greedy decoding of the same B prompts under several routings at once (evaluation's
    methods: base alone, ELREA, uniform, top-k, ...), each weights [B, A] over adapter_names.

    Equal to calling `ensemble_generate` once per routing, but a prompt's KV cache for one
    adapter does not depend on the weights, so on the stacked back-end every (prompt, adapter)
    pair that any routing uses is prefilled once and shared: with the backbone, the base
    adapter, ELREA, uniform and top-1 over C+1 = 5 adapters that is 6 prefill rows per prompt
    instead of 14. The routings' sequences then decode together in one batch.
    """
    keys = list(weight_sets)
    if not keys:
        return {}
    B = len(prompts)
    for k in keys:
        if np.shape(weight_sets[k]) != (B, len(adapter_names)):
            raise ValueError(
                f"weights of {k!r} must have shape [num_prompts={B}, "
                f"num_adapters={len(adapter_names)}], got {list(np.shape(weight_sets[k]))}"
            )
    if backend == "peft" or not _stackable(peft_model, adapter_names):  # no sharing: one call each
        return {
            k: ensemble_generate(
                peft_model,
                prompts,
                adapter_names,
                weight_sets[k],
                max_new_tokens,
                eos_token_id,
                pad_token_id,
                backend=backend,
            )
            for k in keys
        }
    w = np.concatenate([np.asarray(weight_sets[k], dtype=np.float64) for k in keys], axis=0)
    prompt_of = np.tile(np.arange(B), len(keys))
    results: list[list[int]] = [[] for _ in range(len(w))]
    for step in ensemble_stream(
        peft_model,
        prompts,
        adapter_names,
        w,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        backend=backend,
        prompt_of=prompt_of,
    ):
        for v, tok in step:
            results[v].append(tok)
    return {k: results[i * B : (i + 1) * B] for i, k in enumerate(keys)}


def _stackable(peft_model, adapter_names: Sequence[str]) -> bool:
    try:
        stacked_for(unwrap(peft_model), list(adapter_names))
        return True
    except UnsupportedAdapter:
        return False


def ensemble_stream(
    peft_model,
    prompts: Sequence[Sequence[int]],
    adapter_names: Sequence[str],
    weights: np.ndarray,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    sampler: Callable | None = None,
    backend: str = "auto",
    prompt_of: Sequence[int] | None = None,
    share_prefix: bool = True,
) -> Iterator[list[tuple[int, int]]]:
    """`ensemble_generate` one step at a time: yields [(prompt index, new token id), ...] for the
    prompts still generating (for streaming responses).

    prompt_of: decode len(prompt_of) sequences instead, sequence v continuing
    prompts[prompt_of[v]] with weights[v] (indices in the yielded pairs are then sequences).
    Sequences that share a prompt share its prefill on the stacked back-end (see
    `ensemble_generate_many`)."""
    names = list(adapter_names)
    prompt_of, w, limits = _check_stream_args(prompts, names, weights, max_new_tokens, backend, prompt_of)
    if not limits:
        return
    model = unwrap(peft_model)
    unknown = sorted(set(names) - set(getattr(model, "peft_config", {})) - {BACKBONE})
    if unknown:
        raise ValueError(f"adapters {unknown} are not loaded; loaded: {sorted(model.peft_config)} (or {BACKBONE!r})")
    idle = [b for b in range(len(limits)) if not np.any(w[b] != 0)]
    if idle:
        raise ValueError(f"prompts {idle[:5]} have weight 0 for every adapter; nothing to decode with")
    used = [a for a in range(len(names)) if np.any(w[:, a] != 0)]
    prompts = [list(map(int, p)) for p in prompts]
    stacked = None
    if backend != "peft":
        try:  # all of `names`, so that one cached stack serves every routing of these adapters
            stacked = stacked_for(model, names)
        except UnsupportedAdapter:
            if backend == "stacked":
                raise
    was_training = model.training
    model.eval()  # PEFT refuses adapter_names in training mode; decoding wants no dropout
    try:
        with torch.inference_mode():
            if stacked is not None:
                yield from _decode_stacked(
                    model,
                    stacked,
                    prompts,
                    w,
                    limits,
                    _eos_set(eos_token_id),
                    int(pad_token_id),
                    sampler,
                    prompt_of,
                    share_prefix,
                )
            else:  # no prefill sharing here: each sequence is its own prompt
                seqs = prompts if prompt_of is None else [prompts[i] for i in prompt_of]
                yield from _decode_peft(
                    model,
                    seqs,
                    [names[a] for a in used],
                    w[:, used],
                    limits,
                    _eos_set(eos_token_id),
                    int(pad_token_id),
                    sampler,
                )
    finally:
        if was_training:
            model.train()


def _check_stream_args(
    prompts: Sequence[Sequence[int]],
    names: list[str],
    weights: np.ndarray,
    max_new_tokens: int | Sequence[int],
    backend: str,
    prompt_of: Sequence[int] | None,
) -> tuple[np.ndarray | None, np.ndarray, list[int]]:
    """`ensemble_stream`'s arguments checked: (prompt_of as an array or None, weights as float64
    [sequences, adapters], one token limit per sequence)."""
    if prompt_of is not None:
        prompt_of = np.asarray(prompt_of, dtype=np.int64).reshape(-1)
        if prompt_of.size and (prompt_of.min() < 0 or prompt_of.max() >= len(prompts)):
            raise ValueError(f"prompt_of must index the {len(prompts)} prompts")
    b_total = len(prompts) if prompt_of is None else len(prompt_of)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (b_total, len(names)):
        raise ValueError(
            f"weights must have shape [num_sequences={b_total}, num_adapters={len(names)}], got {list(w.shape)}"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    limits = [int(max_new_tokens)] * b_total if np.isscalar(max_new_tokens) else [int(m) for m in max_new_tokens]
    if len(limits) != b_total or any(m < 1 for m in limits):
        raise ValueError(f"max_new_tokens must be >= 1 (one value or one per prompt), got {max_new_tokens}")
    if b_total and any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return prompt_of, w, limits


def _left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, width], left padded so every row's next token is the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = 1
    return ids, mask


# Shorter common prefixes go with the rest of the prompt: an extra forward call for a few tokens saves little.
MIN_SHARED_PREFIX = 4


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the prompts' longest common prefix, leaving every prompt at least one token of
    its own (the prefill's last position must be the prompt's)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


def _emit(
    active: list[int], next_ids: torch.Tensor, eos_t: torch.Tensor, produced: list[int], limits: list[int]
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The step's (prompt, token) pairs, and which active prompts are done after it."""
    done = torch.isin(next_ids, eos_t)
    emitted = []
    for i, (b, tok, fin) in enumerate(zip(active, next_ids.tolist(), done.tolist())):
        if not fin:
            emitted.append((b, tok))
            produced[b] += 1
            if produced[b] >= limits[b]:
                done[i] = True
    return emitted, done


# Model types whose causal-LM forward is `logits = lm_head(final hidden state)`, nothing after:
# for them the mix can move before the head (it is linear). Others (logit soft-capping, logit
# scales) mix logits, computed per row by the model's own forward.
_PLAIN_HEAD = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "phi3",
    "olmo",
    "olmo2",
    "smollm3",
    "starcoder2",
    "stablelm",
}


def _plain_head(hf_model) -> torch.nn.Linear | None:
    from peft.tuners.lora.layer import LoraLayer

    head = hf_model.get_output_embeddings()
    if (
        getattr(hf_model.config, "model_type", None) in _PLAIN_HEAD
        and isinstance(head, torch.nn.Linear)
        and not isinstance(head, LoraLayer)
    ):
        return head
    return None


def _prefill_plan(
    prompts: list[list[int]], w: np.ndarray, prompt_of: np.ndarray | None, share_prefix: bool, pad_token_id: int, device
):
    """The rows `_decode_stacked` prefills and decodes: (pre [R, (prompt, adapter)], shared
    prefix length, ids, mask, position_ids of the prefill rows, pairs [rows, (sequence, adapter)]
    of the decoding rows, src: the prefill row each decoding row copies, or None)."""
    V = len(w)
    fan_out = prompt_of is not None
    prompt_of = np.arange(V) if prompt_of is None else np.asarray(prompt_of, dtype=np.int64)
    # Prefill rows: one per (prompt, adapter) pair with a nonzero weight, so a skipped expert
    # costs nothing. When every prompt runs every adapter, rows go adapter-major (a * B + b):
    # the grouped layout.
    need = np.zeros((len(prompts), w.shape[1]), dtype=bool)
    np.logical_or.at(need, prompt_of, w != 0)
    if np.all(need):
        pre = np.argwhere(need.T)[:, ::-1]  # [R, (prompt, adapter)], sorted by adapter
    else:
        pre = np.argwhere(need)  # [R, (prompt, adapter)], sorted by prompt
    distinct = sorted(set(pre[:, 0].tolist()))  # one prompt alone has nothing to share
    shared = _common_prefix([prompts[i] for i in distinct]) if share_prefix and len(distinct) > 1 else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    ids, mask = _left_pad([p[shared:] for p in prompts], pad_token_id)
    pre_prompt = torch.as_tensor(pre[:, 0], device=device)
    ids, mask = ids.to(device)[pre_prompt], mask.to(device)[pre_prompt]
    if shared:
        mask = torch.cat([mask.new_ones(len(pre), shared), mask], dim=1)  # [prefix | pads | own tokens]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as HF generate: pads get 0, tokens 0..len-1
    if fan_out:  # decoding rows: one per (sequence, adapter) pair, each a copy of a prefill row
        pairs = np.argwhere(w != 0)
        slot = {(int(b), int(a)): r for r, (b, a) in enumerate(pre)}
        src = torch.as_tensor([slot[(int(prompt_of[v]), int(a))] for v, a in pairs], device=device)
    else:
        pairs, src = pre, None
    return pre, shared, ids, mask, position_ids, pairs, src


def _last_rows(hf_model, head, decoder, input_ids, attention_mask, positions, cache):
    """Every row's last hidden state (with a plain head, applied after mixing) or logits, and the cache."""
    if head is not None:
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
        )
        return out.last_hidden_state[:, -1, :], out.cache
    out = hf_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :], out.cache


def _mix(last: torch.Tensor, head, row_prompt: torch.Tensor, row_weight: torch.Tensor, n_active: int) -> torch.Tensor:
    """Mixed next-token logits [n_active, vocab] (eq. 5.10): row r adds row_weight[r] times its
    output to sequence row_prompt[r]."""
    mixed = torch.zeros(n_active, last.shape[-1], dtype=torch.float32, device=last.device)
    mixed.index_add_(0, row_prompt, last.float() * row_weight[:, None])
    if head is not None:  # W (sum_a w_a h_a) + (sum_a w_a) b == sum_a w_a (W h_a + b)
        logits = F.linear(mixed.to(head.weight.dtype), head.weight).float()
        if head.bias is not None:
            total = torch.zeros(n_active, device=last.device).index_add_(0, row_prompt, row_weight)
            logits = logits + total[:, None] * head.bias.float()
        mixed = logits
    return mixed


def _decode_stacked(
    model,
    stacked,
    prompts: list[list[int]],
    w: np.ndarray,
    limits: list[int],
    eos: list[int],
    pad_token_id: int,
    sampler,
    prompt_of: np.ndarray | None = None,
    share_prefix: bool = True,
) -> Iterator[list[tuple[int, int]]]:
    """Decode V sequences with weights w [V, A]. Sequence v continues prompts[prompt_of[v]]
    (default: v itself). Each (prompt, adapter) pair that any sequence uses is prefilled ONCE;
    sequences sharing a prompt then decode from copies of those cache rows (a KV cache depends
    on the prompt and the adapter only, not on the mixing weights).

    With `share_prefix`, the prompts' common leading tokens (for chat prompts, the template's
    system turn: 24 of SmolLM2's ~50 prompt tokens) are prefilled once per adapter, and every
    row's cache starts from a copy of its adapter's; the rest of each prompt is then prefilled
    after it, left padded *between* the prefix and the prompt's own tokens (masked out, with
    positions that skip the pads), which is what a full prefill of the whole prompt computes."""
    hf_model = model.get_base_model()  # the HF model with the LoRA layers injected
    head, decoder = _plain_head(hf_model), hf_model.get_decoder()
    device = next(model.parameters()).device
    V = len(w)
    pre, shared, ids, mask, position_ids, pairs, src = _prefill_plan(
        prompts, w, prompt_of, share_prefix, pad_token_id, device
    )
    row_prompt = torch.as_tensor(pairs[:, 0], device=device)  # position of the row's sequence in `active`
    row_adapter = torch.as_tensor(pairs[:, 1], device=device)
    row_weight = torch.as_tensor(w[pairs[:, 0], pairs[:, 1]], dtype=torch.float32, device=device)
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    active = list(range(V))  # sequence index of each active sequence, in order
    produced = [0] * V

    forward = functools.partial(_last_rows, hf_model, head, decoder)
    mix = lambda last: _mix(last, head, row_prompt, row_weight, len(active))  # noqa: E731

    with stacked.active():
        cache = None
        if shared:  # the common prefix once per adapter, then copied to that adapter's rows
            adapters = sorted(set(pre[:, 1].tolist()))
            prefix = torch.as_tensor(prompts[int(pre[0, 0])][:shared], device=device).repeat(len(adapters), 1)
            stacked.set_rows(torch.as_tensor(adapters, device=device))
            _, cache = forward(prefix, torch.ones_like(prefix), position_ids[: len(adapters), :shared], None)
            slot = {a: i for i, a in enumerate(adapters)}
            cache.batch_select_indices(torch.as_tensor([slot[int(a)] for a in pre[:, 1]], device=device))
        stacked.set_rows(torch.as_tensor(pre[:, 1], device=device))
        last, cache = forward(ids, mask, position_ids[:, shared:], cache)
        last_pos = position_ids[:, -1]
        if src is not None:
            cache.batch_select_indices(src)
            last, mask, last_pos = last[src], mask[src], last_pos[src]
            stacked.set_rows(row_adapter)
        logits = mix(last)
        for _ in range(max(limits)):
            next_ids = logits.argmax(-1) if sampler is None else sampler(logits, active).to(device)
            emitted, done = _emit(active, next_ids, eos_t, produced, limits)
            yield emitted
            if bool(done.all()):
                break
            if bool(done.any()):  # drop finished sequences' rows from the batch and the cache
                alive = (~done).nonzero().flatten()
                remap = torch.full((len(active),), -1, dtype=torch.long, device=device)
                remap[alive] = torch.arange(len(alive), device=device)
                rows = (remap[row_prompt] >= 0).nonzero().flatten()
                cache.batch_select_indices(rows)
                row_prompt, row_adapter, row_weight = remap[row_prompt[rows]], row_adapter[rows], row_weight[rows]
                mask, last_pos, next_ids = mask[rows], last_pos[rows], next_ids[alive]
                active = [active[i] for i in alive.tolist()]
                stacked.set_rows(row_adapter)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last_pos = last_pos + 1
            last, cache = forward(next_ids[row_prompt][:, None], mask, last_pos[:, None], cache)
            logits = mix(last)


def _decode_peft(
    model,
    prompts: list[list[int]],
    names: list[str],
    w: np.ndarray,
    limits: list[int],
    eos: list[int],
    pad_token_id: int,
    sampler,
) -> Iterator[list[tuple[int, int]]]:
    device = next(model.parameters()).device
    n_adapters = len(names)
    ids, mask = _left_pad(prompts, pad_token_id)
    # row b*A + a carries adapter a of prompt b
    ids, mask = ids.repeat_interleave(n_adapters, 0).to(device), mask.repeat_interleave(n_adapters, 0).to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as HF generate: pads get 0, tokens 0..len-1
    weights = torch.as_tensor(w, dtype=torch.float32, device=device)  # [B_active, A]
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=device)
    active = list(range(len(prompts)))  # prompt index of each active prompt, in row order
    produced = [0] * len(prompts)

    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        adapter_names=names * len(active),
        logits_to_keep=1,
    )
    cache, last_pos = out.cache, position_ids[:, -1]
    for _ in range(max(limits)):
        logits = out.logits[:, -1, :].float().view(len(active), n_adapters, -1)
        mixed = torch.einsum("ba,bav->bv", weights, logits)  # eq. 5.10
        next_ids = mixed.argmax(-1) if sampler is None else sampler(mixed, active).to(device)
        emitted, done = _emit(active, next_ids, eos_t, produced, limits)
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
        out = model(
            input_ids=next_ids.repeat_interleave(n_adapters)[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            cache=cache,
            use_cache=True,
            adapter_names=names * len(active),
        )
        cache = out.cache


def single_generate(
    peft_model,
    prompts: Sequence[Sequence[int]],
    adapter_name: str,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    backend: str = "auto",
) -> list[list[int]]:
    """Greedy decoding with one adapter ("__base__": the backbone alone), same conventions as
    `ensemble_generate` (the base-only and backbone-only baselines)."""
    return ensemble_generate(
        peft_model,
        prompts,
        [adapter_name],
        np.ones((len(prompts), 1)),
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        backend=backend,
    )
