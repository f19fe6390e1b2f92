"""Fused ops that the graph passes create, with their PyTorch reference implementations.

Each reference does the same arithmetic, in the same order and precision, as the
subgraph it replaces (the transformers modules' code), so a fused fp32 graph gives
the captured graph's logits to rounding. Faster tactics (Triton) are registered on the
same ops by the kernel modules (``triton_pointwise``, ``triton_attention``, ``gemm``).

    workbench.rms_norm(x, w, eps)                   w * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)
    workbench.add_rms_norm(x, r, w, eps)            (rms_norm(x + r), x + r)   residual add + norm
    workbench.norm_add_rms_norm(x, r, w, w2, eps)   (rms_norm(s, w2), s), s = r + rms_norm(x, w): Gemma's norm after
                                                    the attention / MLP, the residual add and the next norm
    workbench.silu_mul(gate, up)                    silu(gate) * up            SwiGLU
    workbench.gelu_mul(gate, up)                    gelu_tanh(gate) * up       GeGLU (Gemma)
    workbench.softcap(x, cap)                       cap * tanh(x / cap)        Gemma 2's final-logit soft-capping
    workbench.rope(x, cos, sin)                     x * cos + rotate_half(x) * sin
    workbench.attention(q, k, v, mask, scale, softcap=)
                                                    SDPA reading k, v with fewer heads (GQA/MQA); with softcap
                                                    (Gemma 2) the scores are soft-capped before the mask
    workbench.paged_attention(q, k, v, kv_cache, ..., k_scale=, v_scale=, cos=, sin=, q_norm=, k_norm=, norm_eps=,
                              softcap=)
                                                    the same over a paged KV cache (an FP8 one with its scales,
                                                    which graph nodes carry by name); with q_norm/k_norm, a
                                                    per-head RMSNorm first (Qwen3, Gemma 3), then with cos/sin
                                                    RoPE; with softcap the scores soft-capped (Gemma 2)

FP8 producers (the quant stage puts them before FP8 linears with static activation scales, so the GEMM
reads x already quantized and no separate quantization pass runs; the rounding is exactly the
unfused op's, then ``gemm.quantize_fp8``):

    workbench.rms_norm_fp8(x, w, eps, scale)        quantize_fp8(rms_norm(x, w, eps), scale)
    workbench.add_rms_norm_fp8(x, r, w, eps, scale) (quantize_fp8(rms_norm(x + r), scale), x + r)
    workbench.silu_mul_fp8(gate, up, scale)         quantize_fp8(silu_mul(gate, up), scale)
    workbench.gelu_mul_fp8(gate, up, scale)         quantize_fp8(gelu_mul(gate, up), scale)
    workbench.norm_add_rms_norm_fp8(x, r, w, w2, eps, scale)   its first output quantized likewise

Gemma's RMSNorm scales by (1 + w): ``fuse_rms_norm`` folds the 1 into a derived fp32 weight (``1 + w`` computed
when weights are loaded), so Gemma's norms run as ``workbench.rms_norm`` and SmoothQuant folds into them as into
Llama's. An fp32 weight over 16-bit x is Gemma's rounding (times the weight in fp32, rounded once), bit for bit.
"""

from __future__ import annotations

import math

import torch

from . import cost as C
from .gemm import quantize_fp8
from .registry import register_op


def _norm_cost(call: C.OpCall) -> C.Cost:
    return C.Cost(4 * call.out_numel(), call.in_bytes() + call.out_bytes())


@register_op("workbench.rms_norm", cost=_norm_cost, graph_safe=True)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama/Mistral/Qwen2 compute it: statistics in fp32, scale in the input dtype. An fp32 weight over
    16-bit x (Gemma's derived 1 + w) multiplies in fp32 and rounds once, as Gemma computes it; the output is x's
    dtype either way."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return (xf * torch.rsqrt(variance + eps) * weight).to(x.dtype)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


@register_op("workbench.add_rms_norm", cost=_norm_cost, graph_safe=True)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add then RMSNorm: returns (normed, sum); the sum is the next residual."""
    total = x + residual
    return rms_norm(total, weight, eps), total


@register_op("workbench.norm_add_rms_norm", cost=_norm_cost, graph_safe=True)
def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor,
                      eps: float):
    """Gemma's post-norm, residual add and next pre-norm: the sum s = residual + rms_norm(x, weight) and
    (rms_norm(s, next_weight), s); the sum is the next residual."""
    total = residual + rms_norm(x, weight, eps)
    return rms_norm(total, next_weight, eps), total


@register_op("workbench.silu_mul", graph_safe=True)
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def _gelu_mul_cost(call: C.OpCall) -> C.Cost:
    # tanh GELU: x³, two multiply-adds, tanh (~4), the halving and the gating product: about 10 FLOPs an element
    return C.Cost(10 * call.out_numel(), call.in_bytes() + call.out_bytes())


@register_op("workbench.gelu_mul", cost=_gelu_mul_cost, graph_safe=True)
def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU's gating (Gemma's ``gelu_pytorch_tanh``): gelu(gate, approximate="tanh") * up."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _softcap_cost(call: C.OpCall) -> C.Cost:
    return C.Cost(6 * call.out_numel(), call.in_bytes() + call.out_bytes())


@register_op("workbench.softcap", cost=_softcap_cost, graph_safe=True)
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft-capping (Gemma 2's final logits): cap * tanh(x / cap), in the order transformers computes it."""
    return torch.tanh(x / cap) * cap


@register_op("workbench.rms_norm_fp8", cost=_norm_cost, graph_safe=True)
def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose output is quantized to float8_e4m3fn with the static per-tensor ``scale``."""
    return quantize_fp8(rms_norm(x, weight, eps), scale)


@register_op("workbench.add_rms_norm_fp8", cost=_norm_cost, graph_safe=True)
def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     scale: torch.Tensor):
    """Residual add then RMSNorm: (normed quantized to float8_e4m3fn with ``scale``, sum in x's dtype)."""
    normed, total = add_rms_norm(x, residual, weight, eps)
    return quantize_fp8(normed, scale), total


@register_op("workbench.norm_add_rms_norm_fp8", cost=_norm_cost, graph_safe=True)
def norm_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, next_weight: torch.Tensor,
                          eps: float, scale: torch.Tensor):
    """``norm_add_rms_norm`` with the next norm's output quantized to float8_e4m3fn with ``scale`` (the sum as is)."""
    normed, total = norm_add_rms_norm(x, residual, weight, next_weight, eps)
    return quantize_fp8(normed, scale), total


@register_op("workbench.silu_mul_fp8", graph_safe=True)
def silu_mul_fp8(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up quantized to float8_e4m3fn with the static per-tensor ``scale``."""
    return quantize_fp8(silu_mul(gate, up), scale)


@register_op("workbench.gelu_mul_fp8", cost=_gelu_mul_cost, graph_safe=True)
def gelu_mul_fp8(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up quantized to float8_e4m3fn with the static per-tensor ``scale``."""
    return quantize_fp8(gelu_mul(gate, up), scale)


@register_op("workbench.rope", graph_safe=True)
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (the rotate-half form): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention_cost(call: C.OpCall) -> C.Cost:
    """``cost.attention``, plus soft-capping's divide, tanh and multiply on every score (``softcap=``)."""
    cost = C.attention(call)
    if call.kwargs.get("softcap") is None:
        return cost
    q, k = call.tensors()[:2]
    *bh, tq, _ = call.shape(q)
    tk = call.shape(k)[-2]
    return C.Cost(cost.flops + 6 * math.prod(bh) * tq * tk, cost.bytes)


def _softcapped_attention(q, k, v, mask, scale, softcap):
    """Attention with soft-capped scores, in transformers' eager order (Gemma 2 has no SDPA path): scores times
    scale, capped (cap * tanh(s / cap)), the mask added (float) or applied (bool), softmax in fp32, times v."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


@register_op("workbench.attention", cost=_attention_cost, graph_safe=True)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None = None, *, softcap: float | None = None) -> torch.Tensor:
    """Attention over [batch, heads, tokens, head_dim] with k/v holding heads // group heads.

    The graph no longer materialises the repeated KV heads; this reference repeats
    them (as transformers' ``repeat_kv`` did) only to stay bit-identical with it.
    With ``softcap`` the scores are soft-capped before the mask (Gemma 2), computed as transformers' eager
    attention computes them.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        b, h, t, d = k.shape
        k = k[:, :, None].expand(b, h, group, t, d).reshape(b, h * group, t, d)
        v = v[:, :, None].expand(b, h, group, t, d).reshape(b, h * group, t, d)
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, scale, softcap)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_input(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float | None = None,
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """q or k as ``paged_attention`` attends with it (and k as its cache holds it): the per-head RMSNorm over
    head_dim when ``norm`` is given, then the rotary embedding when ``cos``/``sin`` are, each rounded as its
    own op rounds (``rms_norm``, ``rope``)."""
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if cos is not None:
        x = rope(x, cos, sin)
    return x


# not graph-safe: it reads the step's sequence lengths on the host (a CUDA graph runs the Triton tactic)
@register_op("workbench.paged_attention", cost=_attention_cost, effects=True)
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float | None = None,
                    window: int | None = None, k_scale: float | None = None,
                    v_scale: float | None = None, *, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, norm_eps: float | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Attention over a paged KV cache for a flat batch of sequences (batch dim 1).

    Writes the new tokens' k and v ([1, kv_heads, tokens, head_dim]) into ``kv_cache``
    ([2, num_blocks, block_size, kv_heads, head_dim], any strides: the runtime stores each block
    head-major behind this shape) at ``slot_mapping``, then lets each
    sequence's new queries attend, causally, to all of its cached tokens read through
    its row of ``block_tables``. The new tokens are the last ones of each sequence.
    With a sliding ``window`` (Mistral), a query at position p sees keys p - window < j <= p,
    as transformers' sliding-window mask does.

    An FP8 (e4m3) cache holds k / k_scale and v / v_scale (per-layer scales, saturated to ±448)
    and is read back times the scale. Graph nodes pass the scales by name (the quant stage sets them;
    ``graph.paged.PagedLayout.scales`` reads them).

    With ``cos`` and ``sin`` ([1, 1, tokens, head_dim], the ``fuse_rope_into_attention`` pass) q and k
    arrive before their rotary embedding, and it is applied first: ``rope(q, cos, sin)``, ``rope(k, cos, sin)``.
    With ``q_norm`` and ``k_norm`` (head_dim weights, the ``fuse_qk_norm_into_attention`` pass) they arrive
    before Qwen3's per-head RMSNorm too, which comes before the RoPE: ``attention_input``.
    With ``softcap`` (Gemma 2's ``attn_logit_softcapping``) each score s becomes softcap * tanh(s / softcap)
    before the causal / window mask and the softmax.
    """
    q = attention_input(q, q_norm, norm_eps, cos, sin)
    k = attention_input(k, k_norm, norm_eps, cos, sin)
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    quant = kv_cache.dtype == torch.float8_e4m3fn
    k_scale, v_scale = k_scale or 1.0, v_scale or 1.0

    def store(x, scale):
        x = x[0].transpose(0, 1)
        return (x.float() / scale).clamp(-448, 448).to(kv_cache.dtype) if quant else x.to(kv_cache.dtype)

    def load(x, scale):
        return (x.float() * scale).to(q.dtype) if quant else x.to(q.dtype)

    # by block and offset, not through a flat view: the cache may be stored head-major behind this shape
    blk, off = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[0, blk, off] = store(k, k_scale)
    kv_cache[1, blk, off] = store(v, v_scale)
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, length in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        if e == s:  # a sequence with no new tokens this step (the empty rows of a CUDA graph's padding)
            continue
        blocks = block_tables[i, : -(-length // block_size)]
        keys = load(kv_cache[0, blocks].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1), k_scale)
        vals = load(kv_cache[1, blocks].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1), v_scale)
        if group > 1:
            keys = keys[:, None].expand(kv_heads, group, length, head_dim).reshape(-1, length, head_dim)
            vals = vals[:, None].expand(kv_heads, group, length, head_dim).reshape(-1, length, head_dim)
        n = e - s
        first = length - n  # position of the first new token
        kv_pos = torch.arange(length, device=q.device)[None, :]
        q_pos = first + torch.arange(n, device=q.device)[:, None]
        mask = kv_pos <= q_pos
        if window is not None:
            mask &= kv_pos > q_pos - window
        if softcap is not None:
            out[0, :, s:e] = _softcapped_attention(q[0, :, s:e], keys, vals, mask, scale, softcap)
        else:
            out[0, :, s:e] = torch.nn.functional.scaled_dot_product_attention(
                q[0, :, s:e][None], keys[None], vals[None], attn_mask=mask, scale=scale)[0]
    return out
