"""OpenAI's completions and chat API over the runtime: request bodies, sampling parameters, choices and
their streams, response bodies and server-sent events. The HTTP server (``serve/app.py``) only wires
this to FastAPI; nothing here knows about HTTP beyond the status code an ``ApiError`` carries.

    api = OpenAIApi(AsyncLLMEngine(LLMEngine(program, tokenizer)), "smollm2", chat_template)
    body = parse_body(raw_bytes, CompletionRequest)            # or an ApiError (400) saying what is wrong
    head, choices, prompt_tokens = api.submit(body, api.completion_prompts(body), chat=False)
    await collect(choices)                                     # every choice finished, then the response body:
    api.response(head, choices, False, prompt_tokens)          # or stream: async for event in api.events(...)

* **Parameters** keep OpenAI's names: ``max_tokens`` (chat also ``max_completion_tokens``; without one, chat
  generates up to the context length), ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``,
  ``logprobs`` (chat: ``logprobs`` + ``top_logprobs``), ``stream`` (+ ``stream_options.include_usage``), and
  vLLM's ``ignore_eos``, ``min_tokens``, ``stop_token_ids``. Types are strict: ``"16"`` is not an integer.
  Fields this server does not implement are refused when set (``echo``, penalties, ``tools``, ...), other
  unknown fields are ignored.
* **n > 1** runs n engine requests; with a ``seed``, choice i samples with seed ``seed + i`` (in 64-bit
  arithmetic, ``derived_seed``: so a choice equals a single request with that seed, and no seed overflows),
  without one each draws from the global generator. Prompts x n count against ``max_pending`` together;
  more than it could ever hold is a 400.
* **Limits** bound the work one request makes for the others (``MAX_*`` below): n, stop strings (count and
  length), stop token ids, log-probs, JSON nesting depth; ``app.MAX_BODY_BYTES`` bounds the body.
* **Streaming** is server-sent events, ``data: {json}\\n\\n`` chunks then ``data: [DONE]\\n\\n``. While a
  request runs, the last (longest stop string - 1) characters are held back, so a stop string is never sent
  and then taken back. ``usage`` comes in a last chunk when ``stream_options.include_usage`` is set.
* **Engines without a tokenizer** (random-weight presets) take token-id prompts and answer in token ids: every
  choice carries ``token_ids`` (vLLM's field), and a stream sends each new token's ids as they come.
* **Errors** are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
  (malformed JSON, invalid UTF-8, lone surrogates, nesting, wrong types: FastAPI's 422 becomes 400, values
  out of range or over the limits, a prompt plus max_tokens over the context length), 404 for an unknown
  model or path, 413 for a body over ``max_body_bytes``, 429 (with ``Retry-After``) when ``max_pending``
  requests are unfinished, 500 for a request the engine failed alone, 503 while shutting down.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import WorkbenchError
from ..runtime.async_engine import (MIN_TEMPERATURE, AsyncLLMEngine, ContextLengthError, EngineClosedError,
                                    QueueFullError, RequestFailedError, merge_streams)
from ..runtime.engine import RequestOutput
from ..runtime.sampling import MAX_SEED, MIN_SEED, SamplingParams, derived_seed

# Limits of a request body beyond its size (``app.MAX_BODY_BYTES``): each bounds work one request makes for all.
MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP = 16            # stop strings (OpenAI: 4); every one is searched after every token
MAX_STOP_CHARS = 256     # characters of one stop string (a stream holds back the longest one minus one)
MAX_STOP_TOKEN_IDS = 256
MAX_JSON_DEPTH = 16      # nesting of the JSON body; the deepest valid field (messages.i.content.j.text) is 5
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, also when max_tokens is null

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


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
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("max_tokens")
    @classmethod
    def _null_is_the_default(cls, value):  # OpenAI: "max_tokens: integer or null, defaults to 16"
        return COMPLETION_MAX_TOKENS if value is None else value


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
        self.headers: dict[str, str] = {"Retry-After": "1"} if status == 429 else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception) -> ApiError:
    """The OpenAI error a failure maps to (429 queue full, 503 closed, 400 bad input, 500 otherwise)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineClosedError):
        return ApiError(503, str(e), type="service_unavailable", code="engine_closed")
    if isinstance(e, RequestFailedError):
        return ApiError(500, str(e), type="internal_error", code="request_failed")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, WorkbenchError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {e!r}", type="internal_error")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """``raw`` (a request body) as ``model``, or an ApiError (400): invalid UTF-8, malformed JSON (NaN and
    Infinity included), a non-object, a field of the wrong type or range, or a field this server does not
    implement set to anything but its "off" value."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({e})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        obj = _TOO_DEEP  # nested too deeply to parse: refused below
    if obj is _TOO_DEEP or text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(obj) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in obj.items():  # "\ud800" parses to a lone surrogate, which no tokenizer or response takes
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{name}: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not text", param=str(name)) from None
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        errors = e.errors()  # of a union's branches, the one that got past the type check says most
        err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or "[" not in str(p) and p not in _TYPE_NAMES
               and not str(p).startswith("constrained-")]
        raise ApiError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param=loc[0] if loc else None) from None
    for name, off in _UNSUPPORTED.items():
        value = (body.model_extra or {}).get(name, off)
        if value != off and value is not None:
            raise ApiError(400, f"{name!r} is not supported by this server; leave it out", param=name)
    return body


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


_TOO_DEEP = object()


def _depth(obj: Any) -> int:
    """How deeply ``obj`` nests lists and dicts, counted without recursion, up to ``MAX_JSON_DEPTH + 1``."""
    level, depth = [obj], 0
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (list, dict))]
    return depth


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---- choices, responses, events -------------------------------------------------------------------------------

@dataclass
class Choice:
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
class OpenAIApi:
    """OpenAI's completions and chat API over an ``AsyncLLMEngine``: request bodies to engine requests,
    engine outputs to response bodies and server-sent events. No HTTP here (``serve/app.py`` does that)."""
    engine: AsyncLLMEngine
    model_name: str
    chat_template: str | None
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
        self.check_count(len(prompts), body.n)
        try:
            return [self.engine.encode(p) for p in prompts]
        except WorkbenchError as e:
            raise ApiError(400, str(e), param="prompt") from None

    def check_count(self, num_prompts: int, n: int) -> None:
        """Refuse (400) prompts x n choices that ``max_pending`` could never hold at once: retrying cannot help."""
        if num_prompts * n > self.engine.max_pending:
            raise ApiError(400, f"{num_prompts} prompt(s) x n={n} is {num_prompts * n} completions, more than this "
                                f"server ever runs at once ({self.engine.max_pending}, its --max-pending); send "
                                "fewer prompts per request or a lower n", param="n")

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer, so no chat: use /v1/completions with token-id "
                           "prompts (or restart it with --tokenizer MODEL)", param="messages", code="no_chat_template")
        if self.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        self.check_count(1, body.n)
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
                                    top_p=body.top_p, seed=None if body.seed is None else derived_seed(body.seed, i),
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
    def submit(self, body: _GenerationRequest, prompts: list[list[int]], *, chat: bool):
        """Queue the request's choices (prompts x n) on the engine, all or none; returns the response head, the
        choices and the prompt's token count."""
        jobs = [(ids, self.params(body, len(ids), i)) for ids in prompts for i in range(body.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        holdback = max((len(s) for s in jobs[0][1].stop), default=1) - 1
        streams = self.engine.submit_all([(ids, params, f"{rid}-{i}") for i, (ids, params) in enumerate(jobs)])
        choices = [Choice(i, stream, holdback) for i, stream in enumerate(streams)]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        return head, choices, sum(len(ids) for ids in prompts)

    def response(self, head: dict, choices: list[Choice], chat: bool, prompt_tokens: int) -> dict:
        """The non-streaming response body, once every choice finished (``collect``)."""
        out = []
        for c in choices:
            lp = self._logprobs(c, 0, chat)
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.out.text},
                            "logprobs": lp, "finish_reason": c.out.finish_reason})
            else:
                out.append({"index": c.index, "text": c.out.text, "logprobs": lp,
                            "finish_reason": c.out.finish_reason})
            if self.tokenizer is None:  # an engine without a tokenizer answers in token ids
                out[-1]["token_ids"] = list(c.out.token_ids)
        return {**head, "choices": out, "usage": usage(prompt_tokens, choices)}

    async def events(self, head: dict, choices: list[Choice], chat: bool, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        try:
            if chat:  # the role first, as OpenAI does
                for c in choices:
                    yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            async for i, out in merge_streams([c.stream for c in choices]):
                c = choices[i]
                text, start = c.advance(out)
                lp = self._logprobs(c, start, chat) if len(out.token_ids) > start else None
                ids = out.token_ids[start:] if self.tokenizer is None else []
                if not (text or lp or ids or out.finished):
                    continue
                reason = out.finish_reason if out.finished else None
                if chat:
                    choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp,
                              "finish_reason": reason}
                else:
                    choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}
                if self.tokenizer is None:  # no text to stream: the new token ids, each as it comes
                    choice["token_ids"] = list(ids)
                yield sse({**head, "choices": [choice]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, choices)})
        except Exception as e:  # the response has started: report in-band, as vLLM does
            yield sse(api_error(e).body())
        finally:
            for c in choices:
                c.stream.abort()
        yield "data: [DONE]\n\n"

    def _logprobs(self, c: Choice, start: int, chat: bool) -> dict | None:
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


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.out.token_ids) for c in choices if c.out is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


#: one encoder for every event (``json.dumps`` with options builds one per call), compact as OpenAI's own events
_EVENT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def sse(obj: dict) -> str:
    return f"data: {_EVENT_JSON.encode(obj)}\n\n"


async def collect(choices: list[Choice]) -> list[RequestOutput]:
    async for i, out in merge_streams([c.stream for c in choices]):
        choices[i].advance(out)
    return [c.out for c in choices]


