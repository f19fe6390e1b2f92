"""GEMM tactics: a Triton bf16/fp16 linear, and FP8 / INT8 / weight-only INT8 linears with their references.

    aten.linear.default         x [..., K] @ weight[N, K]ᵀ + bias            tactic "triton"
    workbench.fp8_linear        x quantized to float8_e4m3fn (static per-tensor scale, or dynamic per-token
                                amax/448), weight fp8 with a per-tensor or per-output-channel scale
                                                                             tactics "scaled_mm", "triton"
    workbench.int8_linear       the same with int8 (amax/127, round half to even, ±127)
                                                                             tactics "int_mm", "triton"
    workbench.w8_linear         weight-only int8 (per-channel scale), x stays bf16/fp16   tactic "triton"

One Triton kernel serves all four: C = epilogue(A[M, K] @ B[K, N]) with B any strided
[K, N] view (``weight.t()``: no copy), program tiles in grouped-M order (GROUP_M row tiles
share each weight column tile while it is in L2), accumulation in fp32 (int32 for int8 × int8),
and an epilogue that multiplies by the row scale of A (per token) and the column scale of B
(per output channel), adds the bias and rounds once to the output dtype. Split-K configs
(``SPLIT_K`` > 1, for decode shapes whose output tiles cannot fill the GPU) write raw partial
sums that a second small kernel adds up before the same epilogue; that kernel is also the
epilogue of ``torch._int_mm``'s int32 output. At M = 1 (batch-1 decode) a second kernel, a GEMV
(``GEMV_CONFIGS``), streams BLOCK_N weight rows along K on the CUDA cores with the same epilogue: a
tensor-core tile would be 15/16 padding there, and the GEMV measured faster than both the tiles and cuBLAS at
every Llama-3-8B decode shape (``bench/gemm.py``; BENCHMARKS.md, 2026-11-25, "a GEMV kernel for M = 1").

The quantized ops take x in high precision and quantize it themselves: one Triton pass per
row on the GPU (amax, scale, saturate, round, cast), the torch helpers below elsewhere (the
Triton interpreter's float→fp8 casts are wrong). That pass reads and writes all of x, which at
prefill sizes is a noticeable share of an FP8 GEMM's time (BENCHMARKS.md, 2026-11-24, "FP8 GEMMs on x
quantized upstream"); so x may also arrive already quantized (fp8 or
int8, with its scale per tensor or per token), written so by the op that produced it, and the
op is then the GEMM alone. The references are the oracle: quantize x
with those helpers, dequantize both operands to fp32, matmul in fp32, add the bias, round to
the output dtype. Tactics differ from them by fp32 summation order (then one rounding), except on
Hopper, where FP8 tensor cores accumulate in reduced precision: ``torch._scaled_mm`` with
``fast_accum`` (a config; off: cuBLAS promotes partial sums to fp32) and Triton's FP8 dots (Triton's
default on sm90). fp32 inputs to the linear take exact fp32 dots (no TF32), as the reference does.

Quantization helpers (the quant stage and the references use them): ``fp8_scale(t, dim)``, ``quantize_fp8(t, scale)``,
``int8_scale(t, dim)``, ``quantize_int8(t, scale)`` (dim=None: one scale for the tensor;
dim=-1: one per row, kept as [..., 1]).

Configs are plain data (``CONFIGS``, the autotuner's search space per tactic, ``fn.configs``);
``fn.prune(configs, args, kwargs)`` drops those that cannot fit in shared memory or whose row
tile is far taller than M. The launchers take one config and default to the first that survives
pruning. Tests (Triton interpreter, small shapes) and the GPU benchmark:

    python -m pytest -q tests/test_kernels_gemm.py
    PYTHONUNBUFFERED=1 python3 bench/gemm.py --out $OUT        # --quick for fewer shapes
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

from ..errors import WorkbenchError
from . import cost as C
from .registry import REGISTRY, register_op

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric: -128 is never produced
MIN_SCALE = 1e-12  # floor of every computed scale: an all-zero row still gets a usable one
#: Hopper's (sm_90) opt-in shared memory per block (228 KB per SM less 1 KB the driver reserves): the default budget
H100_SMEM_BYTES = 227 * 1024


# --- quantization helpers (torch; the references and the CPU path use them) ---------------------------

def _amax_scale(t: torch.Tensor, dim: int | None, qmax: float) -> torch.Tensor:
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    return (amax.float() / qmax).clamp(min=MIN_SCALE)


def fp8_scale(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """fp32 scale mapping ``t``'s amax to 448: a scalar tensor, or one per slice along ``dim`` (kept, e.g. [M, 1])."""
    return _amax_scale(t, dim, FP8_MAX)


def int8_scale(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """fp32 scale mapping ``t``'s amax to 127: a scalar tensor, or one per slice along ``dim`` (kept)."""
    return _amax_scale(t, dim, INT8_MAX)


def quantize_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t / scale`` saturated to ±448 and rounded to nearest float8_e4m3fn; dequantize as ``q.float() * scale``."""
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_int8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t / scale`` rounded half to even and clamped to ±127, as int8."""
    return (t.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


# --- Triton kernels --------------------------------------------------------------------------------------

@triton.jit
def _scale_bias(acc, SA, SB, BIAS, rm, rn, M, N, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """acc · row scale (A_SCALE 1: one value, 2: one per row) · column scale (B_SCALE likewise) + bias, in fp32."""
    acc = acc.to(tl.float32)
    if A_SCALE == 1:
        acc = acc * tl.load(SA)
    elif A_SCALE == 2:
        acc = acc * tl.load(SA + rm, mask=rm < M, other=0.0)[:, None]
    if B_SCALE == 1:
        acc = acc * tl.load(SB)
    elif B_SCALE == 2:
        acc = acc * tl.load(SB + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["M"])  # M changes every step: one compiled kernel for all of them
def _gemm_kernel(A, B, C, SA, SB, BIAS, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cs,
                 stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr):
    # Grouped ordering: consecutive programs walk down GROUP_M row tiles before moving to the next
    # column tile, so a column tile of B (the weight) is reused from L2 by GROUP_M programs.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # rows/columns past the edge re-read valid ones (modulo), so only K needs a mask; they are never stored
    a_ptrs = A + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + (rn % N).to(tl.int64)[None, :] * stride_bn
    if DOT == "int":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # split pid_k takes K tiles pid_k, pid_k + SPLIT_K, ...
    for k in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K * SPLIT_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if DOT == "int":  # int8 × int8, exact int32 sums
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif DOT == "ieee":  # fp32 inputs, and everything under the interpreter (its bf16 arithmetic is wrong)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:  # tensor cores in A's dtype (bf16, fp16, fp8); int8 weights of w8_linear convert here
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BLOCK_K * SPLIT_K * stride_ak
        b_ptrs += BLOCK_K * SPLIT_K * stride_bk

    mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = C + pid_k * stride_cs + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    if SPLIT_K == 1:
        out = _scale_bias(acc, SA, SB, BIAS, rm, rn, M, N, A_SCALE, B_SCALE, HAS_BIAS)
        tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)
    else:  # raw partial sums; _reduce_kernel adds them and applies the epilogue
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _reduce_kernel(P, SA, SB, BIAS, C, M, N, stride_ps, stride_pm, stride_cm, SPLITS: tl.constexpr,
                   A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """C = epilogue(sum over s of P[s]): P is [SPLITS, M, N] fp32 or int32 (summed exactly in int32)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    ptrs = P + rm.to(tl.int64)[:, None] * stride_pm + rn[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for s in range(1, SPLITS):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0)
    out = _scale_bias(acc, SA, SB, BIAS, rm, rn, M, N, A_SCALE, B_SCALE, HAS_BIAS)
    tl.store(C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(A, B, C, SA, SB, BIAS, M, N, K, stride_am, stride_ak, stride_bn, stride_cm, stride_cn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INT: tl.constexpr):
    """One row of A times B for BLOCK_N columns: grid (column blocks, rows). B is the weight [N, K] with unit
    K stride (``weight.t()`` of a row-major weight), streamed in [BLOCK_N, BLOCK_K] tiles, multiplied by the
    row's slice of A and summed over K on the CUDA cores (fp32; int32 for int8 × int8): no tensor-core tile
    to fill, so nothing is padded at M = 1."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1)
    rk = tl.arange(0, BLOCK_K)
    b_ptrs = B + (rn % N).to(tl.int64)[:, None] * stride_bn + rk[None, :]
    a_ptrs = A + row.to(tl.int64) * stride_am + rk * stride_ak
    acc = tl.zeros([BLOCK_N], dtype=tl.int32 if INT else tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            b = tl.load(b_ptrs)
            a = tl.load(a_ptrs)
        else:
            b = tl.load(b_ptrs, mask=rk[None, :] < K - k, other=0.0)
            a = tl.load(a_ptrs, mask=rk < K - k, other=0.0)
        if INT:
            acc += tl.sum(b.to(tl.int32) * a.to(tl.int32)[None, :], axis=1)
        else:
            acc += tl.sum(b.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        b_ptrs += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
    rm = row + tl.arange(0, 1)
    out = _scale_bias(acc[None, :], SA, SB, BIAS, rm, rn, M, N, A_SCALE, B_SCALE, HAS_BIAS)
    tl.store(C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn, out.to(C.dtype.element_ty),
             mask=(rn < N)[None, :])


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                          DYNAMIC: tl.constexpr, IS_INT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: (DYNAMIC) scale = max(amax / QMAX, MIN_SCALE) stored to S[row], else the scalar S;
    Q = x / scale saturated to ±QMAX (rounded half to even for int8), cast to Q's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    if DYNAMIC:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), QMAX), MIN_SCALE)
        tl.store(S + row, scale)
    else:
        scale = tl.load(S)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)  # IEEE division, as torch divides
        if IS_INT:  # adding and removing 1.5·2²³ rounds half to even (torch.round) for |q| < 2²²
            q = (q + 12582912.0) - 12582912.0
        tl.store(Q + row * stride_q + k0 + cols, q.to(Q.dtype.element_ty), mask=k0 + cols < K)


# --- configs and pruning -----------------------------------------------------------------------------------

def _cfg(bm, bn, bk, group, warps, stages, split=1):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages}


#: The tuning spaces. Large M is compute bound: 128-row tiles, 8 warps (two warpgroups) on 128x256 tiles,
#: 3-4 stages. Small M (decode) streams the weight: 16-64 row tiles (64 is one Hopper warpgroup MMA; below
#: that Triton uses the older MMA), long K steps, and split-K so that a few output tiles still give every
#: SM work. 8-bit operands take twice the K per stage.
CONFIGS = {
    "16bit": [
        _cfg(128, 256, 64, 8, 8, 3), _cfg(128, 128, 64, 8, 8, 4), _cfg(256, 128, 64, 8, 8, 3),
        _cfg(128, 128, 64, 8, 4, 4), _cfg(64, 256, 64, 8, 4, 4), _cfg(64, 128, 64, 8, 4, 4),
        _cfg(32, 64, 128, 1, 4, 4), _cfg(16, 64, 128, 1, 4, 4), _cfg(64, 64, 128, 1, 4, 4, split=4),
        _cfg(16, 128, 128, 1, 4, 4, split=8), _cfg(16, 64, 128, 1, 4, 4, split=4),
    ],
    "8bit": [
        _cfg(128, 256, 128, 8, 8, 3), _cfg(128, 128, 128, 8, 8, 4), _cfg(256, 128, 128, 8, 8, 3),
        _cfg(128, 128, 128, 8, 4, 4), _cfg(64, 256, 128, 8, 4, 4), _cfg(64, 128, 128, 8, 4, 4),
        _cfg(32, 64, 256, 1, 4, 4), _cfg(16, 64, 256, 1, 4, 4), _cfg(64, 64, 256, 1, 4, 3, split=4),
        _cfg(16, 128, 256, 1, 4, 3, split=8), _cfg(16, 64, 256, 1, 4, 4, split=4),
    ],
}


def _gemv(bn, bk, warps):
    return {"GEMV": True, "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": 1,
            "num_warps": warps, "num_stages": 1}


#: M = 1 (batch-1 decode): ``_gemv_kernel``, a few weight rows per program on the CUDA cores. It measured faster
#: than both the tensor-core tiles above and cuBLAS at every Llama-3-8B decode shape, close to copy bandwidth
#: (BENCHMARKS.md, 2026-11-25, "a GEMV kernel for M = 1").
GEMV_CONFIGS = {
    "16bit": [_gemv(8, 1024, 8), _gemv(8, 512, 4), _gemv(16, 1024, 8)],
    "8bit": [_gemv(8, 2048, 8), _gemv(8, 1024, 4), _gemv(16, 2048, 8)],
}
#: torch._scaled_mm: fast accumulation (Hopper's reduced-precision FP8 accumulator) is faster and less exact
SCALED_MM_CONFIGS = [{"fast_accum": True}, {"fast_accum": False}]


def smem_bytes(config: dict, a_bytes: int, b_bytes: int) -> int:
    """Shared memory of the operand pipeline: one A and one B tile per stage."""
    return (config["BLOCK_M"] * a_bytes + config["BLOCK_N"] * b_bytes) * config["BLOCK_K"] * config["num_stages"]


def prune_configs(configs: list[dict], M: int, N: int, K: int, *, a_bytes: int, b_bytes: int,
                  smem_limit: int = H100_SMEM_BYTES) -> list[dict]:
    """The configs worth timing for an [M, K] x [K, N] product: those whose pipeline fits ``smem_limit``
    bytes, whose row tile is at most twice M rounded up to a power of two (64 rows, one warpgroup MMA,
    always pass), and (split-K) that are for small M (<= 64) and leave every split at least one K tile;
    GEMV configs at M = 1 only. Never empty: if nothing passes, the tile config with the least shared
    memory is kept."""
    rows = triton.next_power_of_2(max(M, 1))
    keep = [c for c in configs if (M == 1 if c.get("GEMV") else
            smem_bytes(c, a_bytes, b_bytes) <= smem_limit and c["BLOCK_M"] <= max(64, 2 * rows)
            and (c.get("SPLIT_K", 1) == 1 or (M <= 64 and K >= c["SPLIT_K"] * c["BLOCK_K"])))]
    tiles = [c for c in configs if not c.get("GEMV")] or configs
    return keep or [min(tiles, key=lambda c: (smem_bytes(c, a_bytes, b_bytes), c.get("SPLIT_K", 1)))]


#: Rough ratio of an SM's tensor-core rate to the rate it loads operand tiles (from L2) at, in
#: multiply-adds per loaded element: a BM x BN tile is compute-bound when BM*BN >= TILE_LOAD_RATIO*(BM+BN)
TILE_LOAD_RATIO = 64


def predicted_cost(config: dict, M: int, N: int, K: int, sm_count: int) -> tuple[int, int]:
    """A cost model to rank configs before timing them (the autotuner's ``top_k``), in tile-steps: the
    waves of output tiles (times split-K slices) over ``sm_count`` SMs, each as long as its tile's
    padded K steps, a step costing its multiply-adds or, for thin tiles, its operand loads
    (``TILE_LOAD_RATIO``). Captures padding, last-wave idling and thin tiles starving the MMA units;
    ties go to the larger tile. A GEMV config ranks first at M = 1 (it pads nothing; see ``GEMV_CONFIGS``)."""
    if config.get("GEMV"):
        return (-1 if M == 1 else 1 << 62), 0
    bm, bn, split = config["BLOCK_M"], config["BLOCK_N"], config.get("SPLIT_K", 1)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn) * split
    k_steps = triton.cdiv(triton.cdiv(K, split), config["BLOCK_K"])
    per_step = max(bm * bn, TILE_LOAD_RATIO * (bm + bn)) * config["BLOCK_K"]
    return triton.cdiv(tiles, sm_count) * k_steps * per_step, -bm * bn


def _mnk(args: tuple) -> tuple[int, int, int]:
    """M, N, K of a tactic called as fn(x [..., K], weight [N, K], ...)."""
    x, weight = args[0], args[1]
    return x.numel() // max(x.shape[-1], 1), weight.shape[0], weight.shape[1]


def _ranker(configs: list[dict], args: tuple, kwargs: dict) -> list[dict]:
    """``fn.rank(configs, args, kwargs)``: configs best first by ``predicted_cost``."""
    device = args[0].device
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    M, N, K = _mnk(args)
    return sorted(configs, key=lambda c: predicted_cost(c, M, N, K, sms))


def _tile_invariant(config: dict | None) -> str | None:
    """``fn.invariant`` of the Triton GEMM tactics (``kernels/invariant.py``): a tile config held for every M gives a
    row the same result whatever rows share the call (every row's K loop is the same, in BLOCK_K steps; measured
    bitwise on the GPU, BENCHMARKS.md, 2026-12-07, fourth entry); the GEMV, split-K and the launcher's per-M default
    do not hold that."""
    if config is None:
        return "no config held: the launcher picks its tile by M"
    if config.get("GEMV"):
        return "the M = 1 GEMV sums a row in another order than the tile that takes over at M = 2"
    if config.get("SPLIT_K", 1) != 1:
        return "split-K adds its partial sums in a second kernel, and the tuner sizes the split per token bucket"
    return None


def _cublas_invariant(config: dict | None) -> str | None:
    """``fn.invariant`` of the cuBLAS tactics: never (cuBLAS chooses its kernel by the shape, M included)."""
    return "cuBLAS chooses its kernel by the number of rows"


def _invariant_pruner(quantizes_x: bool):
    """``fn.invariant_configs(configs, args, kwargs)``: the tile configs the tuner times in the batch-invariant mode,
    whatever M (tiles taller than M included: one config runs every bucket): those that are not GEMV or split-K
    and whose pipeline fits the device's shared memory."""

    def configs_for(configs: list[dict], args: tuple, kwargs: dict) -> list[dict]:
        x, weight = args[0], args[1]
        a_bytes, b_bytes = 1 if quantizes_x else x.element_size(), weight.element_size()
        return [c for c in configs if _tile_invariant(c) is None
                and smem_bytes(c, a_bytes, b_bytes) <= _smem_limit(x.device)]

    return configs_for


def _smem_limit(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", H100_SMEM_BYTES)
    return H100_SMEM_BYTES


def _pruner(quantizes_x: bool):
    """``fn.prune(configs, args, kwargs)`` for a tactic called as fn(x, weight, ...): M, N, K from the arguments,
    A's bytes per element 1 where the op quantizes x, the device's shared-memory budget."""

    def prune(configs: list[dict], args: tuple, kwargs: dict) -> list[dict]:
        x, weight = args[0], args[1]
        return prune_configs(configs, *_mnk(args), a_bytes=1 if quantizes_x else x.element_size(),
                             b_bytes=weight.element_size(), smem_limit=_smem_limit(x.device))

    return prune


# --- launchers ----------------------------------------------------------------------------------------------

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K]: a view whenever the leading dims allow one (the kernels take any strides)."""
    return x.reshape(-1, x.shape[-1])


def _flat(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().reshape(-1).contiguous()


def _dot_mode(a_dtype: torch.dtype) -> str:
    if a_dtype == torch.int8:
        return "int"
    if a_dtype == torch.float32 or os.environ.get("TRITON_INTERPRET"):
        return "ieee"
    return "native"


def _scale_mode(scale: torch.Tensor | None) -> int:
    return 0 if scale is None else 1 if scale.numel() == 1 else 2


def _default_config(space: str, M: int, N: int, K: int, a_bytes: int, b_bytes: int, device) -> dict:
    return prune_configs(CONFIGS[space], M, N, K, a_bytes=a_bytes, b_bytes=b_bytes, smem_limit=_smem_limit(device))[0]


def _reduce(partials: torch.Tensor, out: torch.Tensor, a_scale, b_scale, bias) -> torch.Tensor:
    """out [M, N] = epilogue(partials.sum(0)) for partials [splits, M, N] (last dim contiguous)."""
    splits, M, N = partials.shape
    block_m, block_n = 16, 256
    _reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        partials, out if a_scale is None else a_scale, out if b_scale is None else b_scale,
        out if bias is None else bias, out, M, N, partials.stride(0), partials.stride(1), out.stride(0),
        SPLITS=splits, A_SCALE=_scale_mode(a_scale), B_SCALE=_scale_mode(b_scale), HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, config: dict, *, a_scale=None, b_scale=None,
          bias=None) -> torch.Tensor:
    """out [M, N] = (a [M, K] @ b [K, N]) · a_scale (one value or [M]) · b_scale (one value or [N]) + bias.

    ``b`` may have any strides (``weight.t()``); scales are fp32 and contiguous; out's last dim is contiguous."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    dot = _dot_mode(a.dtype)
    if config.get("GEMV"):
        if b.stride(0) != 1:  # the weight streamed along K needs unit K stride
            b = b.t().contiguous().t()
        _gemv_kernel[(triton.cdiv(N, block_n), M)](
            a, b, out, out if a_scale is None else a_scale, out if b_scale is None else b_scale,
            out if bias is None else bias, M, N, K, a.stride(0), a.stride(1), b.stride(1), out.stride(0),
            out.stride(1), BLOCK_N=block_n, BLOCK_K=block_k, A_SCALE=_scale_mode(a_scale),
            B_SCALE=_scale_mode(b_scale), HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, INT=dot == "int",
            num_warps=config["num_warps"], num_stages=1)
        return out
    split = config.get("SPLIT_K", 1)
    if split == 1:
        target, stride_s = out, 0
    else:  # raw partial sums per split, added up by _reduce
        target = torch.empty((split, M, N), dtype=torch.int32 if dot == "int" else torch.float32, device=a.device)
        stride_s = target.stride(0)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split)
    _gemm_kernel[grid](
        a, b, target, out if a_scale is None else a_scale, out if b_scale is None else b_scale,
        out if bias is None else bias, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_s,
        target.stride(-2), target.stride(-1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=config["GROUP_M"], SPLIT_K=split, A_SCALE=_scale_mode(a_scale), B_SCALE=_scale_mode(b_scale),
        HAS_BIAS=bias is not None, EVEN_K=K % (block_k * split) == 0, DOT=dot,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if split > 1:
        _reduce(target, out, a_scale, b_scale, bias)
    return out


def _quantize_rows(x2: torch.Tensor, input_scale: torch.Tensor | None, qdtype: torch.dtype):
    """The Triton quantizer: (q [M, K] in qdtype, scale [M] per row, or the static scale as [1])."""
    M, K = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((M, K), dtype=qdtype, device=x2.device)
    dynamic = input_scale is None
    scale = torch.empty(M, dtype=torch.float32, device=x2.device) if dynamic else _flat(input_scale)
    if M:
        block = min(triton.next_power_of_2(K), 2048)
        _quantize_rows_kernel[(M,)](x2, q, scale, K, x2.stride(0), q.stride(0),
                                    QMAX=INT8_MAX if qdtype == torch.int8 else FP8_MAX, MIN_SCALE=MIN_SCALE,
                                    DYNAMIC=dynamic,
                                    IS_INT=qdtype == torch.int8, BLOCK_K=block, num_warps=8 if block >= 1024 else 4)
    return q, scale


def _quantize_x(x2: torch.Tensor, input_scale: torch.Tensor | None, qdtype: torch.dtype):
    """x [M, K] quantized as the op's reference does it, and its scale ([M] per token, or [1] static).
    One Triton pass on the GPU; the torch helpers elsewhere (the interpreter's float→fp8 casts are wrong)."""
    if x2.dtype == qdtype:  # quantized upstream (e.g. by the norm that produced it)
        return (x2 if x2.stride(-1) == 1 else x2.contiguous()), _flat(input_scale)
    if x2.is_cuda:
        return _quantize_rows(x2, input_scale, qdtype)
    scale_fn, quant_fn = (int8_scale, quantize_int8) if qdtype == torch.int8 else (fp8_scale, quantize_fp8)
    scale = scale_fn(x2, dim=-1) if input_scale is None else input_scale.float().reshape(())
    return quant_fn(x2, scale), scale.reshape(-1)


def _check(op: str, x, weight, weight_scale, input_scale, bias, wdtype: torch.dtype,
           out_dtype: torch.dtype | None = None, qdtype: torch.dtype | None = None) -> tuple[int, int]:
    """Validate a quantized linear's arguments (one-line errors naming the fix); returns (N, K).
    ``qdtype``: the dtype the op quantizes x to, which x may already have (quantized upstream)."""
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise WorkbenchError(f"{op}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if weight.dtype != wdtype or weight.dim() != 2:
        raise WorkbenchError(f"{op}: weight must be a 2-D {wdtype} tensor [N, K], got {weight.dtype} "
                             f"{list(weight.shape)}; quantize it with workbench.kernels.gemm's helpers")
    prequantized = qdtype is not None and x.dtype == qdtype
    if x.dtype not in _FLOATS and not prequantized:
        also = f", or {qdtype} already quantized (with its input_scale)" if qdtype is not None else ""
        raise WorkbenchError(f"{op}: x must be bfloat16, float16 or float32 (the op quantizes it){also}, "
                             f"got {x.dtype}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise WorkbenchError(f"{op}: x's last dim is {x.shape[-1]} but weight is [N={N}, K={K}]; they must share K")
    if weight_scale.numel() not in (1, N):
        raise WorkbenchError(f"{op}: weight_scale must hold 1 value (per tensor) or N={N} (per output channel), "
                             f"got {weight_scale.numel()}")
    if prequantized:
        rows = x.numel() // K if K else 0
        if input_scale is None or input_scale.numel() not in (1, rows):
            got = "none" if input_scale is None else f"{input_scale.numel()} values"
            raise WorkbenchError(f"{op}: x is already {qdtype}, so input_scale must be the scale it was quantized "
                                 f"with: one value (per tensor) or one per token ({rows}); got {got}")
    elif input_scale is not None and input_scale.numel() != 1:
        raise WorkbenchError(f"{op}: input_scale must be one value (static per-tensor) or None (dynamic per-token), "
                             f"got {input_scale.numel()} values")
    if bias is not None and bias.numel() != N:
        raise WorkbenchError(f"{op}: bias must hold N={N} values, got {bias.numel()}")
    return N, K


def _out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype: as asked, else x's, else (x quantized upstream) bfloat16."""
    return out_dtype or (x.dtype if x.dtype in _FLOATS else torch.bfloat16)


#: Rows per matmul call in the CPU references under ``batch_invariant()`` (the last block zero-padded). CPU BLAS
#: chooses its kernel, its blocking and how it splits K over threads by the number of rows, so a row's result
#: depends on how many rows share the call: a request's logits would change with the other requests in its
#: step. Blocks of a fixed size give every row the same call shape wherever it sits (checked by
#: tests/test_paged.py at fp32 and bf16, 1-4 threads). 32 rows cost little padding when decoding; each block
#: re-packs the weight, which is why only runtime steps (where requests share a call) pay for it.
INVARIANT_ROWS = 32
_INVARIANT = contextvars.ContextVar("workbench_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Within the block, the CPU references compute each row independently of the other rows of the call
    (``rows_matmul``). The runtime's steps run under it (``runtime.executor``): a request's output does not
    depend on the requests that share its step. Whole-sequence work (perplexity, calibration) does not need it."""
    token = _INVARIANT.set(enabled)
    try:
        yield
    finally:
        _INVARIANT.reset(token)


def rows_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a [M, K] @ b [K, N] (+ bias)``; under ``batch_invariant()`` on the CPU, in blocks of ``INVARIANT_ROWS``
    rows so each row's result is independent of the other rows (bias added in the same call, so it rounds once as
    ``linear`` does). Elsewhere the plain product (GPU steps run the tactics, not these references)."""
    if a.device.type != "cpu" or a.shape[0] == 0 or not _INVARIANT.get():
        return a @ b if bias is None else torch.addmm(bias, a, b)
    m, r = a.shape[0], INVARIANT_ROWS
    pad = -m % r
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.promote_types(a.dtype, b.dtype))
    for i in range(0, a.shape[0], r):
        if bias is None:
            torch.mm(a[i:i + r], b, out=out[i:i + r])
        else:
            torch.addmm(bias, a[i:i + r], b, out=out[i:i + r])
    return out[:m]


@register_op("aten.linear.default", cost=C.matmul, replace=True, graph_safe=True,
             doc="aten::linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor; on the CPU row-blocked "
                 "(rows_matmul) so a row's result does not depend on the other rows")
def linear_reference(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """aten.linear's reference: torch's own, except on the CPU under ``batch_invariant()``, where the product runs
    in fixed row blocks (``rows_matmul``), so a request's output does not depend on its step's other requests."""
    if input.device.type != "cpu" or weight.dim() != 2 or input.dtype != weight.dtype or input.dim() == 0 \
            or not _INVARIANT.get():
        return torch.ops.aten.linear.default(input, weight, bias)
    y = rows_matmul(input.reshape(-1, input.shape[-1]), weight.t(), bias)
    return y.reshape(*input.shape[:-1], weight.shape[0])


def _dequantized_matmul(x, weight, weight_scale, input_scale, bias, out_dtype, quantize: str | None):
    """The references' arithmetic: (quantize x), dequantize to fp32, fp32 matmul, + bias, round once."""
    x2 = _rows(x)
    if quantize is None:
        xd = x2.float()
    elif x2.dtype in (torch.int8, torch.float8_e4m3fn):  # quantized upstream with input_scale
        sx = input_scale.float().reshape(-1, 1) if input_scale.numel() > 1 else input_scale.float().reshape(())
        xd = x2.float() * sx
    else:
        scale_fn, quant_fn = (int8_scale, quantize_int8) if quantize == "int8" else (fp8_scale, quantize_fp8)
        sx = scale_fn(x2, dim=-1) if input_scale is None else input_scale.float().reshape(())
        xd = quant_fn(x2, sx).float() * sx
    y = rows_matmul(xd, (weight.float() * weight_scale.float().reshape(-1, 1)).t())
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])


# --- aten.linear: the bf16/fp16 GEMM ----------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """The ``triton`` tactic of aten.linear.default: x [..., K] @ weight [N, K]ᵀ (+ bias) in x's dtype
    (fp32 inputs take exact fp32 dots, as the reference does without TF32)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise WorkbenchError(f"linear: x [..., {x.shape[-1]}] and weight {list(weight.shape)} do not multiply; "
                             "weight must be [N, K] with K = x's last dim")
    if x.dtype != weight.dtype or x.dtype not in _FLOATS:
        raise WorkbenchError(f"the triton linear takes x and weight of one dtype (bfloat16, float16 or float32), "
                             f"got {x.dtype} and {weight.dtype}; cast them, or run this node's reference")
    x2 = _rows(x)
    (M, K), N = x2.shape, weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    config = config or _default_config("16bit", M, N, K, x.element_size(), weight.element_size(), x.device)
    _gemm(x2, weight.t(), out, config, bias=bias)
    return out.view(*x.shape[:-1], N)


def _linear_supports(args: tuple, kwargs: dict) -> str | None:
    """``linear.supports``: x and a 2-D weight of one float dtype (meta tensors do); anything else runs elsewhere."""
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    if x is None or weight is None:
        return None  # shapes unknown here: the call checks them
    if weight.dim() != 2 or x.dtype != weight.dtype or x.dtype not in _FLOATS:
        return (f"the triton linear takes x and a 2-D weight of one dtype (bfloat16, float16 or float32), not "
                f"{x.dtype} and {weight.dtype} {list(weight.shape)}")
    return None


linear.supports = _linear_supports


# --- workbench.fp8_linear -------------------------------------------------------------------------------------

@register_op("workbench.fp8_linear", cost=C.matmul, graph_safe=True)
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """FP8 linear: x (bf16/fp16/fp32) quantized to float8_e4m3fn with the static scalar ``input_scale`` or,
    when None, per token (amax/448), times weight fp8 [N, K] with ``weight_scale`` per tensor or per output
    channel; + bias; in ``out_dtype`` (default x's). x may also arrive already in float8_e4m3fn, quantized
    upstream (a norm that writes fp8), with ``input_scale`` one value or one per token, and the output then
    defaults to bfloat16. Reference: dequantize, fp32 matmul, round once."""
    _check("workbench.fp8_linear", x, weight, weight_scale, input_scale, bias, torch.float8_e4m3fn, out_dtype,
           torch.float8_e4m3fn)
    return _dequantized_matmul(x, weight, weight_scale, input_scale, bias, _out_dtype(x, out_dtype), "fp8")


def _quantized_triton(op, x, weight, weight_scale, input_scale, bias, out_dtype, wdtype, qdtype, config):
    """Shared by the Triton tactics: (quantize x to qdtype, or None: weight-only), GEMM with the epilogue."""
    N, K = _check(op, x, weight, weight_scale, input_scale, bias, wdtype, out_dtype, qdtype)
    x2 = _rows(x)
    M = x2.shape[0]
    if qdtype is None:  # weight-only: x goes in as it is
        a, a_scale = x2, None
    else:
        a, a_scale = _quantize_x(x2, input_scale, qdtype)
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    config = config or _default_config("16bit" if qdtype is None else "8bit", M, N, K, a.element_size(), 1, x.device)
    _gemm(a, weight.t(), out, config, a_scale=a_scale, b_scale=_flat(weight_scale), bias=bias)
    return out.view(*x.shape[:-1], N)


def fp8_linear_triton(x, weight, weight_scale, input_scale=None, bias=None, out_dtype=None, config=None):
    """Triton: x quantized (one pass), fp8 × fp8 tensor-core dots with fp32 accumulation, scales and bias in
    the epilogue."""
    return _quantized_triton("workbench.fp8_linear", x, weight, weight_scale, input_scale, bias,
                             _out_dtype(x, out_dtype), torch.float8_e4m3fn, torch.float8_e4m3fn, config)


def fp8_linear_scaled_mm(x, weight, weight_scale, input_scale=None, bias=None, out_dtype=None, config=None):
    """torch._scaled_mm: cuBLASLt with per-tensor scales, row-wise scales (CUTLASS) where x is scaled per
    token or the weight per channel. Its CUDA rules are checked on every device (the CPU kernel is laxer),
    so unsupported inputs fail the same way everywhere, with a WorkbenchError the autotuner records."""
    op = "workbench.fp8_linear"
    N, K = _check(op, x, weight, weight_scale, input_scale, bias, torch.float8_e4m3fn, out_dtype,
                  torch.float8_e4m3fn)
    out_dtype = _out_dtype(x, out_dtype)
    rowwise = input_scale is None or input_scale.numel() > 1 or weight_scale.numel() > 1
    refusal = _scaled_mm_refusal(N, K, rowwise, out_dtype)
    if refusal:
        raise WorkbenchError(f"{op}: {refusal}; use the triton tactic for this shape")
    x2 = _rows(x)
    M = x2.shape[0]
    xq, sx = _quantize_x(x2, input_scale, torch.float8_e4m3fn)
    sw = _flat(weight_scale)
    if rowwise or not x.is_cuda:  # row-wise shapes; on the CPU also ~400x faster than scalar scales
        scale_a, scale_b = sx.expand(M).reshape(M, 1).contiguous(), sw.expand(N).reshape(1, N).contiguous()
    else:
        scale_a, scale_b = sx.reshape(()), sw.reshape(())
    if weight.stride(1) != 1:  # the second operand must be column-major: weight row-major [N, K]
        weight = weight.contiguous()
    late_bias = bias is not None and out_dtype == torch.float32  # _scaled_mm takes no bias with fp32 output
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b,
                         bias=None if bias is None or late_bias else bias.to(out_dtype), out_dtype=out_dtype,
                         use_fast_accum=(config or SCALED_MM_CONFIGS[0])["fast_accum"])
    if late_bias:
        y += bias.float()
    return y.view(*x.shape[:-1], N)


def _scaled_mm_refusal(N: int, K: int, rowwise: bool, out_dtype: torch.dtype) -> str | None:
    """Why cuBLAS's ``torch._scaled_mm`` cannot run an [M, K] x [K, N] FP8 product writing ``out_dtype``, or None."""
    if K % 16 or N % 16:
        return f"torch._scaled_mm needs K and N to be multiples of 16, got K={K}, N={N}"
    if rowwise and out_dtype != torch.bfloat16:
        return (f"torch._scaled_mm with per-token or per-channel (row-wise) scales writes only bfloat16, not "
                f"{out_dtype}")
    return None


def _scaled_mm_supports(args: tuple, kwargs: dict) -> str | None:
    """``fp8_linear_scaled_mm.supports``: its CUDA rules on the arguments' shapes and dtypes (meta tensors do), so
    that a GPU default falls back to the Triton tiles (an lm_head over a vocabulary of 32001, an fp32 output)."""
    names = ("x", "weight", "weight_scale", "input_scale", "bias", "out_dtype")
    bound = {**dict(zip(names, args)), **kwargs}
    x, weight, weight_scale = bound["x"], bound["weight"], bound["weight_scale"]
    if x is None or weight is None or weight_scale is None or weight.dim() != 2:
        return None  # shapes unknown here: the call checks them
    input_scale = bound.get("input_scale")
    rowwise = input_scale is None or input_scale.numel() > 1 or weight_scale.numel() > 1
    return _scaled_mm_refusal(weight.shape[0], weight.shape[1], rowwise, _out_dtype(x, bound.get("out_dtype")))


fp8_linear_scaled_mm.supports = _scaled_mm_supports


# --- workbench.int8_linear ------------------------------------------------------------------------------------

@register_op("workbench.int8_linear", cost=C.matmul, graph_safe=True)
def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """INT8 linear: x quantized to int8 with the static scalar ``input_scale`` or, when None, per token
    (amax/127, round half to even), times weight int8 [N, K] with ``weight_scale`` per tensor or per output
    channel; + bias; in ``out_dtype`` (default x's). x may also arrive already in int8 with its
    ``input_scale`` (one value or one per token); the output then defaults to bfloat16. Reference: dequantize,
    fp32 matmul, round once."""
    _check("workbench.int8_linear", x, weight, weight_scale, input_scale, bias, torch.int8, out_dtype, torch.int8)
    return _dequantized_matmul(x, weight, weight_scale, input_scale, bias, _out_dtype(x, out_dtype), "int8")


def int8_linear_triton(x, weight, weight_scale, input_scale=None, bias=None, out_dtype=None, config=None):
    """Triton: x quantized (one pass), int8 × int8 dots with exact int32 accumulation, scales and bias in the
    epilogue."""
    return _quantized_triton("workbench.int8_linear", x, weight, weight_scale, input_scale, bias,
                             _out_dtype(x, out_dtype), torch.int8, torch.int8, config)


def int8_linear_int_mm(x, weight, weight_scale, input_scale=None, bias=None, out_dtype=None, config=None):
    """torch._int_mm (cuBLASLt int8 → int32), then one Triton pass for scales, bias and rounding. Its CUDA
    rules (M > 16, K and N multiples of 8) are checked on every device."""
    op = "workbench.int8_linear"
    N, K = _check(op, x, weight, weight_scale, input_scale, bias, torch.int8, out_dtype, torch.int8)
    x2 = _rows(x)
    M = x2.shape[0]
    if M <= 16 or K % 8 or N % 8:
        raise WorkbenchError(f"{op}: torch._int_mm needs more than 16 rows and K, N multiples of 8, got M={M}, "
                             f"K={K}, N={N}; use the triton tactic for this shape")
    xq, sx = _quantize_x(x2, input_scale, torch.int8)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    acc = torch._int_mm(xq, weight.t())
    out = torch.empty((M, N), dtype=_out_dtype(x, out_dtype), device=x.device)
    _reduce(acc.unsqueeze(0), out, sx, _flat(weight_scale), bias)
    return out.view(*x.shape[:-1], N)


# --- workbench.w8_linear --------------------------------------------------------------------------------------

@register_op("workbench.w8_linear", cost=C.matmul, graph_safe=True)
def w8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only INT8 linear: x (bf16/fp16/fp32) times weight int8 [N, K] · weight_scale (per output channel,
    or one value) + bias, in x's dtype. Reference: dequantize the weight, fp32 matmul, round once."""
    _check("workbench.w8_linear", x, weight, weight_scale, None, bias, torch.int8)
    return _dequantized_matmul(x, weight, weight_scale, None, bias, x.dtype, None)


def w8_linear_triton(x, weight, weight_scale, bias=None, config=None):
    """Triton: int8 weight tiles converted to x's dtype in registers, fp32 accumulation, scale and bias in
    the epilogue: half the weight bytes of a bf16 GEMM, for memory-bound (decode) shapes."""
    return _quantized_triton("workbench.w8_linear", x, weight, weight_scale, None, bias, x.dtype, torch.int8, None,
                             config)


@triton.jit
def _dequant_rows_kernel(W, S, O, K, stride_w, stride_o, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """O[row, :] = (W[row, :] · scale) in fp32, rounded once to O's dtype; one program per (row, block)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    scale = tl.load(S + row) if PER_ROW else tl.load(S)
    w = tl.load(W + row * stride_w + cols, mask=mask, other=0).to(tl.float32)
    tl.store(O + row * stride_o + cols, (w * scale).to(O.dtype.element_ty), mask=mask)


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 weight [N, K] times its scale (per output channel or per tensor), in ``dtype``: one Triton pass
    on the GPU (1 byte read, 2 written per value), torch elsewhere; the product is rounded once."""
    scale = _flat(weight_scale)
    if not weight.is_cuda:
        return (weight.float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))).to(dtype)
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    block = min(2048, triton.next_power_of_2(k))
    _dequant_rows_kernel[(n, triton.cdiv(k, block))](weight, scale, out, k, weight.stride(0), out.stride(0),
                                                     PER_ROW=scale.numel() > 1, BLOCK=block, num_warps=4)
    return out


def w8_linear_dequant(x, weight, weight_scale, bias=None, config=None):
    """Dequantize the weight to x's dtype (one pass over it), then torch's GEMM (cuBLAS on a GPU): for
    compute-bound (prefill) shapes, where the GEMM's time dwarfs the pass. The weight is rounded to x's
    dtype once (the reference keeps it in fp32), so results differ from the reference by that rounding."""
    _check("workbench.w8_linear", x, weight, weight_scale, None, bias, torch.int8)
    w = dequantize_weight(weight if weight.stride(-1) == 1 else weight.contiguous(), weight_scale, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# --- registration -----------------------------------------------------------------------------------------------

def register() -> None:
    """Add the tactics to their ops, each with its tuning space and pruning (idempotent)."""
    space16, space8 = CONFIGS["16bit"] + GEMV_CONFIGS["16bit"], CONFIGS["8bit"] + GEMV_CONFIGS["8bit"]
    table = [  # op, tactic, fn, configs, Triton tiles to prune: whether the op quantizes x (1-byte A), None: none
        ("aten.linear.default", "triton", linear, space16, False),
        ("workbench.fp8_linear", "scaled_mm", fp8_linear_scaled_mm, SCALED_MM_CONFIGS, None),
        ("workbench.fp8_linear", "triton", fp8_linear_triton, space8, True),
        ("workbench.int8_linear", "int_mm", int8_linear_int_mm, None, None),
        ("workbench.int8_linear", "triton", int8_linear_triton, space8, True),
        ("workbench.w8_linear", "triton", w8_linear_triton, space16, False),
        ("workbench.w8_linear", "dequant", w8_linear_dequant, None, None),
    ]
    for op, name, fn, configs, quantizes_x in table:
        if configs is not None:
            fn.configs = configs  # the autotuner's search space for this tactic
        if quantizes_x is not None:  # Triton tiles: configs that cannot fit or far exceed M are skipped
            fn.prune = _pruner(quantizes_x)
            fn.rank = _ranker
            # the batch-invariant mode (kernels/invariant.py): one tile for every M; 64 x 128 rows fits every M
            fn.invariant = _tile_invariant
            fn.invariant_configs = _invariant_pruner(quantizes_x)
            fn.invariant_default = CONFIGS["8bit" if quantizes_x else "16bit"][5]
        else:
            fn.invariant = _cublas_invariant
        fn.graph_safe = True  # every tactic here: grids and scales from shapes, no host reads
        REGISTRY.get(op).tactics[name] = fn
    # untuned GPU steps: cuBLAS (the reference) for bf16 linears; the quantized ops' fastest general tactics
    # (_int_mm needs more than 16 rows, so INT8 takes the Triton tiles, which serve every M)
    for op, defaults in (("workbench.fp8_linear", ("scaled_mm", "triton")), ("workbench.int8_linear", ("triton",)),
                         ("workbench.w8_linear", ("triton", "dequant"))):
        REGISTRY.get(op).gpu_defaults = defaults


register()
