"""Ray Serve application: a run's routed ensemble behind an OpenAI-compatible HTTP API.

    serve run serve_apps.elrea_app:build_app run_dir=runs/default
    serve run serve_apps/serve_config.yaml

Each replica holds the backbone and all C+1 adapters once and mixes their logits inside one
batched forward (per-expert deployments or model multiplexing cannot mix logits inside one forward).
Each replica runs one continuous-batching decode loop (`elrea_ray.decoding`): a request joins the
running batch at the next decoding step and leaves it at its own end (EOS, stop string,
max_tokens) or when its client disconnects; streaming and non-streaming requests share the batch.

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as SSE),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /v1/stats. Extra request fields: "top_k" (experts kept),
"adapter" (force "base" or "expert-XX"); responses carry a "routing" object (weights, top
clusters, adapters run). Every error body, whatever its status, is OpenAI's error object.
The bearer key comes from $ELREA_API_KEY or the file named by `api_key_file`, never from the
app arguments (those show in the Serve dashboard).
"""

import asyncio
import hmac
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, model_validator
from ray import serve
from starlette.exceptions import HTTPException

from elrea_ray.openai_api import (
    MAX_BODY_BYTES,
    SSE_DONE,
    RequestError,
    StreamWriter,
    check_request,
    completion_body,
    encode_request,
    error_body,
)

log = logging.getLogger("ray.serve")
app = FastAPI(title="elrea-ray", docs_url=None, redoc_url=None)

API_KEY_ENV = "ELREA_API_KEY"
API_KEY_MOVED = (
    f"'api_key' is not an app argument (app arguments show in the Serve dashboard); set "
    f"{API_KEY_ENV} in the replicas' environment, or api_key_file=<path of a file holding the key>"
)


class AppArgs(BaseModel):
    """`serve run ... key=value` arguments or the `args:` block of a Serve config file."""

    run_dir: str  # local path, or an s3:// run that each replica pulls into its node's mirror
    # A file on every replica's node holding the bearer key required on every route but /health
    # (e.g. a mounted Kubernetes secret); unset: $ELREA_API_KEY of the replica, else no key.
    api_key_file: str | None = None
    num_replicas: int = 1  # fixed replica count, unless max_replicas turns autoscaling on
    min_replicas: int = 1
    max_replicas: int | None = None  # set (> min_replicas) for Serve autoscaling
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # per replica; > 0 decodes on the GPU
    max_ongoing_requests: int = 64  # Serve's per-replica cap; beyond it requests queue in Serve
    max_queued_requests: int = 128  # beyond this Serve answers 503
    # Requests a replica admits at once; beyond: 429 with Retry-After. Below max_ongoing_requests
    # so that overload is answered at once; None: max_ongoing_requests (overload queues in Serve).
    max_inflight: int | None = None
    max_batch_size: int = 8  # sequences decoding together in a replica's running batch
    # When the running batch is empty, wait this long before the first prompt forward, so that
    # requests arriving together share it (and their common prompt prefix); 0: start at once.
    batch_wait_timeout_s: float = 0.02
    request_timeout_s: float = 120.0  # beyond: 504
    # gradient | distilled: overrides the bundle's routing.method (distilled needs the run's
    # distilled router); None: the bundle's. Two apps on one bundle can serve both routers.
    routing_method: Literal["gradient", "distilled"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_args(cls, data):
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(API_KEY_MOVED)
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.max_inflight is None:
            self.max_inflight = self.max_ongoing_requests
        if not 1 <= self.max_inflight <= self.max_ongoing_requests:
            raise ValueError(
                f"max_inflight={self.max_inflight} must be in [1, max_ongoing_requests="
                f"{self.max_ongoing_requests}] (requests beyond Serve's cap never reach the replica)"
            )
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        return self


def api_key(args: AppArgs, environ=os.environ) -> str | None:
    """The bearer key: the contents of args.api_key_file, else $ELREA_API_KEY, else None (no key)."""
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"api_key_file {str(path)!r} cannot be read on this node: {e.strerror}") from None
        if not key:
            raise ValueError(f"api_key_file {str(path)!r} is empty")
        return key
    return environ.get(API_KEY_ENV) or None


# GenRequest fields the engine may name in a refusal, as the OpenAI body spells them
_OPENAI_PARAM = {"prompt_ids": "messages", "top_k_experts": "top_k", "logprobs": "top_logprobs"}


class _Stream(StreamingResponse):
    """A streamed response that runs `release` however it ends: also when the client leaves
    before the first chunk (then its generator never starts, and its own finally never runs)."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None  # RFC 6750
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# Errors raised outside the routes (unknown path, wrong method) or unhandled inside them leave
# in OpenAI's shape too, never as Starlette's plain text.
@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(400, f"invalid request: {e.errors()}"), status_code=400)


@app.exception_handler(Exception)
async def _unhandled(request: Request, e: Exception) -> JSONResponse:
    log.warning("unhandled error on %s: %s", request.url.path, type(e).__name__)
    return JSONResponse(error_body(500, f"internal server error ({type(e).__name__})"), status_code=500)


class _Metrics:
    """The replica's Prometheus metrics (`ray.serve.metrics`), fed from the decode loop's counters
    once a second; /v1/stats reads the same counters."""

    TTFT_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]
    ROUTING_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.queue = Gauge("elrea_queue_length", description="requests waiting for a slot in the running batch")
        self.running = Gauge("elrea_running_batch_size", description="sequences in the running decode batch")
        self.tokens = Counter("elrea_generated_tokens", description="tokens generated (rate: tokens/s)")
        self.requests = Counter(
            "elrea_engine_requests", description="requests that left the decode loop", tag_keys=("outcome",)
        )
        self.selections = Counter(
            "elrea_expert_selections", description="routed requests per top expert", tag_keys=("expert",)
        )
        self.ttft = Histogram(
            "elrea_time_to_first_token_s", description="submission to first token", boundaries=self.TTFT_S
        )
        self.routing = Histogram(
            "elrea_routing_s", description="routing time per distinct prompt", boundaries=self.ROUTING_S
        )
        self._seen: dict = {}

    def _inc(self, metric, key, total, tags=None):
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            metric.inc(delta, tags=tags)
        self._seen[key] = total

    def push(self, loop) -> None:
        s = loop.stats
        self.queue.set(loop.queued)
        self.running.set(loop.running)
        self._inc(self.tokens, "tokens", s["tokens_generated"])
        for outcome in ("finished", "cancelled", "failed"):
            self._inc(self.requests, outcome, s[f"requests_{outcome}"], {"outcome": outcome})
        for name, n in s["expert_selections"].items():
            self._inc(self.selections, ("expert", name), n, {"expert": name})
        while loop.observations:
            kind, value = loop.observations.popleft()
            (self.ttft if kind == "ttft_s" else self.routing).observe(value)


@serve.deployment
@serve.ingress(app)
class ELREAServer:
    def __init__(self, args: dict):
        from elrea_ray.serving import Engine

        self.args = AppArgs(**args)
        self.api_key = api_key(self.args)
        self.engine = Engine(
            self.args.run_dir,
            device="cuda" if self.args.num_gpus > 0 else "cpu",
            routing_method=self.args.routing_method,
        )
        self.engine.loop.max_batch_size = self.args.max_batch_size
        self.engine.loop.admission_wait_s = self.args.batch_wait_timeout_s
        self.engine.loop.start()
        self.created = int((self.engine.root / "bundle.json").stat().st_mtime)
        # Tokenising off the event loop, one request at a time (a tokenizer is not reentrant).
        self._tokeniser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise")
        self.inflight = 0
        self.rejected_overload = 0
        self._request_seconds = 1.0  # running mean of a request's time in the engine, for Retry-After
        self._metrics = _Metrics()
        self._pusher: asyncio.Task | None = None

    def _authorised(self, request: Request) -> bool:
        if not self.api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())

    @staticmethod
    async def _body(request: Request):
        """The JSON body, checked before it is read: Content-Type application/json (415; a
        cross-site form post cannot send it), Content-Length at most 1 MB (413), and a body
        without Content-Length read with a running cap."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise RequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415)
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise RequestError(f"Content-Length {length!r} is not a number of bytes")
        if length is not None and int(length) > MAX_BODY_BYTES:
            raise RequestError(
                f"the request body ({int(length)} bytes) is larger than {MAX_BODY_BYTES} bytes", status=413
            )
        raw, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)
            raw.append(chunk)

        def no_constants(name):
            raise ValueError(f"{name} is not a JSON number")

        try:
            return json.loads(b"".join(raw), parse_constant=no_constants)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(f"the request body is not valid JSON: {e}"[:300]) from None

    # -- the decode loop's side ---------------------------------------------------------------
    def _ensure_pusher(self) -> None:
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self):
        while True:
            try:
                self._metrics.push(self.engine.loop)
            except Exception as e:  # metrics must never take the replica down
                log.warning("metrics push failed: %s", type(e).__name__)
            await asyncio.sleep(1.0)

    def _submit(self, reqs: list) -> tuple[list, asyncio.Queue]:
        """Queue a request's choices (one GenRequest each) on the decode loop: (handles, an
        asyncio.Queue of (choice index, Event)). A field the engine refuses is a 400 naming it."""
        from elrea_ray.decoding import InvalidRequest

        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handles = []
        try:
            for i, req in enumerate(reqs):
                handles.append(
                    self.engine.submit(req, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
                )
        except BaseException as e:  # no choice decodes without a reader
            for h in handles:
                h.cancel()
            if isinstance(e, InvalidRequest):
                raise RequestError(str(e), _OPENAI_PARAM.get(e.field, e.field)) from None
            raise
        return handles, events

    async def _next_event(self, handles: list, events: asyncio.Queue):
        """The next (choice, Event) of a request, or None once it is over its time (its rows are
        then cancelled)."""
        left = min(h.submitted_at for h in handles) + self.args.request_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, left))
        except asyncio.TimeoutError:
            for h in handles:
                h.cancel()
            return None

    def _release(self, handles: list) -> None:
        """The request is over (finished, failed, timed out or its client left): its rows leave
        the batch at the next step boundary."""
        for h in handles:
            h.cancel()
        took = time.monotonic() - min(h.submitted_at for h in handles)
        self._request_seconds = 0.8 * self._request_seconds + 0.2 * took

    def _stream_release(self, handles: list):
        """The release of a streamed request: its rows and its admission slot, exactly once
        (both the stream's generator and its response call it)."""
        done = [False]

        def release() -> None:
            if not done[0]:
                done[0] = True
                self._release(handles)
                self.inflight -= 1

        return release

    def _overloaded(self) -> JSONResponse:
        """429 with an honest Retry-After: the requests ahead of a new one, in units of the batch,
        times a request's recent time."""
        self.rejected_overload += 1
        wait = math.ceil(self._request_seconds * (1 + self.inflight / self.args.max_batch_size))
        e = RequestError(
            f"the server is at its limit of {self.args.max_inflight} requests in flight; retry in about {wait} s",
            status=429,
            code="rate_limit_exceeded",
        )
        return JSONResponse(e.body(), status_code=429, headers={"Retry-After": str(wait)})

    def _timeout(self) -> RequestError:
        return RequestError(f"the request took longer than {self.args.request_timeout_s} s", status=504, code="timeout")

    async def _handle(self, request: Request, chat: bool):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401))
        self._ensure_pusher()
        if self.inflight >= self.args.max_inflight:
            return self._overloaded()
        self.inflight += 1
        streaming = False
        try:
            response = await self._admitted(request, chat)
            streaming = isinstance(response, StreamingResponse)
            return response
        except RequestError as e:
            return _error(e)
        except Exception as e:
            log.warning("request failed: %s", type(e).__name__)
            return _error(RequestError(f"internal server error ({type(e).__name__})", status=500))
        finally:
            if not streaming:  # a stream releases its slot when it ends
                self.inflight -= 1

    async def _parse(self, request: Request, chat: bool):
        """(GenRequests, meta): the cheap checks on the event loop, tokenising in its executor."""
        checked = check_request(await self._body(request), self.engine, chat)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._tokeniser, encode_request, checked, self.engine
            )
        except RequestError:
            raise
        except Exception as e:  # e.g. a chat template that rejects the turns: still the client's input
            log.warning("request rejected: %s", type(e).__name__)
            raise RequestError(
                f"the request could not be processed: {type(e).__name__}: {e}"[:300], "messages" if chat else "prompt"
            ) from None

    async def _admitted(self, request: Request, chat: bool):
        reqs, meta = await self._parse(request, chat)
        handles, events = self._submit(reqs)
        if meta["stream"]:
            release = self._stream_release(handles)
            return _Stream(self._stream(meta, handles, events, release), release)
        try:  # a client that leaves cancels this coroutine: the finally takes its rows out of the batch
            results: dict = {}
            while len(results) < len(reqs):
                got = await self._next_event(handles, events)
                if got is None:
                    return _error(self._timeout())
                i, ev = got
                if ev.kind == "done":
                    results[i] = ev.result
                elif ev.kind == "error":
                    return _error(RequestError(f"decoding failed: {ev.error}", status=500))
            return JSONResponse(completion_body([results[i] for i in range(len(reqs))], meta, self.engine.tok))
        finally:
            self._release(handles)

    async def _stream(self, meta, handles, events, release):
        try:
            async for chunk in self._stream_chunks(meta, handles, events):
                yield chunk
        except Exception as e:  # the status line is sent: end with an error event, never a torn stream
            log.warning("stream failed: %s", type(e).__name__)
            yield StreamWriter.error(f"internal server error ({type(e).__name__})")
            yield SSE_DONE
        finally:  # also when the client disconnects: the slot and the rows are freed at once
            release()

    async def _stream_chunks(self, meta, handles, events):
        """The n choices' events, interleaved as their tokens arrive, each choice ending at its
        own "done"; then the usage chunk (stream_options.include_usage) and [DONE]."""
        writer = StreamWriter(meta, self.engine.tok)
        for chunk in writer.start():
            yield chunk
        results: dict = {}
        while len(results) < len(handles):
            got = await self._next_event(handles, events)
            if got is None:
                yield writer.error(str(self._timeout()), 504)
                break
            i, ev = got
            try:
                if ev.kind == "delta":
                    if ev.text or ev.logprobs:
                        yield writer.delta(i, ev.text, ev.logprobs)
                elif ev.kind == "done":
                    results[i] = ev.result
                    yield writer.finish(i, ev.result)
                else:
                    yield writer.error(f"decoding failed: {ev.error}", 500)
                    break
            except RequestError as e:  # e.g. logprobs asked for and not returned
                yield writer.error(str(e), e.status)
                break
        else:
            usage = writer.usage([results[i] for i in range(len(handles))])
            if usage:
                yield usage
        yield SSE_DONE

    async def check_health(self):
        """Serve's health check: the decode loop thread is alive and, when it has work, stepping."""
        self._ensure_pusher()
        self.engine.loop.check_health(stall_s=max(60.0, self.args.request_timeout_s))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    def _model(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "elrea-ray"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401))
        return {"object": "list", "data": [self._model(m) for m in self.engine.model_ids()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401))
        if model_id not in self.engine.model_ids():
            return _error(
                RequestError(
                    f"model {model_id!r} does not exist; available: {', '.join(self.engine.model_ids())}",
                    "model",
                    status=404,
                    code="model_not_found",
                )
            )
        return self._model(model_id)

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401))
        loop = self.engine.loop
        s = dict(loop.stats)
        s["expert_selections"] = dict(s["expert_selections"])
        return {
            **s,
            "running": loop.running,
            "queued": loop.queued,
            "max_batch_size": loop.max_batch_size,
            "inflight": self.inflight,
            "rejected_overload": self.rejected_overload,
        }


def build_app(args: dict) -> serve.Application:
    """Typed builder for `serve run serve_apps.elrea_app:build_app run_dir=...`."""
    a = AppArgs(**args)
    scale: dict = {"num_replicas": a.num_replicas}
    if a.max_replicas is not None:
        scale = {
            "autoscaling_config": {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
            }
        }
    return ELREAServer.options(
        **scale,
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    ).bind(a.model_dump())
