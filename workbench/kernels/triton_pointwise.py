"""Triton kernels for the memory-bound fused ops, registered as their ``triton`` tactic.

    workbench.rms_norm      ROWS rows per program: load, fp32 sum of squares, scale, store; rows may be the
                            heads of a head-split strided slice (Qwen3's per-head q/k norm), read in place; an
                            fp32 weight over 16-bit x (Gemma's 1 + w) multiplies before the one rounding
    workbench.add_rms_norm  the same with the residual add fused: writes the sum and the norm
    workbench.silu_mul      gate and up may be strided slices of one fused GEMM output
    workbench.rms_norm_fp8, add_rms_norm_fp8, silu_mul_fp8
                            the same kernels writing float8_e4m3fn: value rounded as the unfused op rounds
                            it, divided by the static scale, saturated to ±448 (see ``fused.py``)
    workbench.rope          x of any strides ([batch, heads, tokens, head_dim]); a program takes a token's heads,
                            loading its cos/sin once
    workbench.all_reduce_add_rms_norm, all_reduce_add_rms_norm_fp8
                            a tensor-parallel graph's all-reduce fused with the norm: the all-reduce (NCCL),
                            then add_rms_norm's kernel (``collectives.reduce_first``; no fused kernel yet)

Each reads its inputs once and writes its outputs once: the floor is bytes / copy
bandwidth (``bench/pointwise.py`` measures against it). Arithmetic is in fp32 and
rounds where the reference rounds (the residual sum to the input dtype before the
norm, the normed value to the input dtype before the weight), so results match the
references to rounding. On the CPU they run under ``TRITON_INTERPRET=1`` (tests).

Configs (block sizes, warps) are plain data per kernel (``CONFIGS``), the space the
autotuner will search; the launchers take one config and default to the first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .collectives import reduce_first
from .registry import REGISTRY


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, SCALE, stride_x, stride_xh, heads, stride_r, stride_y, stride_s, n_rows, n_cols,
                     eps, HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr, ROUND_NORMED: tl.constexpr = True):
    # ROWS rows per program: more bytes in flight per program, the weight loaded once for them all.
    # x's row r is (r // heads, r % heads) of a [rows / heads, heads, n_cols] view with strides
    # (stride_x, stride_xh, 1): per-head norms (Qwen3's q/k norm) read a head-split slice of the fused
    # QKV output in place; plain rows have heads == 1.
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + (rows // heads) * stride_x + (rows % heads) * stride_xh + cols, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    variance = tl.sum(x * x, axis=1)[:, None] / n_cols
    normed = x * tl.math.rsqrt(variance + eps)
    if ROUND_NORMED:  # Llama's order; an fp32 weight over 16-bit x (Gemma's 1 + w) rounds once, after the weight
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = normed * w
    if QUANT:  # FP8 out: the unfused norm's value (rounded to its dtype) / scale, saturated to ±448; the
        # division rounds as IEEE (torch's), not Triton's default approximate one
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2(-2|x| log2 e): no overflow at any |x|; near 0 its absolute error is a few fp32
    ulps of 1 (a relative error there, which the callers' sums never see)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gated_kernel(G, U, O, SCALE, stride_g, stride_u, stride_o, n_cols, QUANT: tl.constexpr,
                  ROUND: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr):
    # act(gate) * up, one program per row and column block: SwiGLU's silu, or (GELU) GeGLU's tanh GELU
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # sqrt(2 / pi)
    else:
        act = g / (1.0 + tl.exp(-g))
    y = act.to(ROUND).to(tl.float32) * u  # the reference rounds act(g)
    if QUANT:
        y = tl.clamp(tl.math.div_rn(y.to(ROUND).to(tl.float32), tl.load(SCALE)), -448.0, 448.0)
    tl.store(O + row * stride_o + cols, y.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(X, C, S, O, heads, tokens, sx_b, sx_h, sx_t, sc_b, sc_t, so_b, so_h, so_t,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, PASS: tl.constexpr = 0,
                 PASS_BLOCK: tl.constexpr = 1):
    # one program per (batch, token, block of HEADS heads), cos/sin loaded once for all of them: dims [0, 2·HALF)
    # rotated, [2·HALF, 2·HALF + PASS) copied (partial RoPE: GPT-NeoX's rotary_pct; PASS 0 compiles it out)
    pid = tl.program_id(0).to(tl.int64)
    t = pid % tokens
    b = pid // tokens
    h = (tl.program_id(1) * HEADS + tl.arange(0, HEADS)).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK)[None, :]
    dmask = d < HALF
    mask = (h < heads) & dmask
    c_row = C + b * sc_b + t * sc_t
    s_row = S + b * sc_b + t * sc_t
    c1 = tl.load(c_row + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    x_row = X + b * sx_b + h * sx_h + t * sx_t
    o_row = O + b * so_b + h * so_h + t * so_t
    x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + d, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + d, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=mask)
    if PASS > 0:
        e = tl.arange(0, PASS_BLOCK)[None, :]
        pmask = (h < heads) & (e < PASS)
        rest = tl.load(x_row + 2 * HALF + e, mask=pmask, other=0.0)
        tl.store(o_row + 2 * HALF + e, rest.to(O.dtype.element_ty), mask=pmask)


#: The tuning space per kernel: plain data (block sizes where free, warps).
CONFIGS = {
    "rms_norm": [{"ROWS": r, "num_warps": w} for r, w in ((1, 4), (2, 8), (4, 8), (4, 16), (8, 16), (1, 8))],
    "silu_mul": [{"BLOCK": b, "num_warps": w} for b, w in ((1024, 4), (2048, 8), (512, 4), (4096, 8))],
    "rope": [{"HEADS": hb, "num_warps": w} for hb, w in ((32, 4), (8, 2), (16, 4), (32, 8), (64, 8))],
}


def _residual_rows(x: torch.Tensor, residual: torch.Tensor | None, y2: torch.Tensor):
    """A norm kernel's residual arguments: (the residual's rows, the sum's tensor, its rows), or without a
    residual ``y2`` for both rows (unused: HAS_RESIDUAL off) and no sum."""
    if residual is None:
        return y2, None, y2
    s = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    return _rows(residual), s, s.view(-1, x.shape[-1])


def _head_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t`` as rows of its last dim for ``_rms_norm_kernel``: (tensor, row stride, head stride, heads).

    Rows evenly strided (any contiguous tensor) are one level (heads = 1). A head-split view of a strided
    slice ([batch, tokens, heads, head_dim] over a fused QKV output: heads contiguous within a token, tokens
    a whole QKV row apart) is two levels, read in place; anything else is copied first."""
    if t.stride(-1) == 1 and t.dim() >= 3 and not _evenly_strided_rows(t):
        try:
            split = t.view(-1, *t.shape[-2:])
            return split, split.stride(0), split.stride(1), t.shape[-2]
        except RuntimeError:
            pass
    flat = _rows(t)
    return flat, flat.stride(0), 0, 1


def _evenly_strided_rows(t: torch.Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
        return True
    except RuntimeError:
        return False


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as [rows, cols] without copying when the last dim is contiguous and rows are evenly strided."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _round_dtype(t: torch.dtype):
    if t not in _TL:
        raise TypeError(f"the Triton pointwise kernels take fp32, bf16 or fp16 values, not {t}")
    return _TL[t]


def _scale_arg(scale, device) -> torch.Tensor:
    """A static FP8 scale as the one-element device tensor the kernels load (no host sync)."""
    return torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             config: dict | None = None, scale=None):
    config = config or CONFIGS["rms_norm"][0]
    x2, stride_x, stride_xh, heads = _head_rows(x)
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    # an fp32 weight over 16-bit x (Gemma's derived 1 + w): times the weight in fp32, one rounding to x's dtype
    weight_first = weight.dtype == torch.float32 and x.dtype != torch.float32
    out_dtype = x.dtype if weight_first else torch.result_type(weight, x)
    y = torch.empty(x.shape, dtype=out_dtype if scale is None else torch.float8_e4m3fn, device=x.device)
    y2 = y.view(-1, n_cols)
    r2, s, s2 = _residual_rows(x, residual, y2)
    rows = config["ROWS"]
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, weight, y2, s2, y2 if scale is None else _scale_arg(scale, x.device), stride_x, stride_xh, heads,
        r2.stride(0), y2.stride(0), s2.stride(0), n_rows, n_cols, eps, HAS_RESIDUAL=residual is not None,
        QUANT=scale is not None, ROUND=_round_dtype(out_dtype), ROWS=rows, BLOCK=triton.next_power_of_2(n_cols),
        ROUND_NORMED=not weight_first, num_warps=config["num_warps"])
    return (y, s) if residual is not None else y


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 config: dict | None = None):
    return rms_norm(x, weight, eps, residual=residual, config=config)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, scale, config: dict | None = None):
    return rms_norm(x, weight, eps, config=config, scale=scale)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale,
                     config: dict | None = None):
    return rms_norm(x, weight, eps, residual=residual, config=config, scale=scale)


def gated(gate: torch.Tensor, up: torch.Tensor, config: dict, scale=None, *, gelu: bool = False) -> torch.Tensor:
    """``act(gate) * up`` (with ``scale``, FP8 out): SwiGLU's silu, or GeGLU's tanh GELU (``gelu``)."""
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    out_dtype = torch.result_type(gate, up)
    out = torch.empty(gate.shape, dtype=out_dtype if scale is None else torch.float8_e4m3fn, device=gate.device)
    o2 = out.view(-1, n_cols)
    block = min(config["BLOCK"], triton.next_power_of_2(n_cols))
    _gated_kernel[(n_rows, triton.cdiv(n_cols, block))](
        g2, u2, o2, o2 if scale is None else _scale_arg(scale, gate.device), g2.stride(0), u2.stride(0),
        o2.stride(0), n_cols, QUANT=scale is not None, ROUND=_round_dtype(out_dtype), BLOCK=block,
        GELU=gelu, num_warps=config["num_warps"])
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, config: dict | None = None, scale=None) -> torch.Tensor:
    return gated(gate, up, config or CONFIGS["silu_mul"][0], scale)


def silu_mul_fp8(gate: torch.Tensor, up: torch.Tensor, scale, config: dict | None = None) -> torch.Tensor:
    return silu_mul(gate, up, config=config, scale=scale)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x: [batch, heads, tokens, head_dim] (any strides, last dim contiguous); cos/sin: [batch, 1, tokens, head_dim]."""
    config = config or CONFIGS["rope"][0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(x.shape[0], 1, *x.shape[2:]), sin.expand(x.shape[0], 1, *x.shape[2:])
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    b, h, t, d = x.shape
    # the output keeps x's layout (a transposed view of [batch, tokens, heads*dim] in the graph), so a
    # program's writes are as contiguous as its reads; readers of the result accept any strides
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    half = d // 2
    heads = min(config["HEADS"], triton.next_power_of_2(h))
    _rope_kernel[(b * t, triton.cdiv(h, heads))](
        x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
        out.stride(0), out.stride(1), out.stride(2), HALF=half, BLOCK=triton.next_power_of_2(half), HEADS=heads,
        num_warps=config["num_warps"])
    return out


def _row_local(config: dict | None) -> str | None:
    """``fn.invariant`` of these kernels: each program computes whole rows (or elements) alone, so a row's result
    depends on its config and not on the rows beside it; the launcher's default config is one fixed config."""
    return None


def register_triton(kernels, configs: dict[str, list[dict]]) -> None:
    """Make each ``(op, fn, space)``'s ``fn`` the ``triton`` tactic of ``op`` and its GPU default, tuned over
    ``configs[space]``; their programs compute rows alone, so each is batch-invariant at any config held
    (``kernels/invariant.py``). Idempotent."""
    for op, fn, space in kernels:
        fn.configs = configs[space]  # the autotuner's search space for this tactic
        fn.graph_safe = True  # launches only: grids from shapes, no host reads
        # each row (or element) is one program's alone: any config held is batch-invariant (kernels/invariant.py)
        fn.invariant = _row_local
        fn.invariant_default = configs[space][0]
        opdef = REGISTRY.get(op)
        opdef.tactics["triton"] = fn
        opdef.gpu_defaults = ("triton",)


def register() -> None:
    """Add these kernels as the ``triton`` tactic of their ops (idempotent)."""
    register_triton((("workbench.rms_norm", rms_norm, "rms_norm"),
                     ("workbench.add_rms_norm", add_rms_norm, "rms_norm"),
                     ("workbench.rms_norm_fp8", rms_norm_fp8, "rms_norm"),
                     ("workbench.add_rms_norm_fp8", add_rms_norm_fp8, "rms_norm"),
                     ("workbench.silu_mul", silu_mul, "silu_mul"),
                     ("workbench.silu_mul_fp8", silu_mul_fp8, "silu_mul"), ("workbench.rope", rope, "rope"),
                     # a tensor-parallel graph's all-reduce fused with the norm: the all-reduce, then this kernel
                     ("workbench.all_reduce_add_rms_norm", reduce_first(add_rms_norm), "rms_norm"),
                     ("workbench.all_reduce_add_rms_norm_fp8", reduce_first(add_rms_norm_fp8), "rms_norm")), CONFIGS)


register()
