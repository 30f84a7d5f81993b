"""The continuous-batching decode loop (elrea_ray.decoding) on the tiny random Llama, no Ray:
requests join and leave a running batch at step boundaries, each with its own sampling state."""

from __future__ import annotations

import math
import queue

import numpy as np
import pytest
import torch

from elrea_ray.decoding import DecodeLoop, GenRequest, InvalidRequest
from elrea_ray.ensemble import ensemble_generate
from elrea_ray.model import load_adapters, load_tokenizer
from tests.test_ensemble import CFG, NAMES, train_adapters

W = np.array([0.3, 0.5, 0.7])  # a dense routing over base, expert-00, expert-01


def route_with(w):
    def route(reqs):
        """Fixed weights, one-hot for a forced adapter (as Engine._weights)."""
        out = np.tile(w, (len(reqs), 1))
        for i, r in enumerate(reqs):
            if r.adapter is not None:
                out[i] = np.eye(len(NAMES))[NAMES.index(r.adapter)]
        return out

    return route


route = route_with(W)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_adapters(CFG, train_adapters(tmp_path_factory.mktemp("adapters")))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CFG)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = [
        "What is 3 + 4?",
        "Spell this word backward: hello",
        "berry",
        "How many times does the letter r appear in the text: berry?",
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
        for t in texts
    ]


def new_loop(model, tok, stop_ids=(), **kw):
    return DecodeLoop(model, NAMES, tok, list(stop_ids), route=route, **kw)


class Recorder:
    """A request's sink: its events in order."""

    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append(ev)

    @property
    def tokens(self):
        return [t for e in self.events if e.kind == "delta" for t in e.token_ids]

    @property
    def final(self):
        return self.events[-1] if self.events and self.events[-1].kind in ("done", "error") else None


def solo(model, tok, req, stop_ids=()):
    return new_loop(model, tok, stop_ids).generate([req])[0]


def test_alone_equals_the_ensemble_decoder(model, tok, prompts):
    """One request through the loop = ensemble_generate of that prompt and routing (greedy)."""
    for p in prompts[:2]:
        got = solo(model, tok, GenRequest(p, max_tokens=8))
        want = ensemble_generate(model, [p], NAMES, W[None], 8, None, tok.pad_token_id)[0]
        assert got.token_ids == want and got.finish_reason == "length"
        assert got.text == tok.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize(
    "backend,w", [("stacked", W), ("stacked", np.array([0.0, 0.5, 0.7])), ("peft", W)], ids=["dense", "sparse", "peft"]
)
def test_request_admitted_mid_decode_gets_its_solo_tokens(model, tok, prompts, backend, w):
    want = ensemble_generate(model, prompts[:3], NAMES, np.tile(w, (3, 1)), 10, None, tok.pad_token_id)
    loop = DecodeLoop(model, NAMES, tok, [], route=route_with(w), backend=backend)
    assert (loop.stacked is None) == (backend == "peft")
    recs = [Recorder() for _ in range(3)]
    loop.submit(GenRequest(prompts[0], max_tokens=10), recs[0])
    for _ in range(3):
        loop.step()
    assert len(recs[0].tokens) == 3
    loop.submit(GenRequest(prompts[1], max_tokens=10), recs[1])
    loop.step()
    assert loop.running == 2 and len(recs[1].tokens) == 1  # joined at the step boundary
    for _ in range(4):
        loop.step()
    loop.submit(GenRequest(prompts[2], max_tokens=10), recs[2])
    while loop.step():
        pass
    assert [r.tokens for r in recs] == want
    assert all(r.final.kind == "done" and r.final.result.token_ids == t for r, t in zip(recs, want))
    assert loop.running == 0 and loop.cache is None


def test_cancelled_row_stops_within_one_step_and_frees_its_slot(model, tok, prompts):
    loop = new_loop(model, tok, max_batch_size=2)
    a, b, c = Recorder(), Recorder(), Recorder()
    loop.submit(GenRequest(prompts[0], max_tokens=12), a)
    hb = loop.submit(GenRequest(prompts[1], max_tokens=12), b)
    loop.submit(GenRequest(prompts[2], max_tokens=4), c)  # waits: the batch is full
    loop.step()
    loop.step()
    assert loop.running == 2 and loop.queued == 1 and len(b.tokens) == 2
    hb.cancel()
    loop.step()
    assert len(b.tokens) == 2 and hb.finished.is_set()  # no token after the cancel
    assert loop.running == 2 and loop.queued == 0 and len(c.tokens) == 1  # its slot went to c
    while loop.step():
        pass
    assert a.final.result.token_ids == solo(model, tok, GenRequest(prompts[0], max_tokens=12)).token_ids
    assert c.final.result.token_ids == solo(model, tok, GenRequest(prompts[2], max_tokens=4)).token_ids
    assert loop.stats["requests_cancelled"] == 1 and loop.stats["requests_finished"] == 2
    # a request cancelled while it waits never runs
    d = Recorder()
    loop.submit(GenRequest(prompts[3], max_tokens=4), d).cancel()
    assert not loop.step() and d.events == [] and loop.stats["requests_cancelled"] == 2


def test_stop_string_ends_its_row_at_once_while_the_others_continue(model, tok, prompts):
    full = solo(model, tok, GenRequest(prompts[1], max_tokens=10))
    # a stop string that the text reaches after a few tokens
    k = next(
        k
        for k in range(2, 8)
        if len(tok.decode(full.token_ids[:k], skip_special_tokens=True))
        > len(tok.decode(full.token_ids[: k - 1], skip_special_tokens=True)) + 1
    )
    before = tok.decode(full.token_ids[: k - 1], skip_special_tokens=True)
    stop = tok.decode(full.token_ids[:k], skip_special_tokens=True)[len(before) :][:2]
    assert stop and stop not in before
    loop = new_loop(model, tok)
    long, short = Recorder(), Recorder()
    loop.submit(GenRequest(prompts[0], max_tokens=10), long)
    loop.submit(GenRequest(prompts[1], max_tokens=10, stop=[stop]), short)
    steps = 0
    while short.final is None:
        loop.step()
        steps += 1
    assert steps == k and loop.running == 1  # left the batch at the step that completed the stop string
    res = short.final.result
    assert res.finish_reason == "stop" and res.text == before and stop not in res.text
    assert "".join(e.text for e in short.events if e.kind == "delta") == res.text  # never streamed the stop
    while loop.step():
        pass
    assert long.final.result.token_ids == solo(model, tok, GenRequest(prompts[0], max_tokens=10)).token_ids


def test_bad_sampling_state_is_refused_or_confined_to_its_request(model, tok, prompts):
    loop = new_loop(model, tok)
    for bad, field in [
        (dict(seed=2**64), "seed"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(logit_bias={10**9: 1.0}), "logit_bias"),
        (dict(logit_bias={5: 1e9}), "logit_bias"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_tokens=99, max_tokens=4), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(adapter="expert-99"), "adapter"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            loop.submit(GenRequest(prompts[0], **bad), Recorder())
        assert e.value.field == field
    assert loop.queued == 0
    greedy = solo(model, tok, GenRequest(prompts[0], max_tokens=6)).token_ids
    # a temperature of 1e-38 decodes greedily (no NaN), next to a seeded sampled request and a request
    # whose routing fails
    failing = list(prompts[2])

    def flaky_route(reqs):
        if any(list(r.prompt_ids) == failing for r in reqs):
            raise RuntimeError("no features for this prompt")
        return route(reqs)

    loop = DecodeLoop(model, NAMES, tok, [], route=flaky_route)
    tiny, sampled, broken = Recorder(), Recorder(), Recorder()
    loop.submit(GenRequest(prompts[0], max_tokens=6, temperature=1e-38), tiny)
    loop.submit(GenRequest(prompts[1], max_tokens=6, temperature=1.0, seed=2**64 - 1), sampled)
    loop.submit(GenRequest(failing, max_tokens=6), broken)
    while loop.step():
        pass
    assert tiny.final.kind == "done" and tiny.final.result.token_ids == greedy
    assert broken.final.kind == "error" and "routing failed" in broken.final.error
    # the seeded request draws from its own generator: the same tokens alone
    alone = solo(model, tok, GenRequest(prompts[1], max_tokens=6, temperature=1.0, seed=2**64 - 1))
    assert sampled.final.result.token_ids == alone.token_ids
    assert loop.stats["requests_failed"] == 1


def reference(model, tok, prompt, steps, process):
    """Greedy decoding of one prompt with ensemble_generate, `process(mixed [V], produced)`
    applied to the mixed logits before the argmax (the documented formula, written out)."""
    produced: list[int] = []
    seen: list[torch.Tensor] = []

    def sampler(mixed, active):
        row = process(mixed[0].clone(), produced)
        seen.append(row)
        t = int(row.argmax())
        produced.append(t)
        return torch.tensor([t])

    out = ensemble_generate(model, [prompt], NAMES, W[None], steps, None, tok.pad_token_id, sampler=sampler)[0]
    return out, seen


def test_penalties_and_logit_bias_follow_the_openai_formula(model, tok, prompts):
    pres, freq, bias = 0.7, 1.3, {7: 3.0, 11: -2.0}

    def process(row, produced):
        counts = (
            torch.bincount(torch.tensor(produced, dtype=torch.long), minlength=row.shape[0]).float()
            if produced
            else torch.zeros_like(row)
        )
        row = row - freq * counts - pres * (counts > 0).float()
        for t, v in bias.items():
            row[t] += v
        return row

    want, _ = reference(model, tok, prompts[0], 10, process)
    got = solo(
        model,
        tok,
        GenRequest(prompts[0], max_tokens=10, presence_penalty=pres, frequency_penalty=freq, logit_bias=bias),
    )
    assert got.token_ids == want
    plain = solo(model, tok, GenRequest(prompts[0], max_tokens=10)).token_ids
    assert want != plain  # the controls changed the output
    # +100 forces a token, greedy or sampled
    for extra in ({}, {"temperature": 1.0, "seed": 3}):
        forced = solo(model, tok, GenRequest(prompts[1], max_tokens=5, logit_bias={42: 100}, **extra))
        assert forced.token_ids == [42] * 5


def test_min_tokens_masks_end_of_sequence_and_ignore_eos_decodes_past_it(model, tok, prompts):
    free = solo(model, tok, GenRequest(prompts[0], max_tokens=10)).token_ids
    eos = free[2]  # used as the end-of-sequence id: the row stops after 2 tokens
    first = free.index(eos)
    stopped = solo(model, tok, GenRequest(prompts[0], max_tokens=10), stop_ids=[eos])
    assert stopped.token_ids == free[:first] and stopped.finish_reason == "stop"
    held = solo(model, tok, GenRequest(prompts[0], max_tokens=10, min_tokens=6), stop_ids=[eos])
    assert len(held.token_ids) >= 6 and eos not in held.token_ids[:6]
    ignored = solo(model, tok, GenRequest(prompts[0], max_tokens=10, ignore_eos=True), stop_ids=[eos])
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_logprobs_are_of_the_mixed_distribution(model, tok, prompts):
    want, seen = reference(model, tok, prompts[0], 6, lambda row, produced: row)
    loop = new_loop(model, tok)
    rec = Recorder()
    loop.submit(GenRequest(prompts[0], max_tokens=6, logprobs=5), rec)
    loop.submit(GenRequest(prompts[1], max_tokens=9), Recorder())  # batched with another request
    while loop.step():
        pass
    res = rec.final.result
    assert res.token_ids == want and len(res.logprobs) == 6
    assert [e.logprobs[0] for e in rec.events if e.kind == "delta"] == res.logprobs
    for entry, tok_id, row in zip(res.logprobs, want, seen):
        full = torch.log_softmax(row, -1)
        assert math.isclose(float(full.exp().sum()), 1.0, rel_tol=1e-5)  # the whole distribution
        assert entry["token_id"] == tok_id and entry["logprob"] == pytest.approx(float(full[tok_id]), abs=1e-4)
        top_ids = [t for t, _ in entry["top"]]
        assert len(top_ids) == 5 and top_ids[0] == tok_id  # greedy: the chosen token is the most likely
        assert [v for _, v in entry["top"]] == pytest.approx(full.topk(5).values.tolist(), abs=1e-4)
        assert sum(math.exp(v) for _, v in entry["top"]) <= 1.0 + 1e-6


def test_identical_prompts_in_flight_share_routing_and_prefill(model, tok, prompts):
    calls = []

    def counting_route(reqs):
        calls.append(len(reqs))
        return route(reqs)

    loop = DecodeLoop(model, NAMES, tok, [], route=counting_route)
    recs = [Recorder() for _ in range(3)]
    for i, r in enumerate(recs):  # three "n" choices of one prompt, sampled with their own seeds
        loop.submit(GenRequest(prompts[0], max_tokens=6, temperature=1.0, seed=i), r)
    loop.step()
    later = Recorder()
    loop.submit(GenRequest(prompts[0], max_tokens=4), later)  # arrives while they run: routing reused
    while loop.step():
        pass
    assert calls == [1] and loop.stats["routings_shared"] == 3
    assert all(r.final.kind == "done" for r in [*recs, later])
    assert later.final.result.token_ids == solo(model, tok, GenRequest(prompts[0], max_tokens=4)).token_ids


def test_loop_thread_streams_each_request_to_its_own_end(model, tok, prompts):
    loop = new_loop(model, tok)
    loop.start()
    try:
        q_long, q_short = queue.Queue(), queue.Queue()
        loop.submit(GenRequest(prompts[0], max_tokens=30), q_long.put)
        loop.submit(GenRequest(prompts[1], max_tokens=3), q_short.put)
        short = []
        while not short or short[-1].kind == "delta":
            short.append(q_short.get(timeout=120))
        assert short[-1].kind == "done" and len(short[-1].result.token_ids) == 3
        loop.check_health()
        long = []
        while not long or long[-1].kind == "delta":
            long.append(q_long.get(timeout=120))
        assert long[-1].kind == "done" and len(long[-1].result.token_ids) == 30
        assert loop.stats["max_running_seen"] == 2
    finally:
        loop.stop()
    with pytest.raises(RuntimeError, match="not running"):
        loop.check_health()


def test_top_p_keeps_the_nucleus(model, tok, prompts):
    greedy = solo(model, tok, GenRequest(prompts[0], max_tokens=6)).token_ids
    narrow = solo(model, tok, GenRequest(prompts[0], max_tokens=6, temperature=1.5, top_p=1e-6, seed=1))
    assert narrow.token_ids == greedy  # only the most likely token is left in the nucleus
    wide = [solo(model, tok, GenRequest(prompts[0], max_tokens=6, temperature=1.5, seed=s)).token_ids for s in range(3)]
    assert len({tuple(w) for w in wide}) > 1  # different seeds, different samples
