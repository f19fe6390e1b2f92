"""Greedy sampling in one read of the logits: each row's argmax and that token's log-probability.

    tokens, logprobs = greedy_logprobs(logits)   # [rows, vocab], any float dtype -> [rows] int64, [rows] fp32

It is what ``runtime.sampling.Sampler`` computes for a batch of greedy rows (the argmax, and the
log-softmax of the raw logits at it), without the torch chain's passes over the logits: an fp32 copy,
log_softmax (a read and a write of the whole fp32 matrix), argmax, gather. At 512 rows of a 128k
vocabulary that chain moves about 1.2 GB per decode step; this reads the 131 MB of bf16 logits once.
A single row (batch-1 decode) is split over many programs so that it does not run on one SM.

Two kernels:

* a (row, chunk) grid: each program keeps, per lane, a running maximum, the lowest column reaching it, and
  the sum of exp(x - maximum) (rescaled when the maximum grows: the online softmax), then reduces its
  lanes to one (max, argmax, sum) for its chunk;
* one program per row combines the chunks: the token is the lowest column among those holding the
  row's maximum (``torch.argmax``'s tie rule), and since that token's logit is the maximum its
  log-probability is ``-log(sum)``.

Rows that are all -inf give token 0 and a NaN log-probability, as ``torch.argmax`` and ``log_softmax``
do. On the CPU it runs under ``TRITON_INTERPRET=1`` (tests); the runtime calls it on CUDA logits only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import WorkbenchError

#: Lanes per program step, and the programs a batch should spread over (about 16 per SM of a Hopper GPU; fewer
#: measured slower at large batches: BENCHMARKS.md, 2026-11-25, "greedy sampling in one pass")
BLOCK = 1024
TARGET_PROGRAMS = 2048
#: Chunks the combining program takes at a time
COMBINE_BLOCK = 64


@triton.jit
def _merge(m, s, idx, x_max, x_sum, x_idx, take):
    """Lane by lane, the running (max, sum of exp(value - max), index) merged with new ones (``x_sum`` 1 for
    a single value): the online softmax's rescaling. ``take``: where the new index replaces the kept one."""
    new = tl.maximum(m, x_max)
    s = tl.where(new != float("-inf"), s * tl.exp(m - new) + x_sum * tl.exp(x_max - new), 0.0)
    return new, s, tl.where(take, x_idx, idx)


@triton.jit
def _reduce_lanes(m, s, idx):
    """The lanes as one: (max, sum of exp(value - max), lowest index holding the max)."""
    top = tl.max(m, axis=0)
    total = tl.sum(tl.where(m != float("-inf"), s * tl.exp(m - top), 0.0), axis=0)
    return top, total, tl.min(tl.where(m == top, idx, 2147483647), axis=0)


@triton.jit(do_not_specialize=["CHUNK", "n_chunks"])  # they change with the batch: one compiled kernel
def _greedy_chunk_kernel(L, PM, PI, PS, V, stride_l, CHUNK, n_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    idx = start + lanes  # a lane that sees only -inf keeps its first column (all -inf rows: token 0)
    for off in range(start, tl.minimum(start + CHUNK, V), BLOCK):
        cols = off + lanes
        x = tl.load(L + row * stride_l + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, idx = _merge(m, s, idx, x, 1.0, cols, x > m)  # strictly greater: a lane keeps its first maximum
    top, total, first = _reduce_lanes(m, s, idx)
    out = row * n_chunks + chunk
    tl.store(PM + out, top)
    tl.store(PI + out, first)
    tl.store(PS + out, total)


@triton.jit(do_not_specialize=["n_chunks"])
def _greedy_combine_kernel(PM, PI, PS, T, LP, n_chunks, CHUNKS: tl.constexpr):
    """One program per row: its chunks' (max, argmax, sum) combined, CHUNKS at a time (a fixed block, so
    that batches of any size run one compiled kernel: no compile in the middle of serving)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    m = tl.full([CHUNKS], float("-inf"), tl.float32)
    s = tl.zeros([CHUNKS], dtype=tl.float32)
    i = tl.full([CHUNKS], 2147483647, tl.int32)
    for c0 in range(0, n_chunks, CHUNKS):
        mask = c0 + c < n_chunks
        pm = tl.load(PM + row * n_chunks + c0 + c, mask=mask, other=float("-inf"))
        ps = tl.load(PS + row * n_chunks + c0 + c, mask=mask, other=0.0)
        pi = tl.load(PI + row * n_chunks + c0 + c, mask=mask, other=2147483647)
        # chunks come in column order: an equal max later keeps the lower id (a lane's first chunk is taken
        # whatever it holds, so that an all -inf row still gives its first column)
        m, s, i = _merge(m, s, i, pm, ps, pi, (pm > m) | (mask & (i == 2147483647)))
    top, total, token = _reduce_lanes(m, s, i)
    tl.store(T + row, token.to(tl.int64))
    tl.store(LP + row, tl.where(total > 0, -tl.log(total), float("nan")))  # all -inf: NaN, as log_softmax


def chunking(rows: int, vocab: int) -> tuple[int, int]:
    """(chunk length, chunks per row): enough programs to fill the GPU at small batches, whole rows at large
    ones; the chunk a multiple of ``BLOCK``."""
    per_row = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(rows, 1)), triton.cdiv(vocab, BLOCK)))
    chunk = triton.cdiv(triton.cdiv(vocab, per_row), BLOCK) * BLOCK
    return chunk, triton.cdiv(vocab, chunk)


def greedy_logprobs(logits: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax of each row as int64, log_softmax of the row at it as fp32) for ``logits`` [rows, vocab].
    ``chunk``: columns per program, a multiple of ``BLOCK`` (default: ``chunking``'s)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise WorkbenchError(f"greedy_logprobs takes [rows, vocab] float logits, got {logits.dtype} "
                             f"{list(logits.shape)}")
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, logprobs
    if vocab == 0:
        raise WorkbenchError("greedy_logprobs got logits with an empty vocabulary dimension")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if chunk is None:
        chunk, n_chunks = chunking(rows, vocab)
    elif chunk < 1 or chunk % BLOCK:
        raise WorkbenchError(f"greedy_logprobs: chunk must be a positive multiple of {BLOCK}, got {chunk}")
    else:
        n_chunks = triton.cdiv(vocab, chunk)
    part_m = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    part_s = torch.empty_like(part_m)
    part_i = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    _greedy_chunk_kernel[(rows, n_chunks)](logits, part_m, part_i, part_s, vocab, logits.stride(0), chunk, n_chunks,
                                           BLOCK=BLOCK, num_warps=4)
    _greedy_combine_kernel[(rows,)](part_m, part_i, part_s, tokens, logprobs, n_chunks,
                                    CHUNKS=COMBINE_BLOCK, num_warps=4)
    return tokens, logprobs
