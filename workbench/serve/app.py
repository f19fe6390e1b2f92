"""The OpenAI-compatible HTTP server: FastAPI routes over ``AsyncLLMEngine`` (HTTP only; the engine is runtime's).

    workbench serve engine/ --host 127.0.0.1 --port 8000       # an engine directory, a workspace or a model
    app = create_app(AsyncLLMEngine(LLMEngine(program, tokenizer)), model_name="smollm2", chat_template=tpl)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text: ``serve/metrics.py``).

* **The protocol** (parameters, n, streaming, error bodies, limits) is ``serve/openai_api.py``'s; who may call
  it (API key, Host allow-list, JSON-only bodies, CORS) ``serve/access.py``'s.
* **Disconnects** abort: a streaming client that goes away cancels the response task, a non-streaming one is
  watched for ``http.disconnect``; either way the engine aborts the requests and frees their blocks.
* **Slow clients** (``serve``): a request must arrive whole within ``read_timeout`` seconds (408 and the
  connection closed otherwise: ``serve/protocol.py``), so half-sent requests cannot hold the server's sockets.
* **Shutdown** (``serve``, on SIGTERM/SIGINT): stop accepting connections, then ``AsyncLLMEngine.shutdown``
  gives in-flight requests ``shutdown_timeout`` seconds and aborts the rest (their streams still end with
  ``finish_reason: "abort"`` and ``[DONE]``), and the process exits with status 0. A second signal aborts them
  at once (``AsyncLLMEngine.hurry``). An app run by another
  server shuts its engine down when its lifespan ends.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import WorkbenchError
from ..runtime.async_engine import AsyncLLMEngine
from .access import LOOPBACK_NAMES, Access, default_allowed_hosts
from .metrics import MEDIA_TYPE, prometheus_text
from .openai_api import (ApiError, ChatCompletionRequest, CompletionRequest, OpenAIApi, api_error, collect,
                         parse_body)
from .protocol import DEFAULT_READ_TIMEOUT, read_timeout_protocol

MAX_BODY_BYTES = 4 * 2**20


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def _parse(request: Request, model, limit: int) -> Any:
    """The body as ``model`` (``parse_body``), or an ApiError: 413 over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {limit}",
                       code="request_too_large")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                               code="request_too_large")
    except ClientDisconnect:  # gone, or cut off by the read timeout (serve/protocol.py): no one reads the answer
        raise ApiError(400, "the client went away before its request body arrived",
                       code="client_disconnected") from None
    return parse_body(bytes(raw), model)


def _error_response(e: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    error = api_error(e)
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(headers or {})})


# ---- the app -------------------------------------------------------------------------------------------------

def create_app(engine: AsyncLLMEngine, *, model_name: str, chat_template: str | None = None,
               max_model_len: int | None = None, shutdown_timeout: float = 30.0,
               max_body_bytes: int = MAX_BODY_BYTES, access: Access = Access()) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``. ``max_model_len`` (default: the engine's) caps
    prompt + max_tokens; when the app's lifespan ends, the engine is shut down within ``shutdown_timeout``.
    ``access``: the API key, Host allow-list and CORS origins (``serve/access.py``; default: open, no CORS)."""
    from contextlib import asynccontextmanager

    if max_model_len is not None:
        engine.max_model_len = min(engine.max_model_len, max_model_len)
    api = OpenAIApi(engine, model_name, chat_template)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="workbench", lifespan=lifespan)
    access.install(app)

    @app.exception_handler(Exception)
    async def on_error(request, e):
        return _error_response(e)

    for cls in (ApiError, WorkbenchError):
        app.add_exception_handler(cls, on_error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        code = _HTTP_CODES.get(e.status_code)
        return _error_response(ApiError(e.status_code, str(e.detail), code=code), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e):
        return _error_response(ApiError(400, str(e)))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise ApiError(503, "the engine is not running (shutting down or stopped after an error)",
                           type="service_unavailable", code="engine_closed")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.metrics, engine.stats()), media_type=MEDIA_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "workbench", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = api.check_model(await _parse(request, CompletionRequest, max_body_bytes))
        return await _generate(api, request, body, api.completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = api.check_model(await _parse(request, ChatCompletionRequest, max_body_bytes))
        return await _generate(api, request, body, [api.chat_prompt(body)], chat=True)

    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    """Show the request models in /openapi.json: the routes read their bodies themselves (``_parse``: a size
    limit while reading, OpenAI's errors), so FastAPI cannot see them."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            routes = (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest))
            for path, model in routes:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(body.pop("$defs", {}))
                schemas[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


async def _generate(api: OpenAIApi, request: Request, body, prompts: list[list[int]], *, chat: bool):
    head, choices, prompt_tokens = api.submit(body, prompts, chat=chat)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _EventStream(api.events(head, choices, chat, prompt_tokens, include_usage),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                     "X-Accel-Buffering": "no"})
    if await _until_disconnect(request, collect(choices)) is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return api.response(head, choices, chat, prompt_tokens)


async def _until_disconnect(request: Request, work):
    """Await ``work`` unless the client disconnects first: then cancel it (aborting its requests), return None."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


class _EventStream(StreamingResponse):
    """A streaming response that always closes its generator, so its ``finally`` (aborting the requests)
    runs when the client disconnects or the server cancels the response."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          tokenizer: str | None = None, model_name: str | None = None, max_pending: int = 256,
          num_blocks: int | None = None, memory_fraction: float | None = None, max_num_seqs: int | None = None,
          max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info", api_key: str | None = None,
          allowed_hosts: list[str] = (), allowed_origins: list[str] = (),
          tensor_parallel_size: int | None = None, batch_invariant: bool | None = None,
          read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
    """Open ``path`` (an engine directory, a workspace or a model source: ``runnable.open_runnable``) in the engine
    process (``AsyncLLMEngine.spawn``) and run uvicorn here until SIGTERM/SIGINT (``workbench serve``). The
    runtime's limits are the engine's, lowered by the arguments given; the KV cache is ``num_blocks`` blocks, or
    what ``memory_fraction`` of the GPU's free memory holds (the capacity planner). ``api_key``, ``allowed_hosts``
    (beyond ``access.default_allowed_hosts(host)``; "*" for any) and ``allowed_origins`` (CORS):
    ``serve/access.py``. ``tensor_parallel_size`` N > 1: the engine's graph sharded over N ranks
    (``runtime.tensor_parallel``; None: an engine's own size, else 1). Under ``torchrun --nproc-per-node N`` rank
    0 serves (its engine process is rank 0 of the group) and ranks 1.. run its steps. ``batch_invariant``: the
    batch-invariant mode (``LLM``'s; None: the engine's setting). ``read_timeout``: seconds a client has to send
    a whole request, headers and body, before a 408 closes its connection (``serve/protocol.py``)."""
    import functools

    from ..runtime.tensor_parallel import run_torchrun_worker

    if run_torchrun_worker(device):  # torchrun's ranks 1..: rank 0's steps until it stops them; no HTTP here
        return
    import uvicorn

    http = read_timeout_protocol(read_timeout)  # refuses a bad value before the engine starts
    if not shutdown_timeout >= 0:
        raise WorkbenchError(f"--shutdown-timeout must be >= 0 seconds (got {shutdown_timeout})")
    check_listen(host, port)  # before the engine loads, which can take minutes

    access = Access(api_key, default_allowed_hosts(host, allowed_hosts), tuple(allowed_origins))
    if api_key is None and not LOOPBACK_NAMES <= (default_allowed_hosts(host) or set()):
        print(f"workbench serve: listening on {host} without an API key: anyone who reaches it can generate; "
              "give --api-key (or WORKBENCH_API_KEY)", file=sys.stderr, flush=True)
    factory = functools.partial(
        open_served_engine, path, device=device, tokenizer=tokenizer, num_blocks=num_blocks,
        memory_fraction=memory_fraction, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size, batch_invariant=batch_invariant)
    aengine = AsyncLLMEngine.spawn(factory, max_pending=max_pending)  # the engine in its own process
    served = aengine.extra
    app = create_app(aengine, model_name=model_name or served["name"], chat_template=served["chat_template"],
                     max_model_len=served["max_model_len"], shutdown_timeout=shutdown_timeout, access=access)

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None
        hurried = False

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame):
            # a second signal (Ctrl-C twice, or SIGTERM again) while in-flight requests get their time: abort
            # them now (on the loop, not in the handler), so their streams end and the exit follows at once; a
            # third one is uvicorn's force-quit (it waits for no connection either)
            if self.should_exit and not self.hurried and self.loop is not None:
                self.hurried = True
                print("workbench serve: second signal: aborting the requests in flight and exiting now "
                      "(a third one quits without waiting for connections)", file=sys.stderr, flush=True)
                self.loop.call_soon_threadsafe(aengine.hurry)
                getattr(self, "_captured_signals", []).append(sig)  # re-raised at the exit, as uvicorn does
                return
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            # stop accepting, then let the engine finish or abort what is in flight, so that every response
            # ends properly (an aborted stream with finish_reason "abort" and [DONE]) before uvicorn's own wait
            for server in self.servers:
                server.close()
            await asyncio.to_thread(aengine.shutdown, shutdown_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)))
    # uvicorn raises SIGTERM/SIGINT again after its graceful shutdown, for the handler that was there before
    # it: a no-op one, so a completed shutdown exits with status 0
    previous = {sig: signal.signal(sig, lambda sig, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        aengine.shutdown(0)  # a no-op after the lifespan's shutdown; stops the engine if startup failed


def check_listen(host: str, port: int) -> None:
    """Refuse, in one line, a port out of range or an address this process cannot listen on (a port in use, a host
    that is not this machine's), as uvicorn would only after the engine has loaded."""
    import errno
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise WorkbenchError(f"--port must be a number from 0 to 65535 (got {port!r})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except socket.gaierror as e:
        raise WorkbenchError(f"--host {host}: not an address or name this machine knows ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise WorkbenchError(f"port {port} on {host} is already in use (another server?); pick another --port "
                                 "or stop that server") from None
        raise WorkbenchError(f"cannot listen on {host}:{port} ({e.strerror}); give another --host or --port") from None


def open_served_engine(path: str | Path, *, device: str, tokenizer: str | None, num_blocks: int | None,
                       memory_fraction: float | None, max_num_seqs: int | None, max_num_batched_tokens: int | None,
                       max_model_len: int | None, tensor_parallel_size: int | None,
                       batch_invariant: bool | None = None):
    """``serve``'s engine, built in the engine process: ``(LLMEngine, what the server needs of it)``. Prints what
    vLLM logs at start-up (the cache, what it holds, the limits)."""
    from ..runnable import open_runnable
    from ..runtime.capacity import DEFAULT_MEMORY_FRACTION
    from ..runtime.engine import LLMEngine, sharded_engine
    from ..runtime.tensor_parallel import launched_size

    served = open_runnable(path, device=device, tokenizer=tokenizer,
                           tensor_parallel_size=launched_size(tensor_parallel_size, device),
                           batch_invariant=batch_invariant)
    if served.tokenizer is None:
        print(f"workbench serve: {path} has no tokenizer: prompts must be token ids and outputs have no text; "
              "give --tokenizer MODEL for text", file=sys.stderr)
    limits = served.limits.narrowed(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, fixed=served.kind == "engine")
    options = dict(num_blocks=num_blocks, limits=limits, memory_fraction=memory_fraction or DEFAULT_MEMORY_FRACTION)
    if served.sharding is not None:
        engine = sharded_engine(served, **options)
        print(f"workbench serve: {served.sharding.summary()}", file=sys.stderr, flush=True)
    else:
        engine = LLMEngine(served.program, served.tokenizer, **options)
    for line in ([engine.capacity_plan.summary()] if engine.capacity_plan else []) + engine.executor.notes:
        print(f"workbench serve: {line}", file=sys.stderr, flush=True)
    bm = engine.scheduler.bm  # the server caps the context at what the cache holds (AsyncLLMEngine.max_model_len)
    context = (f"{limits.max_model_len}" if bm.capacity_tokens >= limits.max_model_len else
               f"{bm.capacity_tokens} (what its {bm.num_blocks} KV blocks hold; the engine's limit is "
               f"{limits.max_model_len})")
    print(f"workbench serve: {served.kind} {served.name} on {served.device} ({served.stage}"
          f"{', batch-invariant' if served.batch_invariant else ''}); max_model_len {context}, max_num_seqs "
          f"{limits.max_num_seqs}, max_num_batched_tokens {limits.max_num_batched_tokens}", file=sys.stderr, flush=True)
    return engine, {"name": served.name, "chat_template": served.chat_template,
                    "max_model_len": limits.max_model_len}


__all__ = ["ApiError", "create_app", "serve"]
