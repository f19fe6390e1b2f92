"""Triton kernels for Gemma's pointwise and norm ops, registered as their ``triton`` tactic.

    workbench.gelu_mul       GeGLU: gelu_tanh(gate) * up; gate and up may be strided slices of one fused GEMM
                             output (as ``silu_mul``'s, whose launch layout this follows)
    workbench.gelu_mul_fp8   the same writing float8_e4m3fn: rounded as the unfused op rounds, divided by the
                             static scale, saturated to ±448 (see ``fused.py``)
    workbench.softcap        cap * tanh(x / cap): Gemma 2's final logits, rows of any stride
    workbench.norm_add_rms_norm, norm_add_rms_norm_fp8
                             Gemma's post-norm, residual add and next norm in one pass over a row: x's norm, the
                             sum written, the sum's norm written (or quantized), each rounded as the unfused ops
    workbench.all_reduce_norm_add_rms_norm, all_reduce_norm_add_rms_norm_fp8
                             a tensor-parallel graph's all-reduce, then norm_add_rms_norm's kernel
                             (``collectives.reduce_first``)

Arithmetic is fp32; ``tanh`` is computed from one exp2 of -2|x| (``_tanh``), the same on the GPU and under the
CPU interpreter (Triton has no portable tanh). Each kernel reads its inputs once and writes once: the floor is
bytes / copy bandwidth. Configs are plain data (``CONFIGS``), the autotuner's space; the launchers take one
and default to the first. The soft cap of the attention scores is inside the paged attention
(``triton_attention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .collectives import reduce_first
from .triton_pointwise import _round_dtype, _rows, _scale_arg, _tanh, gated, register_triton

@triton.jit
def _softcap_kernel(X, O, stride_x, stride_o, n_cols, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # the reference's order: x / cap rounded to x's dtype, its tanh rounded, then times cap
    y = (x / cap).to(X.dtype.element_ty).to(tl.float32)
    y = _tanh(y).to(X.dtype.element_ty).to(tl.float32) * cap
    tl.store(O + row * stride_o + cols, y.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _norm_add_rms_norm_kernel(X, R, W1, W2, Y, S, SCALE, stride_x, stride_r, stride_y, stride_s, n_rows, n_cols, eps,
                              QUANT: tl.constexpr, ROUND1: tl.constexpr, OUT1: tl.constexpr, ROUND2: tl.constexpr,
                              ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # ROWS rows per program, each: x's norm (rounded as workbench.rms_norm rounds it: the normed value to x's dtype
    # before the weight with ROUND1, else once after an fp32 weight; its output in OUT1), the residual added
    # (rounded to the sum's dtype, stored), the sum's norm likewise (ROUND2), stored or quantized
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    normed = x * tl.math.rsqrt(tl.sum(x * x, axis=1)[:, None] / n_cols + eps)
    if ROUND1:
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
    w1 = tl.load(W1 + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    post = (normed * w1).to(OUT1).to(tl.float32)
    r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    total = (r + post).to(S.dtype.element_ty)
    tl.store(S + rows * stride_s + cols, total, mask=mask)
    t = total.to(tl.float32)
    normed = t * tl.math.rsqrt(tl.sum(t * t, axis=1)[:, None] / n_cols + eps)
    if ROUND2:
        normed = normed.to(S.dtype.element_ty).to(tl.float32)
    w2 = tl.load(W2 + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = normed * w2
    if QUANT:
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


#: The tuning space per kernel: plain data (block sizes, warps).
CONFIGS = {
    "gelu_mul": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (512, 4), (4096, 8))],
    "softcap": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))],
    "norm_add_rms_norm": [{"ROWS": r, "num_warps": w} for r, w in ((1, 4), (2, 8), (4, 8), (1, 8), (4, 16))],
}


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None, scale=None) -> torch.Tensor:
    return gated(gate, up, config or CONFIGS["gelu_mul"][0], scale, gelu=True)


def gelu_mul_fp8(gate: torch.Tensor, up: torch.Tensor, scale, config: dict | None = None) -> torch.Tensor:
    return gelu_mul(gate, up, config=config, scale=scale)


def _norm_dtypes(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, torch.dtype]:
    """``workbench.rms_norm``'s rounding for ``weight`` over ``x``: (round the normed value before the weight, output
    dtype). An fp32 weight over 16-bit x (Gemma's 1 + w) rounds once, after it, to x's dtype."""
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return False, x.dtype
    return True, torch.result_type(weight, x)


def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor,
                      eps: float, config: dict | None = None, scale=None):
    config = config or CONFIGS["norm_add_rms_norm"][0]
    x2, r2 = _rows(x), _rows(residual)
    n_rows, n_cols = x2.shape
    round1, out1 = _norm_dtypes(x, weight)
    total = torch.empty(x.shape, dtype=torch.result_type(residual, torch.empty(0, dtype=out1)), device=x.device)
    round2, out2 = _norm_dtypes(total, next_weight)
    y = torch.empty(x.shape, dtype=out2 if scale is None else torch.float8_e4m3fn, device=x.device)
    y2, s2 = y.view(-1, n_cols), total.view(-1, n_cols)
    rows = config["ROWS"]
    _norm_add_rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, weight, next_weight, y2, s2, y2 if scale is None else _scale_arg(scale, x.device), x2.stride(0),
        r2.stride(0), y2.stride(0), s2.stride(0), n_rows, n_cols, eps, QUANT=scale is not None, ROUND1=round1,
        OUT1=_round_dtype(out1), ROUND2=round2, ROUND=_round_dtype(out2), ROWS=rows,
        BLOCK=triton.next_power_of_2(n_cols), num_warps=config["num_warps"])
    return y, total


def norm_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor,
                          eps: float, scale, config: dict | None = None):
    return norm_add_rms_norm(x, residual, weight, next_weight, eps, config=config, scale=scale)


def softcap(x: torch.Tensor, cap: float, config: dict | None = None) -> torch.Tensor:
    config = config or CONFIGS["softcap"][0]
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, n_cols)
    block = min(config["BLOCK"], triton.next_power_of_2(n_cols))
    _softcap_kernel[(n_rows, triton.cdiv(n_cols, block))](x2, o2, x2.stride(0), o2.stride(0), n_cols, float(cap),
                                                          BLOCK=block, num_warps=config["num_warps"])
    return out


def register() -> None:
    """Add these kernels as the ``triton`` tactic of their ops (idempotent)."""
    register_triton((("workbench.gelu_mul", gelu_mul, "gelu_mul"),
                     ("workbench.gelu_mul_fp8", gelu_mul_fp8, "gelu_mul"),
                     ("workbench.softcap", softcap, "softcap"),
                     ("workbench.norm_add_rms_norm", norm_add_rms_norm, "norm_add_rms_norm"),
                     ("workbench.norm_add_rms_norm_fp8", norm_add_rms_norm_fp8, "norm_add_rms_norm"),
                     # a tensor-parallel graph's all-reduce fused with the norm: the all-reduce, then this kernel
                     ("workbench.all_reduce_norm_add_rms_norm", reduce_first(norm_add_rms_norm), "norm_add_rms_norm"),
                     ("workbench.all_reduce_norm_add_rms_norm_fp8", reduce_first(norm_add_rms_norm_fp8),
                      "norm_add_rms_norm")), CONFIGS)


register()
