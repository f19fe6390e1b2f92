"""The executor: the one runtime module that owns the device (the KV cache memory and the program).

    ex = Executor(program, num_blocks=1024)
    logits = ex.execute(scheduler_output)    # [requests that sample, vocab]: one row each, in schedule order

A step runs the graph once over a flat batch: every scheduled request's new tokens back to back, with the
attention metadata the paged graph reads (see ``paged_cache``): positions, the cache slot of each new
token (from the request's block table), padded block tables, sequence lengths after the step and where
each request's tokens start. The KV cache is allocated once, ``num_blocks`` blocks per layer, in the
graph's cache dtype (an FP8 cache when the precision plan says so). Logits are kept only at the last new
token of the requests whose chunk reaches their last token (the others are mid-prompt chunks).
"""

from __future__ import annotations

import torch

from ..errors import WorkbenchError
from ..graph.ir import dtype_from_name
from .scheduler import SchedulerOutput


class Executor:
    def __init__(self, program, num_blocks: int) -> None:
        paged = program.graph.meta.get("paged")
        if not paged:
            raise WorkbenchError("the runtime runs graphs with paged attention; run the insert_paged_attention pass "
                                 "(`workbench optimize`) first")
        self.program, self.num_blocks = program, num_blocks
        self.block_size = paged["block_size"]
        self.device = program.device
        shape = (2, num_blocks, self.block_size, paged["kv_heads"], paged["head_dim"])
        dtype = dtype_from_name(paged["dtype"])
        self.cache = {f"kv_cache_{i}": torch.zeros(shape, dtype=dtype, device=self.device) for i in paged["layers"]}

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
        inputs, last = self.inputs(out)
        (logits,) = self.program.run(**inputs)
        return logits[0, last].float()
