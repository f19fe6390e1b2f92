"""A simple paged KV cache and a driver for graphs with paged attention (the reference path).

This is the minimum needed to run and test a graph after ``insert_paged_attention``:
fixed-size blocks from a free list, one block list per sequence, and the attention
metadata for a flat batch of new tokens. The runtime issue replaces the
bookkeeping with the real block manager (ref counts, prefix caching, eviction)
and the scheduler; the metadata it hands the graph is the same:

    input_ids        [1, tokens]        new tokens of every sequence, back to back
    position_ids     [1, tokens]        their positions (each sequence continues where it stopped)
    slot_mapping     [tokens]           cache slot (block * block_size + offset) each new token's K/V goes to
    block_tables     [seqs, max_blocks] each sequence's blocks, padded with 0
    seq_lens         [seqs]             tokens in each sequence after this step (context + new)
    query_start_loc  [seqs + 1]         where each sequence's new tokens start in the flat batch
    kv_cache_<layer> [2, num_blocks, block_size, kv_heads, head_dim]

The cache tensors have that shape but store each block head-major ([kv_heads, block_size, head_dim]:
``new_kv_cache``), so that a KV head's keys of one block are contiguous; the kernels follow the strides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import WorkbenchError


def new_kv_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str | torch.device) -> torch.Tensor:
    """One layer's KV cache, zeroed: shape [2, num_blocks, block_size, kv_heads, head_dim], stored head-major
    within each block (a transposed view of [2, num_blocks, kv_heads, block_size, head_dim]). A decode program
    reads one KV head's keys block by block: contiguous runs of block_size × head_dim instead of head_dim-long
    rows strided by kv_heads × head_dim. On the H200, a 512 × 1500 decode over an FP8 cache in blocks of 64
    read 2.7% faster so (bench/attention.py --sections decode)."""
    return torch.zeros(2, num_blocks, kv_heads, block_size, head_dim, dtype=dtype, device=device).transpose(2, 3)


@dataclass
class SimplePagedCache:
    num_blocks: int
    block_size: int
    layers: list[int]
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    free_blocks: list[int] = field(init=False)
    blocks: dict[int, list[int]] = field(init=False, default_factory=dict)
    lengths: dict[int, int] = field(init=False, default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.tensors = {f"kv_cache_{i}": new_kv_cache(self.num_blocks, self.block_size, self.kv_heads, self.head_dim,
                                                      self.dtype, self.device) for i in self.layers}

    def free(self, seq_id: int) -> None:
        self.free_blocks.extend(reversed(self.blocks.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def _reserve(self, seq_id: int, new_tokens: int) -> list[int]:
        """Slots for ``new_tokens`` more tokens of ``seq_id``, allocating blocks as needed."""
        start = self.lengths.get(seq_id, 0)
        blocks = self.blocks.setdefault(seq_id, [])
        need = -(-(start + new_tokens) // self.block_size) - len(blocks)
        if need > len(self.free_blocks):
            raise WorkbenchError(f"KV cache full: sequence {seq_id} needs {need} more blocks, "
                                 f"{len(self.free_blocks)} free of {self.num_blocks}")
        blocks += [self.free_blocks.pop() for _ in range(need)]
        self.lengths[seq_id] = start + new_tokens
        return [blocks[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, start + new_tokens)]

    def step_inputs(self, batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        """Graph inputs for one step: ``batch`` lists (sequence id, its new token ids)."""
        ids, pos, slots, starts, lens = [], [], [], [0], []
        for seq_id, tokens in batch:
            start = self.lengths.get(seq_id, 0)
            slots += self._reserve(seq_id, len(tokens))
            ids += tokens
            pos += range(start, start + len(tokens))
            starts.append(starts[-1] + len(tokens))
            lens.append(start + len(tokens))
        width = max(len(self.blocks[s]) for s, _ in batch)
        tables = [self.blocks[s] + [0] * (width - len(self.blocks[s])) for s, _ in batch]
        dev = self.device

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        return {"input_ids": t([ids]), "position_ids": t([pos]), "slot_mapping": t(slots),
                "block_tables": t(tables), "seq_lens": t(lens), "query_start_loc": t(starts), **self.tensors}


def cache_for(graph, *, num_blocks: int = 64, device: str | torch.device = "cpu") -> SimplePagedCache:
    """A cache shaped for a graph after ``insert_paged_attention``."""
    from ..graph.ir import dtype_from_name

    paged = graph.meta.get("paged")
    if not paged:
        raise WorkbenchError("this graph has no paged attention; run the insert_paged_attention pass first")
    return SimplePagedCache(num_blocks, paged["block_size"], paged["layers"], paged["kv_heads"], paged["head_dim"],
                            dtype_from_name(paged["dtype"]), device)


def paged_greedy(program, prompt: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                 num_blocks: int = 64) -> list[int]:
    """Greedy decoding through a paged graph: one prefill step, then one token per step from the cache."""
    cache = cache_for(program.graph, num_blocks=num_blocks, device=program.device)
    tokens = prompt.reshape(-1).tolist()
    new: list[int] = []
    step = tokens
    for _ in range(max_new_tokens):
        (logits,) = program.run(**cache.step_inputs([(0, step)]))
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        if nxt == eos_token_id:
            break
        step = [nxt]
    return new


def _blocks_for(graph, tokens: int) -> int:
    return -(-tokens // graph.meta["paged"]["block_size"])


def logits_fn(program):
    """A logits function ([1, T] ids -> [1, T, vocab]) for any program: a paged graph runs each
    call as one fresh sequence's prefill; any other graph runs as it is."""
    if not program.graph.meta.get("paged"):
        return program

    def run(ids: torch.Tensor) -> torch.Tensor:
        cache = cache_for(program.graph, num_blocks=_blocks_for(program.graph, ids.shape[-1]), device=program.device)
        (logits,) = program.run(**cache.step_inputs([(0, ids.reshape(-1).tolist())]))
        return logits

    return run


def greedy(program, prompt: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with any program: KV-cached through a paged graph, full recompute otherwise."""
    if program.graph.meta.get("paged"):
        return paged_greedy(program, prompt, max_new_tokens, eos_token_id=eos_token_id,
                            num_blocks=_blocks_for(program.graph, prompt.numel() + max_new_tokens))
    from ..evaluate import greedy as recompute_greedy

    return recompute_greedy(program, prompt, max_new_tokens, eos_token_id=eos_token_id)
