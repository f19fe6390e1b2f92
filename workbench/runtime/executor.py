"""The executor: the one runtime module that owns the device (the KV cache memory and the program).

    ex = Executor(program, num_blocks=1024)
    logits = ex.execute(scheduler_output)    # [requests that sample, vocab]: one row each, in schedule order

A step runs the graph once over a flat batch: every scheduled request's new tokens back to back, with the
attention metadata the paged graph reads (see ``paged_cache``): positions, the cache slot of each new
token (from the request's block table), padded block tables, sequence lengths after the step and where
each request's tokens start. The KV cache is allocated once, ``num_blocks`` blocks per layer, in the
graph's cache dtype (an FP8 cache when the precision plan says so).

**Logits only where a token is sampled.** The executor runs a copy of the graph whose lm_head reads the
hidden states of the rows named by one more input, ``logits_indices``: the last new token of each request
whose chunk reaches its last token. A prefill step of 8192 tokens then multiplies a few rows by the
vocabulary instead of all 8192 (for a 128k vocabulary, 8.6 TFLOP and 2 GiB of logits saved). The
workspace's graph keeps every row's logits (perplexity needs them).

**CUDA graphs.** On a GPU, a step made only of decodes replays a captured graph: one per batch size in
``graph_batch_sizes`` (a step of b decodes runs in the smallest size >= b, the rest of the rows padding
that writes to and reads from a scratch block the block manager never hands out). The inputs are copied
into the graph's static buffers; block tables are padded to ``max_model_len`` tokens' worth of blocks
(steps with longer tables, and every step with a prompt chunk, run eagerly). A captured step launches no
Python per node: the host cost of ~1000 kernel launches is what it removes.

**Never waiting for the GPU.** A step's inputs cross to the device in one copy from pinned memory, queued
without blocking, and ``execute`` returns the logits as a device tensor without synchronizing: the host
can prepare the next step while this one runs. A request's last token may still be a ``PLACEHOLDER``,
sampled by the step before and not yet seen by the host: ``feed`` gives that step's token tensor (on the
device) and each request's row in it, and the token is copied into this step's inputs on the device.
"""

from __future__ import annotations

import copy

import torch

from ..errors import WorkbenchError
from ..graph.ir import Node, Ref, TensorSpec, dtype_from_name
from .request import PLACEHOLDER
from .sampling import to_device
from .scheduler import SchedulerOutput


#: Decode batch sizes captured as CUDA graphs (a step of b decodes replays the smallest bucket >= b).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def sampled_rows_program(program):
    """``program`` with its lm_head (the graph's last linear) reading only the rows ``logits_indices`` names."""
    from ..graph.executor import Program
    from ..kernels.autotune import TunedChoices

    graph = copy.deepcopy(program.graph)
    head = next((n for n in reversed(graph.nodes) if n.op.endswith("linear") or n.op.endswith("linear.default")),
                None)
    x = head.args[0] if head is not None and head.args else None
    spec = graph.specs().get(x.name) if isinstance(x, Ref) else None
    if spec is None or len(spec.shape) != 3:
        return program  # not the [1, tokens, hidden] -> lm_head shape this knows: every row's logits
    graph.inputs["logits_indices"] = TensorSpec(["logits_rows"], "int64")
    graph.dims["logits_rows"] = {"min": 1, "max": 1 << 20}
    rows = Node(f"{head.name}_rows", "aten.index_select.default", [x, 1, Ref("logits_indices")], {},
                [TensorSpec([spec.shape[0], "logits_rows", spec.shape[2]], spec.dtype)], head.module, head.layer)
    graph.nodes.insert(graph.nodes.index(head), rows)
    head.args = [Ref(rows.name), *head.args[1:]]
    if head.out is not None:
        head.outputs = [TensorSpec([head.out.shape[0], "logits_rows", *head.out.shape[2:]], head.out.dtype),
                        *head.outputs[1:]]
    # lm_head was tuned for a bucket's token count, not a few rows: its default tactic (cuBLAS) runs instead
    if program.tuned is not None:
        choices = TunedChoices(list(program.tuned.edges),
                               [{k: v for k, v in c.items() if k != head.name} for c in program.tuned.choices])
        return Program(graph, program.params, device=program.device, tactics=program.tactics, choices=choices)
    return Program(graph, program.params, device=program.device, tactics=program.tactics)


class Executor:
    def __init__(self, program, num_blocks: int, *, cuda_graphs: bool | None = None,
                 graph_batch_sizes=GRAPH_BATCH_SIZES, max_model_len: int = 8192) -> None:
        paged = program.graph.meta.get("paged")
        if not paged:
            raise WorkbenchError("the runtime runs graphs with paged attention; run the insert_paged_attention pass "
                                 "(`workbench optimize`) first")
        program = sampled_rows_program(program)
        self.rows_only = "logits_indices" in program.graph.inputs
        self.program, self.num_blocks = program, num_blocks
        self.block_size = paged["block_size"]
        self.device = program.device
        # one block more than the block manager hands out: the scratch block that padding rows of a
        # CUDA-graph step write to and read from
        shape = (2, num_blocks + 1, self.block_size, paged["kv_heads"], paged["head_dim"])
        dtype = dtype_from_name(paged["dtype"])
        self.cache = {f"kv_cache_{i}": torch.zeros(shape, dtype=dtype, device=self.device) for i in paged["layers"]}
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise WorkbenchError("CUDA graphs need a CUDA device; run without cuda_graphs on the CPU")
        self.graph_batch_sizes = sorted(graph_batch_sizes)
        self.table_width = -(-max_model_len // self.block_size)
        self._graphs: dict[int, tuple] = {}
        self._pool = None
        self.replays = 0

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def _stage(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Host lists as device tensors, with one copy (from pinned memory, queued without blocking)."""
        flat = to_device([x for part in parts for x in part], self.device)
        return list(flat.split([len(part) for part in parts]))

    def _rows(self, out: SchedulerOutput, feed):
        """Per scheduled request: its new tokens (placeholders as 0), positions, slots and length, padded
        block tables, the flat index of each sampling request's last token, and the placeholder feeds
        (flat index in this step, row in the feeding step)."""
        ids, pos, slots, starts, lens, last, feed_at, feed_row = [], [], [], [0], [], [], [], []
        bs = self.block_size
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            c = req.num_computed_tokens
            tokens = req.token_slice(c, c + n)
            if tokens[-1] == PLACEHOLDER:  # sampled by the step still running: fed on the device
                if feed is None or req.request_id not in feed[1]:
                    raise WorkbenchError(f"request {req.request_id}: its last token is not sampled yet and no "
                                         "step feeds it; resolve the previous step first")
                feed_at.append(len(ids) + n - 1)
                feed_row.append(feed[1][req.request_id])
                tokens = tokens[:-1] + [0]
            ids += tokens
            pos += range(c, c + n)
            table = req.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            lens.append(c + n)
            if s.samples:
                last.append(starts[-1] - 1)
        return ids, pos, slots, starts, lens, last, feed_at, feed_row

    @staticmethod
    def _tables(out: SchedulerOutput, rows: int, fill: int) -> tuple[list[int], int]:
        """Block tables of the scheduled requests, then ``rows`` - len(scheduled) rows of ``fill``, all
        padded with ``fill`` to the longest; flattened, and that width."""
        width = max(len(s.request.block_table) for s in out.scheduled)
        flat = []
        for s in out.scheduled:
            flat += s.request.block_table
            flat += [fill] * (width - len(s.request.block_table))
        flat += [fill] * (width * (rows - len(out.scheduled)))
        return flat, width

    def inputs(self, out: SchedulerOutput, feed=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The graph inputs of one step, and the flat index of each sampling request's last new token (on
        the device)."""
        ids, pos, slots, starts, lens, last, feed_at, feed_row = self._rows(out, feed)
        tables, width = self._tables(out, len(out.scheduled), 0)
        d_ids, d_pos, d_slots, d_tables, d_lens, d_starts, d_last, d_at, d_row = self._stage(
            [ids, pos, slots, tables, lens, starts, last, feed_at, feed_row])
        if feed_at:
            d_ids.index_copy_(0, d_at, feed[0].index_select(0, d_row))
        inputs = {"input_ids": d_ids[None], "position_ids": d_pos[None], "slot_mapping": d_slots,
                  "block_tables": d_tables.view(len(out.scheduled), width), "seq_lens": d_lens,
                  "query_start_loc": d_starts, **self.cache}
        if self.rows_only:
            inputs["logits_indices"] = d_last
        return inputs, d_last

    @torch.no_grad()
    def execute(self, out: SchedulerOutput, feed: tuple[torch.Tensor, dict[str, int]] | None = None) -> torch.Tensor:
        """Run one step; the logits ([sampling requests, vocab], float32, on the device) of the requests whose
        chunk reaches their last token, in schedule order. ``feed``: see the module docstring."""
        if out.empty:
            raise WorkbenchError("nothing was scheduled this step; check the scheduler output before executing")
        bucket = self._bucket(out)
        if bucket is not None:
            return self._replay(out, bucket, feed)
        inputs, last = self.inputs(out, feed)
        (logits,) = self.program.run(**inputs)
        return logits[0].float() if self.rows_only else logits[0].index_select(0, last).float()

    # ---- CUDA graphs for decode steps -------------------------------------------------------------------
    def _bucket(self, out: SchedulerOutput) -> int | None:
        """The captured batch size a pure-decode step runs in, or None to run it eagerly."""
        if not self.cuda_graphs or not all(s.num_new_tokens == 1 and s.samples for s in out.scheduled):
            return None
        n = len(out.scheduled)
        if n > self.graph_batch_sizes[-1] or any(len(s.request.block_table) > self.table_width for s in out.scheduled):
            return None
        return next(b for b in self.graph_batch_sizes if b >= n)

    def capture(self, batch_sizes=None) -> None:
        """Capture the decode step for each batch size (largest first, one memory pool for all)."""
        for b in sorted(batch_sizes or self.graph_batch_sizes, reverse=True):
            if b not in self._graphs:
                self._capture(b)

    def _padding(self, b: int) -> dict[str, torch.Tensor]:
        """Inputs of b padding decode rows: position 0 of the scratch block."""
        dev, scratch = self.device, self.num_blocks

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        inputs = {"input_ids": t([[0] * b]), "position_ids": t([[0] * b]),
                  "slot_mapping": t([scratch * self.block_size] * b),
                  "block_tables": torch.full((b, self.table_width), scratch, dtype=torch.long, device=dev),
                  "seq_lens": t([1] * b), "query_start_loc": t(list(range(b + 1)))}
        if self.rows_only:  # a decode step samples every row
            inputs["logits_indices"] = t(list(range(b)))
        return inputs

    def _capture(self, b: int) -> None:
        static = self._padding(b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (Triton compiles, allocator settles)
                self.program.run(**static, **self.cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            (logits,) = self.program.run(**static, **self.cache)
        self._graphs[b] = (graph, static, logits)

    def _replay(self, out: SchedulerOutput, b: int, feed) -> torch.Tensor:
        if b not in self._graphs:
            self._capture(b)
        graph, static, logits = self._graphs[b]
        # the step's rows then padding rows (position 0 of the scratch block), in one copy; block tables
        # only as wide as this step's longest (entries past a row's length are never read)
        n, pad, scratch = len(out.scheduled), b - len(out.scheduled), self.num_blocks
        ids, pos, slots, _, lens, _, feed_at, feed_row = self._rows(out, feed)
        tables, width = self._tables(out, b, scratch)
        d_ids, d_pos, d_slots, d_lens, d_tables, d_at, d_row = self._stage(
            [ids + [0] * pad, pos + [0] * pad, slots + [scratch * self.block_size] * pad, lens + [1] * pad, tables,
             feed_at, feed_row])
        if feed_at:
            d_ids.index_copy_(0, d_at, feed[0].index_select(0, d_row))
        static["input_ids"][0].copy_(d_ids)
        static["position_ids"][0].copy_(d_pos)
        static["slot_mapping"].copy_(d_slots)
        static["seq_lens"].copy_(d_lens)
        static["block_tables"][:, :width].copy_(d_tables.view(b, width))
        graph.replay()
        self.replays += 1
        return logits[0, :n].float()
