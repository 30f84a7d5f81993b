"""Ray Serve application: a run's routed ensemble behind an OpenAI-compatible HTTP API.

    serve run serve_apps.elrea_app:build_app run_dir=runs/default
    serve run serve_apps/serve_config.yaml

Each replica holds the backbone and all C+1 adapters once and mixes their logits inside one
batched forward (per-expert deployments or model multiplexing cannot mix logits inside one forward).
Concurrent requests are batched with `@serve.batch` for the routing gradients and for decoding:
non-streaming requests with each other, streaming requests with each other (each stream gets its
own tokens as the shared batch decodes them).

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as SSE),
GET /v1/models, GET /v1/models/{id}, GET /health. Extra request fields: "top_k" (experts kept),
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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, model_validator
from ray import serve
from starlette.exceptions import HTTPException

from elrea_ray.openai_api import (MAX_BODY_BYTES, SSE_DONE, RequestError, StreamWriter, check_request,
                                  completion_body, encode_request, error_body)

log = logging.getLogger("ray.serve")
app = FastAPI(title="elrea-ray", docs_url=None, redoc_url=None)

API_KEY_ENV = "ELREA_API_KEY"
API_KEY_MOVED = (f"'api_key' is not an app argument (app arguments show in the Serve dashboard); set "
                 f"{API_KEY_ENV} in the replicas' environment, or api_key_file=<path of a file holding the key>")


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
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    request_timeout_s: float = 120.0  # beyond: 504

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
            raise ValueError(f"max_inflight={self.max_inflight} must be in [1, max_ongoing_requests="
                             f"{self.max_ongoing_requests}] (requests beyond Serve's cap never reach the replica)")
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


class _Tagged:
    """A queue's put_nowait that tags each event with its choice index, so that the n choices
    of one request share a queue."""

    def __init__(self, queue: asyncio.Queue, index: int):
        self.queue, self.index = queue, index

    def put_nowait(self, item: tuple) -> None:
        self.queue.put_nowait((self.index, *item))


@serve.deployment
@serve.ingress(app)
class ELREAServer:
    def __init__(self, args: dict):
        from elrea_ray.serving import Engine

        self.args = AppArgs(**args)
        self.api_key = api_key(self.args)
        self.engine = Engine(self.args.run_dir, device="cuda" if self.args.num_gpus > 0 else "cpu")
        self.created = int((self.engine.root / "bundle.json").stat().st_mtime)
        # Tokenising off the event loop, one request at a time (a tokenizer is not reentrant).
        self._tokeniser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise")
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
            raise RequestError(f"the request body ({int(length)} bytes) is larger than {MAX_BODY_BYTES} bytes",
                               status=413)
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
            return _error(RequestError("missing or wrong API key (Authorization: Bearer ...)", status=401))
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
                self._tokeniser, encode_request, checked, self.engine)
        except RequestError:
            raise
        except Exception as e:  # e.g. a chat template that rejects the turns: still the client's input
            log.warning("request rejected: %s", type(e).__name__)
            raise RequestError(f"the request could not be processed: {type(e).__name__}: {e}"[:300],
                               "messages" if chat else "prompt") from None

    async def _admitted(self, request: Request, chat: bool):
        reqs, meta = await self._parse(request, chat)
        if meta["stream"]:
            return StreamingResponse(self._stream(reqs, meta), media_type="text/event-stream")
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self.generate_batch(r) for r in reqs)),
                                             timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(RequestError(f"the request took longer than {self.args.request_timeout_s} s",
                                       status=504, code="timeout"))
        return JSONResponse(completion_body(results, meta, self.engine.tok))

    async def _stream(self, reqs, meta):
        try:
            async for chunk in self._stream_chunks(reqs, meta):
                yield chunk
        except Exception as e:  # the status line is sent: end with an error event, never a torn stream
            log.warning("stream failed: %s", type(e).__name__)
            yield StreamWriter.error(f"internal server error ({type(e).__name__})")
            yield SSE_DONE
        finally:
            self.inflight -= 1

    async def _stream_chunks(self, reqs, meta):
        """The n choices' events, interleaved as their tokens arrive, each choice ending at its
        own "done"; then the usage chunk (stream_options.include_usage) and [DONE]."""
        writer = StreamWriter(meta, self.engine.tok)
        queue: asyncio.Queue = asyncio.Queue()
        for chunk in writer.start():
            yield chunk
        for i, req in enumerate(reqs):
            batch = asyncio.ensure_future(self.stream_batch((req, _Tagged(queue, i))))
            # not awaited (a stream ends at its own "done"): retrieve the outcome so that nothing
            # is logged as an unretrieved exception if the client left early
            batch.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        deadline = time.monotonic() + self.args.request_timeout_s
        results: dict = {}
        while len(results) < len(reqs):  # a client that leaves early leaves the batch decoding for the others
            status = 500
            try:
                i, kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                kind, value = "error", f"the request took longer than {self.args.request_timeout_s} s"
                status = 504
            try:
                if kind == "delta":
                    yield writer.delta(i, value)
                elif kind == "done":
                    results[i] = value
                    yield writer.finish(i, value)
                else:
                    yield writer.error(value, status)
                    break
            except RequestError as e:  # e.g. logprobs asked for and not returned
                yield writer.error(str(e), e.status)
                break
        else:
            usage = writer.usage([results[i] for i in range(len(reqs))])
            if usage:
                yield usage
        yield SSE_DONE

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
            return _error(RequestError(f"model {model_id!r} does not exist; available: "
                                       f"{', '.join(self.engine.model_ids())}", "model", status=404,
                                       code="model_not_found"))
        return self._model(model_id)

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        if not self._authorised(request):
            return _error(RequestError("missing or wrong API key", status=401))
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
