"""Triton kernels for Gemma's pointwise ops, registered as their ``triton`` tactic.

    workbench.gelu_mul       GeGLU: gelu_tanh(gate) * up; gate and up may be strided slices of one fused GEMM
                             output (as ``silu_mul``'s, whose launch layout this follows)
    workbench.gelu_mul_fp8   the same writing float8_e4m3fn: rounded as the unfused op rounds, divided by the
                             static scale, saturated to ±448 (see ``fused.py``)
    workbench.softcap        cap * tanh(x / cap): Gemma 2's final logits, rows of any stride

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

from .registry import REGISTRY
from .triton_pointwise import _round_dtype, _rows, _scale_arg

#: sqrt(2 / pi), GELU's tanh approximation's factor
_GELU_K = 0.7978845608028654


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2(-2|x| log2 e): no overflow at any |x|; near 0 its absolute error is a few fp32
    ulps of 1 (a relative error there, which the callers' sums never see)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gelu_mul_kernel(G, U, O, SCALE, stride_g, stride_u, stride_o, n_cols, QUANT: tl.constexpr,
                     ROUND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    gelu = (0.5 * g * (1.0 + _tanh(inner))).to(ROUND).to(tl.float32)  # the reference rounds gelu(g)
    y = gelu * u
    if QUANT:
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(O + row * stride_o + cols, y.to(O.dtype.element_ty), mask=mask)


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


#: The tuning space per kernel: plain data (block sizes, warps).
CONFIGS = {
    "gelu_mul": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (512, 4), (4096, 8))],
    "softcap": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))],
}


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None, scale=None) -> torch.Tensor:
    config = config or CONFIGS["gelu_mul"][0]
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    out_dtype = torch.result_type(gate, up)
    out = torch.empty(gate.shape, dtype=out_dtype if scale is None else torch.float8_e4m3fn, device=gate.device)
    o2 = out.view(-1, n_cols)
    block = min(config["BLOCK"], triton.next_power_of_2(n_cols))
    _gelu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
        g2, u2, o2, o2 if scale is None else _scale_arg(scale, gate.device), g2.stride(0), u2.stride(0),
        o2.stride(0), n_cols, QUANT=scale is not None, ROUND=_round_dtype(out_dtype), BLOCK=block,
        num_warps=config["num_warps"])
    return out


def gelu_mul_fp8(gate: torch.Tensor, up: torch.Tensor, scale, config: dict | None = None) -> torch.Tensor:
    return gelu_mul(gate, up, config=config, scale=scale)


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
    for op, fn, space in (("workbench.gelu_mul", gelu_mul, "gelu_mul"),
                          ("workbench.gelu_mul_fp8", gelu_mul_fp8, "gelu_mul"),
                          ("workbench.softcap", softcap, "softcap")):
        fn.configs = CONFIGS[space]  # the autotuner's search space for this tactic
        fn.graph_safe = True  # launches only: grids from shapes, no host reads
        opdef = REGISTRY.get(op)
        opdef.tactics["triton"] = fn
        opdef.gpu_defaults = ("triton",)


register()
