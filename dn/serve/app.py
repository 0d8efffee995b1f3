"""The HTTP side of `dn serve` (Starlette under uvicorn): the OpenAI endpoints, their errors as one-line JSON, and
server-sent events fed from the model's worker thread (dn.serve.engine) through an asyncio queue per request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time

import numpy as np

from dn.serve.engine import Engine, Job
from dn.serve.requests import ApiError, Defaults, chat_ids, completion_ids, parse_json, sampling, streaming

try:  # the serve extra (pip install 'dreamnova[serve]'): dn serve says so when it is missing
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:
    Starlette = None

MAX_BODY = 16 * 2**20  # bytes of a request body; more is a 413


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def _handled(fn):
    """An endpoint whose failures all become one-line JSON errors; the server stays up."""
    async def endpoint(self, request):
        try:
            return await fn(self, request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # a bug or a backend failure: this request fails, the server serves the next
            return error_response(ApiError(500, f"{type(e).__name__}: {e}", "internal_error", "server_error"))
    return endpoint


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Server:
    """The routes over one engine and its loaded model."""

    def __init__(self, engine: Engine, model_id: str, names: set[str], args, api_key: str | None = None,
                 shutdown_timeout: float = 10.0):
        self.engine, self.tok, self.model_id = engine, engine.run.tokenizer, model_id
        self.names, self.defaults, self.api_key = names | {model_id}, Defaults(args), api_key
        self.context = engine.run.spec.architecture.max_position_embeddings
        self.rng = np.random.default_rng(args.seed)  # a request without a seed draws one: reproducible per server
        self.shutdown_timeout, self.created = shutdown_timeout, int(time.time())

    def app(self):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await asyncio.to_thread(self.engine.close, 2.0)  # what is left after uvicorn's grace: cancelled

        async def not_found(request, exc):
            code = "not_found" if exc.status_code == 404 else "method_not_allowed"
            return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           code))

        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/dn/stats", self.stats, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})

    # ---- endpoints ------------------------------------------------------------------------------------------

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    @_handled
    async def models(self, request):
        self._auth(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                         "created": self.created, "owned_by": "dn"}]})

    @_handled
    async def stats(self, request):
        """dn's own: the queue, the prompt cache and the process's memory (what bench_serve records)."""
        self._auth(request)
        return JSONResponse(await asyncio.to_thread(self.engine.stats))

    @_handled
    async def chat(self, request):
        return await self._complete(request, chat=True)

    @_handled
    async def completions(self, request):
        return await self._complete(request, chat=False)

    # ---- the work -------------------------------------------------------------------------------------------

    def _auth(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _complete(self, request, chat: bool):
        self._auth(request)
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        if size <= MAX_BODY:  # a body declared too big is not read; one sent in chunks is read up to the limit
            chunks = []
            async for chunk in request.stream():
                size = sum(map(len, chunks)) + len(chunk)
                if size > MAX_BODY:
                    break
                chunks.append(chunk)
            raw = b"".join(chunks)
        if size > MAX_BODY:
            raise ApiError(413, f"the body has {size} bytes; at most {MAX_BODY}", "body_too_large")
        body = parse_json(raw)
        model = body.get("model")
        if model is not None and model not in self.names:
            raise ApiError(404, f"model {json.dumps(model)[:80]} is not served here (this server has "
                                f"{self.model_id!r})", "model_not_found")
        stream, include_usage = streaming(body)
        ids = chat_ids(body, self.tok, self.defaults.system_prompt) if chat else completion_ids(body, self.tok)
        params = sampling(body, self.defaults, int(self.rng.integers(2**63)), self.context, len(ids))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(kind, value):  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(ids, params, emit)
        if self.engine.closed:
            raise ApiError(503, "the server is shutting down", "shutting_down", "server_error")
        if not self.engine.submit(job):
            raise ApiError(429, "the server's queue is full; retry later", "queue_full", "rate_limit_error",
                           {"Retry-After": str(self.engine.retry_after())})
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "created": int(time.time()),
                "model": self.model_id}
        if stream:
            return StreamingResponse(self._events(job, events, head, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, head, chat)

    async def _whole(self, request, job: Job, events: asyncio.Queue, head: dict, chat: bool):
        """A plain response: the text once done; a client that leaves first cancels its generation."""
        pieces, checked = [], time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    kind = None
                if time.monotonic() - checked > 0.5:  # twice a second, whether tokens come or not
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, 499)  # nobody reads it
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    raise ApiError(value["status"], value["message"], value["code"], "server_error")
                elif kind == "done":
                    break
        finally:
            job.cancelled.set()  # a no-op once done
        text, finish = "".join(pieces), value["finish_reason"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": _usage(value)})

    async def _events(self, job: Job, events: asyncio.Queue, head: dict, chat: bool, include_usage: bool):
        """Server-sent events; a client that disconnects cancels the stream here, and so its generation."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**head, "choices": [choice]})

        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield chunk(value)
                elif kind == "error":
                    yield _sse(ApiError(value["status"], value["message"], value["code"], "server_error").body())
                    return
                else:
                    yield chunk(None, value["finish_reason"])
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(value)})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled.set()
