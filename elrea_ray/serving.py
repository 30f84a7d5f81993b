"""The routed ensemble behind an OpenAI-style API, without Ray: loading and checking a bundle,
parsing requests, routing and decoding a batch of them. `serve_apps/elrea_app.py` wraps this in
a Ray Serve deployment.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from elrea_ray.pipeline import BUNDLE_FORMAT_VERSION


class RequestError(ValueError):
    """A client error: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.code, "param": self.param, "code": None}}


class BundleError(RuntimeError):
    """The bundle cannot be served (missing files, wrong version, layout mismatch)."""


def load_bundle(run_dir: str | Path) -> tuple[Path, dict]:
    """(local root, bundle) of a run; an s3:// run is pulled into its local mirror first."""
    from elrea_ray import storage

    if storage.is_remote(run_dir):
        from elrea_ray.artifacts import RunDir

        run = RunDir.at(str(run_dir))
        run.pull(stages=("base", "clusters", "experts"), log=lambda msg: None)  # what serving reads
        root = run.root
    else:
        root = Path(run_dir).expanduser().resolve()
    path = root / "bundle.json"
    if not path.exists():
        raise BundleError(f"no bundle.json in {root}: run jobs/full_pipeline.py until the experts stage")
    bundle = json.loads(path.read_text())
    if bundle.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {bundle.get('format_version')} is not "
                          f"{BUNDLE_FORMAT_VERSION}, the one this version serves")
    for p in [*bundle["adapters"].values(), *bundle["epoch_checkpoints"], bundle["centroids"]]:
        if not (root / p).exists():
            raise BundleError(f"{path} lists {p}, which does not exist under {root}")
    return root, bundle


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


@dataclass
class GenResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    routing: dict


class Engine:
    """One backbone with the C+1 adapters, the gradient-feature extractor and the centroids."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        from safetensors.numpy import load_file

        from elrea_ray.config import ModelConfig
        from elrea_ray.gradients import FeatureExtractor
        from elrea_ray.model import load_adapters, load_tokenizer
        from elrea_ray.projection import ProjectorSpec

        self.root, self.bundle = load_bundle(run_dir)
        b = self.bundle
        self.model_cfg = ModelConfig(**b["model"])
        self.tok = load_tokenizer(self.model_cfg)
        spec = ProjectorSpec.from_dict(b["projector"])
        self.names = list(b["adapters"])  # "base", "expert-00", ...
        # ONE backbone per replica: the C+1 adapters for decoding and the base adapter's epoch
        # checkpoint for the routing gradients all sit on it.
        self.model = load_adapters(self.model_cfg, {n: str(self.root / p) for n, p in b["adapters"].items()},
                                   device)
        try:
            self.fx = FeatureExtractor(self.model_cfg, [str(self.root / p) for p in b["epoch_checkpoints"]],
                                       b["epoch_weights"], spec, device=device, model=self.model)
        except ValueError as e:  # projector d_in does not match the adapters
            raise BundleError(f"bundle {self.root / 'bundle.json'}: {e}") from None
        if [list(x) for x in self.fx.layout] != [list(x) for x in b["parameter_layout"]]:
            raise BundleError(f"bundle {self.root / 'bundle.json'}: parameter_layout does not match the "
                              "epoch checkpoints' LoRA parameters; the bundle and adapters are out of step")
        self.centroids = load_file(str(self.root / b["centroids"]))["centroids"]
        self.routing = b["routing"]
        self.model_id = f"elrea-{self.root.name}"
        self.max_context = int(self.model_cfg.max_length)
        from elrea_ray.data import stop_ids

        self.stop_ids = stop_ids(self.tok)  # eos and the template's end-of-turn token

    # -- requests -----------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.model_id, *self.names]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from elrea_ray.data import render_prompt

        return render_prompt(self.tok, messages)

    def encode_text(self, prompt: str) -> list[int]:
        # A completion prompt is treated as one user turn, as the pipeline formats instructions.
        return self.encode_chat([{"role": "user", "content": prompt}])

    # -- routing and decoding -----------------------------------------------------------------
    def route(self, prompt_ids: list[list[int]], top_k: list[int | None]) -> np.ndarray:
        """[B, 1+C] weights (column 0 = base) from the instructions' gradient features."""
        from elrea_ray.routing import route

        feats = self.fx.features(prompt_ids)
        out = np.zeros((len(prompt_ids), 1 + self.centroids.shape[0]))
        for k in set(top_k):
            rows = [i for i, t in enumerate(top_k) if t == k]
            ew, bw = route(feats[rows], self.centroids, temperature=self.routing["temperature"],
                           top_k=k if k is not None else self.routing.get("top_k"),
                           min_weight=self.routing.get("min_weight", 0.0))
            out[rows, 0], out[rows, 1:] = bw, ew
        return out

    def _weights(self, reqs: list[GenRequest]) -> np.ndarray:
        w = np.zeros((len(reqs), len(self.names)))
        routed = [i for i, r in enumerate(reqs) if r.adapter is None]
        if routed:
            w[routed] = self.route([reqs[i].prompt_ids for i in routed], [reqs[i].top_k_experts for i in routed])
        for i, r in enumerate(reqs):
            if r.adapter is not None:
                w[i, self.names.index(r.adapter)] = 1.0
        return w

    def _routing_info(self, w: np.ndarray, adapter: str | None) -> dict:
        experts = {n: float(x) for n, x in zip(self.names[1:], w[1:])}
        top = sorted(experts, key=experts.get, reverse=True)[:3]
        return {"base_weight": float(w[0]), "expert_weights": experts, "top_clusters": top,
                "forced_adapter": adapter, "adapters_run": [n for n, x in zip(self.names, w) if x != 0]}

    def _sampler(self, reqs: list[GenRequest]):
        if all(r.temperature == 0 for r in reqs):
            return None
        gens = {i: torch.Generator().manual_seed(r.seed if r.seed is not None else int(time.time_ns() % 2**31))
                for i, r in enumerate(reqs)}

        def sample(mixed: torch.Tensor, active: list[int]) -> torch.Tensor:
            out = []
            for row, b in zip(mixed, active):
                r = reqs[b]
                if r.temperature == 0:
                    out.append(int(row.argmax()))
                    continue
                probs = torch.softmax(row.float() / r.temperature, -1)
                if r.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = sp.cumsum(-1) - sp < r.top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=gens[b])))
            return torch.tensor(out)
        return sample

    def stream(self, reqs: list[GenRequest]) -> Iterator[list[tuple[int, str]]]:
        """Yields [(request index, text delta), ...] per decoding step; the last item per request
        carries no text but is followed by `self.last_results`."""
        from elrea_ray.ensemble import ensemble_stream

        w = self._weights(reqs)
        ids: list[list[int]] = [[] for _ in reqs]
        texts = ["" for _ in reqs]
        stopped = [False] * len(reqs)
        finish = ["length"] * len(reqs)
        steps = ensemble_stream(self.model, [r.prompt_ids for r in reqs], self.names, w,
                                [r.max_tokens for r in reqs], self.stop_ids, self.tok.pad_token_id,
                                self._sampler(reqs))
        for step in steps:
            deltas = []
            for b, t in step:
                if stopped[b]:
                    continue
                ids[b].append(t)
                new = self.tok.decode(ids[b], skip_special_tokens=True)
                cut = min((new.find(s) for s in reqs[b].stop if s and s in new), default=-1)
                if cut >= 0:
                    new, stopped[b], finish[b] = new[:cut], True, "stop"
                delta, texts[b] = new[len(texts[b]):], new
                if delta:
                    deltas.append((b, delta))
            if deltas:
                yield deltas
            if all(stopped):
                break
        for b, r in enumerate(reqs):
            if not stopped[b] and len(ids[b]) < r.max_tokens:
                finish[b] = "stop"  # ended with EOS
        self.last_results = [GenResult(ids[b], texts[b], finish[b], self._routing_info(w[b], r.adapter))
                             for b, r in enumerate(reqs)]

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        for _ in self.stream(reqs):
            pass
        return self.last_results


# -- OpenAI request parsing ---------------------------------------------------------------------

def _get(body: dict, key: str, types: tuple, default: Any = None, check=None, allowed: str = "") -> Any:
    if key not in body or body[key] is None:
        return default
    v = body[key]
    if isinstance(v, bool) and bool not in types:
        raise RequestError(f"'{key}' must be {allowed or types[0].__name__}, got a boolean", key)
    if not isinstance(v, types):
        raise RequestError(f"'{key}' must be {allowed or types[0].__name__}, got {type(v).__name__}", key)
    if check is not None and not check(v):
        raise RequestError(f"'{key}' must be {allowed}, got {v!r}", key)
    return v


def parse_request(body: Any, engine: Engine, chat: bool) -> tuple[GenRequest, dict]:
    """Validate an OpenAI completions / chat body; every problem is a RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = _get(body, "model", (str,), engine.model_id)
    if model not in engine.model_ids():
        raise RequestError(f"model {model!r} does not exist; available: {', '.join(engine.model_ids())}",
                           "model", status=404, code="model_not_found")
    adapter = _get(body, "adapter", (str,))
    if adapter is not None and adapter not in engine.names:
        raise RequestError(f"adapter {adapter!r} does not exist; available: {', '.join(engine.names)}",
                           "adapter", status=404, code="model_not_found")
    if model != engine.model_id:
        adapter = adapter or model  # asking for an adapter's model id forces that adapter
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be an object with role system/user/assistant and "
                                   "string content", "messages")
        if not any(m["content"].strip() for m in messages):
            raise RequestError("the messages are empty", "messages")
        ids = engine.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", "prompt")
        if not prompt.strip():
            raise RequestError("'prompt' is empty", "prompt")
        ids = engine.encode_text(prompt)
    max_tokens = _get(body, "max_tokens", (int,), 16, lambda v: 1 <= v <= 4096, "an integer in [1, 4096]")
    if "max_completion_tokens" in body:
        max_tokens = _get(body, "max_completion_tokens", (int,), 16, lambda v: 1 <= v <= 4096,
                          "an integer in [1, 4096]")
    if len(ids) + max_tokens > engine.max_context:
        raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds the "
                           f"model's context of {engine.max_context} tokens", "messages" if chat else "prompt")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of at most 4 strings", "stop")
    n = _get(body, "n", (int,), 1, lambda v: v == 1, "1 (several choices are not supported)")  # noqa: F841
    req = GenRequest(
        prompt_ids=ids, max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", (int, float), 0.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        seed=_get(body, "seed", (int,)),
        stop=stop,
        top_k_experts=_get(body, "top_k", (int,), None, lambda v: 1 <= v <= len(engine.names) - 1,
                           f"an integer in [1, {len(engine.names) - 1}]"),
        adapter=adapter,
    )
    stream = _get(body, "stream", (bool,), False, allowed="true or false")
    return req, {"model": model, "stream": stream, "chat": chat}


def completion_body(res: GenResult, req: GenRequest, meta: dict) -> dict:
    rid = ("chatcmpl-" if meta["chat"] else "cmpl-") + uuid.uuid4().hex[:24]
    usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(res.token_ids),
             "total_tokens": len(req.prompt_ids) + len(res.token_ids)}
    if meta["chat"]:
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                  "finish_reason": res.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": meta["model"],
            "choices": [choice], "usage": usage, "routing": res.routing}


def stream_chunk(rid: str, meta: dict, delta: str | None, finish: str | None = None,
                 extra: dict | None = None, role: bool = False) -> str:
    if meta["chat"]:
        d = {"role": "assistant"} if role else ({} if delta is None else {"content": delta})
        choice = {"index": 0, "delta": d, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": meta["model"], "choices": [choice]}
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"
