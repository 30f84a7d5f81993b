"""The OpenAI HTTP protocol without Ray or a model: request bodies become `GenRequest`s (every
problem a `RequestError` naming the field), results become OpenAI response bodies and SSE chunks.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from elrea_ray.serving import Engine, GenRequest, GenResult


class RequestError(ValueError):
    """A client error: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.code, "param": self.param, "code": None}}



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
