"""The async engine: an ``LLMEngine`` stepped by one background thread, fed by asyncio callers.

    aengine = AsyncLLMEngine(LLMEngine(program, tokenizer), max_pending=256)
    async for out in aengine.generate("Hello", SamplingParams(max_tokens=16)):
        out.text                                   # cumulative snapshots: callers compute deltas
    stream = aengine.submit(prompt, params)        # checks and queues now; errors before any response starts
    async for out in stream: ...                   # the same snapshots; stream.abort() cancels
    aengine.metrics, aengine.stats()               # counters and histograms (runtime.metrics), gauges
    aengine.shutdown(timeout=30)                   # stop accepting, let in-flight finish, abort the rest

**Threads.** ``LLMEngine`` is not thread-safe, so one thread owns it and nothing else touches it:

    event loop (HTTP)                     engine thread
    submit() ── ("add", ...) ──┐          while running:
    abort()  ── ("abort", id) ─┴─► commands ──► drained between steps (add_request / abort + release)
                                          engine.step() ──► outputs
    RequestStream's queue ◄── loop.call_soon_threadsafe ────┘   finished: engine.release(id)

The thread sleeps on a condition while it has neither commands nor unfinished requests. Prompts are
tokenized by the caller (``encode``) so that a bad prompt fails before it is queued; tokenization is the
same call ``LLMEngine.add_request`` makes, so a request's tokens equal ``LLM.generate``'s.

**Cancellation.** A consumer that stops reading (a client that disconnects cancels its task) aborts its
request: the stream's iterator aborts in its ``finally``, and the engine thread aborts and releases it, so its
KV blocks are freed at once. Finished requests are released too: the engine keeps nothing per request.

**Back-pressure.** At most ``max_pending`` requests are submitted and unfinished (queued, waiting or
running); one more raises ``QueueFullError`` (the server answers 429) instead of growing a queue without
bound. After ``shutdown`` (or an engine error) ``submit`` raises ``EngineClosedError`` (503).

**Failures.** No request can stop the engine for the others. Its parameters and token ids are checked before it
is queued (``check_params`` refuses what would make a shared step fail: a temperature that overflows, ids
outside the vocabulary, a seed out of 64 bits); a request the engine refuses gets the error alone; and what one
request still raises inside a step (its draw, detokenizer or stop check: ``LLMEngine`` isolates those) ends
that request alone with ``RequestFailedError`` while the others go on. Only a step that raises as a whole (a
device error) ends every stream with ``EngineClosedError`` instead of leaving it waiting, and the engine
accepts nothing more.

Metrics are recorded by the engine thread into ``runtime.metrics.EngineMetrics`` (TTFT is measured from
``submit``); gauges are a snapshot the engine thread publishes after every iteration, so readers never touch
the scheduler. The server renders both for Prometheus (``workbench.serve.metrics``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from typing import AsyncIterator

from ..errors import WorkbenchError
from .engine import LLMEngine, RequestOutput
from .metrics import EngineMetrics
from .sampling import SamplingParams

log = logging.getLogger(__name__)

class QueueFullError(WorkbenchError):
    """``max_pending`` requests are already unfinished; try again later (HTTP 429)."""


class EngineClosedError(WorkbenchError):
    """The engine is shutting down or stopped after an error (HTTP 503)."""


class RequestFailedError(WorkbenchError):
    """The engine failed this request alone, inside a step (HTTP 500); the others went on."""


class ContextLengthError(WorkbenchError):
    """A prompt plus its ``max_tokens`` does not fit the engine's ``max_model_len`` (HTTP 400)."""


#: Temperatures in (0, MIN_TEMPERATURE) overflow ``logits / temperature`` to inf and the draw to NaN, which
#: would fail the whole step (every request in it); vLLM treats them as greedy.
MIN_TEMPERATURE = 1e-5


# ---- per-request streams -----------------------------------------------------------------------------------

class RequestStream:
    """One request's outputs, in order, as an async iterator of cumulative ``RequestOutput`` snapshots.

    The engine thread puts snapshots (or one exception) on its asyncio queue through the caller's event loop;
    iterating ends after the finished snapshot. Leaving the iteration early (a ``break``, a cancelled task)
    aborts the request; ``abort()`` may also be called directly, any number of times.
    """

    def __init__(self, owner: "AsyncLLMEngine", request_id: str, loop: asyncio.AbstractEventLoop,
                 params: SamplingParams, num_prompt_tokens: int, arrival: float) -> None:
        self.request_id, self.params = request_id, params
        self.num_prompt_tokens, self.arrival = num_prompt_tokens, arrival
        self.finished = False  # set by the consumer once it has seen the finished snapshot (or an error)
        self._owner, self._loop = owner, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        # engine-thread bookkeeping for the latency metrics
        self.num_tokens_seen = 0
        self.last_token_time = arrival

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread: hand a snapshot (or an error) to the consumer's loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass

    def abort(self) -> None:
        """Cancel the request unless it already finished (safe from any thread, idempotent)."""
        if not self.finished:
            self._owner.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                while not isinstance(item, BaseException) and not self._queue.empty():
                    item = self._queue.get_nowait()  # a slow reader skips to the newest snapshot
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()


# ---- the engine ---------------------------------------------------------------------------------------------

class AsyncLLMEngine:
    """An ``LLMEngine`` behind a command queue and one stepping thread (see the module docstring).

    ``max_model_len`` caps prompt + max_tokens (default: the model config's ``max_position_embeddings``); it
    is never more than the KV cache holds. Token ids are checked against the vocabulary by the engine
    (``LLMEngine.check_token_ids``) before a request is queued.
    ``timeline_steps``: the engine's timeline keeps about this many of the latest steps (a server runs for
    days; the timeline would grow by one row per step).
    """

    def __init__(self, engine: LLMEngine, *, max_pending: int = 256, max_model_len: int | None = None,
                 timeline_steps: int = 10_000) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise WorkbenchError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.engine = engine
        self.max_pending = max_pending
        bm = engine.scheduler.bm
        limits = [bm.num_blocks * bm.block_size, max_model_len or _config_value(engine, "max_position_embeddings")]
        self.max_model_len = min(n for n in limits if n)
        self.metrics = EngineMetrics()
        self.timeline_steps = timeline_steps
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._stop = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._gauges: dict[str, float] = {}
        self._publish()
        self._thread = threading.Thread(target=self._run, name="workbench-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side ------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        """Accepting requests: not shut down and not stopped by an error."""
        return self._accepting and self._error is None and self._thread.is_alive()

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, checked: text goes through the tokenizer as ``LLMEngine.add_request`` does,
        ids must lie in the vocabulary; the result is never empty."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise WorkbenchError("this engine has no tokenizer, so prompts must be token ids (a list of ints)")
            ids = list(self.tokenizer(prompt).input_ids)
        else:
            ids = list(prompt)
            self.engine.check_token_ids(ids)
        if not ids:
            raise WorkbenchError("the prompt is empty; give at least one token")
        return ids

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the prompt, {max_tokens} "
                "to generate); shorten the prompt or lower max_tokens")

    def check_params(self, params: SamplingParams) -> None:
        """Refuse what ``SamplingParams`` admits but would fail a shared step rather than one request."""
        t = params.temperature
        if not math.isfinite(t) or 0 < t < MIN_TEMPERATURE:
            raise WorkbenchError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if params.top_k >= 2**31:
            raise WorkbenchError(f"top_k {params.top_k} is too large; use -1 to consider every token")
        self.engine.check_token_ids([], params.stop_token_ids)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestStream:
        """Check a request and queue it for the engine thread; returns its stream. Call from a coroutine
        (the stream delivers to the running loop). Raises ``WorkbenchError`` for a bad prompt,
        or parameters, ``ContextLengthError``, ``QueueFullError`` or ``EngineClosedError``."""
        return self.submit_all([(prompt, params, request_id)])[0]

    def submit_all(self, requests: list[tuple]) -> list[RequestStream]:
        """``submit`` for several ``(prompt, params, request_id)`` at once (a request's ``n`` choices), all or
        none: they count together against ``max_pending``, and more than it could ever hold is refused."""
        loop = asyncio.get_running_loop()
        if len(requests) > self.max_pending:
            raise WorkbenchError(f"{len(requests)} requests at once can never fit this engine's max_pending of "
                                 f"{self.max_pending}; send fewer (lower n, or fewer prompts per request)")
        checked = []
        for prompt, params, request_id in requests:
            params = params or SamplingParams()
            ids = self.encode(prompt)
            self.check_params(params)
            self.check_length(len(ids), params.max_tokens)
            checked.append((ids, params, request_id))
        arrival = time.perf_counter()
        with self._cond:
            if self._error is not None or not self._accepting:
                with self.metrics.lock:
                    self.metrics.rejected["closed"] += 1
                raise EngineClosedError("the engine is shutting down" if self._error is None else
                                        f"the engine stopped after an error ({self._error!r}); restart the server")
            if len(self._streams) + len(checked) > self.max_pending:
                with self.metrics.lock:
                    self.metrics.rejected["queue_full"] += 1
                raise QueueFullError(f"{len(self._streams)} requests are already pending (max_pending="
                                     f"{self.max_pending}); retry later")
            ids_given = [str(rid) for _, _, rid in checked if rid is not None]
            taken = next((rid for rid in ids_given if rid in self._streams), None)
            if taken is not None or len(set(ids_given)) < len(ids_given):
                raise WorkbenchError(f"request id {taken or ids_given[0]!r} is already in use; give each request "
                                     "its own id")
            streams = []
            for ids, params, request_id in checked:
                rid = f"req-{next(self._ids)}" if request_id is None else str(request_id)
                stream = RequestStream(self, rid, loop, params, len(ids), arrival)
                self._streams[rid] = stream
                self._commands.append(("add", stream, ids))
                streams.append(stream)
            self._cond.notify_all()
        return streams

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots of one request until it finishes; cancelling the consumer aborts it."""
        async for out in self.submit(prompt, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); its blocks are freed by the engine thread."""
        with self._cond:
            if request_id in self._streams:
                self._commands.append(("abort", request_id))
                self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        """The latest gauges: running, waiting, pending, kv_usage_percent, prefix_cache_hit_rate, preemptions."""
        with self._cond:
            return {**self._gauges, "pending": len(self._streams)}

    def shutdown(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop accepting requests, let the in-flight ones finish for up to ``timeout`` seconds, abort the
        rest and stop the engine thread. Returns how many were in flight, and how many of them were aborted.
        Blocking: from a coroutine, run it in a thread (``asyncio.to_thread``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            in_flight = len(self._streams)
            while self._streams and self._error is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            aborted = list(self._streams)
            self._commands += [("abort", rid) for rid in aborted]
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=max(10.0, timeout))
        return {"in_flight": in_flight, "aborted": len(aborted)}

    # ---- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._commands and not engine.has_unfinished and not self._stop:
                        self._cond.wait()
                    commands, self._commands = self._commands, []
                    if self._stop and not commands and not engine.has_unfinished:
                        leftover, self._streams = list(self._streams.values()), {}
                        self._cond.notify_all()
                        break
                for command in commands:
                    if command[0] == "add":
                        self._add(*command[1:])
                    else:
                        self._abort(command[1])
                if engine.has_unfinished:
                    self._deliver(engine.step())
                    if len(engine.steps) > 2 * self.timeline_steps:
                        del engine.steps[:-self.timeline_steps]
                self._publish()
            for stream in leftover:  # none expected: every stream's request was finished or aborted above
                stream.put(EngineClosedError("the engine shut down before this request finished"))
        except BaseException as e:  # a broken engine: every consumer gets the error, nothing new is accepted
            log.exception("the engine thread stopped after an error; requests are refused from now on")
            with self._cond:
                self._error = e
                streams, self._streams = list(self._streams.values()), {}
                self._cond.notify_all()
            for stream in streams:
                stream.put(EngineClosedError(f"the engine stopped after an error ({e!r})"))

    def _add(self, stream: RequestStream, ids: list[int]) -> None:
        try:
            self.engine.add_request(stream.request_id, ids, stream.params, arrival=stream.arrival)
        except Exception as e:  # this request is refused; the others go on
            self._forget(stream)
            stream.put(e if isinstance(e, WorkbenchError) else WorkbenchError(f"the engine refused the request: {e}"))

    def _abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or request_id not in self.engine.states:
            return  # finished (and released) already, or its add failed
        self.engine.abort(request_id)
        out = self.engine.output(request_id)
        if out.finished:  # else it already left the scheduler; its last token is read back next step
            self._finish(stream, self.engine.release(request_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new = len(out.token_ids) - stream.num_tokens_seen
            if new > 0:
                with self.metrics.lock:
                    if stream.num_tokens_seen == 0:
                        first = out.metrics.get("first_token_time") or now
                        self.metrics.ttft.observe(first - stream.arrival)
                    else:
                        for _ in range(new):
                            self.metrics.itl.observe((now - stream.last_token_time) / new)
                stream.num_tokens_seen, stream.last_token_time = len(out.token_ids), now
            if out.finished:
                self._finish(stream, self.engine.release(out.request_id))
            else:
                stream.put(out)

    def _finish(self, stream: RequestStream, out: RequestOutput) -> None:
        if out.finish_reason == "error":
            log.error("request %s failed inside the engine step; the others go on", stream.request_id,
                      exc_info=out.error)
        with self.metrics.lock:
            self.metrics.finished[out.finish_reason or "abort"] += 1
            self.metrics.prompt_tokens += stream.num_prompt_tokens
            self.metrics.generation_tokens += len(out.token_ids)
            self.metrics.e2e.observe(time.perf_counter() - stream.arrival)
        self._forget(stream)
        stream.put(out if out.finish_reason != "error" else RequestFailedError(
            f"the engine failed this request ({out.error!r}); other requests were not affected"))

    def _forget(self, stream: RequestStream) -> None:
        with self._cond:
            self._streams.pop(stream.request_id, None)
            self._cond.notify_all()  # shutdown() waits for the streams to drain

    def _publish(self) -> None:
        sched = self.engine.scheduler
        gauges = {"running": len(sched.running), "waiting": len(sched.waiting),
                  "kv_usage_percent": 100.0 * sched.bm.usage, "prefix_cache_hit_rate": sched.bm.hit_rate,
                  "preemptions": sched.num_preemptions}
        with self._cond:
            self._gauges = gauges


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(index, snapshot)`` from several streams as they come (a request's ``n`` choices); an error in one
    ends the merge, and leaving it early aborts every stream."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


def _config_value(engine: LLMEngine, key: str) -> int | None:
    """An integer of the model config, where the program's graph records it."""
    graph = getattr(getattr(engine.executor, "program", None), "graph", None)
    config = (getattr(graph, "meta", None) or {}).get("config") or {}
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


__all__ = ["AsyncLLMEngine", "ContextLengthError", "EngineClosedError", "MIN_TEMPERATURE", "QueueFullError",
           "RequestFailedError", "RequestStream", "merge_streams"]
