"""Ray Serve application: a run's routed ensemble behind an OpenAI-compatible HTTP API.

    serve run serve_apps.elrea_app:build_app run_dir=runs/default
    serve run serve_apps/serve_config.yaml

Each replica holds the backbone and all C+1 adapters once and mixes their logits inside one
batched forward (per-expert deployments or model multiplexing cannot mix logits inside one forward).
Concurrent requests are batched with `@serve.batch` for the routing gradients and for decoding:
non-streaming requests with each other, streaming requests with each other (each stream gets its
own tokens as the shared batch decodes them).

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as SSE),
GET /v1/models, GET /health. Extra request fields: "top_k" (experts kept), "adapter" (force
"base" or "expert-XX"); responses carry a "routing" object (weights, top clusters, adapters run).
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
    max_batch_size: int = 8
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


@serve.deployment
@serve.ingress(app)
class ELREAServer:
    def __init__(self, args: dict):
        from elrea_ray.serving import Engine

        self.args = AppArgs(**args)
        self.engine = Engine(self.args.run_dir, device="cuda" if self.args.num_gpus > 0 else "cpu")
        self.batches_served = 0
        self.requests_batched = 0
        self.max_batch_seen = 0
        self.stream_batches_served = 0
        self.stream_requests_batched = 0
        self.max_stream_batch_seen = 0
        self.inflight = 0
        self.rejected_overload = 0
        self._batch_seconds = 1.0  # running mean of one decoding batch, for Retry-After
        self._lock = asyncio.Lock()  # one decode at a time per replica
        self.set_batch_params()

    def set_batch_params(self):
        for batched in (self.generate_batch, self.stream_batch):
            batched.set_max_batch_size(self.args.max_batch_size)
            batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

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

    async def _decode(self, fn, *args):
        """Run one decoding batch in the executor, one at a time per replica (the model is not
        reentrant), keeping the running mean of a batch's time for Retry-After."""
        async with self._lock:
            t0 = time.monotonic()
            out = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - t0)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, reqs: list) -> list:
        results = await self._decode(self.engine.generate, reqs)
        self.batches_served += 1
        self.requests_batched += len(reqs)
        self.max_batch_seen = max(self.max_batch_seen, len(reqs))
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def stream_batch(self, items: list) -> list:
        """Streaming requests decoded as one batch: items are (request, asyncio.Queue); every
        step's text deltas go to their request's queue, then ("done", result) or ("error", msg)."""
        reqs, queues = [r for r, _ in items], [q for _, q in items]
        loop = asyncio.get_running_loop()

        def run():
            try:
                for step in self.engine.stream(reqs):
                    for b, delta in step:
                        loop.call_soon_threadsafe(queues[b].put_nowait, ("delta", delta))
                for q, res in zip(queues, self.engine.last_results):
                    loop.call_soon_threadsafe(q.put_nowait, ("done", res))
            except Exception as e:  # surfaces as a final error event in every stream, never a torn one
                log.warning("streaming batch failed: %s", type(e).__name__)
                for q in queues:
                    loop.call_soon_threadsafe(q.put_nowait, ("error", str(e)))

        await self._decode(run)
        self.stream_batches_served += 1
        self.stream_requests_batched += len(items)
        self.max_stream_batch_seen = max(self.max_stream_batch_seen, len(items))
        return [None] * len(items)

    def _overloaded(self) -> JSONResponse:
        """429 with an honest Retry-After: the batches ahead of a new request, times a batch's time."""
        self.rejected_overload += 1
        wait = math.ceil(self._batch_seconds * (1 + self.inflight / self.args.max_batch_size))
        e = RequestError(f"the server is at its limit of {self.args.max_inflight} requests in flight; "
                         f"retry in about {wait} s", status=429, code="rate_limit_exceeded")
        return JSONResponse(e.body(), status_code=429, headers={"Retry-After": str(wait)})

    async def _handle(self, request: Request, chat: bool):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401,
                                       code="authentication_error"))
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
        try:
            req, meta = parse_request(await self._body(request), self.engine, chat)
        except RequestError as e:
            return _error(e)
        except Exception as e:  # e.g. a chat template that rejects the turns: still the client's input
            log.warning("request rejected: %s", type(e).__name__)
            return _error(RequestError(f"the request could not be processed: {type(e).__name__}"))
        if meta["stream"]:
            return StreamingResponse(self._stream(req, meta), media_type="text/event-stream")
        try:
            res = await asyncio.wait_for(self.generate_batch(req), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(RequestError(f"the request took longer than {self.args.request_timeout_s} s",
                                       status=504, code="timeout"))
        return JSONResponse(completion_body(res, req, meta))

    async def _stream(self, req, meta):
        try:
            async for chunk in self._stream_chunks(req, meta):
                yield chunk
        finally:
            self.inflight -= 1

    async def _stream_chunks(self, req, meta):
        rid = ("chatcmpl-" if meta["chat"] else "cmpl-") + uuid.uuid4().hex[:24]
        queue: asyncio.Queue = asyncio.Queue()
        if meta["chat"]:
            yield stream_chunk(rid, meta, None, role=True)
        batch = asyncio.ensure_future(self.stream_batch((req, queue)))
        # not awaited (a stream ends at its own "done"): retrieve the outcome so that nothing
        # is logged as an unretrieved exception if the client left early
        batch.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        deadline = time.monotonic() + self.args.request_timeout_s
        while True:  # a client that leaves early leaves the batch decoding for the others
            try:
                kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                kind, value = "error", f"the request took longer than {self.args.request_timeout_s} s"
            if kind == "delta":
                yield stream_chunk(rid, meta, value)
            elif kind == "done":
                usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(value.token_ids),
                         "total_tokens": len(req.prompt_ids) + len(value.token_ids)}
                yield stream_chunk(rid, meta, None, value.finish_reason,
                                   extra={"usage": usage, "routing": value.routing})
                break
            else:
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                break
        yield "data: [DONE]\n\n"

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
        return {"batches_served": self.batches_served, "requests_batched": self.requests_batched,
                "max_batch_seen": self.max_batch_seen, "stream_batches_served": self.stream_batches_served,
                "stream_requests_batched": self.stream_requests_batched,
                "max_stream_batch_seen": self.max_stream_batch_seen, "inflight": self.inflight,
                "rejected_overload": self.rejected_overload}


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
