"""Triton paged attention: one kernel for prefill, decode and mixed steps (the ``triton`` tactic
of ``workbench.paged_attention``).

Grid: (query blocks, KV heads, KV splits). The flat batch's queries are cut, per sequence, into
blocks of ``BLOCK_Q`` tokens; there are at most ``tokens // BLOCK_Q + seqs`` such
blocks, so that is the grid, and each program finds its sequence by a binary search
over ``query_start_loc`` on the device (no host sync, no per-step grid computation).

A program takes BLOCK_Q query tokens × the GROUP query heads that share its KV head
(GQA/MQA: the KV heads are read once for all of them), i.e. BLOCK_M = BLOCK_Q · GROUP
rows (a power of two, at least 16: ``query_rows`` rounds them up, and at a GROUP of 3, 5 or 7
takes as many tokens as they hold, the last rows padding), with an online softmax (base 2)
over its keys in tiles of BLOCK_N, in two ranges:

    keys:  0 ........ context | context ........ last query of the block
           cached: gathered   | this step's own: contiguous, from k/v or write_kv's copies;
           through the block  | tiles below the block's first query need no mask,
           table, masked only | the diagonal tiles are masked (causal, window)
           at the ends        |

A query at position p sees keys max(0, p - window + 1) .. p; tiles outside that are skipped. Tiles
that every row of a program sees whole (without a window: below the block's first query) run without
masks in both ranges: no predicated loads, no per-key comparisons, and in pages of a multiple of BLOCK_N
one scalar offset per tile over per-element offsets computed once. In a decode step only the last tile, cut
at the context's end, is masked. Why: the masked loop's extra instructions are integer offsets and per-key
selects, and the decode step's access pattern alone reads at copy bandwidth, so what kept decode below it was
the loop's own instructions (BENCHMARKS.md, 2026-12-01, "unmasked tiles").
With an FP8 cache, scores and outputs are multiplied by the per-layer K and V scales, and the
step's own keys must be seen as the cache holds them (the reference sees them rounded). In steps
with prompt tokens (more tokens than sequences) the kernel still reads them contiguous and unmasked
below the diagonal, from two fp16 buffers that ``write_kv`` fills beside the cache with the very
values it stores (value / scale, saturated, rounded to e4m3; fp16 holds each exactly): a prefill over an
FP8 cache otherwise gathers every key through the block table with a mask. (The copies are written once
per token; rounding in the attention loop instead would repeat the work in every program that reads the
key, which is how the kernel once did it: BENCHMARKS.md, 2026-12-01, "prompt attention over an FP8
cache".) Decode steps (one token per sequence) read their one new key back from the cache, in the last
cached tile (``"NEW_FROM_CACHE": True`` in a config makes every step, over any cache, read all its
keys from the cache: see "Batch invariance" below).

A mixed step (prompt chunks beside decodes) can run in two launches: a config with a ``"DECODE"``
sub-config sends the sequences of one new token to a launch of their own at that config (grid:
one program per sequence and KV head, ``SEQ_MODE`` 1), and the rest to this one (``SEQ_MODE`` 2,
whose programs skip single-token sequences). At a prompt config (BLOCK_Q 32-64) a decode program
computes 128-256 query rows of which GROUP are real, over the whole context, so a mixed step's decodes run
far slower in the prompt launch than in their own (BENCHMARKS.md, 2026-12-01, "a mixed step's decodes in a
launch of their own"). The grids depend only on the step's shapes, so both launches replay in a graph.

Split-KV (``SPLITS`` > 1, flash-decoding): the cached range is cut into SPLITS slices, one
program each; every slice writes a partial output and its log-sum-exp, and a second small
kernel combines them. For long contexts at small batch, where (query blocks × KV heads)
alone cannot fill the GPU.

**Batch invariance** (``invariant``; the batch-invariant mode, ``kernels/invariant.py``): with one config held, a
row's output depends on its own sequence alone (each program takes one sequence's query block; its rows are
independent in every dot), except for three things a config decides. ``SPLITS`` > 1 cuts the keys at a point
that depends on the query block's last position, which moves with how the scheduler chunked the prompt; a
``"DECODE"`` sub-config runs a decode at another config when a prompt chunk shares its step; and this step's own
keys, read from the inputs, are tiled from the chunk's first token, so a prompt cut into chunks (by a token
budget shared with other requests, or after a prefix-cache hit) sums its keys in other groups than the same
prompt in one piece, and an FP8 cache's decode reads its key another way beside prompt tokens. With
``"NEW_FROM_CACHE": True``, SPLITS 1 and no DECODE, every key comes through the block table in tiles aligned
to absolute positions (0, BLOCK_N, ...), whatever the step: a row at position p sums the same tiles in the
same order alone, in any batch, in any chunk, in a prefill or a decode (tiles past p, and keys masked in
them, add exact zeros). The cost: prompt steps gather their own keys through the block table.

``write_kv`` scatters the new tokens' K/V into their slots first (one program per token;
FP8 caches store value / scale, saturated and rounded to e4m3).

Per-head q/k RMSNorm inside (``q_norm``/``k_norm`` given, Qwen3 and Gemma 3; the ``fuse_qk_norm_into_attention``
pass): the kernel norms each q row over the head dim as it loads it (before RoPE; the rotation's partner element is
normed with the same row statistic), and ``write_kv`` norms each head of K before rotating and storing it, each
rounded as ``workbench.rms_norm`` rounds (Gemma 3's fp32 1 + w over 16-bit q and k: once, after the weight). Two
more launches per layer fewer, and q and k are read once.

Soft-capped scores (``softcap`` given, Gemma 2's ``attn_logit_softcapping``): each tile's scores become
cap · tanh(s · scale / cap) before the masks (``_tanh``, from one exp2: Triton has no portable tanh), and the
exponent's scale is then log2 e alone. Its shared memory is the uncapped kernel's.

RoPE inside (``cos``/``sin`` given, the ``fuse_rope_into_attention`` pass): q and k arrive before their
rotary embedding. The attention kernel rotates q as it loads it; ``write_kv`` rotates k before storing
it and, where the step's own keys are read contiguous (bf16 caches; FP8 caches in steps with prompt
tokens), also writes them as the cache holds them to small buffers that the kernel reads instead. Both
round as ``workbench.rope`` does (fp32, then once to the input dtype), so the results equal the rope
kernels' followed by this kernel. Two launches per layer fewer, which matters most where launches are a large
share of the attention's time: batch-1 decode (BENCHMARKS.md, 2026-11-25, "RoPE inside attention").

Dots run in the input dtype (bf16/fp16 tensor cores) with fp32 accumulation; in fp32,
or under the CPU interpreter (whose bf16 arithmetic is wrong), they run in fp32 (ieee). Over an
FP8 cache they run in fp16 whatever q's 16-bit dtype (``DOT_F16``): e4m3 converts to fp16 in one
instruction per pair but to bf16 only through more, which made bf16 dots convert-bound (BENCHMARKS.md,
2026-11-25, "fp16 dots over the FP8 cache"). fp16 holds every e4m3 value and the probabilities with more
precision than bf16; q is saturated to fp16's range.

An FP8 cache is read as int16 pairs (``PAIRS``): each int16 holds an even and an odd element of a
key's or value's row, and the head dim is split in two halves, the even elements and the odd ones
(scores = q_even·k_even + q_odd·k_odd; the output's even and odd columns accumulate separately).
Every dot operand is then 16-bit. Triton gathers an 8-bit operand that must be transposed (V's,
whose keys are the reduction) from shared memory one byte at a time; 16-bit operands load through
``ldmatrix``, and each two int16 then cost one byte permute and two conversions. So the loop issues far
fewer instructions, and decode over an FP8 cache reads closer to copy bandwidth (``bench/attention.py``;
BENCHMARKS.md, 2026-11-25, "an FP8 KV cache read as int16 pairs"). Prompt steps also try the byte-by-byte
reads (see ``prune``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import WorkbenchError
from .gemm import _smem_limit
from .registry import REGISTRY
from .triton_pointwise import _tanh

LOG2E = 1.4426950408889634
#: KV-cache dtypes stored scaled (value / scale per layer) and read back times the scale
FP8_DTYPES = (torch.float8_e4m3fn,)


@triton.jit
def _round_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32, in plain arithmetic: the
    fp32 mantissa rounded to 3 bits (carries run into the exponent), or below e4m3's least normal (2^-6) to a
    multiple of 2^-9 (its subnormals) by an fp32 add at that spacing; the sign kept (-0 too). The hardware
    conversion's value (checked bit-exact on the GPU by bench/attention.py), which then converts it exactly.

    ``write_kv`` rounds so for two reasons: its fp16 copies, converted back from the e4m3 values it stored,
    came out garbled for half the elements on the GPU (Triton 3.6; BENCHMARKS.md, 2026-12-01, "a Triton
    miscompile caught by the reference"); and the CPU interpreter's own conversion
    rounds wrongly where the rounding carries into the exponent (7.9 -> 4), which exact values avoid."""
    bits = x.to(tl.uint32, bitcast=True)
    u = bits & 0x7FFFFFFF
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    a = u.to(tl.float32, bitcast=True)
    r = tl.where(a < 0.015625, (a + 16384.0) - 16384.0, normal)
    return (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_kernel(K, V, C, SLOTS, COS, SIN, K_OUT, V_OUT, KW, sk_h, sk_t, sv_h, sv_t, sc_kv, sc_blk, sc_off, sc_h,
                     scos_t, sko_h, sko_t, svo_h, svo_t, k_scale, v_scale, norm_eps, PAGE: tl.constexpr,
                     KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     QUANT: tl.constexpr, ROPE: tl.constexpr, HAS_K_OUT: tl.constexpr, HAS_V_OUT: tl.constexpr,
                     NORM: tl.constexpr = False, NORM_ROUND: tl.constexpr = True):
    """One program per new token: its K and V (all KV heads) into the cache slot ``SLOTS[token]``, in two
    halves of the head dim; with NORM, each head of K first normed over the head dim by the weight KW (Qwen3's
    k_norm, rounded as ``workbench.rms_norm`` rounds it: fp32 statistics, the normed value rounded to K's dtype,
    times the weight, rounded again; without NORM_ROUND, an fp32 weight over 16-bit K, Gemma 3's, one rounding after
    the weight); with ROPE, K then rotated (as ``workbench.rope`` does: fp32, one rounding to
    K's dtype). HAS_K_OUT / HAS_V_OUT also write K / V as the attention reads this step's own keys: K normed
    and rotated; over an FP8 cache, the values the cache holds (value / scale, rounded to e4m3) in fp16."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < KV_HEADS) & (d < HALF)
    k1 = tl.load(K + h * sk_h + t * sk_t + d, mask=mask, other=0.0)
    k2 = tl.load(K + h * sk_h + t * sk_t + HALF + d, mask=mask, other=0.0)
    v1 = tl.load(V + h * sv_h + t * sv_t + d, mask=mask)
    v2 = tl.load(V + h * sv_h + t * sv_t + HALF + d, mask=mask)
    if NORM:
        x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
        r = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1))[:, None] / (2 * HALF) + norm_eps)
        w1 = tl.load(KW + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(KW + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        if NORM_ROUND:
            x1 = (x1 * r).to(K.dtype.element_ty).to(tl.float32)
            x2 = (x2 * r).to(K.dtype.element_ty).to(tl.float32)
        else:  # an fp32 weight over 16-bit K (Gemma 3's 1 + w): times the weight, then the one rounding
            x1 = x1 * r
            x2 = x2 * r
        k1 = (x1 * w1).to(K.dtype.element_ty)
        k2 = (x2 * w2).to(K.dtype.element_ty)
    if ROPE:
        c1 = tl.load(COS + t * scos_t + d, mask=d < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(COS + t * scos_t + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + t * scos_t + d, mask=d < HALF, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + t * scos_t + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
        k1 = (x1 * c1 - x2 * s1).to(K.dtype.element_ty)
        k2 = (x2 * c2 + x1 * s2).to(K.dtype.element_ty)
    if QUANT:  # FP8 cache: value / scale, saturated to the format's range (e4m3: ±448), rounded (exact after)
        k1 = _round_e4m3(tl.clamp(k1.to(tl.float32) / k_scale, -448.0, 448.0))
        k2 = _round_e4m3(tl.clamp(k2.to(tl.float32) / k_scale, -448.0, 448.0))
        v1 = _round_e4m3(tl.clamp(v1.to(tl.float32) / v_scale, -448.0, 448.0))
        v2 = _round_e4m3(tl.clamp(v2.to(tl.float32) / v_scale, -448.0, 448.0))
    if HAS_K_OUT:
        tl.store(K_OUT + h * sko_h + t * sko_t + d, k1.to(K_OUT.dtype.element_ty), mask=mask)
        tl.store(K_OUT + h * sko_h + t * sko_t + HALF + d, k2.to(K_OUT.dtype.element_ty), mask=mask)
    if HAS_V_OUT:
        tl.store(V_OUT + h * svo_h + t * svo_t + d, v1.to(V_OUT.dtype.element_ty), mask=mask)
        tl.store(V_OUT + h * svo_h + t * svo_t + HALF + d, v2.to(V_OUT.dtype.element_ty), mask=mask)
    dst = C + (slot // PAGE) * sc_blk + (slot % PAGE) * sc_off + h * sc_h + d
    tl.store(dst, k1.to(C.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, k2.to(C.dtype.element_ty), mask=mask)
    tl.store(dst + sc_kv, v1.to(C.dtype.element_ty), mask=mask)
    tl.store(dst + sc_kv + HALF, v2.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_tile(s, m_i, l_i, s_scale, allowed, MASKED: tl.constexpr, cap, cap_scale, SOFTCAP: tl.constexpr):
    """The online softmax over one tile's scores, in base 2 (``s_scale`` includes log2 e): scores are
    scaled inside the exponent's FMA, never stored scaled. Unmasked tiles (every key visible to every
    row) skip the masking and the guard for rows that see nothing yet. Returns the tile's
    probabilities, the factor the accumulated output is rescaled by, the new row maxima and sums.
    With SOFTCAP (Gemma 2) each score s becomes cap * tanh(s · cap_scale), cap_scale = scale / cap, before the
    mask, and ``s_scale`` is log2 e alone."""
    if SOFTCAP:
        s = cap * _tanh(s * cap_scale)
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * s_scale)
    m_safe = m_new
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * s_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q, k, v, s_scale, allowed, MASKED: tl.constexpr, DOT_FP32: tl.constexpr, cap, cap_scale,
            SOFTCAP: tl.constexpr):
    """One K/V tile: scores, ``_softmax_tile``, and the output accumulated."""
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    p, alpha, m_new, l_i = _softmax_tile(s, m_i, l_i, s_scale, allowed, MASKED, cap, cap_scale, SOFTCAP)
    acc = acc * alpha[:, None]
    if DOT_FP32:  # the product accumulates into acc inside the MMA, no separate add
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
    return acc, m_new, l_i


@triton.jit
def _e4m3_pairs(x, ASM: tl.constexpr):
    """int16 holding two e4m3 bytes (an even and an odd element of a row) -> the two as fp16. On the GPU
    one byte permute and two conversions per two int16 (the packed pair a thread holds after a 16-bit
    shared-memory load); the interpreter has no inline PTX."""
    if ASM:
        even, odd = tl.inline_asm_elementwise(
            """{
            .reg .b32 t;
            .reg .b16 lo, hi;
            prmt.b32 t, $2, 0, 0x3120;
            mov.b32 {lo, hi}, t;
            cvt.rn.f16x2.e4m3x2 $0, lo;
            cvt.rn.f16x2.e4m3x2 $1, hi;
            }""",
            "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        even = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        odd = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return even, odd


@triton.jit
def _attend_pairs(acc_e, acc_o, m_i, l_i, q_e, q_o, k16, v16, s_scale, allowed, MASKED: tl.constexpr,
                  ASM: tl.constexpr, cap, cap_scale, SOFTCAP: tl.constexpr):
    """``_attend`` over an FP8 cache read as int16 pairs: the head dim split into its even and odd
    elements, so that every dot operand is 16-bit (8-bit operands that must be transposed, V's, are
    gathered a byte at a time)."""
    k_e, k_o = _e4m3_pairs(k16, ASM)
    s = tl.dot(q_o, tl.trans(k_o), tl.dot(q_e, tl.trans(k_e)))
    p, alpha, m_new, l_i = _softmax_tile(s, m_i, l_i, s_scale, allowed, MASKED, cap, cap_scale, SOFTCAP)
    p = p.to(tl.float16)
    v_e, v_o = _e4m3_pairs(v16, ASM)
    acc_e = tl.dot(p, v_e, acc_e * alpha[:, None])
    acc_o = tl.dot(p, v_o, acc_o * alpha[:, None])
    return acc_e, acc_o, m_new, l_i


@triton.jit
def _block_seq_kernel(QSL, BLOCK_SEQ, num_seqs, num_blocks, BLOCK_Q: tl.constexpr, BLOCK: tl.constexpr):
    """For a mixed step's prompt launch: each query block's sequence if the block holds prompt tokens (a
    sequence of more than one new token), else -1. The owner of block b is the last i with
    qsl[i] // BLOCK_Q + i <= b (the attention kernel's search, here for BLOCK blocks at once)."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = b < num_blocks
    lo = b * 0
    hi = lo + num_seqs
    while tl.max(hi - lo, axis=0) > 0:
        open_ = lo < hi
        mid = (lo + hi) // 2
        go = tl.load(QSL + mid, mask=open_, other=0) // BLOCK_Q + mid <= b
        lo = tl.where(open_ & go, mid + 1, lo)
        hi = tl.where(open_ & ~go, mid, hi)
    seq = tl.where(ok, lo - 1, 0)
    q_begin = tl.load(QSL + seq)
    n_q = tl.load(QSL + seq + 1) - q_begin
    q_start = (b - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    tl.store(BLOCK_SEQ + b, tl.where((q_start < n_q) & (n_q > 1), seq, -1), mask=ok)


@triton.jit
def _cached_tile(KC, VC, BT, seq, sbt, kv_head, n0, cached_end, sc_blk, sc_off, sc_h, DIM: tl.constexpr,
                 BLOCK_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of one KV head from the cache, K and V (strides in elements of KC/VC: int16
    pairs or the cache's own dtype). When the tile lies in one page (PAGE % BLOCK_N == 0), one block-table
    entry and one scalar offset: the per-element offsets are the same every tile, computed once. Unmasked
    tiles load without predicates (every key exists; the head dim is a power of two)."""
    t = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DIM)
    if PAGE % BLOCK_N == 0:
        page = tl.load(BT + seq * sbt + n0 // PAGE).to(tl.int64)
        offs = (t * sc_off)[:, None] + d[None, :]
        start = page * sc_blk + (n0 % PAGE) * sc_off + kv_head * sc_h
        k_ptrs = KC + start + offs
        v_ptrs = VC + start + offs
    else:
        kv = n0 + t
        page = tl.load(BT + seq * sbt + kv // PAGE, mask=kv < cached_end, other=0).to(tl.int64)
        offs = (page * sc_blk + (kv % PAGE) * sc_off + kv_head * sc_h)[:, None] + d[None, :]
        k_ptrs = KC + offs
        v_ptrs = VC + offs
    if MASKED or DIM != BLOCK_DIM:
        mask = ((n0 + t) < cached_end)[:, None] & (d < DIM)[None, :]
        zero: tl.constexpr = 0 if KC.dtype.element_ty == tl.int16 else 0.0
        k = tl.load(k_ptrs, mask=mask, other=zero)
        v = tl.load(v_ptrs, mask=mask, other=zero)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _paged_attention_kernel(
        Q, K, V, KC, VC, O, BT, SEQ_LENS, QSL, O_PART, LSE, COS, SIN, BLOCK_SEQ, QW,
        sq_h, sq_t, sk_h, sk_t, sv_h, sv_t, so_h, so_t, sc_blk, sc_off, sc_h, sbt, sp_s, sp_h, sp_t, sl_s, sl_h,
        scos_t,
        num_seqs, s_scale, v_scale, window, norm_eps, cap, cap_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
        SPLITS: tl.constexpr, NEW_FROM_INPUT: tl.constexpr, DOT_F16: tl.constexpr, ROPE: tl.constexpr,
        PAIRS: tl.constexpr = False, PAIRS_ASM: tl.constexpr = False, SEQ_MODE: tl.constexpr = 0,
        ROWS: tl.constexpr = 0, NORM: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
        NORM_ROUND: tl.constexpr = True):
    # query rows per program (``query_rows``): BLOCK_Q · GROUP, or with ROWS a power of two above it whose last
    # ROWS - BLOCK_Q · GROUP rows are padding (a GROUP that is not a power of two: 3, 5, 7)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP if ROWS == 0 else ROWS
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if SEQ_MODE == 1:  # a mixed step's decode launch: program i takes sequence i if it has one new token
        seq = tl.program_id(0)
        q_begin = tl.load(QSL + seq)
        n_q = tl.load(QSL + seq + 1) - q_begin
        q_start = 0
        run = n_q == 1
    else:
        # last query blocks first: they have the most keys (causal), so the long programs start early
        # and the short ones fill the tail
        qblock = tl.num_programs(0) - 1 - tl.program_id(0)
        if SEQ_MODE == 2:
            # a mixed step's prompt launch: each block's sequence, or -1 where the block is a decode's (the decode
            # launch's) or past its sequence's tokens, from _block_seq_kernel: one load, where the search below
            # is ~10 dependent loads. Most of this grid is such blocks (one per decode), and each held an SM's
            # slot (the prompt configs' shared memory) for its whole search.
            seq = tl.load(BLOCK_SEQ + qblock)
            run = seq >= 0
            seq = tl.maximum(seq, 0)
        else:
            # which sequence owns this query block: the last i with qsl[i] // BLOCK_Q + i <= qblock. First a guess,
            # right wherever every sequence so far has one new token (qsl[i] = i: i owns blocks i + i // BLOCK_Q, and
            # every BLOCK_Q + 1-th block is empty), checked with two independent loads; else a binary search (~10
            # dependent loads, each an L2 round trip before the program can issue its first key load).
            seq = num_seqs  # not found yet
            g = tl.minimum(qblock - qblock // (BLOCK_Q + 1), num_seqs - 1)
            if (tl.load(QSL + g) // BLOCK_Q + g <= qblock) & (qblock < tl.load(QSL + g + 1) // BLOCK_Q + g + 1):
                seq = g
            if seq == num_seqs:
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
        if SEQ_MODE == 0:
            run = q_start < n_q
    if run:
        seq_len = tl.load(SEQ_LENS + seq)
        context = seq_len - n_q  # position of the sequence's first new token

        rows = tl.arange(0, BLOCK_M)
        tok = q_start + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = tok < n_q
        if BLOCK_M != BLOCK_Q * GROUP:  # padding rows (their tok is the next block's first): never stored
            row_ok = row_ok & (rows < BLOCK_Q * GROUP)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_row = Q + head[:, None] * sq_h + (q_begin + tok)[:, None].to(tl.int64) * sq_t
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_row + d[None, :], mask=q_mask, other=0.0)
        if NORM:  # Qwen3's / Gemma 3's per-head q_norm on the way in, rounded as workbench.rms_norm rounds it
            qf = q.to(tl.float32)
            r = tl.math.rsqrt(tl.sum(qf * qf, axis=1)[:, None] / HEAD_DIM + norm_eps)
            w = tl.load(QW + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            qn = qf * r
            if NORM_ROUND:
                qn = qn.to(Q.dtype.element_ty).to(tl.float32)
            q = (qn * w).to(Q.dtype.element_ty)
        if ROPE:  # rotary embedding on the way in, rounded to q's dtype as workbench.rope rounds it
            half: tl.constexpr = HEAD_DIM // 2
            partner = tl.load(q_row + ((d + half) % HEAD_DIM)[None, :], mask=q_mask, other=0.0).to(tl.float32)
            if NORM:  # the partner element normed as its own column is (the row's r, its own weight)
                w_p = tl.load(QW + (d + half) % HEAD_DIM, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                partner = partner * r
                if NORM_ROUND:
                    partner = partner.to(Q.dtype.element_ty).to(tl.float32)
                partner = (partner * w_p).to(Q.dtype.element_ty)
                partner = partner.to(tl.float32)
            cs_off = (q_begin + tok)[:, None].to(tl.int64) * scos_t + d[None, :]
            c = tl.load(COS + cs_off, mask=q_mask, other=0.0).to(tl.float32)
            s = tl.load(SIN + cs_off, mask=q_mask, other=0.0).to(tl.float32)
            sign = tl.where(d < half, -1.0, 1.0)[None, :]
            q = (q.to(tl.float32) * c + sign * partner * s).to(Q.dtype.element_ty)
        if DOT_FP32:
            q = q.to(tl.float32)
        elif DOT_F16:  # every dot in fp16 (see the module's docstring)
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        pos = context + tok  # each row's query position

        # the cache as _cached_tile reads it: int16 pairs (strides and head dim halved), or its own dtype
        KCT = KC
        VCT = VC
        PER: tl.constexpr = 2 if PAIRS else 1
        if PAIRS:
            q_e, q_o = tl.split(tl.reshape(q, [BLOCK_M, BLOCK_D // 2, 2]))
            acc_e = tl.zeros([BLOCK_M, BLOCK_D // 2], tl.float32)
            acc_o = tl.zeros([BLOCK_M, BLOCK_D // 2], tl.float32)
            KCT = KC.to(tl.pointer_type(tl.int16), bitcast=True)
            VCT = VC.to(tl.pointer_type(tl.int16), bitcast=True)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        last = context + tl.minimum(q_start + BLOCK_Q, n_q)  # keys beyond the block's last query are masked
        first = 0
        if HAS_WINDOW:
            first = tl.maximum(context + q_start - window + 1, 0)
        # Keys [first, last) in two ranges: the cache ([.., cached_end), through the block table) and,
        # with NEW_FROM_INPUT, this step's own keys ([context, last), read straight from K/V).
        cached_end = last
        if NEW_FROM_INPUT:
            cached_end = context
        n_start = (first // BLOCK_N) * BLOCK_N
        n_end = cached_end
        if SPLITS > 1:  # this program's share of the cached range, in whole tiles
            chunk = tl.cdiv(tl.cdiv(cached_end - n_start, BLOCK_N), SPLITS) * BLOCK_N
            n_start = n_start + split * chunk
            n_end = tl.minimum(n_start + chunk, cached_end)
        # tiles that every row of the block sees whole (below its first query, inside the cached range) run
        # without masks: no predicated loads, no per-key comparisons (a decode step's every tile but its last)
        whole_end = n_start
        if not HAS_WINDOW:
            whole_end = tl.maximum(n_start + (tl.minimum(n_end, context + q_start + 1) - n_start) // BLOCK_N * BLOCK_N,
                                  n_start)
        for n0 in range(n_start, whole_end, BLOCK_N):
            k, v = _cached_tile(KCT, VCT, BT, seq, sbt, kv_head, n0, cached_end, sc_blk // PER, sc_off // PER,
                                sc_h // PER, HEAD_DIM // PER, BLOCK_D // PER, PAGE, BLOCK_N, False)
            if PAIRS:
                acc_e, acc_o, m_i, l_i = _attend_pairs(acc_e, acc_o, m_i, l_i, q_e, q_o, k, v, s_scale, row_ok,
                                                       False, PAIRS_ASM, cap, cap_scale, SOFTCAP)
            else:
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, s_scale, row_ok, False, DOT_FP32, cap,
                                        cap_scale, SOFTCAP)
        for n0 in range(whole_end, n_end, BLOCK_N):
            kv = n0 + tl.arange(0, BLOCK_N)
            allowed = (kv[None, :] <= pos[:, None]) & (kv < cached_end)[None, :] & row_ok[:, None]
            if HAS_WINDOW:
                allowed = allowed & (kv[None, :] > pos[:, None] - window)
            k, v = _cached_tile(KCT, VCT, BT, seq, sbt, kv_head, n0, cached_end, sc_blk // PER, sc_off // PER,
                                sc_h // PER, HEAD_DIM // PER, BLOCK_D // PER, PAGE, BLOCK_N, True)
            if PAIRS:
                acc_e, acc_o, m_i, l_i = _attend_pairs(acc_e, acc_o, m_i, l_i, q_e, q_o, k, v, s_scale, allowed,
                                                       True, PAIRS_ASM, cap, cap_scale, SOFTCAP)
            else:
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, s_scale, allowed, True, DOT_FP32, cap,
                                        cap_scale, SOFTCAP)
        if PAIRS:
            acc = tl.reshape(tl.join(acc_e, acc_o), [BLOCK_M, BLOCK_D])
        if NEW_FROM_INPUT and split == SPLITS - 1:
            # this step's keys: tiles every row sees whole (below the block's first query), then the diagonal
            new_start = tl.maximum(first - context, 0)
            full_end = new_start
            if not HAS_WINDOW:
                full_end = (q_start + 1) // BLOCK_N * BLOCK_N
            kv_base = K + kv_head * sk_h + q_begin.to(tl.int64) * sk_t
            vv_base = V + kv_head * sv_h + q_begin.to(tl.int64) * sv_t
            for j0 in range(new_start, full_end, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                if BLOCK_D == HEAD_DIM:  # every key of these tiles exists: unpredicated loads
                    k = tl.load(kv_base + j[:, None] * sk_t + d[None, :])
                    v = tl.load(vv_base + j[:, None] * sv_t + d[None, :])
                else:
                    k = tl.load(kv_base + j[:, None] * sk_t + d[None, :], mask=d_ok[None, :], other=0.0)
                    v = tl.load(vv_base + j[:, None] * sv_t + d[None, :], mask=d_ok[None, :], other=0.0)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, s_scale, row_ok[:, None], False, DOT_FP32, cap,
                                        cap_scale, SOFTCAP)
            for j0 in range(full_end, last - context, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                j_ok = j < n_q
                k = tl.load(kv_base + j[:, None] * sk_t + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(vv_base + j[:, None] * sv_t + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
                kp = context + j
                allowed = (kp[None, :] <= pos[:, None]) & j_ok[None, :] & row_ok[:, None]
                if HAS_WINDOW:
                    allowed = allowed & (kp[None, :] > pos[:, None] - window)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, s_scale, allowed, True, DOT_FP32, cap,
                                        cap_scale, SOFTCAP)
        out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        t_glob = (q_begin + tok).to(tl.int64)
        if SPLITS == 1:
            o_ptrs = O + head[:, None] * so_h + t_glob[:, None] * so_t + d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:  # partial result and its log-sum-exp (base 2; -inf where this slice saw no key), combined after
            p_ptrs = O_PART + split.to(tl.int64) * sp_s + head[:, None] * sp_h + t_glob[:, None] * sp_t + d[None, :]
            tl.store(p_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + split.to(tl.int64) * sl_s + head * sl_h + t_glob, lse, mask=row_ok)


@triton.jit
def _combine_kernel(O_PART, LSE, O, sp_s, sp_h, sp_t, sl_s, sl_h, so_h, so_t,
                    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): the softmax over all the slices' keys."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, SPLITS).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE + s * sl_s + h * sl_h + t)
    w = tl.math.exp2(lse - tl.max(lse, axis=0))
    part = tl.load(O_PART + s[:, None] * sp_s + h * sp_h + t * sp_t + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(O + h * so_h + t * so_t + d, out.to(O.dtype.element_ty), mask=d < HEAD_DIM)


#: Tuning space: query tokens per program (``query_rows`` makes BLOCK_Q · GROUP rows a power of two >= 16), KV tile,
#: warps, stages, SPLITS, the number of slices the key range is cut into (split-KV, for few programs over long
#: contexts), and optionally maxnreg, a cap on registers per thread (more programs per SM; ``prune`` offers a capped
#: config only to the steps of its kind: BLOCK_Q 4 to decode, BLOCK_Q >= 16 to prompt steps).
CONFIGS = [
    {"BLOCK_Q": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1},   # the default: any step
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1},    # decode
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "SPLITS": 1},
    {"BLOCK_Q": 4, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "SPLITS": 1},
    {"BLOCK_Q": 4, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4, "SPLITS": 1},    # decode over a bf16 cache
    # decode over an FP8 cache: a cap on registers per thread (a few spills) fits more programs on an SM (80: 6, 72
    # with the unmasked tiles' fewer live registers: 7). That wins at hundreds of sequences and loses at about two
    # waves of programs, so the tuner decides per bucket. (8 warps at 3 stages made the block-table loads
    # asynchronous but read slower: dropped.) BENCHMARKS.md, 2026-12-01, "register caps" and "unmasked tiles".
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1, "maxnreg": 80},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 1, "maxnreg": 72},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "SPLITS": 1, "maxnreg": 96},
    {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "SPLITS": 1},   # prefill
    {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "SPLITS": 1},
    {"BLOCK_Q": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "SPLITS": 1},
    {"BLOCK_Q": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "SPLITS": 1},
    {"BLOCK_Q": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "SPLITS": 1},
    {"BLOCK_Q": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "SPLITS": 1},
    {"BLOCK_Q": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "SPLITS": 1},
    # prompt steps over an FP8 cache: capped at 128 registers (from 255, some spills) so that two programs of 8 warps
    # share an SM (BENCHMARKS.md, 2026-12-01, "prompt attention over an FP8 cache")
    {"BLOCK_Q": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "SPLITS": 1, "maxnreg": 128},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "SPLITS": 4},    # long context, small batch
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 8},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 16},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLITS": 32},
    {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 2, "num_stages": 2, "SPLITS": 64},
]


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0, cos: torch.Tensor | None = None,
             sin: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
             v_out: torch.Tensor | None = None, *, k_norm: torch.Tensor | None = None,
             norm_eps: float | None = None) -> None:
    """Scatter the new tokens' K and V ([1, kv_heads, tokens, head_dim], any strides with unit last
    stride) into their cache slots; an FP8 cache stores value / scale, saturated. With ``k_norm`` (a head_dim
    weight) each head of K is RMS-normed first (``norm_eps``); with ``cos``/``sin`` (``[tokens, head_dim]``
    rows), K is then rotated. ``k_out`` / ``v_out`` (shaped like k, unit last stride) receive K and V as the
    cache holds them: normed and rotated, and over an FP8 cache value / scale rounded to e4m3 (in their own
    dtype, e.g. fp16, which holds every e4m3 value)."""
    _, num_blocks, page, kv_heads, head_dim = kv_cache.shape
    if head_dim % 2:
        raise WorkbenchError(f"write_kv: head_dim must be even (the kernel copies it in two halves), not {head_dim}")
    if kv_cache.stride(-1) != 1:
        raise WorkbenchError(f"write_kv: the KV cache's head dim must be contiguous (strides {kv_cache.stride()})")
    tokens = k.shape[2]
    if tokens == 0:
        return
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    rope = cos is not None
    cos, sin = (cos, sin) if rope else (k, k)  # unused
    k_out_ = k if k_out is None else k_out
    v_out_ = v if v_out is None else v_out
    _write_kv_kernel[(tokens,)](
        k, v, kv_cache, slot_mapping, cos, sin, k_out_, v_out_, k if k_norm is None else k_norm, k.stride(1),
        k.stride(2), v.stride(1), v.stride(2), *kv_cache.stride()[:4], cos.stride(0) if rope else 0,
        k_out_.stride(1), k_out_.stride(2), v_out_.stride(1), v_out_.stride(2), float(k_scale), float(v_scale),
        float(norm_eps or 0.0), PAGE=page, KV_HEADS=kv_heads, HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        QUANT=kv_cache.dtype in FP8_DTYPES, ROPE=rope, HAS_K_OUT=k_out is not None, HAS_V_OUT=v_out is not None,
        NORM=k_norm is not None, NORM_ROUND=not _weight_first(k_norm, k),
        num_warps=4 if kv_heads * head_dim >= 1024 else 1)


def _weight_first(norm: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a q/k norm multiplies by its weight before its one rounding: an fp32 weight over 16-bit values
    (Gemma 3's derived 1 + w), as ``workbench.rms_norm`` does."""
    return norm is not None and norm.dtype == torch.float32 and x.dtype != torch.float32


def query_rows(block_q: int, group: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q) of a launch at a config's ``BLOCK_Q`` and GQA ``group``: the program's query rows,
    BLOCK_Q · GROUP rounded up to a power of two (``tl.arange``) of at least 16 (``tl.dot`` on a GPU), and the
    tokens it takes, as many as fit. At a power-of-two group, BLOCK_Q · GROUP rows (BLOCK_Q raised to fill 16);
    at 3, 5 or 7 query heads per KV head (SmolLM2's 9 / 3, Qwen2's 14 / 2 and 28 / 4) the block holds
    ``rows // group`` tokens and its last ``rows % group`` rows are padding: BLOCK_Q 16 at group 3 is 21 tokens
    in 64 rows (one padding row), where rounding the tokens up to 16 would pad 16 of them."""
    rows = triton.next_power_of_2(max(block_q * group, 16))
    return rows, rows // group


def _rope_rows(t: torch.Tensor, tokens: int, head_dim: int) -> torch.Tensor:
    """cos or sin ([.., tokens, head_dim], one row per token; the graph's [1, 1, tokens, head_dim]) as
    [tokens, head_dim] with a unit last stride."""
    rows = t.reshape(-1, head_dim)
    if rows.shape[0] != tokens:
        raise WorkbenchError(f"paged_attention: cos/sin hold {rows.shape[0]} rows of {head_dim}, not one per "
                             f"token ({tokens}); pass [1, 1, tokens, head_dim] tables")
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float | None = None, window: int | None = None,
                    k_scale: float | None = None, v_scale: float | None = None,
                    config: dict | None = None, *, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, norm_eps: float | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Same contract as the reference ``workbench.paged_attention`` (see ``kernels/fused.py``)."""
    config = config or CONFIGS[0]
    _, num_blocks, page, kv_heads, head_dim = kv_cache.shape
    k_scale, v_scale = k_scale or 1.0, v_scale or 1.0
    heads, tokens = q.shape[1], q.shape[2]
    # this step's own keys are read contiguous, not gathered through the block table: from k/v as given, or
    # as the cache write leaves them in side buffers (rotated; over an FP8 cache, in steps with prompt tokens,
    # rounded as the cache holds them, in fp16); decode steps over an FP8 cache read them back from the cache
    from_cache = config.get("NEW_FROM_CACHE", False)  # every key through the block table (batch-invariant mode)
    new_e4m3 = kv_cache.dtype in FP8_DTYPES and q.shape[2] > seq_lens.shape[0] and not from_cache
    new_from_input = (kv_cache.dtype == k.dtype or new_e4m3) and not from_cache
    rope = cos is not None
    norm = q_norm is not None  # q normed inside the attention kernel, k by the cache write (before RoPE)
    if norm and k_norm is None:
        raise WorkbenchError("paged_attention: q_norm without k_norm; the q/k norms move inside together")
    if rope:  # q rotated inside the attention kernel, k by the cache write
        cos, sin = _rope_rows(cos, tokens, head_dim), _rope_rows(sin, tokens, head_dim)

    def side_buffer(dtype):  # token-major like the graph's k/v
        return torch.empty(1, tokens, kv_heads, head_dim, dtype=dtype, device=k.device).transpose(1, 2)

    # over an FP8 cache, fp16 copies (fp16 holds every e4m3 value; the kernel's dots run in fp16 there)
    transformed = rope or norm  # the step's own keys are read as write_kv leaves them, not as given
    k_new = (side_buffer(torch.float16) if new_e4m3 else side_buffer(k.dtype) if transformed and new_from_input
             else None)
    v_new = side_buffer(torch.float16) if new_e4m3 else None
    write_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale, cos if rope else None, sin, k_new, v_new,
             k_norm=k_norm if norm else None, norm_eps=norm_eps)
    k = k if k_new is None else k_new
    v = v if v_new is None else v_new
    group = heads // kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    if new_from_input:
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    # token-major ([1, tokens, heads, dim] underneath): the graph's transpose + reshape after it copies nothing
    out = torch.empty(1, tokens, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    seqs = seq_lens.shape[0]
    interpret = bool(os.environ.get("TRITON_INTERPRET"))
    dot_f16 = kv_cache.dtype in FP8_DTYPES and q.dtype != torch.float32  # the interpreter's fp16 is right
    kc, vc = kv_cache[0], kv_cache[1]
    if not rope:
        cos = sin = q  # unused
    scale = head_dim ** -0.5 if scale is None else scale
    # soft-capped scores (Gemma 2): cap * tanh(raw · scale · k_scale / cap), then only log2 e in the exponent
    s_scale = LOG2E if softcap else scale * k_scale * LOG2E
    cap, cap_scale = (float(softcap), scale * k_scale / softcap) if softcap else (1.0, 1.0)

    def launch(cfg: dict, seq_mode: int) -> None:
        block_m, block_q = query_rows(cfg["BLOCK_Q"], group)
        splits = cfg.get("SPLITS", 1)
        programs = seqs if seq_mode == 1 else tokens // block_q + seqs
        if splits > 1:
            part = torch.empty(splits, heads, tokens, head_dim, dtype=torch.float32, device=q.device)
            lse = torch.empty(splits, heads, tokens, dtype=torch.float32, device=q.device)
        else:
            part = lse = out  # unused
        # an FP8 cache read as int16 pairs (see the module's docstring); "PAIRS": False reads it byte by byte
        pairs = dot_f16 and head_dim >= 32 and cfg.get("PAIRS", True)
        block_seq = query_start_loc  # unused
        if seq_mode == 2:
            block_seq = torch.empty(programs, dtype=torch.int32, device=q.device)
            _block_seq_kernel[(triton.cdiv(programs, 256),)](query_start_loc, block_seq, seqs, programs,
                                                              BLOCK_Q=block_q, BLOCK=256, num_warps=4)
        _paged_attention_kernel[(programs, kv_heads, splits)](
            q, k, v, kc, vc, out, block_tables, seq_lens, query_start_loc, part, lse, cos, sin, block_seq,
            q_norm if norm else q, q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
            out.stride(1), out.stride(2), kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            cos.stride(0) if rope else 0, seqs, s_scale, v_scale, window or 0, float(norm_eps or 0.0), cap, cap_scale,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q,
            BLOCK_N=cfg["BLOCK_N"], PAGE=page, HAS_WINDOW=window is not None,
            DOT_FP32=(interpret or q.dtype == torch.float32) and not dot_f16, SPLITS=splits,
            NEW_FROM_INPUT=new_from_input, DOT_F16=dot_f16, ROPE=rope, PAIRS=pairs,
            PAIRS_ASM=pairs and not interpret, SEQ_MODE=seq_mode, ROWS=block_m, NORM=norm, SOFTCAP=bool(softcap),
            NORM_ROUND=not _weight_first(q_norm, q),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}))
        if splits > 1:
            _combine_kernel[(tokens, heads)](
                part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                out.stride(1), out.stride(2), SPLITS=splits, HEAD_DIM=head_dim,
                BLOCK_D=triton.next_power_of_2(head_dim))

    if q.is_cuda:  # a config tuned or written for another head dim or GPU: its pipeline cut to fit this one
        limit = _smem_limit(q.device)
        config = dict(fit_stages(config, group, head_dim, limit) or {**config, "num_stages": 1})
        if config.get("DECODE"):
            config["DECODE"] = fit_stages(config["DECODE"], group, head_dim, limit) or {**config["DECODE"],
                                                                                        "num_stages": 1}
    decode = config.get("DECODE")
    if decode and tokens > seqs:  # a mixed step: single-token sequences at the decode config, the rest at this one
        if decode.get("SPLITS", 1) != 1:
            raise WorkbenchError(f"paged_attention: a DECODE sub-config runs one program per sequence, so it "
                                 f"cannot split the keys (SPLITS {decode['SPLITS']}); drop SPLITS from {decode}")
        launch(decode, 1)
        launch(config, 2)
    else:
        launch(config, 0)
    return out


#: The largest query tile (rows × BLOCK_D, each an fp32 accumulator and an operand element) ``prune`` offers: 256
#: rows at head dim 128, 128 at 256 (see ``prune``)
MAX_QUERY_TILE = 32768

#: The decode launch of a mixed step (``"DECODE"`` in a config; see ``paged_attention``): 4 query rows per KV head,
#: int16 pairs, registers capped at 80 so that 6 programs share an SM: the decode config measured fastest at the
#: hundreds of decodes a mixed step holds in the offline runs (BENCHMARKS.md, 2026-12-01, "register caps").
DECODE_CONFIG = {"BLOCK_Q": 4, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "maxnreg": 80}


def shared_memory(config: dict, group: int, head_dim: int) -> int:
    """Bytes of shared memory the attention kernel asks for at ``config``, GQA ``group`` and ``head_dim``, with
    16-bit operands (an FP8 cache's prompt steps read this step's keys from fp16 copies, pipelined like a bf16
    cache's; its decode steps ask for less). Per tile: K and V of BLOCK_N × BLOCK_D each, Q of BLOCK_M × BLOCK_D,
    P of BLOCK_M × BLOCK_N. Programs of 64 query rows or more keep ``num_stages`` K/V tiles in flight and Q; fewer
    rows keep one K/V tile fewer (a single K tile at one stage), Q and P. The formula gives exactly what Triton 3.9
    compiled for sm_90 asked for at 16 configs (head dims 128 and 256, 16 to 256 rows, 1 to 3 stages, 4 and 8
    warps; BENCHMARKS.md, 2026-12-07, "shared memory of the attention kernel at head dim 256")."""
    rows, _ = query_rows(config["BLOCK_Q"], group)
    block_d = triton.next_power_of_2(head_dim)
    tile = config["BLOCK_N"] * block_d * 2  # one of K or V
    q, p = rows * block_d * 2, rows * config["BLOCK_N"] * 2
    stages = config["num_stages"]
    if rows >= 64:
        return 2 * stages * tile + q
    return max(2 * (stages - 1), 1) * tile + q + p


def fit_stages(config: dict, group: int, head_dim: int, limit: int) -> dict | None:
    """``config`` with its pipeline cut to as many stages as fit ``limit`` bytes of shared memory (itself when it
    fits); None when even one stage does not. Head dim 256 (Gemma) is where 3 stages stop fitting an H100."""
    stages = config["num_stages"]
    while stages > 1 and shared_memory({**config, "num_stages": stages}, group, head_dim) > limit:
        stages -= 1
    fitted = config if stages == config["num_stages"] else {**config, "num_stages": stages}
    return fitted if shared_memory(fitted, group, head_dim) <= limit else None


def _fit_all(configs: list[dict], group: int, head_dim: int, limit: int) -> list[dict]:
    """Each config fitted to ``limit`` (``fit_stages``), those that cannot fit dropped, duplicates once."""
    out = []
    for c in configs:
        fitted = fit_stages(c, group, head_dim, limit)
        if fitted is not None and fitted not in out:
            out.append(fitted)
    return out


def prune(configs: list[dict], args: tuple, kwargs: dict) -> list[dict]:
    """Configs for a step's shape. Steps of at most 4 new tokens per sequence on average (decode) get every
    config but the prompt register caps: split-KV (where the query blocks alone are few) and the decode caps
    among them. Steps of more get the prompt configs (BLOCK_Q >= 16: a 4-token block multiplies a tile of keys
    per 4 queries) with their register caps, unsplit (prefill has plenty of programs, and its partial outputs
    would be huge).

    Over an FP8 cache, prompt steps also try each config reading the cache byte by byte (``"PAIRS": False``):
    int16 pairs win decode but lost a long prefill, and chunks after cached tokens go either way (BENCHMARKS.md,
    2026-11-25, "int16 pairs"). (Reading the step's own keys back from the cache, ``"NEW_FROM_CACHE"``, is not
    offered: since they come from write_kv's fp16 copies, it lost every prompt step measured, BENCHMARKS.md,
    2026-12-01, "prompt attention over an FP8 cache".)

    A step with prompt chunks beside decodes (sequences of one new token) also tries each config with
    its decodes in a launch of their own at ``DECODE_CONFIG``: at a prompt config (BLOCK_Q 32-64) a
    decode program multiplies 128-256 query rows of which GROUP are real.

    Every config's pipeline is cut to the stages that fit the device's shared memory (``fit_stages``; an H100's
    232,448 B per block off the GPU too): at head dim 256, 3 stages of 64-key tiles do not fit beside 64 or more
    query rows, nor of 128-key tiles at any size.

    Configs whose query tile (``query_rows`` × BLOCK_D) exceeds ``MAX_QUERY_TILE`` elements are dropped (all of
    them never: the smallest stays): at GROUP 8 and head dim 256 (Gemma-2B), BLOCK_Q 64 compiles for sm_90, slowly,
    to a kernel asking for more shared memory than a block gets (227 KB), and BLOCK_Q 32 to one that spills; at
    groups 5 and 7 (Qwen2) BLOCK_Q 64 rounds up to 512 rows. Llama-3-8B's configs (group 4,
    head dim 128: at most 256 rows) all stay. (The compile figures: BENCHMARKS.md, "Figures moved out of source
    docstrings".)"""
    q, kv_cache, seq_lens, query_start_loc = args[0], args[3], args[6], args[7]
    group, block_d = q.shape[1] // kv_cache.shape[3], triton.next_power_of_2(kv_cache.shape[-1])
    tiles = {id(c): query_rows(c["BLOCK_Q"], group)[0] * block_d for c in configs}
    configs = ([c for c in configs if tiles[id(c)] <= MAX_QUERY_TILE]
               or [min(configs, key=lambda c: tiles[id(c)])])
    # pipelines sized to the device's shared memory (head dim 256: fewer stages); never empty
    fitted = _fit_all(configs, group, kv_cache.shape[-1], _smem_limit(q.device))
    configs = fitted or [{**min(configs, key=lambda c: tiles[id(c)]), "num_stages": 1}]
    tiles = {id(c): query_rows(c["BLOCK_Q"], group)[0] * block_d for c in configs}
    if q.shape[2] <= 4 * seq_lens.shape[0]:
        return [c for c in configs if "maxnreg" not in c or c["BLOCK_Q"] < 16]
    unsplit = [c for c in configs if c.get("SPLITS", 1) == 1]
    kept = ([c for c in unsplit if c["BLOCK_Q"] >= 16]
            or [min(unsplit, key=lambda c: tiles[id(c)])])  # many query heads per KV head: a decode config
    if kv_cache.dtype in FP8_DTYPES:
        kept = kept + [{**c, "PAIRS": False} for c in kept]
    new = query_start_loc.diff()
    if bool((new == 1).any()) and bool((new > 1).any()):  # tuning time only: one host read of the step's lengths
        kept += [{**c, "DECODE": DECODE_CONFIG} for c in kept]
    return kept


def supports(args: tuple, kwargs: dict) -> str | None:
    """``paged_attention.supports``: every head count, GQA group and even head dim (``query_rows`` pads the rows,
    BLOCK_D the head dim to powers of two); ``write_kv`` copies the head dim in two halves."""
    cache = args[3] if len(args) > 3 else kwargs.get("kv_cache")
    if cache is not None and cache.shape[-1] % 2:
        return f"head_dim {cache.shape[-1]} is odd (write_kv copies it in two halves)"
    return None


def invariant(config: dict | None) -> str | None:
    """``paged_attention.invariant`` (``kernels/invariant.py``): why ``config`` held for every step would still give a
    row another result beside other rows or chunks (see the module docstring's "Batch invariance"), or None."""
    if config is None:
        return "no config held"
    if config.get("SPLITS", 1) != 1:
        return "split-KV cuts the keys where the query block's last position puts the cut, which moves with chunking"
    if config.get("DECODE"):
        return "a DECODE sub-config runs decodes at another config when a prompt chunk shares their step"
    if not config.get("NEW_FROM_CACHE"):
        return "this step's own keys are tiled from the chunk's first token, so chunking changes the sums"
    return None


def invariant_configs(configs: list[dict], args: tuple, kwargs: dict) -> list[dict]:
    """``paged_attention.invariant_configs``: what the tuner times in the batch-invariant mode: each unsplit config
    without a DECODE sub-config, pipelined to fit the device (``fit_stages``), its query tile within
    ``MAX_QUERY_TILE``, reading every key from the cache; the same list at every step, so one of them can run every
    bucket."""
    q, kv_cache = args[0], args[3]
    group, block_d = q.shape[1] // kv_cache.shape[3], triton.next_power_of_2(kv_cache.shape[-1])
    plain = [c for c in configs if c.get("SPLITS", 1) == 1 and not c.get("DECODE")
             and query_rows(c["BLOCK_Q"], group)[0] * block_d <= MAX_QUERY_TILE]
    fitted = _fit_all(plain, group, kv_cache.shape[-1], _smem_limit(q.device))
    return [{**c, "NEW_FROM_CACHE": True} for c in fitted]


paged_attention.configs = CONFIGS  # the autotuner's search space
paged_attention.prune = prune
paged_attention.invariant = invariant
paged_attention.invariant_configs = invariant_configs
paged_attention.invariant_default = {**CONFIGS[0], "NEW_FROM_CACHE": True}  # any step, every key from the cache
paged_attention.supports = supports
# grids depend on the step's shapes alone (each program finds its sequence on the device): graph-safe
paged_attention.graph_safe = True
REGISTRY.get("workbench.paged_attention").tactics["triton"] = paged_attention
REGISTRY.get("workbench.paged_attention").gpu_defaults = ("triton",)
