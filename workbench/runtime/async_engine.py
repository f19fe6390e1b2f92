"""The async engine: an ``LLMEngine`` stepped by one background thread or in its own process, fed by asyncio callers.

    aengine = AsyncLLMEngine(LLMEngine(program, tokenizer), max_pending=256)
    aengine = AsyncLLMEngine.spawn(factory)        # the engine built and stepped in a child process (the server's)
    async for out in aengine.generate("Hello", SamplingParams(max_tokens=16)):
        out.text                                   # cumulative snapshots: callers compute deltas
    stream = aengine.submit(prompt, params)        # checks and queues now; errors before any response starts
    async for out in stream: ...                   # the same snapshots; stream.abort() cancels
    aengine.metrics, aengine.stats()               # counters and histograms (runtime.metrics), gauges
    aengine.shutdown(timeout=30)                   # stop accepting, let in-flight finish, abort the rest

**Threads, or a process.** ``LLMEngine`` is not thread-safe, so one owner steps it and nothing else touches it:
``_Core`` takes commands between steps and hands over each step's ``RequestDelta``s (what each request gained).
``AsyncLLMEngine(engine)`` runs the core on a thread of this process; ``AsyncLLMEngine.spawn(factory)`` builds
the engine in a child process and runs the core on its main thread, as vLLM's engine core runs apart from its API
server. ``workbench serve`` spawns: in one process the engine's host work and the HTTP loop's (an event per token
per stream) take turns on one GIL, and torch's CPU kernels called from a second thread ran a small model's steps
3.6x slower than from a main thread. In the child, a sender thread writes to the pipe, so the engine never waits
for the server; the server reads every step that arrived before delivering, so one that falls behind sends each
stream fewer, larger chunks instead of slowing the engine (on an H100 a 1B model served 0.20x of offline on a
thread and 0.25x in a process whose steps waited for the pipe: BENCHMARKS.md).

    event loop (HTTP)                     the core (engine thread, or the engine process)
    submit() ── ("add", ...) ──┐          while running:
    abort()  ── ("abort", id) ─┴─► commands ──► taken between steps (add_request / abort + release)
                                          engine.step(deltas=True) ──► deltas ──┐
    RequestStream's queue ◄── one loop.call_soon_threadsafe per step ◄── _deliver ┘ (this thread, or the
                                          thread reading the process's pipe): snapshots rebuilt from deltas

The core sleeps while it has neither commands nor unfinished requests. Prompts are tokenized by the caller
(``encode``) so that a bad prompt fails before it is queued; tokenization is the same call
``LLMEngine.add_request`` makes, so a request's tokens equal ``LLM.generate``'s. The caller's side keeps each
request's output so far and hands consumers cumulative snapshots, as before deltas.

**Cancellation.** A consumer that stops reading (a client that disconnects cancels its task) aborts its
request: the stream's iterator aborts in its ``finally``, and the core aborts and releases it, so its
KV blocks are freed at once. Finished requests are released too: the engine keeps nothing per request.

**Back-pressure.** At most ``max_pending`` requests are submitted and unfinished (queued, waiting or
running); one more raises ``QueueFullError`` (the server answers 429) instead of growing a queue without
bound. After ``shutdown`` (or an engine error) ``submit`` raises ``EngineClosedError`` (503).

**Failures.** No request can stop the engine for the others. Its parameters and token ids are checked before it
is queued (``check_params`` refuses what would make a shared step fail: a temperature that overflows, ids
outside the vocabulary, a seed out of 64 bits); a request the engine refuses gets the error alone; and what one
request still raises inside a step (its draw, detokenizer or stop check: ``LLMEngine`` isolates those) ends
that request alone with ``RequestFailedError`` while the others go on. Only a step that raises as a whole (a
device error), or an engine process that dies, ends every stream with ``EngineClosedError`` instead of leaving it
waiting, and the engine accepts nothing more.

Metrics are recorded by the delivering thread into ``runtime.metrics.EngineMetrics`` (TTFT is measured from
``submit``); gauges are a snapshot the core publishes with its deltas, so readers never touch the scheduler. The server renders both for Prometheus (``workbench.serve.metrics``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from typing import Any, AsyncIterator

from ..errors import WorkbenchError
from .engine import LLMEngine, RequestDelta, RequestOutput, apply_delta, check_token_ids
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

    The delivering thread (see ``AsyncLLMEngine``) puts snapshots (or one exception) on its asyncio queue through
    the caller's event loop; iterating ends after the finished snapshot. Leaving the iteration early (a ``break``,
    a cancelled task) aborts the request; ``abort()`` may also be called directly, any number of times.
    """

    def __init__(self, owner: "AsyncLLMEngine", request_id: str, loop: asyncio.AbstractEventLoop,
                 params: SamplingParams, prompt_ids: list[int], arrival: float) -> None:
        self.request_id, self.params = request_id, params
        self.num_prompt_tokens, self.arrival = len(prompt_ids), arrival
        self.finished = False  # set by the consumer once it has seen the finished snapshot (or an error)
        self._owner, self._loop = owner, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        # the delivering thread's: the output so far (advanced by each delta), and the latency bookkeeping
        self.out = RequestOutput(request_id, None, prompt_ids, [], "", False)
        self.num_tokens_seen = 0
        self.last_token_time = arrival

    def put(self, item: RequestOutput | BaseException) -> None:
        """From another thread: hand a snapshot (or an error) to the consumer's loop."""
        _hand_over(self._loop, [(self._queue, item)])

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


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Put ``(queue, item)`` pairs on their queues in ``loop``'s thread: one wake-up of the loop for all."""
    def put_all():
        for queue, item in items:
            queue.put_nowait(item)
    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening
        pass


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy of ``out`` whose lists the delivering thread's next deltas do not change. Built from ``out``'s fields
    directly: ``dataclasses.replace`` took three times as long, once per stream per step in a busy server."""
    snap = object.__new__(RequestOutput)
    snap.__dict__.update(out.__dict__, token_ids=list(out.token_ids), logprobs=list(out.logprobs),
                         top_logprobs=list(out.top_logprobs), metrics=dict(out.metrics))
    return snap


# ---- the side that owns the engine --------------------------------------------------------------------------

class _Core:
    """The ``LLMEngine``'s owner (the engine thread, or the engine process's main thread): commands in,
    ``RequestDelta``s out. ``run(take, emit)``: ``take(block)`` returns the commands that came (waiting for one
    when ``block``), ``emit(deltas, gauges)`` hands each iteration's deltas over. Commands: ``("add", id, ids,
    params, arrival)``, ``("abort", id)``, ``("stop",)`` (finish what is in flight, then return)."""

    def __init__(self, engine: LLMEngine, timeline_steps: int) -> None:
        self.engine, self.timeline_steps = engine, timeline_steps

    def run(self, take, emit) -> None:
        engine, stopping, gauges = self.engine, False, None
        while True:
            deltas: list[RequestDelta] = []
            for command in take(not engine.has_unfinished and not stopping):
                if command[0] == "add":
                    deltas += self._add(*command[1:])
                elif command[0] == "abort":
                    deltas += self._abort(command[1])
                else:
                    stopping = True
            if engine.has_unfinished:
                deltas += self._step()
            now = self.gauges()
            if deltas or now != gauges:
                emit(deltas, now)
                gauges = now
            if stopping and not engine.has_unfinished:
                return

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, arrival: float) -> list[RequestDelta]:
        try:
            self.engine.add_request(request_id, ids, params, arrival=arrival)
            return []
        except Exception as e:  # noqa: BLE001 - this request is refused; the others go on
            error = e if isinstance(e, WorkbenchError) else WorkbenchError(f"the engine refused the request: {e}")
            return [RequestDelta(request_id, [], 0, "", True, REFUSED, error=error)]

    def _abort(self, request_id: str) -> list[RequestDelta]:
        engine = self.engine
        if request_id not in engine.states:
            return []  # finished (and released) already, or its add failed
        engine.abort(request_id)
        delta = engine.delta(request_id)
        if delta.finished:  # else it already left the scheduler; its last token is read back next step
            engine.release(request_id)
        return [delta]

    def _step(self) -> list[RequestDelta]:
        engine = self.engine
        deltas = engine.step(deltas=True)
        for delta in deltas:
            if delta.finished:
                engine.release(delta.request_id)
                if delta.finish_reason == "error":
                    log.error("request %s failed inside the engine step; the others go on", delta.request_id,
                              exc_info=delta.error)
        if len(engine.steps) > 2 * self.timeline_steps:
            del engine.steps[:-self.timeline_steps]
        return deltas

    def gauges(self) -> dict[str, float]:
        sched = self.engine.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting),
                "kv_usage_percent": 100.0 * sched.bm.usage, "prefix_cache_hit_rate": sched.bm.hit_rate,
                "preemptions": sched.num_preemptions}

    def facts(self) -> dict[str, Any]:
        """What the caller's side needs to check requests without the engine."""
        bm = self.engine.scheduler.bm
        return {"tokenizer": self.engine.tokenizer, "vocab_size": self.engine.vocab_size,
                "cache_tokens": bm.capacity_tokens,
                "max_position_embeddings": _config_value(self.engine, "max_position_embeddings"),
                "gauges": self.gauges()}


#: ``finish_reason`` of the delta that answers a request the engine refused to add (its error is the reason)
REFUSED = "refused"
#: messages from the engine process read at most before delivering them (steps' deltas merged per stream)
READ_BATCH = 64


# ---- the engine ---------------------------------------------------------------------------------------------

class AsyncLLMEngine:
    """An ``LLMEngine`` behind a command queue, stepped by one thread or in its own process (see the module
    docstring).

    ``AsyncLLMEngine(engine)`` steps ``engine`` in a thread of this process; ``AsyncLLMEngine.spawn(factory)``
    builds the engine in a child process (``factory()`` returns ``(LLMEngine, extra)``; ``extra``, a picklable
    dict, comes back as ``.extra``) and steps it there.
    ``max_model_len`` caps prompt + max_tokens (default: the model config's ``max_position_embeddings``); it
    is never more than the KV cache holds. Token ids are checked against the vocabulary before a request is
    queued. ``timeline_steps``: the engine's timeline keeps about this many of the latest steps (a server runs
    for days; the timeline would grow by one row per step).
    """

    def __init__(self, engine: LLMEngine, *, max_pending: int = 256, max_model_len: int | None = None,
                 timeline_steps: int = 10_000) -> None:
        self.engine = engine
        self.extra: dict[str, Any] = {}
        self.process = None
        core = _Core(engine, timeline_steps)
        self._setup(core.facts(), max_pending, max_model_len)
        self._thread = threading.Thread(target=self._run_thread, args=(core,), name="workbench-engine", daemon=True)
        self._thread.start()

    @classmethod
    def spawn(cls, factory, *, max_pending: int = 256, max_model_len: int | None = None,
              timeline_steps: int = 10_000, start_timeout: float | None = None) -> "AsyncLLMEngine":
        """The engine built by ``factory()`` (picklable; returns ``(LLMEngine, extra dict)``) in a child process
        ("spawn"), stepped there on its main thread: its host work (scheduling, the step's inputs, detokenizing)
        never waits for this process's (the HTTP server's) and the other way round. Blocks until the engine is
        ready; a factory that fails raises ``WorkbenchError`` with its message here."""
        import multiprocessing as mp

        self = cls.__new__(cls)
        self.engine = None
        ctx = mp.get_context("spawn")
        commands_r, commands_w = ctx.Pipe(duplex=False)
        outputs_r, outputs_w = ctx.Pipe(duplex=False)
        # not a daemon: the engine may start processes of its own (tensor-parallel ranks)
        self.process = ctx.Process(target=_engine_process_main, name="workbench-engine",
                                   args=(factory, commands_r, outputs_w, timeline_steps))
        self.process.start()
        commands_r.close()
        outputs_w.close()
        self._commands_w, self._outputs_r, self._send_lock = commands_w, outputs_r, threading.Lock()
        deadline = None if start_timeout is None else time.monotonic() + start_timeout
        try:
            while not outputs_r.poll(1.0):
                if not self.process.is_alive():
                    raise WorkbenchError(f"the engine process exited with code {self.process.exitcode} while it "
                                         "started; its messages are above")
                if deadline is not None and time.monotonic() > deadline:
                    raise WorkbenchError(f"the engine process did not start within {start_timeout:g} s")
            try:
                kind, payload = outputs_r.recv()
            except EOFError:
                self.process.join(10)
                raise WorkbenchError(f"the engine process exited with code {self.process.exitcode} while it "
                                     "started; its messages are above") from None
        except BaseException:  # Ctrl-C while it starts, or it failed: it goes too
            self.process.terminate()
            self.process.join(10)
            raise
        if kind != "ready":
            self.process.join(30)
            raise WorkbenchError(payload)
        facts, self.extra = payload
        self._setup(facts, max_pending, max_model_len)
        self._thread = threading.Thread(target=self._read_process, name="workbench-engine-reader", daemon=True)
        self._thread.start()
        return self

    def _setup(self, facts: dict[str, Any], max_pending: int, max_model_len: int | None) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise WorkbenchError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.max_pending = max_pending
        self._tokenizer, self.vocab_size = facts["tokenizer"], facts["vocab_size"]
        limits = [facts["cache_tokens"], max_model_len or facts["max_position_embeddings"]]
        self.max_model_len = min(n for n in limits if n)
        self.metrics = EngineMetrics()
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._hurried = False
        self._stopped = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._gauges: dict[str, float] = facts["gauges"]

    # ---- the caller's side ------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

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
            check_token_ids(self.vocab_size, ids)
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
        check_token_ids(self.vocab_size, [], params.stop_token_ids)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestStream:
        """Check a request and queue it for the engine; returns its stream. Call from a coroutine (the stream
        delivers to the running loop). Raises ``WorkbenchError`` for a bad prompt or parameters,
        ``ContextLengthError``, ``QueueFullError`` or ``EngineClosedError``."""
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
            streams, commands = [], []
            for ids, params, request_id in checked:
                rid = f"req-{next(self._ids)}" if request_id is None else str(request_id)
                stream = RequestStream(self, rid, loop, params, ids, arrival)
                self._streams[rid] = stream
                commands.append(("add", rid, ids, params, arrival))
                streams.append(stream)
        self._send(commands)
        return streams

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots of one request until it finishes; cancelling the consumer aborts it."""
        async for out in self.submit(prompt, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); its blocks are freed by the engine."""
        with self._cond:
            pending = request_id in self._streams
        if pending:
            self._send([("abort", request_id)])

    def stats(self) -> dict[str, float]:
        """The latest gauges: running, waiting, pending, kv_usage_percent, prefix_cache_hit_rate, preemptions."""
        with self._cond:
            return {**self._gauges, "pending": len(self._streams)}

    def shutdown(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop accepting requests, let the in-flight ones finish for up to ``timeout`` seconds, abort the
        rest and stop the engine (its thread, or its process). Returns how many were in flight, and how many of
        them were aborted. Blocking: from a coroutine, run it in a thread (``asyncio.to_thread``). ``hurry()``,
        before or during it, ends the wait at once."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            in_flight = len(self._streams)
            while self._streams and self._error is None and self._thread.is_alive() and not self._hurried:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            aborted = list(self._streams)
        self._send([("abort", rid) for rid in aborted] + [("stop",)])
        self._thread.join(timeout=max(10.0, timeout))
        if self.process is not None:
            self.process.join(timeout=max(10.0, timeout))
            if self.process.is_alive():
                log.error("the engine process did not stop; terminating it")
                self.process.terminate()
                self.process.join(10)
        return {"in_flight": in_flight, "aborted": len(aborted)}

    def hurry(self) -> None:
        """Cut ``shutdown``'s wait for the in-flight requests short (now, or when it starts): they are aborted at
        once. What a second Ctrl-C or SIGTERM does to ``workbench serve``."""
        with self._cond:
            self._hurried = True
            self._cond.notify_all()

    def _send(self, commands: list[tuple]) -> None:
        if self.process is None:
            with self._cond:
                self._commands += commands
                self._cond.notify_all()
            return
        with self._send_lock:
            try:
                for command in commands:
                    self._commands_w.send(command)
            except (OSError, ValueError):  # the engine process is gone; the reader thread reports it
                pass

    # ---- delivery (the engine thread, or the thread reading the engine process) -------------------------
    def _run_thread(self, core: _Core) -> None:
        def take(block: bool) -> list[tuple]:
            with self._cond:
                while block and not self._commands:
                    self._cond.wait()
                commands, self._commands = self._commands, []
            return commands

        try:
            core.run(take, self._deliver)
        except BaseException as e:  # a broken engine: every consumer gets the error, nothing new is accepted
            log.exception("the engine thread stopped after an error; requests are refused from now on")
            self._fail_all(e)
        else:
            self._fail_all(None)

    def _read_process(self) -> None:
        """Deliver what the engine process sends. Everything that arrived is read before delivering (up to
        ``READ_BATCH`` messages), so a server that falls behind its engine hands each stream one snapshot of
        several tokens instead of falling further behind (the engine never waits for it: see its sender)."""
        error: BaseException | None = None
        try:
            done = False
            while not done:
                messages = [self._outputs_r.recv()]
                while len(messages) < READ_BATCH and self._outputs_r.poll():
                    messages.append(self._outputs_r.recv())
                deltas, gauges = [], None
                for kind, payload in messages:
                    if kind == "step":
                        deltas += payload[0]
                        gauges = payload[1]
                    else:
                        done = True
                        if kind == "error":  # the engine process logged it and exits
                            error = WorkbenchError(payload)
                        break  # "stopped", or the error: nothing follows
                if gauges is not None:
                    self._deliver(deltas, gauges)
        except (EOFError, OSError):
            self.process.join(5)
            error = WorkbenchError(f"the engine process exited unexpectedly (exit code {self.process.exitcode})")
        if error is not None:
            log.error("the engine stopped: %s; requests are refused from now on", error)
        self._fail_all(error)

    def _fail_all(self, error: BaseException | None) -> None:
        """The engine stopped: after an error (every unfinished stream gets it, nothing new is accepted), or
        after a shutdown (none expected: every stream's request was finished or aborted first)."""
        with self._cond:
            if error is not None:
                self._error = error
            self._stopped = True
            streams, self._streams = list(self._streams.values()), {}
            self._cond.notify_all()
        for stream in streams:
            stream.put(EngineClosedError(f"the engine stopped after an error ({error!r})" if error is not None
                                         else "the engine shut down before this request finished"))

    def _deliver(self, deltas: list[RequestDelta], gauges: dict[str, float]) -> None:
        """Advance each delta's stream, record the latency metrics, and hand each stream advanced one snapshot
        (several deltas of one stream make one snapshot), one wake-up per event loop."""
        now = time.perf_counter()
        with self._cond:
            self._gauges = gauges
        items: dict[str, RequestOutput | BaseException] = {}  # request id -> what its consumer gets, in order
        touched: dict[str, RequestStream] = {}
        for delta in deltas:
            rid = delta.request_id
            stream = self._streams.get(rid)
            if stream is None:
                continue
            touched[rid] = stream
            if delta.finish_reason == REFUSED:  # the engine refused it: the request fails alone
                self._forget(stream)
                items[rid] = delta.error
                continue
            out = apply_delta(stream.out, delta)
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
                items[rid] = self._finish(stream, out)
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, stream in touched.items():
            item = items[rid] if rid in items else _snapshot(stream.out)
            batches.setdefault(stream._loop, []).append((stream._queue, item))
        for loop, batch in batches.items():
            _hand_over(loop, batch)

    def _finish(self, stream: RequestStream, out: RequestOutput) -> RequestOutput | BaseException:
        with self.metrics.lock:
            self.metrics.finished[out.finish_reason or "abort"] += 1
            self.metrics.prompt_tokens += stream.num_prompt_tokens
            self.metrics.generation_tokens += len(out.token_ids)
            self.metrics.e2e.observe(time.perf_counter() - stream.arrival)
        self._forget(stream)
        return out if out.finish_reason != "error" else RequestFailedError(
            f"the engine failed this request ({out.error!r}); other requests were not affected")

    def _forget(self, stream: RequestStream) -> None:
        with self._cond:
            self._streams.pop(stream.request_id, None)
            self._cond.notify_all()  # shutdown() waits for the streams to drain


def _engine_process_main(factory, commands, outputs, timeline_steps: int) -> None:
    """The engine process: build the engine, say "ready" (with what the caller's side needs), then run the
    core until told to stop. Ctrl-C and SIGTERM are the parent's to handle (it sends the aborts and the stop); a
    parent that dies closes the pipe, which ends this process too."""
    import signal

    import queue

    import torch

    # Ctrl-C, and SIGTERM sent to the whole process group (torchrun, systemd), are the parent's to handle: it
    # drains what is in flight and then sends the stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # one core left to the server's process: torch's CPU kernels wait for every thread of their pool, so a pool
    # as wide as the machine stalls whenever the HTTP loop runs (on 2 cores, a CPU engine's steps took 4x longer)
    if torch.get_num_threads() > 1:
        torch.set_num_threads(torch.get_num_threads() - 1)
    try:
        engine, extra = factory()
        core = _Core(engine, timeline_steps)
        outputs.send(("ready", (core.facts(), extra)))
    except BaseException as e:  # noqa: BLE001 - the parent shows the message
        outputs.send(("failed", e.args[0] if isinstance(e, WorkbenchError) and e.args else
                      f"the engine could not start: {e!r}"))
        return

    def take(block: bool) -> list[tuple]:
        taken = [commands.recv()] if block else []
        while commands.poll():
            taken.append(commands.recv())
        return taken

    # the engine never waits for the server: a sender thread writes to the pipe (pickling there too), so a
    # server that reads slowly gets several steps at once (merged per stream) instead of stalling the steps
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_all() -> None:
        while (message := outbox.get()) is not None:
            try:
                outputs.send(message)
            except OSError:  # the parent is gone; the core notices on its next read of the commands
                return

    sender = threading.Thread(target=send_all, name="workbench-engine-sender", daemon=True)
    sender.start()

    def emit(deltas: list[RequestDelta], gauges: dict[str, float]) -> None:
        for delta in deltas:  # what failed a request crosses the pipe as a message, not as its own class
            if delta.error is not None and not isinstance(delta.error, WorkbenchError):
                delta.error = WorkbenchError(f"{type(delta.error).__name__}: {delta.error}")
        outbox.put(("step", (deltas, gauges)))

    last = ("stopped", None)
    try:
        core.run(take, emit)
    except EOFError:  # the parent is gone
        last = None
    except BaseException as e:  # noqa: BLE001 - a broken engine: the parent fails every request with it
        log.exception("the engine stopped after an error; requests are refused from now on")
        last = ("error", f"{type(e).__name__}: {e}")
    finally:
        close = getattr(getattr(engine.executor, "tensor_parallel", None), "close", None)
        if close is not None:
            close()
    if last is not None:
        outbox.put(last)
    outbox.put(None)
    sender.join(30)


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
           "REFUSED", "RequestFailedError", "RequestStream", "merge_streams"]
