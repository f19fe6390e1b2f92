"""The OpenAI-compatible HTTP server: FastAPI routes over ``AsyncLLMEngine`` (HTTP only; logic lives in runtime).

    workbench serve ws/ --host 127.0.0.1 --port 8000           # a workspace or an engine directory
    app = create_app(AsyncLLMEngine(LLMEngine(program, tokenizer)), model_name="smollm2", chat_template=tpl)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text, rendered by the engine).

* **Parameters** keep OpenAI's names: ``max_tokens`` (chat also ``max_completion_tokens``; without one, chat
  generates up to the context length), ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``,
  ``logprobs`` (chat: ``logprobs`` + ``top_logprobs``), ``stream`` (+ ``stream_options.include_usage``), and
  vLLM's ``ignore_eos``, ``min_tokens``, ``stop_token_ids``. Types are strict: ``"16"`` is not an integer.
  Fields this server does not implement are refused when set (``echo``, penalties, ``tools``, ...), other
  unknown fields are ignored.
* **n > 1** runs n engine requests; with a ``seed``, choice i samples with seed ``seed + i`` (so a choice
  equals a single request with that seed), without one each draws from the global generator.
* **Streaming** is server-sent events, ``data: {json}\\n\\n`` chunks then ``data: [DONE]\\n\\n``. While a
  request runs, the last (longest stop string - 1) characters are held back, so a stop string is never sent
  and then taken back. ``usage`` comes in a last chunk when ``stream_options.include_usage`` is set.
* **Errors** are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
  (malformed JSON, invalid UTF-8, wrong types: FastAPI's 422 becomes 400, values out of range, a prompt
  plus max_tokens over the context length), 404 for an unknown model or path, 413 for a body over
  ``max_body_bytes``, 429 when ``max_pending`` requests are unfinished, 503 while shutting down.
* **Disconnects** abort: a streaming client that goes away cancels the response task, a non-streaming one is
  watched for ``http.disconnect``; either way the engine aborts the requests and frees their blocks.
* **Shutdown** (``serve``, on SIGTERM/SIGINT): stop accepting connections, then ``AsyncLLMEngine.shutdown``
  gives in-flight requests ``shutdown_timeout`` seconds and aborts the rest (their streams still end with
  ``finish_reason: "abort"`` and ``[DONE]``), and the process exits with status 0. An app run by another
  server shuts its engine down when its lifespan ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from .errors import WorkbenchError
from .runtime.async_engine import (MIN_TEMPERATURE, AsyncLLMEngine, ContextLengthError, EngineClosedError,
                                   QueueFullError, merge_streams)
from .runtime.engine import RequestOutput
from .runtime.sampling import SamplingParams

MAX_BODY_BYTES = 4 * 2**20
MAX_LOGPROBS = 20
MAX_N = 128


# ---- request bodies ----------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, lt=2**31)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


#: OpenAI fields this server does not implement, with the value that means "off": any other value is a 400.
_UNSUPPORTED = {"echo": False, "suffix": None, "best_of": None, "presence_penalty": 0, "frequency_penalty": 0,
                "logit_bias": None, "tools": None, "functions": None, "response_format": None, "prediction": None}


# ---- errors --------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineClosedError):
        return ApiError(503, str(e), type="service_unavailable", code="engine_closed")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, WorkbenchError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {e!r}", type="internal_error")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The body as ``model``, or an ApiError: 413 over ``limit`` bytes, 400 for invalid UTF-8, malformed
    JSON (NaN and Infinity included), a non-object or a field of the wrong type or range."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {limit}",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({e})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or "[" not in str(p) and p not in _TYPE_NAMES]
        raise ApiError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param=loc[0] if loc else None) from None
    for name, off in _UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name, off)
        if value != off and value is not None:
            raise ApiError(400, f"{name!r} is not supported by this server; leave it out", param=name)
    return body


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---- the app -------------------------------------------------------------------------------------------------

def create_app(engine: AsyncLLMEngine, *, model_name: str, chat_template: str | None = None,
               max_model_len: int | None = None, shutdown_timeout: float = 30.0,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``. ``max_model_len`` (default: the engine's) caps
    prompt + max_tokens; when the app's lifespan ends, the engine is shut down within ``shutdown_timeout``."""
    from contextlib import asynccontextmanager

    if max_model_len is not None:
        engine.max_model_len = min(engine.max_model_len, max_model_len)
    api = _Api(engine, model_name, chat_template, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="workbench", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def on_error(request, e):
        return _api_error(e).response()

    for cls in (ApiError, WorkbenchError):
        app.add_exception_handler(cls, on_error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        code = _HTTP_CODES.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e):
        return ApiError(400, str(e)).response()

    @app.get("/health")
    async def health():
        if not engine.is_running:
            raise ApiError(503, "the engine is not running (shutting down or stopped after an error)",
                           type="service_unavailable", code="engine_closed")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "workbench", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = api.check_model(await _parse(request, CompletionRequest, api.max_body_bytes))
        return await api.generate(request, body, api.completion_prompts(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = api.check_model(await _parse(request, ChatCompletionRequest, api.max_body_bytes))
        return await api.generate(request, body, [api.chat_prompt(body)], chat=True)

    return app


@dataclass
class _Choice:
    """One choice's stream and what of it was sent."""
    index: int
    stream: Any
    holdback: int
    out: RequestOutput | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    text_offset: int = 0

    def advance(self, out: RequestOutput) -> tuple[str, int]:
        """The text not sent yet (minus the holdback while running) and the first token not sent yet."""
        self.out = out
        end = len(out.text) if out.finished else max(self.sent_text, len(out.text) - self.holdback)
        text, self.sent_text = out.text[self.sent_text:end], end
        start, self.sent_tokens = self.sent_tokens, len(out.token_ids)
        return text, start


@dataclass
class _Api:
    engine: AsyncLLMEngine
    model_name: str
    chat_template: str | None
    max_body_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- requests to engine inputs ----------------------------------------------------------------------
    def check_model(self, body: _GenerationRequest) -> _GenerationRequest:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ApiError(400, "the prompt is empty; give a string, a list of strings or token ids", param="prompt")
        try:
            return [self.engine.encode(p) for p in prompts]
        except WorkbenchError as e:
            raise ApiError(400, str(e), param="prompt") from None

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.chat_template is None or self.tokenizer is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if not isinstance(m.content, list) else "\n".join(p.text for p in m.content)
            if content is None and m.role != "assistant":
                raise ApiError(400, f"messages.{i}.content: a {m.role} message needs content", param="messages")
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # the template itself raised (jinja's raise_exception, a missing field)
            raise ApiError(400, f"the chat template could not render these messages ({e})", param="messages") from None
        try:
            return self.engine.encode(list(self.tokenizer(text, add_special_tokens=False).input_ids))
        except WorkbenchError as e:
            raise ApiError(400, str(e), param="messages") from None

    def params(self, body: _GenerationRequest, num_prompt_tokens: int, i: int) -> SamplingParams:
        max_tokens = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
        max_tokens = max_tokens or body.max_tokens or max(1, self.engine.max_model_len - num_prompt_tokens)
        if isinstance(body, ChatCompletionRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0  # tiny: greedy, as vLLM
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=body.top_k,
                                    top_p=body.top_p, seed=None if body.seed is None else body.seed + i,
                                    stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                                    logprobs=logprobs, min_tokens=body.min_tokens)
            self.engine.check_params(params)
        except WorkbenchError as e:  # the messages start with the field's name
            raise ApiError(400, str(e), param=str(e).split()[0].rstrip(":")) from None
        try:
            self.engine.check_length(num_prompt_tokens, params.max_tokens)
        except ContextLengthError as e:
            too_long = num_prompt_tokens >= self.engine.max_model_len
            param = ("messages" if isinstance(body, ChatCompletionRequest) else "prompt") if too_long else "max_tokens"
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        return params

    # ---- running them ---------------------------------------------------------------------------------------
    async def generate(self, request: Request, body: _GenerationRequest, prompts: list[list[int]], *, chat: bool):
        jobs = [(ids, self.params(body, len(ids), i)) for ids in prompts for i in range(body.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        holdback = max((len(s) for s in jobs[0][1].stop), default=1) - 1
        choices: list[_Choice] = []
        try:
            for i, (ids, params) in enumerate(jobs):
                choices.append(_Choice(i, self.engine.submit(ids, params, f"{rid}-{i}"), holdback))
        except BaseException:
            for c in choices:
                c.stream.abort()
            raise
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = self._events(head, choices, chat, prompt_tokens, include_usage)
            return _EventStream(events, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = await _until_disconnect(request, _collect(choices))
        if finals is None:  # the client left; nobody reads this
            return Response(status_code=499)
        out = []
        for c in choices:
            lp = self._logprobs(c, 0, chat)
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.out.text},
                            "logprobs": lp, "finish_reason": c.out.finish_reason})
            else:
                out.append({"index": c.index, "text": c.out.text, "logprobs": lp,
                            "finish_reason": c.out.finish_reason})
        return {**head, "choices": out, "usage": _usage(prompt_tokens, choices)}

    async def _events(self, head: dict, choices: list[_Choice], chat: bool, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        try:
            if chat:  # the role first, as OpenAI does
                for c in choices:
                    yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            async for i, out in merge_streams([c.stream for c in choices]):
                c = choices[i]
                text, start = c.advance(out)
                lp = self._logprobs(c, start, chat) if len(out.token_ids) > start else None
                if not (text or lp or out.finished):
                    continue
                reason = out.finish_reason if out.finished else None
                if chat:
                    choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp,
                              "finish_reason": reason}
                else:
                    choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}
                yield _sse({**head, "choices": [choice]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, choices)})
        except Exception as e:  # the response has started: report in-band, as vLLM does
            yield _sse(_api_error(e).body())
        finally:
            for c in choices:
                c.stream.abort()
        yield "data: [DONE]\n\n"

    def _logprobs(self, c: _Choice, start: int, chat: bool) -> dict | None:
        """Log-probs of ``c``'s tokens from ``start``, in the completions or the chat shape; None if not asked."""
        params, out = c.stream.params, c.out
        if params.logprobs is None:
            return None
        ids = out.token_ids[start:]

        def decode(t: int) -> str:
            return self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)

        tokens = [decode(t) for t in ids]
        chosen = out.logprobs[start:start + len(ids)]
        top = out.top_logprobs[start:start + len(ids)]
        if chat:
            def entry(text, lp):
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(text, lp), "top_logprobs": [entry(decode(t), v) for t, v in row or []]}
                                for text, lp, row in zip(tokens, chosen, top)]}
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=c.text_offset))
        c.text_offset += sum(len(t) for t in tokens)
        return {"tokens": tokens, "token_logprobs": chosen, "text_offset": offsets,
                "top_logprobs": [{decode(t): v for t, v in row or []} for row in top]}


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(len(c.out.token_ids) for c in choices if c.out is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(choices: list[_Choice]) -> list[RequestOutput]:
    async for i, out in merge_streams([c.stream for c in choices]):
        choices[i].advance(out)
    return [c.out for c in choices]


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


# ---- loading what to serve ------------------------------------------------------------------------------------

@dataclass
class ServedModel:
    program: Any
    tokenizer: Any
    chat_template: str | None
    name: str
    limits: dict[str, Any] = field(default_factory=dict)  # max_model_len, max_num_seqs, num_blocks, ... when known


def load_served_model(path: str | Path, *, device: str = "cpu", tokenizer: str | None = None) -> ServedModel:
    """What ``workbench serve PATH`` runs: an engine directory (``PATH/engine.json``) through
    ``workbench.engine.load_engine``, else a workspace's latest graph as ``LLM(workspace)`` loads it.
    ``tokenizer`` (a model directory or name) replaces the model's own, e.g. for a random-weight model."""
    path = Path(path)
    name = path.resolve().name
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    if (path / "engine.json").is_file():
        from .engine import load_engine

        loaded = load_engine(path, device=device)
        tok = tok or loaded.tokenizer
        template = (getattr(loaded, "chat_template", None) if tokenizer is None else None) or _template_of(tok)
        return ServedModel(loaded.program, tok, template, name, _as_dict(getattr(loaded, "limits", None)))
    from .models.intake import load_tokenizer
    from .pipeline import load_program, workspace_source
    from .workspace import Workspace

    if not path.is_dir():
        raise WorkbenchError(f"{path} is neither an engine directory (engine.json) nor a workspace")
    ws = Workspace(path, create=False)
    if ws.record("passes") is None:
        raise WorkbenchError(f"{path} has no optimized graph to serve; run `workbench optimize {path}` first")
    stage = ("tune" if ws.status("tune") == "ok" and str(device).startswith("cuda") else
             "quant" if ws.status("quant") == "ok" else "passes")
    program = load_program(ws, stage=stage, device=device)
    tok = tok or load_tokenizer(workspace_source(ws))
    config = program.graph.meta.get("config") or {}
    limits = {"max_model_len": config["max_position_embeddings"]} if config.get("max_position_embeddings") else {}
    return ServedModel(program, tok, _template_of(tok), name, limits)


def _load_tokenizer(spec: str):
    from .models.intake import load_tokenizer, resolve_source

    if (Path(spec) / "tokenizer.json").is_file() or (Path(spec) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer  # a directory of tokenizer files alone (no weights needed)

        return AutoTokenizer.from_pretrained(spec)
    tok = load_tokenizer(resolve_source(spec, fetch=False))
    if tok is None:
        raise WorkbenchError(f"{spec!r} has random weights and no tokenizer; give a model directory or name with one")
    return tok


def _template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return template if isinstance(template, str) else None


def _as_dict(limits) -> dict[str, Any]:
    if limits is None:
        return {}
    if isinstance(limits, dict):
        return dict(limits)
    return asdict(limits) if is_dataclass(limits) else dict(vars(limits))


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          tokenizer: str | None = None, model_name: str | None = None, max_pending: int = 256,
          num_blocks: int | None = None, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
          max_model_len: int | None = None, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Load ``path``, start the engine thread and run uvicorn until SIGTERM/SIGINT (``workbench serve``)."""
    import uvicorn

    from .runtime.engine import LLMEngine
    from .runtime.scheduler import SchedulerConfig

    served = load_served_model(path, device=device, tokenizer=tokenizer)
    if served.tokenizer is None:
        print(f"workbench serve: {path} has no tokenizer: prompts must be token ids and outputs have no text; "
              "give --tokenizer MODEL for text", file=sys.stderr)
    limits = served.limits
    sched = {"max_num_seqs": max_num_seqs or limits.get("max_num_seqs"),
             "max_num_batched_tokens": max_num_batched_tokens or limits.get("max_num_batched_tokens")}
    num_blocks = num_blocks or limits.get("num_blocks")
    if num_blocks is None and str(device).startswith("cuda"):  # what 85% of the free memory holds
        from .runtime.capacity import KVLayout, device_memory, plan_capacity

        free, _ = device_memory(device)
        n = max_model_len or limits.get("max_model_len") or 2048
        plan = plan_capacity(KVLayout.from_graph(served.program.graph), memory_bytes=free, fraction=0.85,
                             prompt_len=n // 2, output_len=n - n // 2)
        print(f"workbench serve: {plan.summary()}", file=sys.stderr)
        num_blocks = plan.num_blocks
    engine = LLMEngine(served.program, served.tokenizer, num_blocks=num_blocks or 256,
                       config=SchedulerConfig(**{k: v for k, v in sched.items() if v}),
                       max_model_len=max_model_len or limits.get("max_model_len"))
    aengine = AsyncLLMEngine(engine, max_pending=max_pending,
                             max_model_len=max_model_len or limits.get("max_model_len"))
    app = create_app(aengine, model_name=model_name or served.name, chat_template=served.chat_template,
                     shutdown_timeout=shutdown_timeout)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # stop accepting, then let the engine finish or abort what is in flight, so that every response
            # ends properly (an aborted stream with finish_reason "abort" and [DONE]) before uvicorn's own wait
            for server in self.servers:
                server.close()
            await asyncio.to_thread(aengine.shutdown, shutdown_timeout)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)))
    # uvicorn raises SIGTERM/SIGINT again after its graceful shutdown, for the handler that was there before
    # it: a no-op one, so a completed shutdown exits with status 0
    previous = {sig: signal.signal(sig, lambda sig, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        aengine.shutdown(0)  # a no-op after the lifespan's shutdown; stops the thread if startup failed


__all__ = ["ApiError", "ServedModel", "create_app", "load_served_model", "serve"]
