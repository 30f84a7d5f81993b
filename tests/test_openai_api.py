"""The OpenAI protocol without Ray: every request field is honoured (it lands in the GenRequests)
or refused with a 400 naming it; response bodies and SSE chunks carry several choices, per-token
logprobs in OpenAI's shapes and usage. The engine is the real Engine's request methods over the
tiny fixture's real tokenizer (no model: parsing needs none)."""

import json

import pytest

from elrea_ray.decoding import GenResult
from elrea_ray.openai_api import (
    ERROR_KINDS,
    RequestError,
    StreamWriter,
    check_request,
    completion_body,
    error_body,
    parse_request,
)
from elrea_ray.serving import Engine


class RequestEngine:
    """The part of Engine that parsing uses, with Engine's own methods: a tokenizer, the model
    ids of a bundle with two experts, a 256-token context."""

    model_ids = Engine.model_ids
    encode_chat = Engine.encode_chat
    encode_text = Engine.encode_text

    def __init__(self, tok):
        self.tok, self.model_id, self.max_context = tok, "elrea-run", 256
        self.names = ["base", "expert-00", "expert-01"]


@pytest.fixture(scope="module")
def engine():
    from elrea_ray.config import ModelConfig
    from elrea_ray.model import load_tokenizer

    return RequestEngine(load_tokenizer(ModelConfig(name_or_path="tiny-random-llama")))


CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}
COMP = {"prompt": "2 + 3 ="}


def chat(engine, **fields):
    return parse_request({**CHAT, **fields}, engine, chat=True)


def comp(engine, **fields):
    return parse_request({**COMP, **fields}, engine, chat=False)


def refused(engine, body, is_chat, param, status=400):
    with pytest.raises(RequestError) as e:
        parse_request(body, engine, chat=is_chat)
    assert e.value.status == status and e.value.param == param, (e.value.status, e.value.param, str(e.value))
    err = e.value.body()["error"]
    assert err["message"] and err["param"] == param and err["type"] == ERROR_KINDS[status][0]
    return e.value


def test_defaults_are_one_greedy_choice(engine):
    reqs, meta = chat(engine)
    (r,) = reqs
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.adapter) == (16, 0.0, 1.0, None, [], None)
    assert (r.presence_penalty, r.frequency_penalty, r.logit_bias, r.min_tokens, r.ignore_eos, r.logprobs) == (
        0.0,
        0.0,
        {},
        0,
        False,
        None,
    )
    assert meta == {
        "model": "elrea-run",
        "stream": False,
        "chat": True,
        "n": 1,
        "include_usage": False,
        "echo": None,
        "logprobs": None,
        "prompt_tokens": len(r.prompt_ids),
    }


def test_sampling_fields_land_in_the_request(engine):
    (r,), _ = chat(
        engine,
        max_completion_tokens=7,
        temperature=0.7,
        top_p=0.9,
        seed=5,
        stop="\n",
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        logit_bias={"3": 100, "17": -100.0},
        min_tokens=2,
        ignore_eos=True,
        top_k=1,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        modalities=["text"],
    )
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop) == (7, 0.7, 0.9, 5, ["\n"])
    assert (r.presence_penalty, r.frequency_penalty, r.logit_bias) == (0.5, -1.5, {3: 100.0, 17: -100.0})
    assert (r.min_tokens, r.ignore_eos, r.top_k_experts) == (2, True, 1)


def test_n_expands_into_choices_with_distinct_seeds(engine):
    reqs, meta = chat(engine, n=3, seed=10, temperature=1.0)
    assert meta["n"] == 3 and [r.seed for r in reqs] == [10, 11, 12]
    assert all(r.prompt_ids == reqs[0].prompt_ids for r in reqs)
    reqs, _ = comp(engine, n=2, best_of=2)
    assert [r.seed for r in reqs] == [None, None]
    reqs[0].stop.append("x")  # every choice owns its lists
    assert reqs[1].stop == []


def test_logprobs_fields(engine):
    assert chat(engine, logprobs=True)[0][0].logprobs == 0
    assert chat(engine, logprobs=True, top_logprobs=20)[0][0].logprobs == 20
    assert chat(engine, logprobs=False)[0][0].logprobs is None
    assert comp(engine, logprobs=5)[0][0].logprobs == 5
    assert comp(engine, logprobs=0)[0][0].logprobs == 0
    refused(engine, {**CHAT, "top_logprobs": 3}, True, "top_logprobs")
    refused(engine, {**CHAT, "logprobs": True, "top_logprobs": 21}, True, "top_logprobs")
    refused(engine, {**CHAT, "logprobs": 3}, True, "logprobs")
    refused(engine, {**COMP, "logprobs": 6}, False, "logprobs")
    refused(engine, {**COMP, "logprobs": True}, False, "logprobs")
    refused(engine, {**COMP, "logprobs": 1, "echo": True}, False, "echo")


def test_streaming_options(engine):
    _, meta = chat(engine, stream=True, stream_options={"include_usage": True})
    assert meta["stream"] and meta["include_usage"]
    refused(engine, {**CHAT, "stream_options": {"include_usage": True}}, True, "stream_options")
    refused(engine, {**CHAT, "stream": True, "stream_options": {"x": 1}}, True, "stream_options")
    refused(engine, {**CHAT, "stream": "yes"}, True, "stream")


def test_content_parts_and_the_developer_role(engine):
    parts = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 3?"}],
                "name": "ann",
            },
        ]
    }
    reqs, _ = parse_request(parts, engine, chat=True)
    plain = engine.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is\n2 + 3?"}]
    )
    assert reqs[0].prompt_ids == plain
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    refused(engine, {"messages": [{"role": "user", "content": [image]}]}, True, "messages[0].content[0].type")
    refused(engine, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, True, "messages[0].content[0]")
    refused(engine, {"messages": [{"role": "tool", "content": "3"}]}, True, "messages[0].role")
    refused(engine, {"messages": [{"role": "robot", "content": "3"}]}, True, "messages[0].role")
    refused(engine, {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, True, "messages[0].mood")
    refused(
        engine,
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        True,
        "messages[0].tool_calls",
    )
    refused(engine, {"messages": [{"role": "user", "content": " "}]}, True, "messages")
    refused(engine, {"messages": []}, True, "messages")


def test_completions_continue_the_raw_prompt(engine):
    (r,), meta = comp(engine)
    assert r.prompt_ids == list(engine.tok("2 + 3 =")["input_ids"])  # no chat template around it
    assert "<|im_start|>" not in engine.tok.decode(r.prompt_ids)
    assert parse_request({"prompt": ["2 + 3 ="]}, engine, chat=False)[0][0].prompt_ids == r.prompt_ids
    assert parse_request({"prompt": [5, 6, 7]}, engine, chat=False)[0][0].prompt_ids == [5, 6, 7]
    assert parse_request({"prompt": [[5, 6]]}, engine, chat=False)[0][0].prompt_ids == [5, 6]
    assert comp(engine, echo=True)[1]["echo"] == "2 + 3 ="
    assert parse_request({"prompt": [5, 6], "echo": True}, engine, chat=False)[1]["echo"] == engine.tok.decode([5, 6])
    refused(engine, {"prompt": ["a", "b"]}, False, "prompt")
    refused(engine, {"prompt": [5, 10**6]}, False, "prompt")
    refused(engine, {"prompt": ""}, False, "prompt")
    refused(engine, {"prompt": 3}, False, "prompt")


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 4097),
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("seed", 2**63),
        ("seed", 2**64),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", True),
        ("n", 0),
        ("n", 9),
        ("n", "2"),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"3": 101}),
        ("logit_bias", {"999999": 1}),
        ("logit_bias", [1]),
        ("logit_bias", {"3": True}),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("ignore_eos", 1),
        ("stop", 3),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("top_k", 3),
        ("top_k", 0),
        ("user", 5),
        ("model", 5),
        ("adapter", 5),
        ("metadata", {"k": 1}),
        ("service_tier", "flex"),
        ("parallel_tool_calls", "yes"),
    ],
)
def test_out_of_range_or_wrong_type_is_a_400_naming_the_field(engine, field, value):
    refused(engine, {**CHAT, field: value}, True, field)


def test_seed_at_the_limit_and_n(engine):
    assert chat(engine, seed=2**63 - 1)[0][0].seed == 2**63 - 1
    refused(engine, {**CHAT, "seed": 2**63 - 2, "n": 3}, True, "seed")  # choice 2 would seed 2**63


def test_tiny_temperatures_decode_greedily(engine):
    """softmax(logits / 1e-38) is NaN in float32; temperatures below 0.01 mean greedy."""
    for t in (1e-38, 1e-5, 0.0099):
        assert chat(engine, temperature=t)[0][0].temperature == 0.0
    assert chat(engine, temperature=0.01)[0][0].temperature == 0.01


@pytest.mark.parametrize(
    "field,value,is_chat",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}], True),
        ("tool_choice", "auto", True),
        ("functions", [{"name": "f"}], True),
        ("function_call", "auto", True),
        ("response_format", {"type": "json_object"}, True),
        ("response_format", {"type": "json_schema", "json_schema": {}}, True),
        ("audio", {"voice": "x"}, True),
        ("modalities", ["text", "audio"], True),
        ("store", True, True),
        ("prediction", {"type": "content", "content": "x"}, True),
        ("reasoning_effort", "low", True),
        ("web_search_options", {}, True),
        ("suffix", "end", False),
        ("best_of", 3, False),
        ("frobnicate", 1, True),
        ("echo", True, True),
        ("prompt", "x", True),
        ("messages", [], False),
        ("top_logprobs", 2, False),
        ("max_completion_tokens", 3, False),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(engine, field, value, is_chat):
    body = {**(CHAT if is_chat else COMP), field: value}
    e = refused(engine, body, is_chat, field)
    assert e.code in ("unsupported_parameter", "unsupported_value", "unknown_parameter")


def test_model_and_adapter(engine):
    assert chat(engine, model="expert-01")[0][0].adapter == "expert-01"
    assert chat(engine, model="elrea-run", adapter="base")[0][0].adapter == "base"
    assert chat(engine, model="base", adapter="base")[0][0].adapter == "base"
    e = refused(engine, {**CHAT, "model": "gpt-9"}, True, "model", status=404)
    assert e.body()["error"]["code"] == "model_not_found"
    refused(engine, {**CHAT, "adapter": "expert-99"}, True, "adapter", status=404)
    refused(engine, {**CHAT, "model": "expert-00", "adapter": "expert-01"}, True, "adapter")


def test_bodies_that_are_not_objects_and_the_context_limit(engine):
    for body in ([], "hi", 3, None):
        refused(engine, body, True, None)
    refused(engine, {"prompt": "hi " * 300}, False, "prompt")
    refused(engine, {**CHAT, "messages": [{"role": "user", "content": "hi " * 300}]}, True, "messages")


def test_cheap_checks_run_before_tokenising(engine):
    """check_request refuses a bad field without tokenising (a prompt that would fail to encode
    is not looked at)."""

    class NoTokenising(RequestEngine):
        def encode_text(self, prompt):
            raise AssertionError("tokenised")

    with pytest.raises(RequestError, match="seed"):
        check_request({**COMP, "seed": -1}, NoTokenising(engine.tok), chat=False)


def test_error_bodies_have_openai_types_and_codes_for_every_status():
    for status in (400, 401, 404, 405, 413, 415, 429, 500, 503, 504):
        err = error_body(status, "m", "p")["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] == "m"
        assert err["type"] == (
            "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
        )
    assert error_body(401, "m")["error"]["code"] == "invalid_api_key"
    assert error_body(429, "m")["error"]["code"] == "rate_limit_exceeded"
    assert error_body(404, "m", code="model_not_found")["error"]["code"] == "model_not_found"


def _result(tok, text, logprobs=None, finish="stop"):
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    lps = None
    if logprobs is not None:  # the chosen token and `logprobs` alternatives per step
        lps = [
            {"token_id": t, "logprob": -0.5, "top": [[t, -0.5], [7, -1.5], [8, float("-inf")]][:logprobs]} for t in ids
        ]
    return GenResult(ids, text, finish, {"base_weight": 0.2, "expert_weights": {"expert-00": 1.0}}, lps)


def test_chat_body_with_choices_and_logprobs(engine):
    tok = engine.tok
    reqs, meta = chat(engine, n=2, logprobs=True, top_logprobs=3)
    results = [_result(tok, "five", 3), _result(tok, "5", 3, "length")]
    body = completion_body(results, meta, tok)
    assert json.loads(json.dumps(body, allow_nan=False)) == body  # strict JSON: no -Infinity
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][1]["finish_reason"] == "length" and body["choices"][0]["message"]["content"] == "five"
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == "five"
    first = content[0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"} and first["logprob"] == -0.5
    assert bytes(first["bytes"]).decode() == first["token"]
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.5, -9999.0]
    usage = body["usage"]
    assert usage["prompt_tokens"] == meta["prompt_tokens"] == len(reqs[0].prompt_ids)
    assert usage["completion_tokens"] == sum(len(r.token_ids) for r in results) > len(results[0].token_ids)
    assert body["routing"]["base_weight"] == 0.2 and body["object"] == "chat.completion"


def test_logprob_bytes_rebuild_characters_split_across_tokens(engine):
    """A token holding half of "é" decodes to U+FFFD; its `bytes` are still exact, so the bytes
    of all tokens concatenate to the text's UTF-8."""
    tok = engine.tok
    _, meta = chat(engine, logprobs=True)
    text = "café über 日本"
    body = completion_body([_result(tok, text, 0)], meta, tok)
    content = body["choices"][0]["logprobs"]["content"]
    assert any("\ufffd" in t["token"] for t in content)  # the tokenizer does split characters
    assert b"".join(bytes(t["bytes"]) for t in content) == text.encode("utf-8")


def test_completion_body_logprobs_echo_and_offsets(engine):
    tok = engine.tok
    _, meta = comp(engine, logprobs=0)
    body = completion_body([_result(tok, "hello world", 0)], meta, tok)
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == "hello world" and lp["token_logprobs"] == [-0.5] * len(lp["tokens"])
    assert lp["top_logprobs"][0] == {lp["tokens"][0]: -0.5}  # the chosen token is always listed
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    _, meta = comp(engine, echo=True)
    body = completion_body([_result(tok, " 5")], meta, tok)
    assert body["choices"][0]["text"] == "2 + 3 = 5" and body["choices"][0]["logprobs"] is None


def test_logprobs_asked_and_not_returned_is_a_500_not_a_silent_null(engine):
    _, meta = chat(engine, logprobs=True)
    with pytest.raises(RequestError) as e:
        completion_body([_result(engine.tok, "five")], meta, engine.tok)
    assert e.value.status == 500


def _events(chunks):
    return [json.loads(c[len("data: ") :]) for c in chunks if c != "data: [DONE]\n\n"]


def test_stream_writer_interleaves_choices_and_ends_with_usage(engine):
    tok = engine.tok
    _, meta = chat(engine, n=2, stream=True, stream_options={"include_usage": True}, logprobs=True)
    w = StreamWriter(meta, tok)
    a, b = _result(tok, "ab", 0), _result(tok, "c", 0)
    chunks = [
        *w.start(),
        w.delta(1, "c", b.logprobs),
        w.delta(0, "ab"),
        w.finish(1, b),
        w.finish(0, a),
        w.usage([a, b]),
    ]
    ev = _events(chunks)
    assert {e["id"] for e in ev} == {w.rid}
    assert [e["choices"][0]["delta"] for e in ev[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert all(e["usage"] is None for e in ev[:-1]) and ev[-1]["choices"] == []
    assert ev[-1]["usage"]["completion_tokens"] == len(a.token_ids) + len(b.token_ids)
    # choice 1's logprobs came with its delta; choice 0's (no delta carried them) with its last chunk
    assert ev[2]["choices"][0]["logprobs"]["content"][0]["token"] == "c"
    assert ev[4]["choices"][0]["logprobs"] is None and ev[4]["choices"][0]["finish_reason"] == "stop"
    assert "".join(x["token"] for x in ev[5]["choices"][0]["logprobs"]["content"]) == "ab"
    assert ev[5]["routing"]["base_weight"] == 0.2


def test_stream_writer_completions_echo_without_usage(engine):
    _, meta = comp(engine, stream=True, echo=True)
    w = StreamWriter(meta, engine.tok)
    ev = _events([*w.start(), w.delta(0, " 5"), w.finish(0, _result(engine.tok, " 5"))])
    assert [e["choices"][0]["text"] for e in ev] == ["2 + 3 =", " 5", ""]
    assert w.usage([]) is None and "usage" not in ev[0]
    err = json.loads(StreamWriter.error("boom")[len("data: ") :])["error"]
    assert err["type"] == "server_error" and err["message"] == "boom"


# -- over real HTTP, against the Serve app on the shared smoke run ------------------------------
@pytest.fixture(scope="module")
def server(smoke_run):
    from ray import serve

    from serve_apps.elrea_app import build_app
    from tests.ray_processes import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"run_dir": str(smoke_run.root), "num_cpus": 0.5, "batch_wait_timeout_s": 0.05}),
        name="protocol",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}"
    serve.delete("protocol")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _post(server, path, body, **headers):
    import httpx

    return httpx.post(
        server + path,
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
        timeout=60,
    )


def _openai_error(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ERROR_KINDS[status][0] and err["param"] == param
    if code:
        assert err["code"] == code
    return err


@pytest.mark.slow
def test_n_choices_with_the_openai_client(client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model,
        n=3,
        max_tokens=4,
        temperature=1.0,
        seed=1,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 12  # summed over the choices
    same = client.chat.completions.create(
        model=model,
        n=3,
        max_tokens=4,
        temperature=1.0,
        seed=1,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
    )
    assert [c.message.content for c in same.choices] == [c.message.content for c in r.choices]  # seed, seed+1, ...
    c = client.completions.create(model=model, prompt="3 * 4 =", n=2, max_tokens=3, echo=True)
    assert [x.index for x in c.choices] == [0, 1] and all(x.text.startswith("3 * 4 =") for x in c.choices)
    assert c.choices[0].text == c.choices[1].text  # greedy


@pytest.mark.slow
def test_streamed_choices_and_the_usage_chunk(client):
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Count the letters in apple."}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, n=2)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = ["", ""]
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        texts[choice.index] += choice.delta.content or ""
        assert ch.usage is None
    assert texts == [c.message.content for c in full.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    plain = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=2, stream=True))
    assert all(ch.usage is None for ch in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_logprobs_over_http(client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model,
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


@pytest.mark.slow
def test_completions_continue_raw_text(client, smoke_run):
    from elrea_ray.config import ModelConfig
    from elrea_ray.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(**json.loads(smoke_run.bundle.read_text())["model"]))
    c = client.completions.create(model=client.models.list().data[0].id, prompt="Spell cat backward.", max_tokens=2)
    assert c.usage.prompt_tokens == len(tok("Spell cat backward.")["input_ids"])


@pytest.mark.slow
def test_models_by_id(server, client):
    ids = [m.id for m in client.models.list().data]
    assert client.models.retrieve(ids[1]).id == ids[1]
    import httpx

    _openai_error(httpx.get(server + "/v1/models/gpt-9"), 404, "model", "model_not_found")
    _openai_error(httpx.get(server + "/v1/nothing-here"), 404)
    _openai_error(httpx.get(server + "/v1/completions"), 405)


@pytest.mark.slow
@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'"hi"', 400, None),
        (b"[" * 100_000, 400, None),
        (b'{"prompt": "hi", "temperature": NaN}', 400, None),
        (b'{"prompt": "hi", "\xff": 1}', 400, None),
        ({"prompt": "hi", "seed": 2**64}, 400, "seed"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        ({"prompt": "hi", "model": "expert-00", "adapter": "base"}, 400, "adapter"),
        ({"prompt": "hi", "n": 9}, 400, "n"),
        ({"prompt": "hi", "suffix": "x"}, 400, "suffix"),
        ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ],
)
def test_hostile_completion_bodies(server, body, status, param):
    _openai_error(_post(server, "/v1/completions", body), status, param)


@pytest.mark.slow
def test_hostile_chat_bodies(server):
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    _openai_error(
        _post(server, "/v1/chat/completions", {"messages": msgs, "tools": [tool]}),
        400,
        "tools",
        "unsupported_parameter",
    )
    _openai_error(
        _post(server, "/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_object"}}),
        400,
        "response_format",
    )
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    _openai_error(
        _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": image}]}),
        400,
        "messages[0].content[0].type",
    )


@pytest.mark.slow
def test_a_tiny_temperature_decodes_greedily(server):
    body = {"prompt": "What is 1 + 1?", "max_tokens": 4}
    greedy = _post(server, "/v1/completions", body)
    tiny = _post(server, "/v1/completions", {**body, "temperature": 1e-38})
    assert tiny.status_code == greedy.status_code == 200
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.slow
def test_content_type_and_size_are_checked_before_reading(server):
    import socket
    import urllib.parse

    import httpx

    # a cross-site HTML form can post only form or text bodies: refused, never run
    r = httpx.post(server + "/v1/completions", data={"prompt": "hi"}, timeout=30)
    _openai_error(r, 415)
    _openai_error(
        httpx.post(
            server + "/v1/completions", content=b'{"prompt": "hi"}', timeout=30, headers={"content-type": "text/plain"}
        ),
        415,
    )
    # a declared 2 GB body is answered at once, before a byte of it is sent
    u = urllib.parse.urlsplit(server)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000000\r\n\r\n"
        )
        answer = b""
        while b"request_too_large" not in answer and (part := s.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in answer, answer[:300]

    def chunked():  # no Content-Length: read with a running cap
        for _ in range(300):
            yield b" " * 10_000

    _openai_error(
        httpx.post(
            server + "/v1/completions", content=chunked(), timeout=60, headers={"content-type": "application/json"}
        ),
        413,
    )
