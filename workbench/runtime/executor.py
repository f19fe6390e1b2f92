"""The executor: the one runtime module that owns the device (the KV cache memory and the program).

    ex = Executor(program, num_blocks=1024)
    logits = ex.execute(scheduler_output)    # [requests that sample, vocab]: one row each, in schedule order

A step runs the graph once over a flat batch: every scheduled request's new tokens back to back, with the
attention metadata the paged graph reads (see ``paged_cache``): positions, the cache slot of each new
token (from the request's block table), padded block tables, sequence lengths after the step and where
each request's tokens start. The KV cache is allocated once, ``num_blocks`` blocks per layer, in the
graph's cache dtype (an FP8 cache when the precision plan says so). Logits are kept only at the last new
token of the requests whose chunk reaches their last token (the others are mid-prompt chunks).

**CUDA graphs.** On a GPU, a step made only of decodes replays a captured graph: one per batch size in
``graph_batch_sizes`` (a step of b decodes runs in the smallest size >= b, the rest of the rows padding
that writes to and reads from a scratch block the block manager never hands out). The inputs are copied
into the graph's static buffers; block tables are padded to ``max_model_len`` tokens' worth of blocks
(steps with longer tables, and every step with a prompt chunk, run eagerly). A captured step launches no
Python per node: the host cost of ~1000 kernel launches is what it removes.
"""

from __future__ import annotations

import torch

from ..errors import WorkbenchError
from ..graph.ir import dtype_from_name
from .scheduler import SchedulerOutput


#: Decode batch sizes captured as CUDA graphs (a step of b decodes replays the smallest bucket >= b).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class Executor:
    def __init__(self, program, num_blocks: int, *, cuda_graphs: bool | None = None,
                 graph_batch_sizes=GRAPH_BATCH_SIZES, max_model_len: int = 8192) -> None:
        paged = program.graph.meta.get("paged")
        if not paged:
            raise WorkbenchError("the runtime runs graphs with paged attention; run the insert_paged_attention pass "
                                 "(`workbench optimize`) first")
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

    def inputs(self, out: SchedulerOutput) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The graph inputs of one step, and the flat index of each sampling request's last new token."""
        ids, pos, slots, starts, lens, last = [], [], [], [0], [], []
        bs = self.block_size
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            c = req.num_computed_tokens
            ids += req.token_ids[c:c + n]
            pos += range(c, c + n)
            table = req.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            lens.append(c + n)
            if s.samples:
                last.append(starts[-1] - 1)
        width = max(len(s.request.block_table) for s in out.scheduled)
        tables = [s.request.block_table + [0] * (width - len(s.request.block_table)) for s in out.scheduled]

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=self.device)

        return {"input_ids": t([ids]), "position_ids": t([pos]), "slot_mapping": t(slots), "block_tables": t(tables),
                "seq_lens": t(lens), "query_start_loc": t(starts), **self.cache}, last

    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        if out.empty:
            raise WorkbenchError("nothing was scheduled this step; check the scheduler output before executing")
        bucket = self._bucket(out)
        if bucket is not None:
            return self._replay(out, bucket)
        inputs, last = self.inputs(out)
        (logits,) = self.program.run(**inputs)
        return logits[0, last].float()

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

        return {"input_ids": t([[0] * b]), "position_ids": t([[0] * b]),
                "slot_mapping": t([scratch * self.block_size] * b),
                "block_tables": torch.full((b, self.table_width), scratch, dtype=torch.long, device=dev),
                "seq_lens": t([1] * b), "query_start_loc": t(list(range(b + 1)))}

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

    def _replay(self, out: SchedulerOutput, b: int) -> torch.Tensor:
        if b not in self._graphs:
            self._capture(b)
        graph, static, logits = self._graphs[b]
        # the step's rows, then padding rows, built on the host and copied in with one transfer per buffer
        n, bs, scratch = len(out.scheduled), self.block_size, self.num_blocks
        ids, pos, slots, lens = [], [], [], []
        tables = torch.full((b, self.table_width), scratch, dtype=torch.long)
        for i, s in enumerate(out.scheduled):
            req = s.request
            c = req.num_computed_tokens
            ids.append(req.token_ids[c])
            pos.append(c)
            slots.append(req.block_table[c // bs] * bs + c % bs)
            lens.append(c + 1)
            tables[i, :len(req.block_table)] = torch.tensor(req.block_table, dtype=torch.long)
        pad = b - n
        host = {"input_ids": torch.tensor([ids + [0] * pad]), "position_ids": torch.tensor([pos + [0] * pad]),
                "slot_mapping": torch.tensor(slots + [scratch * bs] * pad), "block_tables": tables,
                "seq_lens": torch.tensor(lens + [1] * pad)}
        for name, value in host.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        self.replays += 1
        return logits[0, :n].float()
