"""The Serve app on a real local Ray, over real HTTP, from the shared smoke run's bundle."""

import json
import random
import socket
import string
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.ray_processes import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smoke_run):
    from ray import serve

    from serve_apps.elrea_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"run_dir": str(smoke_run.root), "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.2}),
        name="elrea",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}"
    serve.delete("elrea")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def test_models_lists_ensemble_and_adapters(client, smoke_run):
    ids = [m.id for m in client.models.list().data]
    b = json.loads(smoke_run.bundle.read_text())
    assert ids[0].startswith("elrea-") and set(ids[1:]) == set(b["adapters"])


def test_chat_and_completion_with_openai_client(client):
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=4, messages=[{"role": "user", "content": "What is 2 + 3?"}]
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4
    routing = r.model_extra["routing"]
    assert abs(sum(routing["expert_weights"].values()) - 1.0) < 1e-6 and 0 <= routing["base_weight"] <= 2
    c = client.completions.create(model=client.models.list().data[0].id, prompt="Spell cat backward.", max_tokens=3)
    assert c.usage.prompt_tokens > 0 and c.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(client):
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Count the letters in apple."}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=5)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model, messages=msgs, max_tokens=5, stream=True)
    ]
    assert "".join(parts) == full.choices[0].message.content
    text = "".join(
        c.choices[0].text for c in client.completions.create(model=model, prompt="3 * 4 =", max_tokens=4, stream=True)
    )
    assert text == client.completions.create(model=model, prompt="3 * 4 =", max_tokens=4).choices[0].text


def test_routing_equals_the_library_and_forcing_base_equals_base_adapter(client, smoke_run):
    from safetensors.numpy import load_file

    from elrea_ray.config import ModelConfig
    from elrea_ray.ensemble import single_generate
    from elrea_ray.gradients import FeatureExtractor
    from elrea_ray.model import load_adapters, load_tokenizer
    from elrea_ray.projection import ProjectorSpec
    from elrea_ray.routing import route

    b = json.loads(smoke_run.bundle.read_text())
    mc = ModelConfig(**b["model"])
    tok = load_tokenizer(mc)
    msgs = [{"role": "user", "content": "What is 7 + 1 + 2?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    fx = FeatureExtractor(
        mc,
        [str(smoke_run.root / p) for p in b["epoch_checkpoints"]],
        b["epoch_weights"],
        ProjectorSpec.from_dict(b["projector"]),
    )
    ew, bw = route(fx.features([ids]), load_file(str(smoke_run.root / b["centroids"]))["centroids"])
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=3)
    got = r.model_extra["routing"]
    assert got["base_weight"] == pytest.approx(float(bw[0]), abs=1e-5)
    assert [got["expert_weights"][f"expert-{c:02d}"] for c in range(ew.shape[1])] == pytest.approx(
        ew[0].tolist(), abs=1e-5
    )

    forced = client.chat.completions.create(model="base", messages=msgs, max_tokens=4)
    model = load_adapters(mc, {"base": str(smoke_run.root / b["adapters"]["base"])})
    ref = single_generate(model, [ids], "base", 4, tok.eos_token_id, tok.pad_token_id)[0]
    assert forced.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)
    assert forced.model_extra["routing"]["adapters_run"] == ["base"]


def test_32_concurrent_requests_succeed_in_batches(server):
    body = {"prompt": "What is 1 + 1?", "max_tokens": 3}

    def one(i):
        return httpx.post(server + "/v1/completions", json={**body, "prompt": f"What is {i} + 1?"}, timeout=120)

    with ThreadPoolExecutor(32) as ex:
        codes = [r.status_code for r in ex.map(one, range(32))]
    assert codes == [200] * 32
    stats = httpx.get(server + "/v1/stats").json()
    assert stats["max_running_seen"] > 1 and stats["requests_admitted"] >= 32


def test_concurrent_streams_are_decoded_in_one_batch(client, server):
    """Streaming requests arriving together share the running batch; each stream still gets its
    own tokens, a final chunk with usage and routing, and its own end."""
    before = httpx.get(server + "/v1/stats").json()
    model = client.models.list().data[0].id

    def one(i):
        chunks = list(
            client.chat.completions.create(
                model=model,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
            )
        )
        last = chunks[-2]  # the choice's last chunk; then the usage chunk
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, last.choices[0].finish_reason, chunks[-1].usage, last.model_extra["routing"]

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(6)))
    for text, finish, usage, routing in results:
        assert finish in ("stop", "length") and usage.completion_tokens <= 4 and usage.prompt_tokens > 0
        assert abs(sum(routing["expert_weights"].values()) - 1.0) < 1e-6
    after = httpx.get(server + "/v1/stats").json()
    assert after["requests_admitted"] - before["requests_admitted"] == 6
    # one after the other, every token and every end-of-sequence would take a step of its own
    alone = sum(usage.completion_tokens for _, _, usage, _ in results) + sum(f == "stop" for _, f, _, _ in results)
    assert after["steps"] - before["steps"] < alone


def _long_body(server, need=60):
    """A completion body that decodes past `need` tokens: ignore_eos where the protocol takes it,
    else a hot seeded sampling of the tiny random model that happens to avoid end-of-turn tokens."""
    best = (-1, -1)
    for seed in range(24):
        body = {
            "prompt": "Write a long story.",
            "max_tokens": 200,
            "ignore_eos": True,
            "temperature": 2.0,
            "seed": seed,
        }
        n = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["usage"]["completion_tokens"]
        best = max(best, (n, seed))
        if n >= need:
            return body
    pytest.fail(f"no seed decodes past {need} tokens (longest: {best[0]}, seed {best[1]})")


def _wait_for(cond, what, timeout=30.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_stream_ends_before_the_long_request_it_is_batched_with(client, server):
    """Continuous batching: a short stream joins a running long request and leaves the batch at
    its own end, while the long one goes on decoding."""
    body = _long_body(server)
    stats = lambda: httpx.get(server + "/v1/stats").json()  # noqa: E731
    with ThreadPoolExecutor(1) as ex:
        long = ex.submit(httpx.post, server + "/v1/completions", json=body, timeout=120)
        _wait_for(lambda: stats()["running"] >= 1, "the long request to start decoding")
        chunks = list(
            client.completions.create(
                model=client.models.list().data[0].id,
                prompt="Hi there.",
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens <= 2
        assert not long.done() and stats()["running"] == 1  # the stream left; the long request decodes on
        r = long.result()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 60


def test_client_disconnect_frees_its_slot_and_its_row(smoke_run, server):
    from ray import serve

    from serve_apps.elrea_app import build_app

    serve.run(
        build_app(
            {
                "run_dir": str(smoke_run.root),
                "num_cpus": 0.25,
                "max_inflight": 1,
                "max_batch_size": 1,
                "batch_wait_timeout_s": 0.0,
            }
        ),
        name="one",
        route_prefix="/one",
    )
    u = server + "/one"
    stats = lambda: httpx.get(u + "/v1/stats").json()  # noqa: E731
    try:
        # 8 choices of 240 tokens decoded one after another (max_batch_size 1): the client leaves
        # long before the request could end, however slowly the disconnect reaches the replica
        body = {**_long_body(u), "max_tokens": 240, "n": 8}
        for stream in (True, False):
            before = stats()
            with socket.create_connection(("127.0.0.1", int(u.split(":")[-1].split("/")[0]))) as sock:
                data = json.dumps({**body, "stream": stream}).encode()
                sock.sendall(
                    b"POST /one/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data
                )
                _wait_for(lambda: stats()["running"] == 1, "the request to decode")
            # the client left mid-decode (the socket is closed)
            _wait_for(lambda: stats()["inflight"] == 0 and stats()["running"] == 0, "the slot to be freed")
            after = stats()
            cancelled = after["requests_cancelled"] - before["requests_cancelled"]
            finished = after["requests_finished"] - before["requests_finished"]
            assert cancelled >= 1 and finished < 8, (stream, cancelled, finished)  # it did not run to its end
            ok = httpx.post(u + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert ok.status_code == 200  # not 429: the slot is free
    finally:
        serve.delete("one")


def test_stats_and_prometheus_metrics_read_the_decode_loop(server):
    import ray

    _long_body(server)  # at least one request that generated tokens
    s = httpx.get(server + "/v1/stats").json()
    assert s["tokens_generated"] >= 60 and s["requests_finished"] > 0 and s["queued"] == 0
    assert sum(s["expert_selections"].values()) == s["requests_admitted"]
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = [
        "elrea_generated_tokens",
        "elrea_running_batch_size",
        "elrea_queue_length",
        "elrea_time_to_first_token_s",
        "elrea_routing_s",
        "elrea_expert_selections",
    ]

    def exported():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return all(w in text for w in wanted)

    _wait_for(exported, "the replica's metrics in Ray's Prometheus export", timeout=60)


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
        (json.dumps({"prompt": 3}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "hi", "max_tokens": "5"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "hi", "model": "gpt-9"}).encode(), 404, "model"),
        (json.dumps({"prompt": "hi", "adapter": "expert-99"}).encode(), 404, "adapter"),
        (json.dumps({"prompt": "hi", "temperature": 5}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "hi " * 400}).encode(), 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_style_4xx(server, body, status, param):
    r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["param"] == param


def test_fuzzed_bodies_never_500(server):
    rng = random.Random(0)
    values = [None, True, -1, 0, 10**12, 1.5, "", "x" * 50, [], [1, 2], {}, {"a": 1}, ["hi"], "\u0000\ud7ff"]
    keys = [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "model",
        "adapter",
        "top_k",
        "seed",
        "stream",
        "n",
        "logit_bias",
        "stream_options",
        "min_tokens",
        "ignore_eos",
        "echo",
        "presence_penalty",
        "response_format",
        "tools",
        "user",
        "best_of",
    ]
    codes = []
    with httpx.Client(timeout=60) as http:
        for i in range(500):
            if i % 5 == 0:
                raw = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40))).encode()
            else:
                body = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(1, 5))}
                if rng.random() < 0.5:
                    body["max_tokens"] = rng.choice([0, -3, "a", None, 10**9])
                raw = json.dumps(body).encode()
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            r = http.post(server + path, content=raw, headers={"content-type": "application/json"})
            codes.append(r.status_code)
    assert not [c for c in codes if c >= 500], sorted(set(codes))
    assert httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200


def test_api_key_guards_every_route_but_health(smoke_run, server, tmp_path):
    from ray import serve

    from serve_apps.elrea_app import build_app

    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret\n")
    serve.run(
        build_app({"run_dir": str(smoke_run.root), "num_cpus": 0.25, "api_key_file": str(key_file)}),
        name="secure",
        route_prefix="/secure",
    )
    u = server + "/secure"
    try:
        assert httpx.get(u + "/health").status_code == 200
        for path in ("/v1/models", "/v1/models/base", "/v1/stats"):
            assert httpx.get(u + path).status_code == 401
            r = httpx.get(u + path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        body = {"prompt": "hi", "max_tokens": 2}
        assert httpx.post(u + "/v1/completions", json=body).status_code == 401
        ok = httpx.post(u + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
    finally:
        serve.delete("secure")


def test_overload_gets_429_with_retry_after_and_the_rest_succeed(smoke_run, server):
    from ray import serve

    from serve_apps.elrea_app import build_app

    serve.run(
        build_app(
            {
                "run_dir": str(smoke_run.root),
                "num_cpus": 0.25,
                "max_inflight": 2,
                "max_batch_size": 2,
                "batch_wait_timeout_s": 0.2,
            }
        ),
        name="small",
        route_prefix="/small",
    )
    u = server + "/small"
    try:

        def one(i):
            return httpx.post(u + "/v1/completions", json={"prompt": f"What is {i} + 2?", "max_tokens": 8}, timeout=120)

        with ThreadPoolExecutor(12) as ex:
            responses = list(ex.map(one, range(12)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        stats = httpx.get(u + "/v1/stats").json()
        assert stats["inflight"] == 0 and stats["rejected_overload"] == codes.count(429)
        assert one(0).status_code == 200  # the slots were given back
    finally:
        serve.delete("small")


def test_app_args_are_checked():
    from pydantic import ValidationError

    from serve_apps.elrea_app import AppArgs, build_app

    with pytest.raises(ValidationError, match="max_inflight"):
        AppArgs(run_dir="x", max_inflight=100, max_ongoing_requests=64)
    with pytest.raises(ValidationError, match="max_replicas"):
        AppArgs(run_dir="x", min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="ELREA_API_KEY.*api_key_file"):
        AppArgs(run_dir="x", api_key="s3cret")  # app arguments show in the Serve dashboard
    app = build_app({"run_dir": "x", "max_replicas": 4, "num_gpus": 0.5})
    deployment = app._bound_deployment  # the deployment the application binds
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.ray_actor_options["num_gpus"] == 0.5


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    from serve_apps.elrea_app import AppArgs, api_key

    assert api_key(AppArgs(run_dir="x"), environ={}) is None
    assert api_key(AppArgs(run_dir="x"), environ={"ELREA_API_KEY": "from-env"}) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert api_key(AppArgs(run_dir="x", api_key_file=str(f)), environ={"ELREA_API_KEY": "from-env"}) == "from-file"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        api_key(AppArgs(run_dir="x", api_key_file=str(f)), environ={})
    with pytest.raises(ValueError, match="cannot be read"):
        api_key(AppArgs(run_dir="x", api_key_file=str(tmp_path / "missing")), environ={})


def test_unhandled_errors_leave_in_openai_shape():
    """The app's exception handlers, on a FastAPI app of their own with a route that fails."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve_apps import elrea_app

    app = FastAPI()
    app.exception_handlers.update(elrea_app.app.exception_handlers)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("no")

    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.get("/boom")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = http.get("/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
