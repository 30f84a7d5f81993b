"""Ray Serve application: a run's routed ensemble behind an OpenAI-compatible HTTP API.

    serve run serve_apps.elrea_app:build_app run_dir=runs/default
    serve run serve_apps/serve_config.yaml

Each replica holds the backbone and all C+1 adapters once and mixes their logits inside one
batched forward (per-expert deployments or model multiplexing cannot mix logits inside one forward).
Each replica runs one continuous-batching decode loop (`elrea_ray.decoding`): a request joins the
running batch at the next decoding step and leaves it at its own end (EOS, stop string,
max_tokens) or when its client disconnects; streaming and non-streaming requests share the batch.

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as SSE),
GET /v1/models, GET /health, GET /v1/stats. Extra request fields: "top_k" (experts kept),
"adapter" (force "base" or "expert-XX"); responses carry a "routing" object (weights, top
clusters, adapters run).
"""


import asyncio
import hmac
import json
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, model_validator
from ray import serve

from elrea_ray.openai_api import RequestError, completion_body, parse_request, stream_chunk

log = logging.getLogger("ray.serve")
app = FastAPI(title="elrea-ray", docs_url=None, redoc_url=None)


class AppArgs(BaseModel):
    """`serve run ... key=value` arguments or the `args:` block of a Serve config file."""

    run_dir: str  # local path, or an s3:// run that each replica pulls into its node's mirror
    api_key: str | None = None  # bearer key required on every route but /health
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

    @model_validator(mode="after")
    def _check(self):
        if self.max_inflight is None:
            self.max_inflight = self.max_ongoing_requests
        if not 1 <= self.max_inflight <= self.max_ongoing_requests:
            raise ValueError(f"max_inflight={self.max_inflight} must be in [1, max_ongoing_requests="
                             f"{self.max_ongoing_requests}] (requests beyond Serve's cap never reach the replica)")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        return self


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


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
        self.requests = Counter("elrea_engine_requests", description="requests that left the decode loop",
                                tag_keys=("outcome",))
        self.selections = Counter("elrea_expert_selections", description="routed requests per top expert",
                                  tag_keys=("expert",))
        self.ttft = Histogram("elrea_time_to_first_token_s", description="submission to first token",
                              boundaries=self.TTFT_S)
        self.routing = Histogram("elrea_routing_s", description="routing time per distinct prompt",
                                 boundaries=self.ROUTING_S)
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
        self.engine = Engine(self.args.run_dir, device="cuda" if self.args.num_gpus > 0 else "cpu")
        self.engine.loop.max_batch_size = self.args.max_batch_size
        self.engine.loop.admission_wait_s = self.args.batch_wait_timeout_s
        self.engine.loop.start()
        self.inflight = 0
        self.rejected_overload = 0
        self._request_seconds = 1.0  # running mean of a request's time in the engine, for Retry-After
        self._metrics = _Metrics()
        self._pusher: asyncio.Task | None = None

    def _authorised(self, request: Request) -> bool:
        if not self.args.api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.args.api_key}".encode())

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > 1_000_000:
            raise RequestError("the request body is larger than 1 MB", status=413)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

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

    def _submit(self, req):
        """Queue the request on the decode loop: (handle, asyncio.Queue of its events). Raises
        InvalidRequest when the engine refuses a field."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handle = self.engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return handle, events

    async def _next_event(self, handle, events: asyncio.Queue):
        """The request's next event, or None once it is over its time (it is then cancelled)."""
        left = handle.submitted_at + self.args.request_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, left))
        except asyncio.TimeoutError:
            handle.cancel()
            return None

    def _release(self, handle) -> None:
        """The request is over (finished, failed, timed out or its client left): its row leaves
        the batch at the next step boundary."""
        handle.cancel()
        took = time.monotonic() - handle.submitted_at
        self._request_seconds = 0.8 * self._request_seconds + 0.2 * took

    def _overloaded(self) -> JSONResponse:
        """429 with an honest Retry-After: the requests ahead of a new one, in units of the batch,
        times a request's recent time."""
        self.rejected_overload += 1
        wait = math.ceil(self._request_seconds * (1 + self.inflight / self.args.max_batch_size))
        e = RequestError(f"the server is at its limit of {self.args.max_inflight} requests in flight; "
                         f"retry in about {wait} s", status=429, code="rate_limit_exceeded")
        return JSONResponse(e.body(), status_code=429, headers={"Retry-After": str(wait)})

    def _timeout(self) -> RequestError:
        return RequestError(f"the request took longer than {self.args.request_timeout_s} s", status=504,
                            code="timeout")

    async def _handle(self, request: Request, chat: bool):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                                       code="authentication_error"))
        self._ensure_pusher()
        if self.inflight >= self.args.max_inflight:
            return self._overloaded()
        self.inflight += 1
        streaming = False
        try:
            response = await self._admitted(request, chat)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:
            if not streaming:  # a stream releases its slot when it ends
                self.inflight -= 1

    async def _admitted(self, request: Request, chat: bool):
        from elrea_ray.decoding import InvalidRequest

        try:
            req, meta = parse_request(await self._body(request), self.engine, chat)
            handle, events = self._submit(req)
        except RequestError as e:
            return _error(e)
        except InvalidRequest as e:
            return _error(RequestError(str(e), e.field))
        except Exception as e:  # e.g. a chat template that rejects the turns: still the client's input
            log.warning("request rejected: %s", type(e).__name__)
            return _error(RequestError(f"the request could not be processed: {type(e).__name__}"))
        if meta["stream"]:
            return StreamingResponse(self._stream(req, meta, handle, events), media_type="text/event-stream")
        try:  # a client that leaves cancels this coroutine: the finally takes its row out of the batch
            while True:
                ev = await self._next_event(handle, events)
                if ev is None:
                    return _error(self._timeout())
                if ev.kind == "done":
                    return JSONResponse(completion_body(ev.result, req, meta))
                if ev.kind == "error":
                    return _error(RequestError(f"decoding failed: {ev.error}", status=500, code="server_error"))
        finally:
            self._release(handle)

    async def _stream(self, req, meta, handle, events):
        try:
            async for chunk in self._stream_chunks(req, meta, handle, events):
                yield chunk
        finally:  # also when the client disconnects: the slot and the row are freed at once
            self._release(handle)
            self.inflight -= 1

    async def _stream_chunks(self, req, meta, handle, events):
        rid = ("chatcmpl-" if meta["chat"] else "cmpl-") + uuid.uuid4().hex[:24]
        if meta["chat"]:
            yield stream_chunk(rid, meta, None, role=True)
        while True:
            ev = await self._next_event(handle, events)
            if ev is None or ev.kind == "error":
                message = str(self._timeout()) if ev is None else f"decoding failed: {ev.error}"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                break
            if ev.kind == "delta":
                if ev.text:
                    yield stream_chunk(rid, meta, ev.text)
                continue
            res = ev.result
            usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(res.token_ids),
                     "total_tokens": len(req.prompt_ids) + len(res.token_ids)}
            yield stream_chunk(rid, meta, None, res.finish_reason, extra={"usage": usage, "routing": res.routing})
            break
        yield "data: [DONE]\n\n"

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

    @app.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401, code="authentication_error"))
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "elrea-ray"}
                                           for m in self.engine.model_ids()]}

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401, code="authentication_error"))
        loop = self.engine.loop
        s = dict(loop.stats)
        s["expert_selections"] = dict(s["expert_selections"])
        return {**s, "running": loop.running, "queued": loop.queued, "max_batch_size": loop.max_batch_size,
                "inflight": self.inflight, "rejected_overload": self.rejected_overload}


def build_app(args: dict) -> serve.Application:
    """Typed builder for `serve run serve_apps.elrea_app:build_app run_dir=...`."""
    a = AppArgs(**args)
    scale: dict = {"num_replicas": a.num_replicas}
    if a.max_replicas is not None:
        scale = {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                        "target_ongoing_requests": a.target_ongoing_requests}}
    return ELREAServer.options(
        **scale, max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests,
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    ).bind(a.model_dump())
