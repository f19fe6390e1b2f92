"""Triton kernels for the LayerNorm families' fused ops (``fused_ln.py``), registered as their ``triton`` tactic.

    workbench.layer_norm      ROWS rows per program: load, fp32 mean and variance (two passes over registers),
                              normalise, scale, shift, store
    workbench.add_layer_norm  the same with the residual add fused: writes the sum (rounded to its dtype, as the
                              reference rounds it before the norm) and the norm
    workbench.gelu            a block of one row's columns per program, exact (erf) or GPT-2's tanh form; x may be
                              a strided view
    workbench.partial_rope    one program per (batch, token, block of heads): the first r dims rotated, the rest
                              copied; cos/sin loaded once for the heads
    workbench.layer_norm_fp8, add_layer_norm_fp8, gelu_fp8
                              the same kernels writing float8_e4m3fn: the value rounded as the unfused op rounds it,
                              divided by the static scale, saturated to ±448

Arithmetic is in fp32 with one rounding at the store (the reference's ``layer_norm`` rounds once too; its GELU
rounds each step, which differs from one rounding by a unit of the last place in bf16, within the tests'
tolerance). Each reads its inputs once and writes its outputs once: the floor is bytes / copy bandwidth. On the CPU
they run under ``TRITON_INTERPRET=1`` (``tests/test_kernels_ln.py``, at small and odd shapes).

Configs (rows per program, block sizes, warps) are plain data per kernel (``CONFIGS``), the autotuner's search
space; the launchers take one config and default to the first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pointwise import _residual_rows, _rope_kernel, _round_dtype, _rows, _scale_arg, register_triton

#: ``gelu``'s modes as the kernel's constexpr
_APPROX = {"none": 0, "tanh": 1}


@triton.jit
def _layer_norm_kernel(X, R, W, B, Y, S, SCALE, stride_x, stride_r, stride_y, stride_s, n_rows, n_cols, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       QUANT: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1)[:, None] / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=1)[:, None] / n_cols
    y = centred * tl.math.rsqrt(variance + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if QUANT:  # the unfused norm's value (rounded to its dtype) / scale, saturated; IEEE division as torch's
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_kernel(X, O, SCALE, stride_x, stride_o, n_cols, APPROX: tl.constexpr, QUANT: tl.constexpr,
                 ROUND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if APPROX == 1:  # tanh(u) = sign(u)·(1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: no overflow at either end
        u = (x + x * x * x * 0.044715) * 0.7978845608028654
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        y = (x * 0.5) * (1.0 + tl.where(u < 0, -t, t))
    else:
        y = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    if QUANT:
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(O + row * stride_o + cols, y.to(O.dtype.element_ty), mask=mask)


#: The tuning space per kernel: plain data (rows or heads per program, block sizes, warps).
CONFIGS = {
    "layer_norm": [{"ROWS": r, "num_warps": w} for r, w in ((1, 4), (2, 8), (4, 8), (4, 16), (8, 16), (1, 8))],
    "gelu": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (512, 4), (4096, 8))],
    "partial_rope": [{"HEADS": hb, "num_warps": w} for hb, w in ((32, 4), (8, 2), (16, 4), (64, 8))],
}


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None, config: dict | None = None, scale=None):
    config = config or CONFIGS["layer_norm"][0]
    x2 = _rows(x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    y = torch.empty(x.shape, dtype=x.dtype if scale is None else torch.float8_e4m3fn, device=x.device)
    y2 = y.view(-1, n_cols)
    r2, s, s2 = _residual_rows(x, residual, y2)
    rows = config["ROWS"]
    _layer_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, y2 if weight is None else weight, y2 if bias is None else bias, y2, s2,
        y2 if scale is None else _scale_arg(scale, x.device), x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        n_rows, n_cols, eps, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, QUANT=scale is not None, ROUND=_round_dtype(x.dtype), ROWS=rows,
        BLOCK=triton.next_power_of_2(n_cols), num_warps=config["num_warps"])
    return (y, s) if residual is not None else y


def add_layer_norm(x, residual, weight, bias, eps: float, config: dict | None = None):
    return layer_norm(x, weight, bias, eps, residual=residual, config=config)


def layer_norm_fp8(x, weight, bias, eps: float, scale, config: dict | None = None):
    return layer_norm(x, weight, bias, eps, config=config, scale=scale)


def add_layer_norm_fp8(x, residual, weight, bias, eps: float, scale, config: dict | None = None):
    return layer_norm(x, weight, bias, eps, residual=residual, config=config, scale=scale)


def gelu(x: torch.Tensor, approximate: str = "none", config: dict | None = None, scale=None) -> torch.Tensor:
    config = config or CONFIGS["gelu"][0]
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(x.shape, dtype=x.dtype if scale is None else torch.float8_e4m3fn, device=x.device)
    o2 = out.view(-1, n_cols)
    block = min(config["BLOCK"], triton.next_power_of_2(n_cols))
    _gelu_kernel[(n_rows, triton.cdiv(n_cols, block))](
        x2, o2, o2 if scale is None else _scale_arg(scale, x.device), x2.stride(0), o2.stride(0), n_cols,
        APPROX=_APPROX[approximate], QUANT=scale is not None, ROUND=_round_dtype(x.dtype), BLOCK=block,
        num_warps=config["num_warps"])
    return out


def gelu_fp8(x: torch.Tensor, approximate: str, scale, config: dict | None = None) -> torch.Tensor:
    return gelu(x, approximate, config=config, scale=scale)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x: [batch, heads, tokens, head_dim] (any strides); cos/sin: [batch, 1, tokens, r] with r <= head_dim even."""
    config = config or CONFIGS["partial_rope"][0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    rot = cos.shape[-1]
    cos, sin = cos.expand(b, 1, t, rot), sin.expand(b, 1, t, rot)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((b, h, t, d), dtype=torch.result_type(x, cos), device=x.device)
    half = rot // 2
    heads = min(config["HEADS"], triton.next_power_of_2(h))
    _rope_kernel[(b * t, triton.cdiv(h, heads))](
        x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
        out.stride(0), out.stride(1), out.stride(2), HALF=half, PASS=d - rot, BLOCK=triton.next_power_of_2(half),
        PASS_BLOCK=triton.next_power_of_2(max(d - rot, 1)), HEADS=heads, num_warps=config["num_warps"])
    return out


def _supports_partial_rope(args: tuple, kwargs: dict) -> str | None:
    x, cos = args[0], args[1]
    if x is None or cos is None:
        return None
    if x.dim() != 4 or cos.shape[-1] % 2 or cos.shape[-1] > x.shape[-1]:
        return f"partial_rope takes x [batch, heads, tokens, head_dim] and an even rotary width <= head_dim, " \
               f"not x {list(x.shape)}, cos {list(cos.shape)}"
    return None


def _supports_gelu(args: tuple, kwargs: dict) -> str | None:
    mode = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    return None if mode in _APPROX else f"gelu mode {mode!r} is not one of {', '.join(_APPROX)}"


def register() -> None:
    """Add these kernels as the ``triton`` tactic of their ops (idempotent)."""
    partial_rope.supports = _supports_partial_rope
    gelu.supports = gelu_fp8.supports = _supports_gelu
    register_triton((("workbench.layer_norm", layer_norm, "layer_norm"),
                     ("workbench.add_layer_norm", add_layer_norm, "layer_norm"),
                     ("workbench.layer_norm_fp8", layer_norm_fp8, "layer_norm"),
                     ("workbench.add_layer_norm_fp8", add_layer_norm_fp8, "layer_norm"),
                     ("workbench.gelu", gelu, "gelu"), ("workbench.gelu_fp8", gelu_fp8, "gelu"),
                     ("workbench.partial_rope", partial_rope, "partial_rope")), CONFIGS)


register()
