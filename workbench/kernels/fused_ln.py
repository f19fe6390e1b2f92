"""Fused ops of the LayerNorm families (GPT-2, GPT-NeoX / Pythia, Falcon), with their PyTorch references.

The graph passes in ``graph/passes/layernorm.py`` create them; each reference does the arithmetic of the subgraph
it replaces, in the same order and precision, so a fused fp32 graph gives the captured graph's logits to rounding.
The Triton tactics are in ``triton_ln.py``.

    workbench.layer_norm(x, w, b, eps)              layer_norm over the last dim (b may be None)
    workbench.add_layer_norm(x, r, w, b, eps)       (layer_norm(x + r), x + r)     residual add + norm
    workbench.gelu(x, approximate)                  an ungated MLP's GELU: "none" (erf: NeoX, Falcon)
                                                    or "tanh" (GPT-2's 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))),
                                                    computed in that order)
    workbench.partial_rope(x, cos, sin)             rotary embedding of the first cos.shape[-1] dims of each head,
                                                    the rest passed through (NeoX's rotary_pct)

FP8 producers (the quant stage's, as for the RMSNorm ops in ``fused.py``): the same value, rounded as the op
rounds it, then ``gemm.quantize_fp8`` with the static per-tensor scale:

    workbench.layer_norm_fp8(x, w, b, eps, scale)
    workbench.add_layer_norm_fp8(x, r, w, b, eps, scale)    (normed quantized, sum in x's dtype)
    workbench.gelu_fp8(x, approximate, scale)
"""

from __future__ import annotations

import torch

from . import cost as C
from .gemm import quantize_fp8
from .registry import register_op

#: √(2/π) as GPT-2's activation writes it (``math.sqrt(2.0 / math.pi)``)
SQRT_2_OVER_PI = 0.7978845608028654
GELU_MODES = ("none", "tanh")


def _norm_cost(call: C.OpCall) -> C.Cost:
    # mean, variance, normalise, scale and shift: about 7 FLOPs an element; every input read once
    return C.Cost(7 * call.out_numel(), call.in_bytes() + call.out_bytes())


def _gelu_cost(call: C.OpCall) -> C.Cost:
    return C.Cost(8 * call.out_numel(), call.in_bytes() + call.out_bytes())


@register_op("workbench.layer_norm", cost=_norm_cost, graph_safe=True)
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, as ``torch.nn.LayerNorm`` computes it (statistics in fp32, one rounding)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@register_op("workbench.add_layer_norm", cost=_norm_cost, graph_safe=True)
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float):
    """Residual add then LayerNorm: returns (normed, sum); the sum is the next residual."""
    total = x + residual
    return layer_norm(total, weight, bias, eps), total


@register_op("workbench.layer_norm_fp8", cost=_norm_cost, graph_safe=True)
def layer_norm_fp8(x, weight, bias, eps: float, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm whose output is quantized to float8_e4m3fn with the static per-tensor ``scale``."""
    return quantize_fp8(layer_norm(x, weight, bias, eps), scale)


@register_op("workbench.add_layer_norm_fp8", cost=_norm_cost, graph_safe=True)
def add_layer_norm_fp8(x, residual, weight, bias, eps: float, scale: torch.Tensor):
    """Residual add then LayerNorm: (normed quantized to float8_e4m3fn with ``scale``, sum in x's dtype)."""
    normed, total = add_layer_norm(x, residual, weight, bias, eps)
    return quantize_fp8(normed, scale), total


def _check_mode(approximate: str) -> None:
    if approximate not in GELU_MODES:
        raise ValueError(f"gelu approximate must be one of {GELU_MODES}, not {approximate!r}")


@register_op("workbench.gelu", cost=_gelu_cost, graph_safe=True)
def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU: exact (erf) for "none"; for "tanh" GPT-2's formula, each step rounded where its ops round."""
    _check_mode(approximate)
    if approximate == "none":
        return torch.nn.functional.gelu(x)
    return (x * 0.5) * (torch.tanh((x + x.pow(3.0) * 0.044715) * SQRT_2_OVER_PI) + 1.0)


@register_op("workbench.gelu_fp8", cost=_gelu_cost, graph_safe=True)
def gelu_fp8(x: torch.Tensor, approximate: str, scale: torch.Tensor) -> torch.Tensor:
    """GELU quantized to float8_e4m3fn with the static per-tensor ``scale``."""
    return quantize_fp8(gelu(x, approximate), scale)


@register_op("workbench.partial_rope", graph_safe=True)
def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x's first ``cos.shape[-1]`` dims; the others pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
