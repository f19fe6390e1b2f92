"""The step-level engine and the offline API: requests in, tokens and text out, in-flight batching between.

    llm = LLM("ws/")                                        # a workspace (its latest graph) or a Program
    outs = llm.generate(["Hello", "The capital of"], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].metrics        # per request
    llm.engine.timeline()                                   # one row per step (see ``timeline``)

    engine = LLMEngine(program, tokenizer)                  # what a server drives
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished:
        for out in engine.step(): ...                       # outputs of the requests that advanced
    engine.abort("r1")

Each ``step``: the scheduler picks the step's tokens (``scheduler``), the executor runs the graph over
them (``executor``), the sampler draws a token for each request whose chunk reached its last token
(``sampling``: per-request seeds make a request's tokens independent of what it is batched with), and
each new token is detokenized incrementally and checked against the request's stop conditions. The
step is recorded (``timeline``).

**Asynchronous scheduling** (``async_scheduling``, on by default on a GPU): the host never waits for the
step it has just launched. ``step`` schedules and launches step N, whose inputs take the tokens of step
N-1 straight from the device (they are ``PLACEHOLDER``s in the requests until then), and only then reads
step N-1's tokens back, detokenizes them and checks stops, while the GPU runs step N. The host's work
hides behind the GPU's, which is what batch-1 decode needs to reach the HBM roofline. The price: a
request that stops on a token (EOS, a stop string) has one more token computed and thrown away, and its
blocks are freed a step later. The tokens are those of the synchronous engine (tested).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import WorkbenchError
from .block_manager import BlockManager
from .capacity import DEFAULT_MEMORY_FRACTION
from .executor import Executor, graph_token_sizes as default_token_sizes
from .request import PLACEHOLDER, Request, Status
from .sampling import (IncrementalDetokenizer, PendingSample, ReadySample, SampleOutput, Sampler, SamplingParams,
                       check_stop, make_generator, suppressed_tokens)
from .scheduler import Scheduler, SchedulerConfig


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]  # one list shared by all of a request's outputs: read it, do not change it
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None  # finish_reason "error": what failed this request alone


@dataclass
class RequestDelta:
    """What a request gained since its previous delta (``LLMEngine.step(deltas=True)``): the new token ids and
    their log-probs, and its text as ``text[:text_keep] + text_tail`` of the previous text (a stop string can
    take back characters already sent). A server streams deltas instead of cumulative ``RequestOutput``s, whose
    copies grow with every token; ``apply_delta`` rebuilds the cumulative output on the receiving side."""
    request_id: str
    token_ids: list[int]
    text_keep: int
    text_tail: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] | None = None  # with the first token and when finished; None between
    error: BaseException | None = None


def apply_delta(out: RequestOutput, delta: RequestDelta) -> RequestOutput:
    """``out`` (a request's output so far, changed in place) advanced by ``delta``; returns ``out``."""
    out.token_ids += delta.token_ids
    out.logprobs += delta.logprobs
    out.top_logprobs += delta.top_logprobs
    out.text = out.text[:delta.text_keep] + delta.text_tail
    out.finished, out.finish_reason, out.error = delta.finished, delta.finish_reason, delta.error
    if delta.metrics is not None:
        out.metrics = delta.metrics
    return out


def check_token_ids(vocab: int | None, ids: list[int], stop_token_ids=()) -> None:
    """Refuse prompt or stop token ids outside a vocabulary of ``vocab`` tokens (``LLMEngine.check_token_ids``)."""
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
                or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise WorkbenchError(f"token id {bad!r} is not in the vocabulary (0 to {vocab - 1})" if vocab else
                             f"token id {bad!r} is not a non-negative integer")
    bad = next((t for t in stop_token_ids if vocab is not None and t >= vocab), None)
    if bad is not None:
        raise WorkbenchError(f"stop_token_ids: {bad} is not in the vocabulary (0 to {vocab - 1})")


@dataclass(eq=False)
class _State:
    """What the engine keeps per request beyond the scheduler's record."""
    request: Request
    params: SamplingParams
    prompt: str | None
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    first_token_time: float | None = None
    finished_time: float | None = None
    finish_reason: str | None = None
    prompt_ids: list[int] = field(default_factory=list)  # copied once: every output of the request shares it
    error: BaseException | None = None
    sent: tuple[int, int, int] = (0, 0, 0)  # token ids, text characters and top log-probs its deltas carried


@dataclass(eq=False)
class _Launched:
    """A step on its way: the requests that sample (in row order), their rows by id, and their draw."""
    requests: list[Request]
    rows: dict[str, int]
    sample: PendingSample
    failed: dict[str, BaseException] = field(default_factory=dict)  # rows whose draw raised: those requests fail


class LLMEngine:
    def __init__(self, program, tokenizer=None, *, num_blocks: int | None = None,
                 config: SchedulerConfig | None = None, limits=None, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                 prefix_caching: bool = True, eos_token_id: int | None = None, cuda_graphs: bool | None = None,
                 async_scheduling: bool | None = None, max_model_len: int | None = None,
                 graph_token_sizes=None, emulate_graphs: bool = False, on_executor=None) -> None:
        """``limits`` (an engine's ``EngineLimits``, the runtime's config record): the scheduler's budget and
        sequence count and the longest request, unless ``config`` / ``max_model_len`` say otherwise.
        ``num_blocks`` (default: the capacity planner's ``runtime_plan``: ``memory_fraction`` of the GPU's free
        memory, a fixed budget on the CPU; ``capacity_plan`` keeps it) sizes the KV cache.
        ``cuda_graphs`` (default: on a GPU): every step replays a captured graph (see ``executor``), all
        captured here; ``graph_token_sizes`` are the token counts captured for steps with prompt chunks
        (default: ``graph_token_sizes(max_num_batched_tokens)``; ``()`` runs those steps eagerly).
        ``emulate_graphs``: the CPU test of that path (the graphs' padded inputs, run node by node).
        ``on_executor(executor)`` runs once the executor exists, before any graph is captured (a tensor-parallel
        engine starts its other ranks there: they capture each graph with rank 0)."""
        if limits is not None:
            config = config or SchedulerConfig(max_num_batched_tokens=limits.max_num_batched_tokens,
                                               max_num_seqs=limits.max_num_seqs)
            max_model_len = max_model_len or limits.max_model_len
        #: the longest request (prompt + max_tokens) accepted; None: the cache's size alone limits it
        self.max_model_len = max_model_len
        self.vocab_size = program.graph.meta.get("config", {}).get("vocab_size")
        #: the ranks the program is a shard of (1: one device); each step record carries it
        self.tensor_parallel_size = int(program.graph.meta.get("tensor_parallel", {}).get("size", 1))
        config = config or SchedulerConfig()
        #: the capacity planner's plan when it sized the KV cache (None when ``num_blocks`` was given)
        self.capacity_plan = None
        if num_blocks is None:
            from ..graph.paged import PagedLayout
            from .capacity import runtime_plan

            context = max_model_len or int(program.graph.meta.get("config", {}).get("max_position_embeddings") or 8192)
            self.capacity_plan = runtime_plan(PagedLayout.from_graph(program.graph), program.device,
                                              max_model_len=context, max_num_seqs=config.max_num_seqs,
                                              memory_fraction=memory_fraction)
            num_blocks = self.capacity_plan.num_blocks
        if graph_token_sizes is None:
            graph_token_sizes = default_token_sizes(config.max_num_batched_tokens)
        self.executor = Executor(program, num_blocks, cuda_graphs=cuda_graphs, graph_token_sizes=graph_token_sizes,
                                 max_seqs=config.max_num_seqs, emulate_graphs=emulate_graphs,
                                 **({"max_model_len": max_model_len} if max_model_len else {}))
        if on_executor is not None:
            on_executor(self.executor)
        self.async_scheduling = (self.executor.device.type == "cuda" if async_scheduling is None
                                 else async_scheduling)
        self._pending: _Launched | None = None
        self.scheduler = Scheduler(BlockManager(num_blocks, self.executor.block_size, prefix_caching=prefix_caching),
                                   config)
        if self.executor.cuda_graphs:  # every graph the scheduler's steps can run in, captured up front
            sizes = self.executor.graph_batch_sizes
            top = next((b for b in sizes if b >= config.max_num_seqs), sizes[-1])
            self.executor.capture([b for b in sizes if b <= top], progress=True)
        self.tokenizer = tokenizer
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
        self.eos_token_id = eos_token_id
        self.sampler = Sampler()
        self.states: dict[str, _State] = {}
        self.steps: list[dict[str, Any]] = []  # the timeline; a server may trim old rows (numbers stay unique)
        self.num_steps = 0
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None, *,
                    arrival: float | None = None) -> str:
        params = params or SamplingParams()
        if request_id is None:  # the next automatic id no caller has taken
            request_id = str(next(self._ids))
            while request_id in self.states:
                request_id = str(next(self._ids))
        request_id = str(request_id)
        if request_id in self.states:
            raise WorkbenchError(f"request id {request_id!r} is already in use by this engine; give each request "
                                 "its own id")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise WorkbenchError("this engine has no tokenizer, so prompts must be token ids (a list of ints)")
            text, ids = prompt, self.tokenizer(prompt).input_ids
        else:
            text, ids = None, [int(t) for t in prompt]
        self.check_token_ids(ids, params.stop_token_ids)
        if self.max_model_len is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise WorkbenchError(f"request {request_id!r}: its prompt ({len(ids)} tokens) plus max_tokens "
                                 f"({params.max_tokens}) is more than this engine's max_model_len "
                                 f"({self.max_model_len}); shorten the prompt or lower max_tokens")
        req = Request(request_id, ids, params.max_tokens, arrival=time.perf_counter() if arrival is None else arrival,
                      params=params)
        # all or nothing: whatever can refuse the request runs before the scheduler holds it
        generator = make_generator(params, self.executor.device)
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        self.scheduler.add(req)  # validates the request against the cache and the budget
        self.states[request_id] = _State(req, params, text, generator, detok, prompt_ids=list(ids))
        return request_id

    def check_token_ids(self, ids: list[int], stop_token_ids=()) -> None:
        """Refuse prompt or stop token ids outside the vocabulary: they would fail the shared step, not only
        their own request. Pure (no engine state changes): the server calls it before queueing a request."""
        check_token_ids(self.vocab_size, ids, stop_token_ids)

    def abort(self, request_id: str) -> None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            st = self.states[request_id]
            st.finish_reason, st.finished_time = "abort", time.perf_counter()
            if req.output_token_ids and req.output_token_ids[-1] == PLACEHOLDER:
                req.output_token_ids.pop()  # its step still runs; the token is dropped when read back

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._pending is not None

    # ---- one step -------------------------------------------------------------------------------------
    def step(self, *, finished_only: bool = False, deltas: bool = False) -> list[RequestOutput] | list[RequestDelta]:
        """Schedule and launch a step; return the outputs of the requests whose new token the host has
        just seen (this step's, or with asynchronous scheduling the previous step's); with
        ``finished_only``, of those that finished only. Each output copies its request's token ids and
        log-probs so far, which at hundreds of running requests with long outputs is milliseconds of host
        time a step: a caller that only waits for requests to finish (``LLM.generate``) skips it, and a
        streaming caller takes ``deltas`` (``RequestDelta``: what each request gained since its last delta)."""
        t0 = time.perf_counter()
        waiting_before = len(self.scheduler.waiting)
        out = self.scheduler.schedule()
        launched = self._launch(out) if not out.empty else None
        if self.async_scheduling:  # read the previous step back while this one runs
            outputs = self._resolve(self._pending, finished_only, deltas) if self._pending is not None else []
            self._advance(out, launched)
            self._pending = launched
        else:
            self._advance(out, launched)
            outputs = self._resolve(launched, finished_only, deltas) if launched is not None else []
        now = time.perf_counter()
        self.num_steps += 1
        self.steps.append({"step": self.num_steps - 1, "time": t0, "step_ms": (now - t0) * 1e3,
                           "prefill_tokens": out.num_prefill_tokens, "decode_tokens": out.num_decode_tokens,
                           "scheduled": len(out.scheduled), "running": len(self.scheduler.running),
                           "waiting": len(self.scheduler.waiting), "waiting_before": waiting_before,
                           "kv_usage": self.scheduler.bm.usage, "preempted": len(out.preempted),
                           "admitted": len(out.admitted), "finished": sum(o.finished for o in outputs),
                           "graph_tokens": self.executor.last_graph[0] if launched and self.executor.last_graph else 0,
                           "tensor_parallel_size": self.tensor_parallel_size})
        return outputs

    def _launch(self, out) -> _Launched:
        """Run the graph over the scheduled tokens and queue the draw of each sampling request's token."""
        feed = (self._pending.sample.tokens, self._pending.rows) if self._pending is not None else None
        logits = self.executor.execute(out, feed)
        requests = [s.request for s in out.scheduled if s.samples]
        states = [self.states[r.request_id] for r in requests]
        suppress = [suppressed_tokens(st.params, len(r.output_token_ids), self.eos_token_id)
                    for r, st in zip(requests, states)]
        params, generators = [st.params for st in states], [st.generator for st in states]
        failed: dict[str, BaseException] = {}
        try:
            sample = self.sampler.launch(logits, params, generators, suppress=suppress)
        except Exception:  # noqa: BLE001 - one request's draw may be at fault: find it, fail it alone
            sample = self._launch_by_row(logits, requests, params, generators, suppress, failed)
        return _Launched(requests, {r.request_id: i for i, r in enumerate(requests)}, sample, failed)

    def _launch_by_row(self, logits, requests, params, generators, suppress, failed) -> PendingSample:
        """The draw of a step whose batched draw raised, one row at a time: a row's draw depends only on its own
        logits, parameters and generator, so the rows that succeed get the tokens the batch would have given
        them; a row that raises alone goes into ``failed`` (its token, 0, is never read)."""
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(self.sampler.launch(logits[i:i + 1], params[i:i + 1], generators[i:i + 1],
                                                suppress=suppress[i:i + 1]).result())
            except Exception as e:  # noqa: BLE001 - this request's sampling fails; the others go on
                failed[req.request_id] = e
                rows.append(SampleOutput([0], [float("nan")], [None]))
        tokens = torch.tensor([r.token_ids[0] for r in rows], dtype=torch.long, device=logits.device)
        return ReadySample(tokens, SampleOutput([r.token_ids[0] for r in rows], [r.logprobs[0] for r in rows],
                                                [r.top_logprobs[0] for r in rows]))

    def _advance(self, out, launched: _Launched | None) -> None:
        """The bookkeeping of a launched step: requests advance, each sampling one gets a placeholder for
        its token, and one that reached max_tokens leaves the scheduler (its token is still to read)."""
        sampled = {rid: PLACEHOLDER for rid in launched.rows} if launched is not None else {}
        self.scheduler.update(out, sampled)
        for req in launched.requests if launched is not None else ():
            if req.status is Status.RUNNING and len(req.output_token_ids) >= req.max_tokens:
                self.scheduler.finish(req.request_id, Status.FINISHED_LENGTH)

    def _resolve(self, launched: _Launched, finished_only: bool = False,
                 deltas: bool = False) -> list[RequestOutput] | list[RequestDelta]:
        """Read a step's tokens back: fill the placeholders, detokenize, check stops, build the outputs."""
        result = launched.sample.result()
        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        for i, req in enumerate(launched.requests):
            st = self.states.get(req.request_id)
            if st is None or st.request is not req or st.finish_reason is not None:
                continue  # finished (a stop read back meanwhile), aborted or released: the token is dropped
            if not req.output_token_ids or req.output_token_ids[-1] != PLACEHOLDER:
                raise WorkbenchError(f"request {req.request_id}: no token waiting to be read back; report this bug")
            try:
                error = launched.failed.get(req.request_id)
                if error is not None:
                    raise error
                stop, reason = self._take_token(req, st, result, i, now)
            except Exception as e:  # noqa: BLE001 - a request's own failure (its draw, detokenizer, stop check)
                if req.output_token_ids and req.output_token_ids[-1] == PLACEHOLDER:
                    req.output_token_ids.pop()
                st.error, stop, reason = e, True, "error"
            if stop:
                st.finish_reason, st.finished_time = reason, now
                status = {"length": Status.FINISHED_LENGTH, "stop": Status.FINISHED_STOPPED}.get(
                    reason, Status.FINISHED_ABORTED)
                if req.request_id in self.scheduler.requests:
                    self.scheduler.finish(req.request_id, status)
                else:  # left the scheduler at max_tokens already; a stop on that last token says "stop"
                    req.status = status
            if stop or not finished_only:
                outputs.append(self._delta(st) if deltas else self._output(st))
        return outputs

    def _take_token(self, req: Request, st: _State, result: SampleOutput, i: int,
                    now: float) -> tuple[bool, str | None]:
        """Row ``i``'s token into its request: token, log-probs, text; whether (and why) the request stops."""
        token = result.token_ids[i]
        req.output_token_ids[-1] = token
        st.logprobs.append(result.logprobs[i])
        if st.params.logprobs is not None:
            st.top_logprobs.append(result.top_logprobs[i])
        if st.first_token_time is None:
            st.first_token_time = now
        delta = st.detok.add(token) if st.detok is not None else ""
        stop, reason, keep = check_stop(st.params, req.output_token_ids, token, st.text + delta, self.eos_token_id)
        st.text = (st.text + delta)[:keep]
        return stop, reason

    def _output(self, st: _State) -> RequestOutput:
        req = st.request
        finished = st.finish_reason is not None
        metrics = {"arrival": req.arrival, "first_token_time": st.first_token_time,
                   "finished_time": st.finished_time, "num_cached_tokens": req.num_cached_tokens,
                   "num_preemptions": req.num_preemptions}
        ids = req.output_token_ids
        ids = ids[:-1] if ids and ids[-1] == PLACEHOLDER else list(ids)  # a token not read back yet
        return RequestOutput(req.request_id, st.prompt, st.prompt_ids, ids, st.text, finished, st.finish_reason,
                             list(st.logprobs), list(st.top_logprobs), metrics, st.error)

    def _delta(self, st: _State) -> RequestDelta:
        req = st.request
        n_ids, n_text, n_top = st.sent
        ids = req.output_token_ids
        end = len(ids) - 1 if ids and ids[-1] == PLACEHOLDER else len(ids)  # a token not read back yet
        keep = min(n_text, len(st.text))
        finished = st.finish_reason is not None
        metrics = None
        if finished or (n_ids == 0 and end > 0):
            metrics = {"arrival": req.arrival, "first_token_time": st.first_token_time,
                       "finished_time": st.finished_time, "num_cached_tokens": req.num_cached_tokens,
                       "num_preemptions": req.num_preemptions}
        st.sent = (end, len(st.text), len(st.top_logprobs))
        return RequestDelta(req.request_id, ids[n_ids:end], keep, st.text[keep:], finished, st.finish_reason,
                            st.logprobs[n_ids:end], st.top_logprobs[n_top:], metrics, st.error)

    def delta(self, request_id: str) -> RequestDelta:
        """What a request gained since its previous delta (see ``RequestDelta``)."""
        if request_id not in self.states:
            raise WorkbenchError(f"no request {request_id!r} in this engine (never added, or released)")
        return self._delta(self.states[request_id])

    def output(self, request_id: str) -> RequestOutput:
        """The current state of any request this engine has seen (and not released)."""
        if request_id not in self.states:
            raise WorkbenchError(f"no request {request_id!r} in this engine (never added, or released)")
        return self._output(self.states[request_id])

    def release(self, request_id: str) -> RequestOutput:
        """Forget a finished (or aborted) request and return its final output; a long-running server calls
        this so the engine's memory does not grow with every request it has served. Its id can be reused."""
        out = self.output(request_id)
        if not out.finished:
            raise WorkbenchError(f"request {request_id!r} is still running; abort it before releasing it")
        del self.states[request_id]
        return out

    # ---- the timeline -----------------------------------------------------------------------------------
    def timeline(self):
        """One row per step: tokens (prefill, decode), requests (scheduled, running, waiting), KV usage,
        preemptions, admissions, finishes, the step's wall time and the tensor-parallel size it ran at (each
        rank ran the step over its shard; the KV usage is each rank's, the same on all)."""
        import pandas as pd

        return pd.DataFrame(self.steps)


class LLM:
    """Offline generation, as vLLM's ``LLM``: ``LLM(model).generate(prompts, params)``.

    ``model`` is an engine directory (``workbench build``/``export``), a workspace (its latest up-to-date graph), a
    model source (a named model such as ``"smollm2-135m"``, a preset, a Hugging Face directory, a GGUF file or a
    config.json: captured and optimized in memory, untuned) or a ``Program`` (pass its tokenizer); see
    ``workbench.runnable.open_runnable``. ``device="auto"`` is the GPU when there is one.

    The runtime's limits are the engine's (``EngineLimits``: the longest request, sequences and tokens per step);
    ``max_model_len``, ``max_num_seqs`` and ``max_num_batched_tokens`` override them, and ``config`` (a
    ``SchedulerConfig``) replaces the scheduler's settings whole. The KV cache holds ``num_blocks`` blocks, by
    default what ``memory_fraction`` of the GPU's free memory holds once the weights are loaded (the capacity
    planner, as ``workbench serve`` sizes it), or a fixed budget on the CPU. ``plugins``: modules or ``.py``
    files registering ops and passes, loaded first, with those of ``WORKBENCH_PLUGINS`` and the installed
    ``workbench.plugins`` entry points (``workbench.plugins``); an engine loads the plugins it was built with.
    ``tensor_parallel_size`` N > 1 shards the program over N ranks, ranks 1.. in worker processes
    (``runtime.tensor_parallel``); ``close()`` (or ``with LLM(...) as llm``) stops them. An engine directory runs at
    the size it was built for unless told otherwise (another size re-shards it, or is refused in one line), and
    each rank reads only its own slices of the engine's weights. Under ``torchrun --nproc-per-node N`` the size is
    N and the ranks are torchrun's: rank 0's ``LLM`` is the one that generates; on ranks 1.. ``LLM(...)`` runs rank
    0's steps until rank 0's closes, then ends the process (``SystemExit(0)``), so one script serves every rank.

    ``batch_invariant=True`` runs the batch-invariant mode, as vLLM's: every step, whatever its size, runs each op
    with one tactic and one config that gives a row the same result whatever rows share the step (Triton tiles, no
    GEMV, split-K or cuBLAS; attention reading every key from the cache, unsplit), so a prompt's tokens and logits
    are the same alone and in any batch. None (the default) takes the engine's setting (``workbench build
    --batch-invariant``). ``notes`` says which ops lost which tuned choice (``kernels/invariant.py``).
    """

    def __init__(self, model, *, tokenizer=None, device: str = "auto", stage: str = "latest",
                 num_blocks: int | None = None, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, config: SchedulerConfig | None = None,
                 prefix_caching: bool = True, dtype: str = "auto", kv_block_size: int | None = None,
                 cuda_graphs: bool | None = None, plugins=(), tensor_parallel_size: int | None = None,
                 batch_invariant: bool | None = None) -> None:
        import sys

        from ..plugins import load_plugins
        from ..runnable import open_runnable
        from .tensor_parallel import launched_size, run_torchrun_worker

        load_plugins(plugins)
        if run_torchrun_worker(device):  # torchrun's ranks 1..: rank 0's steps, until its LLM closes
            raise SystemExit(0)
        self.runnable = opened = open_runnable(model, device=device, stage=stage, tokenizer=tokenizer, dtype=dtype,
                                               kv_block_size=kv_block_size,
                                               tensor_parallel_size=launched_size(tensor_parallel_size, device),
                                               batch_invariant=batch_invariant)
        #: whether the batch-invariant mode runs (asked for, or the engine's setting)
        self.batch_invariant = opened.batch_invariant
        #: the Engine (limits, manifest, chat template) when ``model`` is an engine directory
        self.loaded_engine = opened.engine
        limits = opened.limits and opened.limits.narrowed(
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            fixed=opened.kind == "engine")
        self.limits = limits
        options = dict(num_blocks=num_blocks, config=config, limits=limits, memory_fraction=memory_fraction,
                       prefix_caching=prefix_caching, cuda_graphs=cuda_graphs)
        #: when the program runs on several ranks (ranks 1.. in worker processes): the reports of the sharding pass
        #: and the passes after it (``graph.passes.tensor_parallel.shard_and_fuse``); empty on one rank
        self.tp_reports = opened.sharding.reports if opened.sharding is not None else []
        if opened.sharding is not None:
            self.engine = sharded_engine(opened, **options)
        else:
            self.engine = LLMEngine(opened.program, opened.tokenizer, **options)
        # the executor's program repeats the lines open_runnable's GPU program noted: each once
        self.notes = opened.notes + [n for n in self.engine.executor.notes if n not in opened.notes]
        if self.engine.executor.device.type == "cuda":  # what vLLM logs at start-up: the cache and what it holds
            plan = self.engine.capacity_plan
            for line in ([plan.summary()] if plan is not None else []) + self.engine.executor.notes:
                print(f"workbench: {line}", file=sys.stderr, flush=True)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the tensor-parallel ranks (if any); the engine takes no more steps after."""
        workers = getattr(getattr(getattr(self, "engine", None), "executor", None), "tensor_parallel", None)
        if workers is not None:
            workers.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` (strings or token-id lists) to completion; outputs in the prompts' order."""
        if isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise WorkbenchError(f"{len(prompts)} prompts but {len(params)} sampling params; give one, or one each")
        ids = [self.engine.add_request(None, p, sp) for p, sp in zip(prompts, params)]
        from ..progress import progress_bar

        with progress_bar(len(ids), "generate", "request", enabled=progress) as bar:
            while self.engine.has_unfinished:
                done = len(self.engine.step(finished_only=True))
                if done:
                    bar.update(done)
        return [self.engine.output(i) for i in ids]



def sharded_engine(runnable, *, cuda_graphs: bool | None = None, **engine_options) -> LLMEngine:
    """An ``LLMEngine`` of rank 0 of ``runnable`` (``open_runnable(..., tensor_parallel_size=N)``: rank 0's shard),
    with ranks 1.. started as its workers (``runtime.tensor_parallel``: torchrun's ranks, or spawned) before any
    step graph is captured, so that every rank captures and replays the same ones. ``engine_options`` are
    ``LLMEngine``'s; steps are synchronous. Step graphs across ranks are opt-in (``cuda_graphs=True``; on the CPU
    ``emulate_graphs=True``): NCCL's capture of the collectives has not been run on GPUs yet, so by default every
    rank runs every step eagerly."""
    from .tensor_parallel import start_workers

    if runnable.program.batch_invariant:
        raise WorkbenchError("the batch-invariant mode runs on one device (a tensor-parallel all-reduce picks its "
                             "algorithm by message size): leave tensor parallelism at 1 or the mode off")
    engine = LLMEngine(runnable.program, runnable.tokenizer, async_scheduling=False, cuda_graphs=bool(cuda_graphs),
                       on_executor=lambda executor: start_workers(executor, runnable.sharding), **engine_options)
    executor = engine.executor
    if executor.device.type == "cuda" and not executor.graphs_enabled:  # what the start-up log says of its speed
        executor.notes.append(f"tensor parallelism over {runnable.sharding.size} ranks: every step runs eagerly on "
                              "every rank (step graphs across ranks: cuda_graphs=True, not yet run on GPUs)")
    return engine
