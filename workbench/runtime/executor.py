"""The executor: the one runtime module that owns the device (the KV cache memory and the program).

    ex = Executor(program, num_blocks=1024)
    logits = ex.execute(scheduler_output)    # [requests that sample, vocab]: one row each, in schedule order

A step runs the graph once over a flat batch: every scheduled request's new tokens back to back, with the
attention metadata the paged graph reads (``graph.paged.step_inputs`` builds it, as it does for every
other driver of a paged graph): positions, the cache slot of each new token (from the request's block
table), padded block tables, sequence lengths after the step and where each request's tokens start. The
KV cache is allocated once (``PagedLayout.new_caches``), ``num_blocks`` blocks per layer, in the graph's
cache dtype (an FP8 cache when the precision plan says so).

**Logits only where a token is sampled.** The executor runs a copy of the graph whose lm_head reads the
hidden states of the rows named by one more input, ``logits_indices`` (the ``select_logits_rows`` pass,
``graph/passes/rows.py``): the last new token of each request whose chunk reaches its last token. A prefill step of 8192 tokens then multiplies a few rows by the
vocabulary instead of all 8192 (the lm_head is the widest linear of a model with a large vocabulary, and
its logits, tokens × vocabulary, the largest activation). The workspace's graph keeps every row's logits
(perplexity needs them).

**CUDA graphs, for every step.** On a GPU a step replays a captured graph: a step made only of decodes in
the graph of the smallest batch size in ``graph_batch_sizes`` that holds it, any other step (prompt chunks,
or more decodes than the largest batch size) in the graph of the smallest token count in
``graph_token_sizes`` that holds its tokens. A graph is captured for a fixed number of tokens T and of
sequences S (the batch size for decode graphs, ``max_seqs`` for the others); a step with fewer fills the
rest with padding: its real sequences first, then empty ones (no tokens: their attention programs exit at
once), then one padding sequence at row S that owns the padding tokens. Padding tokens write their K/V to
a scratch block the block manager never hands out, and their rows' outputs are never read. This works
because the attention kernel's grid depends on T and S alone (each program finds its sequence on the
device), so nothing in a step depends on host values a graph would freeze. Block tables are padded to
``max_model_len`` tokens' worth of blocks; a step with a longer table, more tokens than the largest size or
more sequences than ``max_seqs`` runs eagerly, node by node. A captured step launches no Python per node:
the host cost of an 8B model's ~1000 kernel launches from Python is what it removes (BENCHMARKS.md,
2026-11-24, "every step in a CUDA graph").

**Never waiting for the GPU.** A step's inputs cross to the device in one copy from pinned memory, queued
without blocking, and ``execute`` returns the logits as a device tensor without synchronizing: the host
can prepare the next step while this one runs. A request's last token may still be a ``PLACEHOLDER``,
sampled by the step before and not yet seen by the host: ``feed`` gives that step's token tensor (on the
device) and each request's row in it, and the token is copied into this step's inputs on the device.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..errors import WorkbenchError
from ..graph.paged import RERUN_PASSES, PagedLayout, is_paged, step_inputs
from ..kernels.gemm import batch_invariant
from .request import PLACEHOLDER
from .sampling import to_device
from .scheduler import SchedulerOutput


#: Decode batch sizes captured as CUDA graphs (a step of b decodes replays the smallest bucket >= b).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
#: Graphs of at most this many tokens are warmed up side by side before they are captured (``Executor.warm_up``)
WARM_UP_TOKENS = 512


def graph_token_sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts to capture for steps with prompt chunks, up to ``max_tokens`` (the scheduler's budget):
    powers of two to 512, then steps of 512 to 4096 and of 1024 beyond, so padding stays under a third of a
    large step and the graphs stay few (15 for a budget of 8192)."""
    if max_tokens < 1:
        raise WorkbenchError(f"graph_token_sizes: max_tokens must be >= 1, not {max_tokens}")
    sizes = {64, 128, 256, 512, *range(1024, 4097, 512), *range(5120, max_tokens, 1024)}
    return tuple(sorted({t for t in sizes if t < max_tokens} | {max_tokens}))


def sampled_rows_program(program):
    """``program`` with its lm_head reading only the rows ``logits_indices`` names: the ``select_logits_rows``
    pass, checked numerically where the program runs on the CPU (on a GPU the check would hold every value of
    two forward passes in device memory before the KV cache is sized; the suite checks the pass on the CPU).
    The pass's report is the new program's ``rows_report``. The lm_head's tuned choice is dropped: it was
    tuned for a bucket's token count, not a few rows, so its default tactic runs instead; in the batch-invariant
    mode it keeps the one config it runs for every row count (the head node keeps its name)."""
    from ..graph.executor import Program
    from ..graph.passes import run_passes
    from ..kernels.autotune import TunedChoices

    if "logits_indices" in program.graph.inputs:  # selects its rows already (a tensor-parallel rank's, rank 0's)
        return program
    from ..distributed import current

    # checked on the CPU, but not inside a tensor-parallel group: the check's run would do collectives alone
    check = program.device.type == "cpu" and (current() is None or current().size == 1)
    graph, (report,) = run_passes(program.graph, program.params, ["select_logits_rows"], check=check,
                                  device=program.device)
    if not report.accepted:
        raise WorkbenchError(f"select_logits_rows changed the logits ({'; '.join(report.notes)}, first at "
                             f"{report.first_diverging}); report it with the graph's lm_head op")
    if not report.matches:
        return program  # no [batch, tokens, hidden] -> logits head this knows: every row's logits
    head = report.matches[0].replaced[0]  # the lm_head node the pass narrowed
    given = program.choices_given  # in the batch-invariant mode its selection is made again from these
    if isinstance(given, TunedChoices) and not program.batch_invariant:
        choices = TunedChoices(list(given.edges), [{k: v for k, v in c.items() if k != head} for c in given.choices])
    elif given is not None and not isinstance(given, TunedChoices) and not program.batch_invariant:
        choices = {k: v for k, v in given.items() if k != head}  # one mapping for every step
    else:
        choices = given
    rows = Program(graph, program.params, device=program.device, tactics=program.tactics, choices=choices,
                   graph_safe=program.graph_safe, batch_invariant=program.batch_invariant)
    rows.rows_report = report
    return rows


@contextlib.contextmanager
def _sync_errors():
    """torch's sync debug mode at "error" for the block: an op that synchronizes with the host raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@dataclass
class StaticStep:
    """One step's inputs as a graph of (T tokens, S sequences) takes them, padded, on the host: ``parts`` are the
    token ids, positions, slots, sequence lengths, query starts and sampling rows (each padded to T or S), and
    the ``sequences`` real sequences' block tables, ``table_width`` blocks each, flat."""

    sequences: int
    table_width: int
    parts: list[list[int]]


class Executor:
    def __init__(self, program, num_blocks: int, *, cuda_graphs: bool | None = None,
                 graph_batch_sizes=GRAPH_BATCH_SIZES, graph_token_sizes=(), max_seqs: int = 256,
                 max_model_len: int = 8192, emulate_graphs: bool = False) -> None:
        """``graph_token_sizes``: token counts captured for steps that are not all decodes (none: those run
        eagerly); ``max_seqs``: the most sequences such a step may have (the scheduler's max_num_seqs).
        ``emulate_graphs`` (for tests on the CPU): every step runs the way a graph would, on the same
        padded static inputs, but node by node instead of replayed."""
        if not is_paged(program.graph):
            raise WorkbenchError(f"the runtime runs graphs with paged attention, and this one has none: {RERUN_PASSES}")
        program = sampled_rows_program(program)
        self.cuda_graphs = program.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and program.device.type != "cuda":
            raise WorkbenchError("CUDA graphs need a CUDA device; run without cuda_graphs on the CPU")
        if program.device.type == "cuda" and not program.graph_safe:  # tuned where safe, GPU defaults else
            program = program.for_gpu_steps()
        #: one line per reason an implementation was replaced or a step cannot be captured (for logs)
        self.notes = list(program.notes)
        self.rows_only = "logits_indices" in program.graph.inputs
        self.program, self.num_blocks = program, num_blocks
        self.layout = PagedLayout.from_graph(program.graph)
        self.block_size = self.layout.block_size
        self.device = program.device
        # one block more than the block manager hands out: the scratch block that padding rows of a
        # CUDA-graph step write to and read from
        self.cache = self.layout.new_caches(num_blocks + 1, self.device)
        if emulate_graphs and self.cuda_graphs:
            raise WorkbenchError("emulate_graphs stands in for CUDA graphs where there are none; not both")
        self.emulate_graphs = emulate_graphs
        self.graph_batch_sizes = sorted(graph_batch_sizes)
        # a graph with every row's logits would hold [tokens, vocab] of them: only the rows-only program
        self.graph_token_sizes = sorted(graph_token_sizes) if self.rows_only else []
        if max_seqs < 1:
            raise WorkbenchError(f"max_seqs must be >= 1, not {max_seqs}")
        self.max_seqs = max_seqs
        self.table_width = -(-max_model_len // self.block_size)
        self._graphs: dict[tuple[int, int], tuple] = {}  # (tokens, sequences) -> (graph, static inputs, logits)
        self._pool = None
        self.replays = 0
        self.last_graph: tuple[int, int] | None = None  # the (tokens, sequences) graph the last step ran in
        self._unsafe: dict[int, list[str]] = {}  # token count -> nodes that may not be captured at it
        #: ``runtime.tensor_parallel.TPWorkers`` when this is rank 0 of a sharded program (each step it runs, and
        #: each graph it captures, the other ranks run and capture too)
        self.tensor_parallel = None
        # a program prepared for GPU steps knows which of its nodes a graph may not capture: steps running
        # one of those run eagerly (on the CPU, emulated graphs check the same when given such a program)
        self.checks_safety = self.graphs_enabled and self.program.graph_safe
        if self.checks_safety:
            unsafe = self.program.unsafe_nodes()
            if unsafe:
                self.notes.append(f"{len(unsafe)} node(s) have no CUDA-graph-safe implementation (e.g. {unsafe[0]}): "
                                  "steps that run them run eagerly")

    def uncapturable(self, tokens: int) -> list[str]:
        """The nodes a step of ``tokens`` tokens runs with an implementation a CUDA graph may not capture (its
        token bucket's plan); such a step runs eagerly."""
        if tokens not in self._unsafe:
            self._unsafe[tokens] = self.program.unsafe_nodes(tokens)
        return self._unsafe[tokens]

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def _stage(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Host lists as device tensors, with one copy (from pinned memory, queued without blocking)."""
        flat = to_device([x for part in parts for x in part], self.device)
        return list(flat.split([len(part) for part in parts]))

    def _rows(self, out: SchedulerOutput, feed, table_fill: int):
        """The step's metadata (``step_inputs``: placeholders as token 0, block tables padded with
        ``table_fill``), the flat index of each sampling request's last token, and the placeholder feeds (flat
        index in this step, row in the feeding step)."""
        seqs, last, feed_at, feed_row = [], [], [], []
        end = 0  # flat index past the request's new tokens
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            c = req.num_computed_tokens
            tokens = req.token_slice(c, c + n)
            end += n
            if tokens[-1] == PLACEHOLDER:  # sampled by the step still running: fed on the device
                if feed is None or req.request_id not in feed[1]:
                    raise WorkbenchError(f"request {req.request_id}: its last token is not sampled yet and no "
                                         "step feeds it; resolve the previous step first")
                feed_at.append(end - 1)
                feed_row.append(feed[1][req.request_id])
                tokens = tokens[:-1] + [0]
            seqs.append((c, tokens, req.block_table))
            if s.samples:
                last.append(end - 1)
        return step_inputs(self.block_size, seqs, table_fill=table_fill), last, feed_at, feed_row

    def inputs(self, out: SchedulerOutput, feed=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The graph inputs of one step, and the flat index of each sampling request's last new token (on
        the device)."""
        step, last, feed_at, feed_row = self._rows(out, feed, 0)
        d_ids, d_pos, d_slots, d_tables, d_lens, d_starts, d_last, d_at, d_row = self._stage(
            [step.input_ids, step.position_ids, step.slot_mapping, step.block_tables, step.seq_lens,
             step.query_start_loc, last, feed_at, feed_row])
        if feed_at:
            d_ids.index_copy_(0, d_at, feed[0].index_select(0, d_row))
        inputs = {"input_ids": d_ids[None], "position_ids": d_pos[None], "slot_mapping": d_slots,
                  "block_tables": d_tables.view(len(out.scheduled), step.table_width), "seq_lens": d_lens,
                  "query_start_loc": d_starts, **self.cache}
        if self.rows_only:
            inputs["logits_indices"] = d_last
        return inputs, d_last

    @torch.no_grad()
    def execute(self, out: SchedulerOutput, feed: tuple[torch.Tensor, dict[str, int]] | None = None) -> torch.Tensor:
        """Run one step; the logits ([sampling requests, vocab], on the device, in the graph's output dtype) of the
        requests whose chunk reaches their last token, in schedule order. ``feed``: see the module docstring.
        The sampler reads them as they come: a float32 copy of a 512-row bf16 step's logits (128k vocabulary)
        was a measurable share of a decode step (bench/engine_trace.py; BENCHMARKS.md, 2026-12-01, fifth entry,
        "an engine's decode step beyond its graph"). From a CUDA graph they are a view of its output buffer, valid
        until the next step is queued (work queued before that reads them)."""
        if out.empty:
            raise WorkbenchError("nothing was scheduled this step; check the scheduler output before executing")
        self.last_graph = key = self._graph_key(out)
        if key is not None:
            return self._replay(out, key, feed)
        inputs, last = self.inputs(out, feed)
        tp = self.tensor_parallel
        if tp is not None:  # the other ranks run the same step on their own caches
            tp.broadcast({k: v for k, v in inputs.items() if k not in self.cache})
        # CPU references: a request's rows do not depend on the others in the step
        with batch_invariant(), self._ranks_step():
            (logits,) = self.program.run(**inputs)
        return logits[0] if self.rows_only else logits[0].index_select(0, last)

    def _ranks_step(self):
        """Around this rank's part of a step its other ranks run too: a rank that died is named (no ranks: none)."""
        return self.tensor_parallel.step() if self.tensor_parallel is not None else contextlib.nullcontext()

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    @property
    def graphs_enabled(self) -> bool:
        return self.cuda_graphs or self.emulate_graphs

    def _graph_key(self, out: SchedulerOutput) -> tuple[int, int] | None:
        """The (tokens, sequences) graph a step runs in, or None to run it eagerly."""
        if not self.graphs_enabled:
            return None
        if any(len(s.request.block_table) > self.table_width for s in out.scheduled):
            return None
        n = len(out.scheduled)
        if all(s.num_new_tokens == 1 and s.samples for s in out.scheduled) and n <= self.graph_batch_sizes[-1]:
            b = next(b for b in self.graph_batch_sizes if b >= n)
            key = b, b
        else:
            tokens = out.num_tokens
            if n > self.max_seqs or not self.graph_token_sizes or tokens > self.graph_token_sizes[-1]:
                return None
            key = next(t for t in self.graph_token_sizes if t >= tokens), self.max_seqs
        return None if self.checks_safety and self.uncapturable(key[0]) else key

    def capture(self, batch_sizes=None, token_sizes=None, *, progress: bool = False) -> None:
        """Capture the decode graphs for ``batch_sizes`` (default: all) and the step graphs for
        ``token_sizes`` (default: all), largest first, in one memory pool (``progress``: a progress bar)."""
        from ..progress import progress_bar

        keys = [(b, b) for b in (self.graph_batch_sizes if batch_sizes is None else batch_sizes)]
        keys += [(t, self.max_seqs) for t in (self.graph_token_sizes if token_sizes is None else token_sizes)]
        todo = [k for k in sorted(set(keys), reverse=True) if k not in self._graphs
                and not (self.checks_safety and self.uncapturable(k[0]))]
        if self.cuda_graphs:
            self.warm_up(todo, progress=progress)
        with progress_bar(len(todo), "capture CUDA graphs", "graph", enabled=progress) as bar:
            for key in todo:
                self._capture(key)
                bar.update(1)

    def warm_up(self, keys, *, threads: int | None = None, max_tokens: int = WARM_UP_TOKENS,
                progress=False):
        """Run the padding-only step of each graph key of at most ``max_tokens`` tokens once, side by side on a pool
        of threads (``kernels/precompile.py``; ``threads`` defaults to ``compile_threads()``), so that the Triton
        kernels their captures need compile on every core instead of one graph after another (on a fresh machine,
        most of a start). Padding steps write only the scratch block.

        - The smallest step runs first, alone, on this thread: it compiles and loads the kernels every step shares
          (norms, rotary, the GEMMs of a config), which the pool's threads would otherwise compile side by side.
        - Memory: the steps in flight hold at most as many tokens (or logits rows) together as the largest of
          ``keys`` alone, the step whose capture the memory plan must already leave room for.
        - Larger steps are left to their captures. Nothing runs for a tensor-parallel rank 0 (its collectives
          pair up with the other ranks' one step at a time).

        Returns ``precompile``'s ``Precompiled`` (None where the pool did not run); failures are in ``notes``."""
        from ..kernels.precompile import compile_threads, precompile

        threads = compile_threads() if threads is None else threads
        if self.tensor_parallel is not None or threads <= 1:
            return None
        budget = max((max(k) for k in keys), default=0)  # a step's tokens, or its logits rows when more
        keys = sorted((k for k in keys if k[0] <= max_tokens and k not in self._graphs), key=max)
        if len(keys) < 2:
            return None
        self._warm_run(keys[0])
        room = threading.Condition()
        in_flight = [0]

        def bounded(key):
            need = max(key)
            with room:  # a step waits until the steps in flight leave room for it
                room.wait_for(lambda: in_flight[0] == 0 or in_flight[0] + need <= budget)
                in_flight[0] += need
            try:
                self._warm_run(key)
            finally:
                with room:
                    in_flight[0] -= need
                    room.notify_all()

        done = precompile([(bounded, (key,), {}, None) for key in keys[1:]], device=self.device, threads=threads,
                          progress=progress)
        if done is not None and done.failed:
            self.notes.append(f"warm-up before capture: {done.line()}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the steps' activations back to the device, for the graphs' pool
        return done

    def _warm_run(self, key: tuple[int, int]) -> None:
        self.program.run(**self._static(key), **self.cache)

    def _static(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The static inputs of a (T tokens, S sequences) graph, holding a step of padding only: S empty
        sequences, then the padding sequence (row S) with all T tokens, writing to the scratch block."""
        t, s = key
        dev, scratch = self.device, self.num_blocks
        width = max(self.table_width, -(-t // self.block_size))  # the padding sequence's table spans its tokens

        def full(shape, value):
            return torch.full(shape, value, dtype=torch.long, device=dev)

        inputs = {"input_ids": full((1, t), 0), "position_ids": full((1, t), 0),
                  "slot_mapping": full((t,), scratch * self.block_size),
                  "block_tables": full((s + 1, width), scratch),
                  "seq_lens": torch.tensor([0] * s + [t], dtype=torch.long, device=dev),
                  "query_start_loc": torch.tensor([0] * (s + 1) + [t], dtype=torch.long, device=dev)}
        if self.rows_only:  # one row per sequence: the step's sampling rows, then the last token's
            inputs["logits_indices"] = full((s,), t - 1)
        return inputs

    def _capture(self, key: tuple[int, int]) -> None:
        if self.tensor_parallel is not None:  # every rank captures the same graph at once: its collectives pair up
            self.tensor_parallel.capture(key)
        with self._ranks_step():
            self._capture_here(key)

    def _capture_here(self, key: tuple[int, int]) -> None:
        static = self._static(key)
        if self.emulate_graphs:
            self._graphs[key] = (None, static, None)
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.program.run(**static, **self.cache)  # warm up outside the graph (Triton compiles, lazy inits)
            # then a steady-state run in which anything that makes the host wait for the GPU (a .tolist(), an
            # .item(), a device-to-host copy: what a graph cannot capture) raises, naming the op in its traceback
            with _sync_errors():
                self.program.run(**static, **self.cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), _sync_errors():  # (entering the graph synchronizes)
            (logits,) = self.program.run(**static, **self.cache)
        self._graphs[key] = (graph, static, logits)

    def _replay(self, out: SchedulerOutput, key: tuple[int, int], feed) -> torch.Tensor:
        if key not in self._graphs:
            self._capture(key)
        # the step's sequences, empty ones to S, the padding sequence (row S) owning tokens n..T: all in one
        # copy. Block tables only as wide as this step's longest (entries past a row's length are never
        # read), rows past the step's stale (their sequences are empty); the padding row stays scratch.
        t, s = key
        n, scratch = len(out.scheduled), self.num_blocks
        step, last, feed_at, feed_row = self._rows(out, feed, scratch)
        used, pad = len(step.input_ids), t - len(step.input_ids)
        host = StaticStep(n, step.table_width,
                          [step.input_ids + [0] * pad, step.position_ids + [0] * pad,
                           step.slot_mapping + [scratch * self.block_size] * pad,
                           step.seq_lens + [0] * (s - n) + [pad], step.query_start_loc + [used] * (s - n) + [t],
                           last + [t - 1] * (s - len(last)), step.block_tables])
        tp = self.tensor_parallel
        if tp is not None:  # the other ranks replay the same graph on this step's inputs (theirs have no feed)
            if feed_at:
                raise WorkbenchError("a tensor-parallel step cannot take tokens sampled on the device: its other "
                                     "ranks replay from the host's inputs; run it with synchronous scheduling")
            tp.replay(key, host)
        with self._ranks_step():
            d_last, logits = self.replay_static(key, host, feed_at, feed_row, feed)
        if self.rows_only:
            return logits[0, :len(last)]
        return logits[0].index_select(0, d_last[:len(last)])

    def replay_static(self, key: tuple[int, int], host: "StaticStep", feed_at=(), feed_row=(), feed=None):
        """Copy a step's padded inputs (``host``) into graph ``key``'s static inputs, with one copy to the device,
        and replay it (emulated: run the program on them); the device copy of the sampling rows and the graph's
        logits. Ranks 1.. of a tensor-parallel engine replay their graph of each step through this, with rank 0's
        ``host``."""
        graph, static, logits = self._graphs[key]
        d_ids, d_pos, d_slots, d_lens, d_starts, d_last, d_tables, d_at, d_row = self._stage(
            [*host.parts, list(feed_at), list(feed_row)])
        if feed_at:
            d_ids.index_copy_(0, d_at, feed[0].index_select(0, d_row))
        n, width = host.sequences, host.table_width
        static["input_ids"][0].copy_(d_ids)
        static["position_ids"][0].copy_(d_pos)
        static["slot_mapping"].copy_(d_slots)
        static["seq_lens"].copy_(d_lens)
        static["query_start_loc"].copy_(d_starts)
        static["block_tables"][:n, :width].copy_(d_tables.view(n, width))
        if self.rows_only:
            static["logits_indices"].copy_(d_last)
        if graph is None:  # emulated: the same static inputs, run node by node
            (logits,) = self.program.run(**static, **self.cache)
        else:
            graph.replay()
        self.replays += 1
        return d_last, logits
