"""Routed-ensemble greedy decoding (paper eq. 5.10) on the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elrea_ray.checkpoints import save_epoch_checkpoint, unwrap
from elrea_ray.config import ModelConfig
from elrea_ray.ensemble import ensemble_generate, single_generate
from elrea_ray.model import load_adapters, load_tokenizer, lora_parameters, new_lora_model

CFG = ModelConfig(name_or_path="tiny-random-llama", lora_dropout=0.0)
NAMES = ["base", "expert-00", "expert-01"]
NEW = 10


def train_adapters(folder):
    """A base adapter after a few Adam steps (an epoch checkpoint) and experts that perturb it.
    Every adapter gets random noise too: the tiny random backbone alone repeats one token, and
    the tests need adapters whose greedy outputs differ."""
    model = new_lora_model(CFG, seed=0)
    opt = torch.optim.Adam([p for _, p in lora_parameters(model)], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name in NAMES:
        with torch.no_grad():
            for _, p in lora_parameters(model):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        if name == NAMES[0]:
            save_epoch_checkpoint(folder / name, model, opt, step=4, lr=1e-2, mean_lr=1e-2, epoch=1)
        else:
            model.save_pretrained(str(folder / name))
    return {n: str(folder / n) for n in NAMES}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_adapters(CFG, train_adapters(tmp_path_factory.mktemp("adapters")))


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(CFG)
    texts = [
        "What is 3 + 4?",
        "Spell this word backward: hello",
        "berry",
        "How many times does the letter r appear in the text: berry? Solve 12 * 7 = 84.",
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
        for t in texts
    ]


def hf_generate(model, prompts, adapter, eos, pad, new=NEW):
    """Reference: HF generate (greedy), batched with left padding, with that adapter active."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    if adapter == "__base__":
        with model.disable_adapter():
            out = model.generate(input_ids=ids, **kwargs)
    else:
        model.set_adapter(adapter)
        out = model.generate(input_ids=ids, **kwargs)
        model.set_adapter(NAMES[0])
    eos_set = {eos} if isinstance(eos, int) else set(eos)
    result = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result


def naive_ensemble(model, prompts, names, weights, eos, new=NEW):
    """Reference: per step, each adapter alone over the whole sequence, no KV cache, no padding."""
    eos_set = {eos} if isinstance(eos, int) else set(eos)
    results = []
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq, out = list(p), []
            for _ in range(new):
                mixed = 0
                for a, name in enumerate(names):
                    if name == "__base__":
                        with model.disable_adapter():
                            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
                    else:
                        model.set_adapter(name)
                        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
                    mixed = mixed + float(weights[b, a]) * logits
                nxt = int(mixed.argmax())
                if nxt in eos_set:
                    break
                out.append(nxt)
                seq.append(nxt)
            results.append(out)
    model.set_adapter(names[0] if names[0] != "__base__" else NAMES[0])
    return results


def an_eos_mid_generation(model, prompts, pad):
    """A token expert-00 emits in the middle of prompt 0's greedy output, so that using
    it as EOS makes that prompt stop early while others (likely) go on."""
    free = hf_generate(model, prompts, NAMES[1], eos=[], pad=pad)
    return free[0][NEW // 2]


@pytest.mark.parametrize("adapter", NAMES + ["__base__"])
def test_one_hot_weights_equal_hf_generate_of_that_adapter(model, prompts, adapter):
    pad = 0
    for eos in (2, [an_eos_mid_generation(model, prompts, pad), 2]):
        names = NAMES + ["__base__"]
        w = np.zeros((len(prompts), len(names)))
        w[:, names.index(adapter)] = 1.0
        got = ensemble_generate(model, prompts, names, w, NEW, eos, pad)
        want = hf_generate(model, prompts, adapter, eos, pad)
        assert got == want
        assert single_generate(model, prompts, adapter, NEW, eos, pad) == want


def test_weighted_ensemble_equals_naive_reference(model, prompts):
    rng = np.random.default_rng(0)
    names = NAMES + ["__base__"]
    w = rng.uniform(0.1, 1.5, size=(len(prompts), len(names)))  # need not sum to 1
    eos = [an_eos_mid_generation(model, prompts, 0), 2]
    got = ensemble_generate(model, prompts, names, w, NEW, eos, pad_token_id=0)
    assert got == naive_ensemble(model, prompts, names, w, eos)
    assert len({len(g) for g in got}) > 1  # some prompts stopped early (EOS), others did not
    # The ensemble really mixes: it differs from each adapter alone on some prompt.
    alone = [single_generate(model, prompts, n, NEW, 2, 0) for n in names]
    assert all(a != ensemble_generate(model, prompts, names, w, NEW, 2, 0) for a in alone)


def test_adapters_with_zero_weight_everywhere_are_skipped(model, prompts):
    w = np.array([[0.7, 0.3, 0.0]] * len(prompts))
    with_zero = ensemble_generate(model, prompts, NAMES, w, NEW, 2, 0)
    assert with_zero == ensemble_generate(model, prompts, NAMES[:2], w[:, :2], NEW, 2, 0)


def test_bad_arguments_are_explained(model, prompts):
    with pytest.raises(ValueError, match="shape"):
        ensemble_generate(model, prompts, NAMES, np.ones((len(prompts), 2)), NEW, 2, 0)
    with pytest.raises(ValueError, match="not loaded"):
        ensemble_generate(model, prompts, ["nope"], np.ones((len(prompts), 1)), NEW, 2, 0)
    with pytest.raises(ValueError, match="weight 0"):
        ensemble_generate(model, prompts, NAMES, np.zeros((len(prompts), 3)), NEW, 2, 0)
    assert ensemble_generate(model, [], NAMES, np.zeros((0, 3)), NEW, 2, 0) == []


def recorded(model, prompts, names, w, backend, eos=2):
    """Greedy tokens and every step's mixed logits (through the sampler hook) of one back-end."""
    steps = []

    def greedy(mixed, active):
        steps.append((list(active), mixed.clone()))
        return mixed.argmax(-1)

    tokens = ensemble_generate(model, prompts, names, w, NEW, eos, 0, sampler=greedy, backend=backend)
    return tokens, steps


@pytest.mark.parametrize("backbone", [True, False], ids=["with-backbone", "adapters-only"])
def test_stacked_path_equals_peft_mixed_batch(model, prompts, backbone):
    rng = np.random.default_rng(1)
    names = NAMES + ["__base__"] if backbone else list(NAMES)
    w = rng.uniform(0.1, 1.5, size=(len(prompts), len(names)))
    eos = [an_eos_mid_generation(model, prompts, 0), 2]  # prompts leave the batch at different steps
    got, got_steps = recorded(model, prompts, names, w, "stacked", eos)
    stacked = model._elrea_stacked[tuple(names)]
    assert stacked._grouped[0]  # dense routing took the grouped (bmm) layout
    for _, a_cat, b_cat, _, a_grp, b_grp in stacked._layers:
        # every slot a real adapter: the grouped operands are views of the concatenations (no copy);
        # with the backbone's empty slot they are zero-padded copies
        shares = (
            a_grp.untyped_storage().data_ptr() == a_cat.untyped_storage().data_ptr()
            and b_grp.untyped_storage().data_ptr() == b_cat.untyped_storage().data_ptr()
        )
        assert shares == (not backbone)
    want, want_steps = recorded(model, prompts, names, w, "peft", eos)
    assert got == want
    assert len(got_steps) == len(want_steps)
    for (active_s, logits_s), (active_p, logits_p) in zip(got_steps, want_steps):
        assert active_s == active_p
        torch.testing.assert_close(logits_s, logits_p, rtol=1e-4, atol=1e-4)


def test_zero_weight_expert_is_not_run_for_that_prompt(model, prompts):
    """Sparse routing: a per-prompt weight of exactly 0 drops that (prompt, adapter) row, and
    the result equals decoding that prompt without the adapter at all."""
    w = np.array([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    got = ensemble_generate(model, prompts, NAMES, w, NEW, 2, 0, backend="stacked")
    assert not model._elrea_stacked[tuple(NAMES)]._grouped[0]  # per-prompt rows: the masked layout
    for b, p in enumerate(prompts):
        keep = [a for a in range(len(NAMES)) if w[b, a] != 0]
        alone = ensemble_generate(model, [p], [NAMES[a] for a in keep], w[b : b + 1, keep], NEW, 2, 0, backend="peft")
        assert got[b] == alone[0]


def test_stacked_forward_does_the_same_ops_whatever_the_number_of_adapters(model, prompts):
    """Per decoding step, the stacked path issues the same number of matmuls for 2 adapters as
    for 4 (no Python loop over adapters inside a LoRA module), dense or sparse routing."""
    from torch.overrides import TorchFunctionMode

    class CountLinear(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.linear, torch.bmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    for sparse in (False, True):
        counts = []
        for names in (NAMES[:2], NAMES + ["__base__"]):
            w = np.ones((2, len(names)))
            w[0, 0] = 0.0 if sparse else 1.0
            with CountLinear() as mode:
                ensemble_generate(model, prompts[:2], names, w, 3, eos_token_id=None, pad_token_id=0, backend="stacked")
            counts.append(mode.n)
        assert counts[0] == counts[1] > 0


def test_several_routings_share_the_prefill_and_equal_separate_calls(model, prompts):
    """ensemble_generate_many = one ensemble_generate per routing (tokens), while each
    (prompt, adapter) pair is prefilled once: the prompt forward has one row per pair used."""
    from elrea_ray.ensemble import _common_prefix, ensemble_generate_many

    names = ["__base__", *NAMES]
    B = len(prompts)
    rng = np.random.default_rng(2)
    sets = {
        "backbone": np.eye(len(names))[[0] * B],
        "base": np.eye(len(names))[[1] * B],
        "dense": np.concatenate([np.zeros((B, 1)), rng.uniform(0.1, 1.5, (B, 3))], 1),
        "sparse": np.array([[0, 0.6, 0.4, 0.0], [0, 0.0, 0.5, 0.5], [0, 1.0, 0, 0], [0, 0.2, 0.3, 0.5]]),
    }
    eos = [an_eos_mid_generation(model, prompts, 0), 2]
    seen = []
    hook = (
        model.get_base_model()
        .get_decoder()
        .embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    )
    try:
        got = ensemble_generate_many(model, prompts, names, sets, NEW, eos, 0)
    finally:
        hook.remove()
    shared = _common_prefix(prompts)
    assert seen[0] == (len(names), shared)  # the common prefix, once per adapter
    assert seen[1][0] == B * len(names)  # 16 prefill rows, not 4 + 4 + 12 + 8 = 28
    assert all(s[1] == 1 for s in seen[2:])  # then one token per row and step
    for k, w in sets.items():
        assert got[k] == ensemble_generate(model, prompts, names, w, NEW, eos, 0), k
    assert len({len(g) for g in got["dense"]}) > 1  # sequences leave the joint batch at different steps
    with pytest.raises(ValueError, match="shape"):
        ensemble_generate_many(model, prompts, names, {"x": np.ones((B, 2))}, NEW, 2, 0)


def test_common_prompt_prefix_is_prefilled_once_per_adapter(model, prompts):
    """The prompts' shared chat-template prefix is prefilled once per adapter (one row each),
    then copied to that adapter's rows: tokens and mixed logits equal a full prefill of every row."""
    from elrea_ray.ensemble import _common_prefix

    shared = _common_prefix(prompts)
    assert shared >= 4  # the template's system turn
    w = np.random.default_rng(3).uniform(0.1, 1.5, size=(len(prompts), len(NAMES)))
    eos = [an_eos_mid_generation(model, prompts, 0), 2]
    calls: list[tuple] = []
    hook = (
        unwrap(model)
        .get_input_embeddings()
        .register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    )
    seen = {}
    try:
        for share in (True, False):
            steps: list[torch.Tensor] = []

            def greedy(mixed, active):
                steps.append(mixed.clone())
                return mixed.argmax(-1)

            calls.clear()
            tokens = ensemble_generate(
                model, prompts, NAMES, w, NEW, eos, 0, sampler=greedy, backend="stacked", share_prefix=share
            )
            seen[share] = (tokens, steps, list(calls))
    finally:
        hook.remove()
    width, rows = max(map(len, prompts)), len(prompts) * len(NAMES)
    assert seen[True][2][:2] == [(len(NAMES), shared), (rows, width - shared)]
    assert seen[False][2][0] == (rows, width)
    assert seen[True][0] == seen[False][0]
    assert len(seen[True][1]) == len(seen[False][1])
    for a, b in zip(seen[True][1], seen[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # one prompt alone: nothing is shared (its whole prompt is already prefilled once per adapter)
    calls.clear()
    hook = (
        unwrap(model)
        .get_input_embeddings()
        .register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    )
    try:
        ensemble_generate(model, prompts[:1], NAMES, w[:1], 2, None, 0, backend="stacked")
    finally:
        hook.remove()
    assert calls[0] == (len(NAMES), len(prompts[0]))
