"""The OpenAI HTTP protocol without Ray or a model: request bodies become `GenRequest`s (every
problem a `RequestError` naming the field), results become OpenAI response bodies and SSE chunks.

Every field of OpenAI's chat and completions bodies is either honoured or refused with a 400
naming it; none is silently ignored. Unknown top-level fields are refused as OpenAI's own API
refuses them ("unknown_parameter"); docs/serving.md lists what is honoured and what is refused.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from elrea_ray.decoding import GenRequest, GenResult

MAX_BODY_BYTES = 1_000_000  # larger bodies get 413 before they are read
MAX_TOKENS = 4096  # per choice
MAX_CHOICES = 8  # `n`
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGIT_BIAS = 1024  # entries of `logit_bias`
MAX_TOP_LOGPROBS = {True: 20, False: 5}  # chat `top_logprobs`, completions `logprobs` (OpenAI's caps)
# Below this, softmax(logits / t) underflows to one-hot in float32 (or to NaN when t is tiny), so
# such temperatures decode greedily, as vLLM does below 1e-5.
GREEDY_BELOW = 1e-2
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit signed seed
LOGPROB_FLOOR = -9999.0  # -inf (a masked token) is not valid JSON; OpenAI reports -9999.0

# OpenAI's error `type` and default `code` per HTTP status.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind, default = ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default}}


class RequestError(ValueError):
    """A request answered with an OpenAI-style error body: 4xx for the client's input, 5xx when
    the server cannot give what was asked."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return error_body(self.status, str(self), self.param, self.code)


# -- fields ------------------------------------------------------------------------------------
_COMMON = {
    "model",
    "adapter",
    "top_k",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "user",
    "min_tokens",
    "ignore_eos",
}
_CHAT_FIELDS = _COMMON | {
    "messages",
    "top_logprobs",
    "max_completion_tokens",
    "response_format",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_MESSAGE_KEYS = {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _type_error(key: str, expected: str, v: Any) -> RequestError:
    got = "a boolean" if isinstance(v, bool) else type(v).__name__
    return RequestError(f"'{key}' must be {expected}, got {got}", key, code="invalid_type")


def _value_error(key: str, expected: str, v: Any) -> RequestError:
    return RequestError(f"'{key}' must be {expected}, got {v!r}", key, code="invalid_value")


def _unsupported(key: str, what: str) -> RequestError:
    return RequestError(f"'{key}': {what} is not supported by this server", key, code="unsupported_parameter")


def _int(body: dict, key: str, lo: int, hi: int, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(key, "an integer", v)
    if not lo <= v <= hi:
        raise _value_error(key, f"an integer in [{lo}, {hi}]", v)
    return v


def _num(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(key, "a number", v)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise _value_error(key, f"a number in [{lo}, {hi}]", v)
    return float(v)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(key, "true or false", v)
    return v


def _refuse_unsupported(body: dict, chat: bool, n: int) -> None:
    """400 for every field whose meaning this server cannot honour (when set to more than its
    no-op value)."""
    for key in ("tools", "functions"):
        if body.get(key) not in (None, []):
            raise _unsupported(key, "tool and function calling")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise _unsupported(key, "tool and function calling")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise _type_error("parallel_tool_calls", "true or false", body["parallel_tool_calls"])
    for key, what in (
        ("audio", "audio output"),
        ("prediction", "predicted outputs"),
        ("reasoning_effort", "reasoning effort"),
        ("web_search_options", "web search"),
    ):
        if body.get(key) is not None:
            raise _unsupported(key, what)
    if body.get("modalities") not in (None, ["text"]):
        raise _unsupported("modalities", 'output other than ["text"]')
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise RequestError(
            '\'response_format\': only {"type": "text"} is supported (no JSON mode or JSON schema)',
            "response_format",
            code="unsupported_value",
        )
    if body.get("store") not in (None, False):
        raise _unsupported("store", "storing completions")
    md = body.get("metadata")
    if md is not None and not (
        isinstance(md, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    ):
        raise _type_error("metadata", "an object of string values", md)
    if body.get("service_tier") not in (None, "auto", "default"):
        raise _value_error("service_tier", '"auto" or "default"', body["service_tier"])
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _type_error("user", "a string", body["user"])
    if not chat:
        if body.get("suffix") not in (None, ""):
            raise _unsupported("suffix", "insertion (a suffix after the completion)")
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise RequestError(
                f"'best_of' must equal n ({n}): choosing the best of several candidates is not supported",
                "best_of",
                code="unsupported_value",
            )


def _messages(body: dict) -> list[dict]:
    """The chat turns as {role, content} with content a string (text parts joined by newlines,
    as vLLM joins them) and "developer" rendered as "system"."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        unknown = sorted(set(m) - _MESSAGE_KEYS)
        if unknown:
            raise RequestError(
                f"{where} has an unknown field {unknown[0]!r}", f"{where}.{unknown[0]}", code="unknown_parameter"
            )
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise _unsupported(
                f"{where}.role" if role in ("tool", "function") else f"{where}.tool_calls", "tool and function calling"
            )
        if m.get("audio") is not None:
            raise _unsupported(f"{where}.audio", "audio")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role must be one of system, developer, user, assistant; got {role!r}", f"{where}.role"
            )
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise _type_error(f"{where}.name", "a string", m["name"])
        out.append({"role": _ROLES[role], "content": _content(m.get("content"), where)})
    if not any(m["content"].strip() for m in out):
        raise RequestError("every message's content is empty", "messages")
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(
            f'{where}.content must be a string or a list of {{"type": "text", "text": ...}} parts', f"{where}.content"
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "input_audio", "file", "image", "audio"):
            raise _unsupported(f"{at}.type", f"a {kind!r} part (this model reads text only)")
        if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise RequestError(f'{at} must be {{"type": "text", "text": <string>}}', at)
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(body: dict, vocab: int) -> str | list[int]:
    """A completion prompt: a string, or token ids; a list holding one of them. Several prompts
    in one request are refused (each would need its own routing)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p.strip():
            raise RequestError("'prompt' is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"'prompt' holds token id {bad}, outside the vocabulary [0, {vocab})", "prompt")
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise RequestError(
            "'prompt' holds several prompts; send one prompt per request (use 'n' for "
            "several completions of one prompt)",
            "prompt",
            code="unsupported_value",
        )
    raise RequestError("'prompt' must be a string or a list of token ids", "prompt")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return [s for s in stop if s]


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    lb = body.get("logit_bias")
    if lb is None:
        return {}
    if not isinstance(lb, dict):
        raise _type_error("logit_bias", "an object mapping token ids to numbers", lb)
    if len(lb) > MAX_LOGIT_BIAS:
        raise _value_error("logit_bias", f"at most {MAX_LOGIT_BIAS} entries", f"{len(lb)} entries")
    out = {}
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < vocab):
            raise RequestError(
                f"'logit_bias' key {k!r} must be a token id in [0, {vocab}) written as a string",
                "logit_bias",
                code="invalid_value",
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and -100 <= v <= 100):
            raise RequestError(
                f"'logit_bias' value for token {k} must be a number in [-100, 100], got {v!r}",
                "logit_bias",
                code="invalid_value",
            )
        out[int(k)] = float(v)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """GenRequest.logprobs: None, or k (each token's logprob and its k most likely alternatives).
    Chat: `logprobs: bool` + `top_logprobs: 0..20`; completions: `logprobs: 0..5`."""
    cap = MAX_TOP_LOGPROBS[chat]
    if not chat:
        return _int(body, "logprobs", 0, cap, None)
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, cap, None)
    if top is not None and not want:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def _model_and_adapter(body: dict, engine) -> tuple[str, str | None]:
    """(model id, forced adapter or None); an adapter's model id forces that adapter."""
    model = body.get("model")
    if model is None:
        model = engine.model_id
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model not in engine.model_ids():
        raise RequestError(
            f"model {model!r} does not exist; available: {', '.join(engine.model_ids())}",
            "model",
            status=404,
            code="model_not_found",
        )
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise _type_error("adapter", "a string", adapter)
    if adapter is not None and adapter not in engine.names:
        raise RequestError(
            f"adapter {adapter!r} does not exist; available: {', '.join(engine.names)}",
            "adapter",
            status=404,
            code="model_not_found",
        )
    if model == engine.model_id:
        return model, adapter
    if adapter is not None and adapter != model:
        raise RequestError(
            f"'model' {model!r} and 'adapter' {adapter!r} name different adapters; give one "
            f"of them, or model {engine.model_id!r} with the adapter",
            "adapter",
        )
    return model, model


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not stream:
        raise RequestError("'stream_options' is only allowed with \"stream\": true", "stream_options")
    if not isinstance(so, dict) or set(so) - {"include_usage"}:
        raise RequestError("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    if so.get("include_usage") is not None and not isinstance(so["include_usage"], bool):
        raise _type_error("stream_options.include_usage", "true or false", so["include_usage"])
    return stream, bool(so.get("include_usage"))


@dataclass(frozen=True)
class CheckedRequest:
    """A body whose every field is checked, before tokenising (the costly part)."""

    chat: bool
    model: str
    messages: list[dict] | None  # chat
    prompt: str | list[int] | None  # completions: raw text or token ids
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    template: GenRequest  # every field but prompt_ids


def check_request(body: Any, engine, chat: bool) -> CheckedRequest:
    """Every check that needs no tokenising; every problem a RequestError naming the field.

    `engine` needs: model_id, names, model_ids(), tok (for the vocabulary size)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    allowed = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        where = "chat completions" if chat else "completions"
        raise RequestError(
            f"unknown field {unknown[0]!r} for {where}; known fields: {', '.join(sorted(allowed))}",
            unknown[0],
            code="unknown_parameter",
        )
    model, adapter = _model_and_adapter(body, engine)
    n = _int(body, "n", 1, MAX_CHOICES, 1)
    _refuse_unsupported(body, chat, n)
    vocab = len(engine.tok)
    messages = _messages(body) if chat else None
    prompt = None if chat else _prompt(body, vocab)

    max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS, 16)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS, 16)
    min_tokens = _int(body, "min_tokens", 0, MAX_TOKENS, 0)
    if min_tokens > max_tokens:
        raise _value_error("min_tokens", f"at most max_tokens ({max_tokens})", min_tokens)
    temperature = _num(body, "temperature", 0.0, 2.0, 0.0)
    seed = _int(body, "seed", 0, SEED_LIMIT - 1, None)
    if seed is not None and seed + n > SEED_LIMIT:  # choice i samples with seed + i
        raise _value_error("seed", f"below 2**63 - n ({SEED_LIMIT - n}) with n={n}", seed)
    stream, include_usage = _stream(body)
    echo = False if chat else _bool(body, "echo")
    logprobs = _logprobs(body, chat)
    if echo and logprobs is not None:
        raise _unsupported("echo", "'echo' with 'logprobs' (the prompt's logprobs)")
    top_p = _num(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise _value_error("top_p", "a number in (0, 1]", body["top_p"])
    num_experts = len(engine.names) - 1
    template = GenRequest(
        prompt_ids=[],
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(body),
        top_k_experts=_int(body, "top_k", 1, max(num_experts, 1), None),
        adapter=adapter,
        presence_penalty=_num(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_num(body, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body, vocab),
        min_tokens=min_tokens,
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs,
    )
    return CheckedRequest(
        chat=chat,
        model=model,
        messages=messages,
        prompt=prompt,
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=echo,
        template=template,
    )


def encode_request(c: CheckedRequest, engine) -> tuple[list[GenRequest], dict]:
    """Tokenise a checked request: n GenRequests with the same prompt (choice i samples with
    seed + i), and the meta the response bodies need. `engine` needs encode_chat, encode_text,
    tok and max_context."""
    if c.chat:
        ids = engine.encode_chat(c.messages)
    elif isinstance(c.prompt, str):
        ids = engine.encode_text(c.prompt)
    else:
        ids = c.prompt
    if not ids:
        raise RequestError("the prompt encodes to no tokens", "messages" if c.chat else "prompt")
    t = c.template
    if len(ids) + t.max_tokens > engine.max_context:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; with max_tokens={t.max_tokens} that exceeds the "
            f"model's context of {engine.max_context} tokens",
            "messages" if c.chat else "prompt",
        )
    reqs = [
        replace(
            t,
            prompt_ids=list(ids),
            seed=None if t.seed is None else t.seed + i,
            stop=list(t.stop),
            logit_bias=dict(t.logit_bias),
        )
        for i in range(c.n)
    ]
    echo = None
    if c.echo:
        echo = c.prompt if isinstance(c.prompt, str) else engine.tok.decode(ids)
    meta = {
        "model": c.model,
        "stream": c.stream,
        "chat": c.chat,
        "n": c.n,
        "include_usage": c.include_usage,
        "echo": echo,
        "logprobs": t.logprobs,
        "prompt_tokens": len(ids),
    }
    return reqs, meta


def parse_request(body: Any, engine, chat: bool) -> tuple[list[GenRequest], dict]:
    """check_request then encode_request: the GenRequests (one per choice) and the meta."""
    return encode_request(check_request(body, engine, chat), engine)


# -- response bodies ---------------------------------------------------------------------------
def _token(tok, token_id: int) -> str:
    return tok.decode([int(token_id)])


@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _token_bytes(tok, token_id: int, text: str) -> list[int]:
    """The token's exact UTF-8 bytes (OpenAI's `bytes`): a token holding part of a character
    decodes to U+FFFD, so its bytes come from the vocabulary piece when the tokenizer is
    byte-level BPE (GPT-2, Llama 3, SmolLM2) or uses byte fallback (SentencePiece)."""
    piece = tok.convert_ids_to_tokens(int(token_id))
    if isinstance(piece, str) and "\ufffd" in text:
        chars = _byte_level_chars()
        if all(c in chars for c in piece):
            return [chars[c] for c in piece]
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
    return list(text.encode("utf-8"))


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR) if not math.isnan(x) else LOGPROB_FLOOR


def _chat_logprobs(entries: list[dict], tok) -> list[dict]:
    """OpenAI chat shape: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""

    def one(tid, lp):
        text = _token(tok, tid)
        return {"token": text, "logprob": _lp(lp), "bytes": _token_bytes(tok, tid, text)}

    return [
        {**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e.get("top", [])]}
        for e in entries
    ]


def _completion_logprobs(entries: list[dict], tok, offset: int) -> tuple[dict, int]:
    """OpenAI completions shape: tokens, token_logprobs, top_logprobs (the k most likely, and the
    chosen token, as OpenAI always includes it), text_offset (characters into the choice's text)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = _token(tok, e["token_id"])
        top = {_token(tok, t): _lp(lp) for t, lp in e.get("top", [])}
        top.setdefault(text, _lp(e["logprob"]))
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(e["logprob"]))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def _checked_logprobs(res: GenResult, meta: dict) -> list[dict] | None:
    if meta["logprobs"] is None:
        return None
    if res.logprobs is None:
        raise RequestError("the request asked for logprobs but the engine returned none", "logprobs", status=500)
    return res.logprobs


def _usage(results: list[GenResult], meta: dict) -> dict:
    done = sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": meta["prompt_tokens"],
        "completion_tokens": done,
        "total_tokens": meta["prompt_tokens"] + done,
    }


def completion_body(results: list[GenResult], meta: dict, tok) -> dict:
    """The non-streaming response: one choice per result (index = position), usage over all of
    them, and the routing of the prompt (the same for every choice)."""
    choices = []
    for i, res in enumerate(results):
        entries = _checked_logprobs(res, meta)
        if meta["chat"]:
            lp = None if entries is None else {"content": _chat_logprobs(entries, tok), "refusal": None}
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": res.text, "refusal": None},
                    "logprobs": lp,
                    "finish_reason": res.finish_reason,
                }
            )
        else:
            echo = meta["echo"] or ""
            lp = None if entries is None else _completion_logprobs(entries, tok, len(echo))[0]
            choices.append({"index": i, "text": echo + res.text, "logprobs": lp, "finish_reason": res.finish_reason})
    return {
        "id": new_id(meta),
        "object": "chat.completion" if meta["chat"] else "text_completion",
        "created": int(time.time()),
        "model": meta["model"],
        "choices": choices,
        "usage": _usage(results, meta),
        "routing": results[0].routing,
    }


def new_id(meta: dict) -> str:
    return ("chatcmpl-" if meta["chat"] else "cmpl-") + uuid.uuid4().hex[:24]


def stream_chunk(
    rid: str,
    meta: dict,
    delta: str | None,
    finish: str | None = None,
    extra: dict | None = None,
    role: bool = False,
    index: int = 0,
    logprobs: dict | None = None,
) -> str:
    """One SSE event of choice `index`: a text delta (or the chat role), its logprobs in the
    response's shape, and the finish reason on a choice's last chunk."""
    if meta["chat"]:
        d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
        choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": meta["model"], "choices": [choice]}
    if meta.get("include_usage"):
        body["usage"] = None  # OpenAI: null on every chunk but the last, usage-only one
    if extra:
        body.update(extra)
    return sse(body)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class StreamWriter:
    """The SSE events of one streaming request with `meta["n"]` choices. Logprobs that arrive
    with a delta go out with it; those a result carries that no delta carried go out with the
    choice's last chunk."""

    def __init__(self, meta: dict, tok):
        self.meta, self.tok = meta, tok
        self.rid = new_id(meta)
        self.sent = [0] * meta["n"]  # logprob entries already sent, per choice
        self.offset = [len(meta["echo"] or "")] * meta["n"]  # next completions text_offset, per choice

    def start(self) -> list[str]:
        """Chat: the assistant role of every choice; completions with echo: the prompt text."""
        if self.meta["chat"]:
            return [stream_chunk(self.rid, self.meta, None, role=True, index=i) for i in range(self.meta["n"])]
        if self.meta["echo"]:
            return [stream_chunk(self.rid, self.meta, self.meta["echo"], index=i) for i in range(self.meta["n"])]
        return []

    def _shape(self, index: int, entries: list[dict] | None) -> dict | None:
        if self.meta["logprobs"] is None or not entries:
            return None
        self.sent[index] += len(entries)
        if self.meta["chat"]:
            return {"content": _chat_logprobs(entries, self.tok), "refusal": None}
        lp, self.offset[index] = _completion_logprobs(entries, self.tok, self.offset[index])
        return lp

    def delta(self, index: int, text: str, logprobs: list[dict] | None = None) -> str:
        lp = self._shape(index, logprobs)
        return stream_chunk(self.rid, self.meta, text, index=index, logprobs=lp)

    def finish(self, index: int, res: GenResult) -> str:
        entries = _checked_logprobs(res, self.meta)
        rest = None if entries is None else entries[self.sent[index] :]
        return stream_chunk(
            self.rid,
            self.meta,
            None,
            res.finish_reason,
            index=index,
            logprobs=self._shape(index, rest),
            extra={"routing": res.routing},
        )

    def usage(self, results: list[GenResult]) -> str | None:
        """The last event when stream_options.include_usage: no choices, the usage of all."""
        if not self.meta["include_usage"]:
            return None
        return sse(
            {
                "id": self.rid,
                "object": "chat.completion.chunk" if self.meta["chat"] else "text_completion",
                "created": int(time.time()),
                "model": self.meta["model"],
                "choices": [],
                "usage": _usage(results, self.meta),
            }
        )

    @staticmethod
    def error(message: str, status: int = 500) -> str:
        return sse(error_body(status, message))
