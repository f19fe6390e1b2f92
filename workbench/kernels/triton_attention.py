"""Triton paged attention: one kernel for prefill, decode and mixed steps (the ``triton`` tactic
of ``workbench.paged_attention``).

Grid: (query blocks, KV heads). The flat batch's queries are cut, per sequence, into
blocks of ``BLOCK_Q`` tokens; there are at most ``tokens // BLOCK_Q + seqs`` such
blocks, so that is the grid, and each program finds its sequence by a binary search
over ``query_start_loc`` on the device (no host sync, no per-step grid computation).

A program takes BLOCK_Q query tokens × the GROUP query heads that share its KV head
(GQA/MQA: the KV heads are read once for all of them), i.e. BLOCK_M = BLOCK_Q · GROUP
rows, and walks the sequence's cached K/V in tiles of BLOCK_N tokens gathered through
its block table, with an online softmax. A query at position p sees keys
max(0, p - window + 1) .. p; tiles entirely outside that range are skipped.

The new tokens' K/V are scattered into the cache first (a torch index_put for now).

Dots run in the cache dtype (bf16/fp16 tensor cores) with fp32 accumulation; in fp32,
or under the CPU interpreter (whose bf16 arithmetic is wrong), they run in fp32 (ieee).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .registry import REGISTRY


@triton.jit
def _paged_attention_kernel(
        Q, K, V, O, BT, SEQ_LENS, QSL, O_PART, LSE,
        sq_h, sq_t, so_h, so_t, sk_blk, sk_off, sk_h, sbt, sp_s, sp_h, sp_t, sl_s, sl_h, num_seqs, scale, window,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
        SPLITS: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # which sequence owns this query block: the last i with qsl[i] // BLOCK_Q + i <= qblock
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(QSL + mid) // BLOCK_Q + mid <= qblock:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_begin = tl.load(QSL + seq)
    n_q = tl.load(QSL + seq + 1) - q_begin
    q_start = (qblock - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query of this block, within the sequence
    if q_start < n_q:
        seq_len = tl.load(SEQ_LENS + seq)
        context = seq_len - n_q  # position of the sequence's first new token

        rows = tl.arange(0, BLOCK_M)
        tok = q_start + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = tok < n_q
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ptrs = Q + head[:, None] * sq_h + (q_begin + tok)[:, None].to(tl.int64) * sq_t + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        pos = context + tok  # each row's query position

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        last = context + tl.minimum(q_start + BLOCK_Q, n_q)  # keys beyond the block's last query are masked
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(context + q_start - window + 1, 0)
        n_start = (first // BLOCK_N) * BLOCK_N
        n_end = last
        if SPLITS > 1:  # this program's share of the key range, in whole tiles
            chunk = tl.cdiv(tl.cdiv(last - n_start, BLOCK_N), SPLITS) * BLOCK_N
            n_start = n_start + split * chunk
            n_end = tl.minimum(n_start + chunk, last)
        for n0 in range(n_start, n_end, BLOCK_N):
            kv = n0 + tl.arange(0, BLOCK_N)
            kv_ok = kv < seq_len
            page = tl.load(BT + seq * sbt + kv // PAGE, mask=kv_ok, other=0).to(tl.int64)
            base = page * sk_blk + (kv % PAGE) * sk_off + kv_head * sk_h
            kv_mask = kv_ok[:, None] & d_ok[None, :]
            k = tl.load(K + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            allowed = (kv[None, :] <= pos[:, None]) & kv_ok[None, :] & row_ok[:, None]
            if HAS_WINDOW:
                allowed = allowed & (kv[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        t_glob = (q_begin + tok).to(tl.int64)
        if SPLITS == 1:
            o_ptrs = O + head[:, None] * so_h + t_glob[:, None] * so_t + d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:  # partial result and its log-sum-exp (-inf where this slice saw no key); combined afterwards
            p_ptrs = O_PART + split * sp_s + head[:, None] * sp_h + t_glob[:, None] * sp_t + d[None, :]
            tl.store(p_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + split * sl_s + head * sl_h + t_glob, lse, mask=row_ok)


#: Tuning space: query tokens per program (BLOCK_Q · GROUP must be >= 16 on a GPU), KV tile, warps, stages,
#: and SPLITS, the number of slices the key range is cut into (split-KV, for few programs over long contexts).
CONFIGS = [
    {"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "SPLITS": 1},
    {"BLOCK_Q": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 8},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 32},
]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float | None = None, window: int | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """Same contract as the reference ``workbench.paged_attention`` (see ``kernels/fused.py``)."""
    config = config or CONFIGS[0]
    _, num_blocks, page, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * page, kv_heads, head_dim)
    flat[0, slot_mapping] = k[0].transpose(0, 1).to(kv_cache.dtype)
    flat[1, slot_mapping] = v[0].transpose(0, 1).to(kv_cache.dtype)
    heads, tokens = q.shape[1], q.shape[2]
    group = heads // kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    seqs = seq_lens.shape[0]
    block_q = max(config["BLOCK_Q"], triton.next_power_of_2(-(-16 // group)))
    interpret = bool(os.environ.get("TRITON_INTERPRET"))
    splits = config.get("SPLITS", 1)
    grid = (tokens // block_q + seqs, kv_heads, splits)
    kc, vc = kv_cache[0], kv_cache[1]
    if splits > 1:
        part = torch.empty(splits, heads, tokens, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, heads, tokens, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    _paged_attention_kernel[grid](
        q, kc, vc, out, block_tables, seq_lens, query_start_loc, part, lse,
        q.stride(1), q.stride(2), out.stride(1), out.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2) if splits > 1 else 0,
        lse.stride(0), lse.stride(1), seqs, head_dim ** -0.5 if scale is None else scale, window or 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q,
        BLOCK_N=config["BLOCK_N"], PAGE=page, HAS_WINDOW=window is not None,
        DOT_FP32=interpret or q.dtype == torch.float32, SPLITS=splits, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    if splits > 1:  # out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse): the softmax over all keys
        weights = torch.exp(lse - lse.amax(0, keepdim=True))
        out[0] = ((part * weights[..., None]).sum(0) / weights.sum(0)[..., None]).to(out.dtype)
    return out


paged_attention.configs = CONFIGS  # the autotuner's search space
REGISTRY.get("workbench.paged_attention").tactics["triton"] = paged_attention
