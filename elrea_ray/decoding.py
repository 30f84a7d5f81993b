"""Continuous batching for the routed ensemble: one decode loop per replica, each request its own row.

The loop runs decoding steps over a running batch of sequences. At every step boundary it

1. drops sequences whose client cancelled (their rows leave the batch before the next forward),
2. admits waiting requests while fewer than `max_batch_size` sequences run: routes them (identical
   prompts in flight share one routing), prefills their (prompt, adapter) rows on their own, and
   merges those rows into the running KV cache (left padding: the shorter cache gets masked
   columns on the left, as HF generate pads a batch),
3. picks every sequence's next token from its mixed logits (eq. 5.10) with the request's own
   sampling state (penalties, logit_bias, min_tokens, temperature, top_p, its own generator),
4. ends the sequences that finished (end-of-sequence or end-of-turn id, a stop string, max_tokens)
   and runs one forward of one token per remaining row.

A sequence whose sampling state fails (no finite logit left, a generator error) ends with an error
event of its own; the others keep decoding. The forward is the stacked multi-adapter forward of
`elrea_ray.stacked` (all C+1 adapters of every sequence in one batch), or PEFT's mixed-adapter batch
when the adapters use a LoRA feature the stacked forward lacks. No Ray here: `serve_apps/elrea_app.py`
drives it from a Serve replica, tests drive it step by step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from elrea_ray.checkpoints import unwrap
from elrea_ray.ensemble import MIN_SHARED_PREFIX, _common_prefix, _left_pad, _plain_head
from elrea_ray.stacked import BACKBONE, UnsupportedAdapter, stacked_for

log = logging.getLogger(__name__)

# Temperatures below this decode greedily: logits / 1e-38 overflow to inf and the softmax to NaN
# (vLLM uses the same threshold).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_BIAS = 100.0  # OpenAI's logit_bias range is [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's presence/frequency penalty range is [-2, 2]


class InvalidRequest(ValueError):
    """A request the engine cannot decode, found before it joins the batch; `field` names the
    GenRequest field that is wrong."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k_experts: int | None = None
    adapter: str | None = None  # force one adapter ("base" or "expert-XX"); None: routed ensemble
    # Sampling controls on the mixed next-token distribution (OpenAI / vLLM semantics).
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # end-of-sequence ids are masked until this many tokens are out
    ignore_eos: bool = False  # decode to max_tokens (stop strings still end the row)
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely


@dataclass
class GenResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-sequence or stop string) or "length"
    routing: dict
    # Per generated token, when the request asked for logprobs: {"token_id", "logprob",
    # "top": [[token_id, logprob], ...]} of the mixed distribution the token was drawn from.
    logprobs: list[dict] | None = None


@dataclass
class Event:
    """One item of a request's stream: "delta" (the text and token ids of one step, and the token's
    logprobs when asked), then exactly one "done" (with the result) or "error"."""

    kind: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    result: object = None  # GenResult, for "done"
    error: str | None = None


class Handle:
    """A submitted request: `cancel()` from any thread takes its row out of the batch at the next
    step boundary (or out of the queue); `finished` is set once its final event was sent."""

    def __init__(self, req, sink: Callable[[Event], None]):
        self.req, self.sink = req, sink
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()

    def _send(self, event: Event) -> None:
        if self.finished.is_set():
            return
        if event.kind in ("done", "error"):
            self.finished.set()
        try:
            self.sink(event)
        except Exception as e:  # a sink that fails (e.g. its event loop closed) ends only this request
            log.warning("request sink failed: %s", type(e).__name__)
            self.cancelled.set()


def check_request(req, names: Sequence[str], vocab_size: int, max_experts: int | None = None) -> None:
    """Every field of a GenRequest the engine relies on, checked before the request joins a batch."""
    ids = req.prompt_ids
    if not isinstance(ids, (list, tuple)) or not ids:
        raise InvalidRequest("prompt_ids must be a non-empty list of token ids", "prompt_ids")
    bad = next(
        (
            i
            for i, t in enumerate(ids)
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size
        ),
        None,
    )
    if bad is not None:
        raise InvalidRequest(f"prompt_ids[{bad}] = {ids[bad]!r} is not a token id in [0, {vocab_size})", "prompt_ids")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}", "max_tokens")
    t = req.temperature
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {t!r}", "temperature")
    p = req.top_p
    if not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise InvalidRequest(f"top_p must be a number in (0, 1], got {p!r}", "top_p")
    if req.seed is not None and (
        isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED
    ):
        raise InvalidRequest(f"seed must be an integer in [0, 2**64 - 1], got {req.seed!r}", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if not isinstance(v, (int, float)) or not -MAX_PENALTY <= v <= MAX_PENALTY:
            raise InvalidRequest(f"{name} must be a number in [-2, 2], got {v!r}", name)
    if not isinstance(req.logit_bias, dict):
        raise InvalidRequest("logit_bias must map token ids to numbers", "logit_bias")
    for k, v in req.logit_bias.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < vocab_size:
            raise InvalidRequest(f"logit_bias key {k!r} is not a token id in [0, {vocab_size})", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -MAX_BIAS <= v <= MAX_BIAS:
            raise InvalidRequest(f"logit_bias[{k}] must be a number in [-100, 100], got {v!r}", "logit_bias")
    if not isinstance(req.min_tokens, int) or not 0 <= req.min_tokens <= req.max_tokens:
        raise InvalidRequest(
            f"min_tokens must be an integer in [0, max_tokens={req.max_tokens}], got {req.min_tokens!r}", "min_tokens"
        )
    if req.logprobs is not None and (
        isinstance(req.logprobs, bool) or not isinstance(req.logprobs, int) or not 0 <= req.logprobs <= MAX_LOGPROBS
    ):
        raise InvalidRequest(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {req.logprobs!r}", "logprobs")
    if not isinstance(req.stop, list) or not all(isinstance(s, str) for s in req.stop):
        raise InvalidRequest("stop must be a list of strings", "stop")
    if req.adapter is not None and req.adapter not in names:
        raise InvalidRequest(f"adapter {req.adapter!r} does not exist; available: {', '.join(names)}", "adapter")
    k = req.top_k_experts
    if k is not None and (
        isinstance(k, bool) or not isinstance(k, int) or k < 1 or (max_experts is not None and k > max_experts)
    ):
        raise InvalidRequest(f"top_k_experts must be an integer in [1, {max_experts}], got {k!r}", "top_k_experts")


class _Seq:
    """One running sequence: its request, routing, generator and what it produced so far."""

    def __init__(self, handle: Handle, weights: np.ndarray, routing: dict, device):
        r = handle.req
        self.handle, self.req, self.weights, self.routing = handle, r, weights, routing
        self.ids: list[int] = []
        self.text = ""  # decoded text after stop-string cutting
        self.sent = 0  # characters of `text` already streamed
        self.logprobs: list[dict] | None = [] if r.logprobs is not None else None
        self.finish: str | None = None
        self.greedy = r.temperature < SAMPLING_EPS
        self.generator = None
        if not self.greedy:
            seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(8), "little")
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.bias = None
        if r.logit_bias:
            self.bias = (
                torch.as_tensor([int(k) for k in r.logit_bias], dtype=torch.long, device=device),
                torch.as_tensor([float(v) for v in r.logit_bias.values()], dtype=torch.float32, device=device),
            )
        self.penalised = bool(r.presence_penalty or r.frequency_penalty)
        self.first_token_at: float | None = None


class DecodeLoop:
    """Continuous batching over one PEFT model carrying the adapters `names`.

    route(requests) -> weights [n, len(names)] (the routed ensemble's logit weights, or one-hot for
    a forced adapter); describe(weights [len(names)], adapter) -> the routing dict of a result.
    `submit` queues a request (from any thread); `step` runs one step boundary and one decoding
    step (the caller's thread: tests); `start` runs steps in a background thread (serving).
    """

    def __init__(
        self,
        peft_model,
        names: Sequence[str],
        tokenizer,
        stop_ids: Sequence[int],
        route: Callable,
        describe: Callable | None = None,
        max_batch_size: int = 8,
        admission_wait_s: float = 0.0,
        backend: str = "auto",
        share_prefix: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if backend not in ("auto", "stacked", "peft"):
            raise ValueError(f"backend must be auto, stacked or peft, got {backend!r}")
        self.model = unwrap(peft_model)
        self.names = list(names)
        loaded = set(getattr(self.model, "peft_config", {})) | {BACKBONE}
        if set(self.names) - loaded:
            raise ValueError(f"adapters {sorted(set(self.names) - loaded)} are not loaded in the model")
        self.tok = tokenizer
        self.stop_ids = [int(t) for t in stop_ids]
        self.route, self.describe = route, describe or (lambda w, adapter: {})
        self.max_batch_size, self.admission_wait_s, self.share_prefix = max_batch_size, admission_wait_s, share_prefix
        self.device = next(self.model.parameters()).device
        self.stacked = None
        if backend != "peft":
            try:
                self.stacked = stacked_for(self.model, self.names)
            except UnsupportedAdapter:
                if backend == "stacked":
                    raise
        self.hf_model = self.model.get_base_model()
        self.head = _plain_head(self.hf_model) if self.stacked is not None else None
        self.decoder = self.hf_model.get_decoder()
        self.vocab_size = int(self.hf_model.get_output_embeddings().weight.shape[0])
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._stop_t = torch.as_tensor(self.stop_ids, dtype=torch.long, device=self.device)
        self._cond = threading.Condition()
        self.pending: deque[Handle] = deque()
        # the running batch: sequences, and rows = (sequence, adapter) pairs with a nonzero weight
        self.seqs: list[_Seq] = []
        self.cache = None
        self.mask = self.row_seq = self.row_adapter = self.row_weight = self.last_pos = None
        self.next_logits: torch.Tensor | None = None  # [len(seqs), vocab] mixed logits of the next token
        self._routes: dict[tuple, tuple[np.ndarray, int]] = {}  # prompt key -> (weights, sequences using it)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.last_progress = time.monotonic()
        self.stats = {
            "requests_admitted": 0,
            "requests_finished": 0,
            "requests_cancelled": 0,
            "requests_failed": 0,
            "tokens_generated": 0,
            "steps": 0,
            "max_running_seen": 0,
            "routings_shared": 0,
            "expert_selections": {n: 0 for n in self.names},
            # where the loop's time went: routing, admission (routing + prompt forward +
            # cache merge) and decoding steps, in seconds
            "routing_s": 0.0,
            "admission_s": 0.0,
            "decode_s": 0.0,
        }
        self.observations: deque[tuple[str, float]] = deque(maxlen=10_000)  # ("ttft_s" | "routing_s", value)

    # -- the caller's side --------------------------------------------------------------------
    def submit(self, req, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; raises InvalidRequest at once when a field is wrong. Its events go to
        `sink` from the loop's thread (the sink must be quick and thread-safe)."""
        check_request(req, self.names, self.vocab_size, max_experts=len(self.names) - 1)
        handle = Handle(req, sink)
        with self._cond:
            self.pending.append(handle)
            self._cond.notify_all()
        return handle

    @property
    def running(self) -> int:
        return len(self.seqs)

    @property
    def queued(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        """Run the loop in a daemon thread until `stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="elrea-decode-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_health(self, stall_s: float = 60.0) -> None:
        """Raises when the loop thread died, or has work and made no step for `stall_s` seconds."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the decode loop is not running")
        busy = bool(self.seqs or self.pending)
        idle_for = time.monotonic() - self.last_progress
        if busy and idle_for > stall_s:
            raise RuntimeError(
                f"the decode loop has {len(self.seqs)} running and {len(self.pending)} waiting "
                f"requests but made no step for {idle_for:.0f} s"
            )

    def generate(self, reqs: Sequence) -> list:
        """Decode the requests to their ends (GenResults, in order); steps in this thread unless the
        loop thread runs. An error of one request raises after all of them finished."""
        out: list = [None] * len(reqs)
        errors: list[str] = []

        def sink_for(i):
            def sink(ev: Event):
                if ev.kind == "done":
                    out[i] = ev.result
                elif ev.kind == "error":
                    errors.append(f"request {i}: {ev.error}")

            return sink

        handles = [self.submit(r, sink_for(i)) for i, r in enumerate(reqs)]
        while not all(h.finished.is_set() for h in handles):
            if self._thread is not None and self._thread.is_alive():
                handles[[h.finished.is_set() for h in handles].index(False)].finished.wait(1.0)
            else:
                self.step()
        if errors:
            raise RuntimeError("; ".join(errors))
        return out

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.pending and not self.seqs:
                    self.last_progress = time.monotonic()
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    break
            if not self.seqs and self.admission_wait_s > 0:
                # idle: give requests arriving together a moment to share one prefill
                time.sleep(min(self.admission_wait_s, 1.0))
            try:
                self.step()
            except Exception as e:  # step() isolates per-request failures; anything else ends the batch
                log.exception("decode step failed")
                self._fail_all(f"the decoding step failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")
        for h in self._take_pending(len(self.pending)):
            h._send(Event("error", error="the server is shutting down"))

    def step(self) -> bool:
        """One step boundary (cancellations, admissions) and one decoding step; False when idle."""
        self._drop_cancelled()
        free = self.max_batch_size - len(self.seqs)
        if free > 0 and self.pending:
            t0 = time.monotonic()
            self._admit(self._take_pending(free))
            self.stats["admission_s"] += time.monotonic() - t0
        if not self.seqs:
            self.last_progress = time.monotonic()
            return False
        self.stats["max_running_seen"] = max(self.stats["max_running_seen"], len(self.seqs))
        t0 = time.monotonic()
        tokens, failed = self._pick(self.next_logits)
        done = []
        for i, s in enumerate(self.seqs):
            if i in failed:
                self._finish(s, error=failed[i])
            elif self._advance(s, tokens[i]):
                self._finish(s)
            if s.handle.finished.is_set():
                done.append(i)
        self.stats["steps"] += 1
        self._remove(done)
        if self.seqs:
            self._decode_one()
        self.last_progress = time.monotonic()
        self.stats["decode_s"] += self.last_progress - t0
        return True

    def _take_pending(self, n: int) -> list[Handle]:
        with self._cond:
            out = []
            while self.pending and len(out) < n:
                h = self.pending.popleft()
                if h.cancelled.is_set():
                    self.stats["requests_cancelled"] += 1
                    h.finished.set()
                    continue
                out.append(h)
            return out

    def _drop_cancelled(self) -> None:
        gone = [i for i, s in enumerate(self.seqs) if s.handle.cancelled.is_set()]
        for i in gone:
            self.seqs[i].handle.finished.set()
        self.stats["requests_cancelled"] += len(gone)
        self._remove(gone)

    # -- admission: routing and prefill ---------------------------------------------------------
    @staticmethod
    def _route_key(req) -> tuple:
        return tuple(int(t) for t in req.prompt_ids), req.top_k_experts, req.adapter

    def _weights_for(self, handles: list[Handle]) -> list[np.ndarray | Exception]:
        """Each request's weights; identical prompts (in this group or running) are routed once."""
        keys = [self._route_key(h.req) for h in handles]
        todo = {}
        for k, h in zip(keys, handles):
            if k not in self._routes and k not in todo:
                todo[k] = h.req
        got: dict[tuple, np.ndarray | Exception] = {}
        if todo:
            t0 = time.monotonic()
            try:
                w = np.asarray(self.route(list(todo.values())), dtype=np.float64)
                got = dict(zip(todo, w))
            except Exception:  # find the request that fails, so that it fails alone
                for k, r in todo.items():
                    try:
                        got[k] = np.asarray(self.route([r]), dtype=np.float64)[0]
                    except Exception as e:
                        got[k] = e
            took = time.monotonic() - t0
            self.stats["routing_s"] += took
            per = took / len(todo)
            self.observations.extend(("routing_s", per) for _ in todo)
        self.stats["routings_shared"] += len(handles) - len(todo)
        out = []
        for k in keys:
            w = got[k] if k in got else self._routes[k][0]
            if not isinstance(w, Exception) and (
                w.shape != (len(self.names),) or not np.all(np.isfinite(w)) or not np.any(w != 0)
            ):
                w = ValueError(f"routing gave unusable weights {np.round(w, 4).tolist()}")
            out.append(w)
        return out

    def _admit(self, handles: list[Handle]) -> None:
        weights = self._weights_for(handles)
        new = []
        for h, w in zip(handles, weights):
            if isinstance(w, Exception):
                self.stats["requests_failed"] += 1
                h._send(Event("error", error=f"routing failed: {type(w).__name__}: {w}"))
                continue
            try:
                new.append(_Seq(h, w, self.describe(w, h.req.adapter), self.device))
            except Exception as e:  # e.g. a generator the device refuses
                self.stats["requests_failed"] += 1
                h._send(Event("error", error=f"the sampling state could not be built: {type(e).__name__}: {e}"))
        if new:
            self._prefill_and_join(new)

    def _prefill_and_join(self, new: list[_Seq]) -> None:
        """Prompt forward of the new sequences, then into the running batch; when that fails for a
        group, each is retried alone, so that only the request that fails fails."""
        try:
            self._join(new, *self._prefill(new))
        except Exception as e:
            if len(new) > 1:
                for s in new:
                    self._prefill_and_join([s])
                return
            self.stats["requests_failed"] += 1
            new[0].handle._send(Event("error", error=f"the prompt forward failed: {type(e).__name__}: {e}"))

    def _forward(self, ids, mask, positions, cache, row_adapter):
        """Every row's last hidden state (stacked, plain head) or logits, and the cache."""
        if self.model.training:
            self.model.eval()  # PEFT refuses adapter_names in training mode; decoding wants no dropout
        with torch.inference_mode():
            if self.stacked is not None:
                self.stacked.set_rows(row_adapter)
                with self.stacked.active():
                    if self.head is not None:
                        out = self.decoder(
                            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
                        )
                        return out.last_hidden_state[:, -1, :], out.cache
                    out = self.hf_model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=positions,
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    return out.logits[:, -1, :], out.cache
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                adapter_names=[self.names[a] for a in row_adapter.tolist()],
                logits_to_keep=1,
            )
            return out.logits[:, -1, :], out.cache

    def _mix(self, last, row_seq, row_weight, n_seq: int) -> torch.Tensor:
        """Mixed next-token logits [n_seq, vocab] (eq. 5.10); the head runs once per sequence."""
        with torch.inference_mode():
            mixed = torch.zeros(n_seq, last.shape[-1], dtype=torch.float32, device=self.device)
            mixed.index_add_(0, row_seq, last.float() * row_weight[:, None])
            if self.head is not None:  # W (sum_a w_a h_a) + (sum_a w_a) b == sum_a w_a (W h_a + b)
                logits = F.linear(mixed.to(self.head.weight.dtype), self.head.weight).float()
                if self.head.bias is not None:
                    total = torch.zeros(n_seq, device=self.device).index_add_(0, row_seq, row_weight)
                    logits = logits + total[:, None] * self.head.bias.float()
                mixed = logits
            return mixed

    def _prefill(self, new: list[_Seq]):
        """Prompt forward of the new sequences: one row per (distinct prompt, adapter) pair with a
        nonzero weight (sequences with the same prompt share it), the prompts' common prefix once
        per adapter; then one row per (sequence, adapter), copied from those. Returns the rows'
        (cache, mask, positions of the last token, sequence, adapter, weight) and the mixed logits."""
        dev = self.device
        prompts, prompt_of = [], []
        index: dict[tuple, int] = {}
        for s in new:
            key = tuple(int(t) for t in s.req.prompt_ids)
            if key not in index:
                index[key] = len(prompts)
                prompts.append(list(key))
            prompt_of.append(index[key])
        w = np.stack([s.weights for s in new])
        need = np.zeros((len(prompts), len(self.names)), dtype=bool)
        np.logical_or.at(need, np.asarray(prompt_of), w != 0)
        pre = np.argwhere(need)  # [R, (prompt, adapter)]
        shared = _common_prefix(prompts) if self.share_prefix and len(prompts) > 1 else 0
        shared = shared if shared >= MIN_SHARED_PREFIX else 0
        ids, mask = _left_pad([p[shared:] for p in prompts], self.pad_id)
        pre_prompt = torch.as_tensor(pre[:, 0], device=dev)
        ids, mask = ids.to(dev)[pre_prompt], mask.to(dev)[pre_prompt]
        if shared:
            mask = torch.cat([mask.new_ones(len(pre), shared), mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = None
        if shared:
            adapters = sorted(set(pre[:, 1].tolist()))
            prefix = torch.as_tensor(prompts[0][:shared], device=dev).repeat(len(adapters), 1)
            _, cache = self._forward(
                prefix,
                torch.ones_like(prefix),
                positions[: len(adapters), :shared],
                None,
                torch.as_tensor(adapters, device=dev),
            )
            slot = {a: i for i, a in enumerate(adapters)}
            cache.batch_select_indices(torch.as_tensor([slot[int(a)] for a in pre[:, 1]], device=dev))
        last, cache = self._forward(ids, mask, positions[:, shared:], cache, torch.as_tensor(pre[:, 1], device=dev))
        slot = {(int(p), int(a)): r for r, (p, a) in enumerate(pre)}
        pairs = np.argwhere(w != 0)  # [(sequence, adapter)]
        src = torch.as_tensor([slot[(prompt_of[v], int(a))] for v, a in pairs], device=dev)
        if not torch.equal(src.cpu(), torch.arange(len(pre))):
            cache.batch_select_indices(src)
        last, mask, last_pos = last[src], mask[src], positions[src, -1]
        row_seq = torch.as_tensor(pairs[:, 0], device=dev)
        row_adapter = torch.as_tensor(pairs[:, 1], device=dev)
        row_weight = torch.as_tensor(w[pairs[:, 0], pairs[:, 1]], dtype=torch.float32, device=dev)
        return cache, mask, last_pos, row_seq, row_adapter, row_weight, self._mix(last, row_seq, row_weight, len(new))

    def _join(self, new: list[_Seq], cache, mask, last_pos, row_seq, row_adapter, row_weight, logits) -> None:
        """Merge prefilled sequences into the running batch (rows ordered adapter-major, so that
        dense routing takes the stacked forward's grouped path)."""
        if not self.seqs:
            self.seqs, self.cache, self.mask, self.last_pos = list(new), cache, mask, last_pos
            self.row_seq, self.row_adapter, self.row_weight, self.next_logits = row_seq, row_adapter, row_weight, logits
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            _merge_caches(self.cache, cache, width)
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            self.last_pos = torch.cat([self.last_pos, last_pos])
            self.row_seq = torch.cat([self.row_seq, row_seq + len(self.seqs)])
            self.row_adapter = torch.cat([self.row_adapter, row_adapter])
            self.row_weight = torch.cat([self.row_weight, row_weight])
            self.next_logits = torch.cat([self.next_logits, logits])
            self.seqs += new
        order = torch.as_tensor(
            np.lexsort((self.row_seq.cpu().numpy(), self.row_adapter.cpu().numpy())), device=self.device
        )
        self._select_rows(order)
        for s in new:
            k = self._route_key(s.req)
            w, n = self._routes.get(k, (s.weights, 0))
            self._routes[k] = (w, n + 1)
            # the selected expert: the forced adapter, or the routed expert of largest weight
            if s.req.adapter is not None:
                top = s.req.adapter
            else:
                top = self.names[1 + int(np.argmax(s.weights[1:]))] if len(self.names) > 1 else self.names[0]
            self.stats["expert_selections"][top] += 1
        self.stats["requests_admitted"] += len(new)

    def _select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.last_pos = self.mask[rows], self.last_pos[rows]
        self.row_seq, self.row_adapter = self.row_seq[rows], self.row_adapter[rows]
        self.row_weight = self.row_weight[rows]

    def _remove(self, gone: list[int]) -> None:
        """Take sequences out of the batch: their rows leave the cache, and cache columns that are
        padding for every remaining row are cut."""
        if not gone:
            return
        for i in gone:
            k = self._route_key(self.seqs[i].req)
            w, n = self._routes.get(k, (None, 1))
            if n <= 1:
                self._routes.pop(k, None)
            else:
                self._routes[k] = (w, n - 1)
        gone_set = set(gone)
        keep = [i for i in range(len(self.seqs)) if i not in gone_set]
        if not keep:
            self.seqs, self.cache, self.next_logits = [], None, None
            self.mask = self.row_seq = self.row_adapter = self.row_weight = self.last_pos = None
            return
        remap = torch.full((len(self.seqs),), -1, dtype=torch.long, device=self.device)
        remap[torch.as_tensor(keep, device=self.device)] = torch.arange(len(keep), device=self.device)
        rows = (remap[self.row_seq] >= 0).nonzero().flatten()
        self._select_rows(rows)
        self.row_seq = remap[self.row_seq]
        self.next_logits = self.next_logits[torch.as_tensor(keep, device=self.device)]
        self.seqs = [self.seqs[i] for i in keep]
        used = self.mask.any(0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut > 0:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]

    def _decode_one(self) -> None:
        """Feed every row its sequence's new token: the next mixed logits of every sequence."""
        tokens = torch.as_tensor([s.ids[-1] for s in self.seqs], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.last_pos = self.last_pos + 1
        last, self.cache = self._forward(
            tokens[self.row_seq][:, None], self.mask, self.last_pos[:, None], self.cache, self.row_adapter
        )
        self.next_logits = self._mix(last, self.row_seq, self.row_weight, len(self.seqs))

    # -- sampling ------------------------------------------------------------------------------
    def _pick(self, mixed: torch.Tensor) -> tuple[list[int], dict[int, str]]:
        """Each sequence's next token from its mixed logits and its own sampling state; a sequence
        whose state gives no valid distribution is in `failed` (index -> reason), alone."""
        logits = mixed.clone()
        stop = self._stop_t
        for i, s in enumerate(self.seqs):
            r = s.req
            if s.penalised and s.ids:
                counts = torch.bincount(torch.as_tensor(s.ids, device=self.device), minlength=logits.shape[1])
                counts = counts[: logits.shape[1]].float()
                logits[i] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).float()
            if s.bias is not None:
                logits[i].index_add_(0, s.bias[0], s.bias[1])
            if len(s.ids) < r.min_tokens and len(stop):
                logits[i, stop] = -math.inf
        valid = torch.isfinite(logits).any(-1) & ~torch.isnan(logits).any(-1) & ~torch.isposinf(logits).any(-1)
        greedy = logits.argmax(-1)
        valid_l, greedy_l = valid.tolist(), greedy.tolist()
        tokens, failed = [], {}
        for i, s in enumerate(self.seqs):
            if not valid_l[i]:
                failed[i] = "the sampling state left no valid token (every logit -inf or NaN)"
                tokens.append(-1)
                continue
            try:
                if s.greedy:
                    tok = greedy_l[i]
                else:
                    tok = self._sample(logits[i], s)
                if s.logprobs is not None:
                    s.logprobs.append(self._logprob_entry(logits[i], tok, s.req.logprobs))
            except Exception as e:
                failed[i] = f"sampling failed: {type(e).__name__}: {e}"
                tok = -1
            tokens.append(tok)
        return tokens, failed

    @staticmethod
    def _sample(row: torch.Tensor, s: _Seq) -> int:
        probs = torch.softmax(row / s.req.temperature, -1)
        if s.req.top_p < 1.0:  # nucleus: the smallest set of most likely tokens with mass >= top_p
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < s.req.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        total = probs.sum()
        if not bool(torch.isfinite(total)) or float(total) <= 0:
            raise ValueError(f"the distribution at temperature {s.req.temperature} does not normalise")
        return int(torch.multinomial(probs / total, 1, generator=s.generator))

    @staticmethod
    def _logprob_entry(row: torch.Tensor, tok: int, k: int) -> dict:
        """The chosen token's logprob and the k most likely, of the mixed distribution after
        penalties, logit_bias and min_tokens (before temperature and top_p)."""
        lp = torch.log_softmax(row, -1)
        top = []
        if k:
            vals, idx = lp.topk(min(k, lp.shape[0]))
            top = [[int(t), float(v)] for t, v in zip(idx.tolist(), vals.tolist())]
        return {"token_id": int(tok), "logprob": float(lp[tok]), "top": top}

    def _advance(self, s: _Seq, tok: int) -> bool:
        """Append the token, stream its text; True when the sequence is finished."""
        r = s.req
        now = time.monotonic()
        if s.first_token_at is None:
            s.first_token_at = now
            self.observations.append(("ttft_s", now - s.handle.submitted_at))
        if tok in self.stop_ids and not r.ignore_eos:
            if s.logprobs:
                s.logprobs.pop()  # the end-of-sequence token is not part of the output
            s.finish = "stop"
            return True
        s.ids.append(tok)
        self.stats["tokens_generated"] += 1
        text = self.tok.decode(s.ids, skip_special_tokens=True)
        hits = [text.find(x) for x in r.stop if x]
        hits = [h for h in hits if h >= 0]
        if hits:
            text, s.finish = text[: min(hits)], "stop"
        elif len(s.ids) >= r.max_tokens:
            s.finish = "length"
        s.text = text
        end = len(text) if s.finish else len(text) - _holdback(text, r.stop)
        delta = text[s.sent : end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        s.handle._send(Event("delta", text=delta, token_ids=[tok], logprobs=[s.logprobs[-1]] if s.logprobs else None))
        return s.finish is not None

    def _finish(self, s: _Seq, error: str | None = None) -> None:

        if error is not None:
            self.stats["requests_failed"] += 1
            s.handle._send(Event("error", error=error))
            return
        if s.sent < len(s.text):  # text held back for a stop string that did not come
            s.handle._send(Event("delta", text=s.text[s.sent :]))
            s.sent = len(s.text)
        self.stats["requests_finished"] += 1
        s.handle._send(
            Event("done", result=GenResult(list(s.ids), s.text, s.finish or "stop", s.routing, logprobs=s.logprobs))
        )

    def _fail_all(self, message: str) -> None:
        for s in self.seqs:
            self.stats["requests_failed"] += 1
            s.handle._send(Event("error", error=message))
        self._remove(list(range(len(self.seqs))))


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold back: an unfinished multi-byte character, or the
    start of a stop string that the next tokens may complete."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), 0, -1):
            if text.endswith(x[:k]):
                n = max(n, k)
                break
    return n


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    if mask.shape[1] == width:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], 1)


def _merge_caches(running, new, width: int) -> None:
    """Append the new rows' KV cache to the running one along the batch, both left padded to
    `width` positions (the padded positions are masked out by the attention mask)."""
    from transformers.cache_utils import DynamicLayer

    if len(running.layers) != len(new.layers):
        raise ValueError("the caches have different layer counts")
    for a, b in zip(running.layers, new.layers):  # checked before any layer changes
        if type(a) is not DynamicLayer or type(b) is not DynamicLayer:
            raise ValueError(f"continuous batching merges plain KV caches only, not {type(a).__name__}")
    for a, b in zip(running.layers, new.layers):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)
            x = F.pad(x, (0, 0, width - x.shape[2], 0)) if x.shape[2] < width else x
            y = F.pad(y, (0, 0, width - y.shape[2], 0)) if y.shape[2] < width else y
            setattr(a, name, torch.cat([x, y]))
