"""Collectives as graph ops: what a tensor-parallel graph (``graph.passes.tensor_parallel``) inserts.

    workbench.all_reduce(x)          the sum of x over the ranks of the group (after a row-parallel linear)
    workbench.all_gather(x, dim)     the ranks' x concatenated along ``dim``, in rank order (the logits)

Fused across the collective (``graph.passes.collective``: the all-reduce after a row-parallel linear with the
residual add and the RMSNorm that read it; each returns what the norm it replaces returned, (normed, sum)):

    workbench.all_reduce_add_rms_norm(x, r, w, eps)              add_rms_norm(all_reduce(x), r, w, eps)
    workbench.all_reduce_add_rms_norm_fp8(x, r, w, eps, scale)   add_rms_norm_fp8(all_reduce(x), r, w, eps, scale)
    workbench.all_reduce_norm_add_rms_norm(x, r, w, w2, eps)     norm_add_rms_norm(all_reduce(x), ...) (Gemma)
    workbench.all_reduce_norm_add_rms_norm_fp8(x, r, w, w2, eps, scale)

Their references are the all-reduce, then the norm's reference, so a fused graph's values are the unfused one's
bit for bit. Their ``triton`` tactic (``reduce_first``, registered with the norms' kernels) is the all-reduce, then
the norm's Triton kernel: what the unfused pair runs on a GPU, so the fusion costs nothing there before it gains.
The fast path is a GPU kernel for later: one kernel that reduces over NVLink (or NCCL's all-reduce into a buffer
the norm reads in place) and writes the normed value and the sum once, never the reduced x on its own; what it
saves is that write, the norm's read of it and a launch per site.

References run ``torch.distributed`` on the group of ``workbench.distributed.current()``; outside a group (one
rank) they return x itself. They are CUDA-graph safe on NCCL, which captures collectives in a graph; gloo runs on
the CPU, where nothing is captured. Cost: the memory they read and write, plus ``link_bytes``, what each rank
sends over the link in a ring: 2·(n−1)/n of x for an all-reduce, (n−1)/n of the gathered output for a gather. A
fused op's: the all-reduce's link bytes for x, plus its norm's memory traffic (its inputs read and its outputs
written once; the reduced x is neither written nor read back) and FLOPs (the reduction's adds and the norm's).
"""

from __future__ import annotations

import torch

from ..distributed import current
from . import cost as C
from .fused import add_rms_norm, add_rms_norm_fp8, norm_add_rms_norm, norm_add_rms_norm_fp8
from .registry import register_op


def _ranks() -> int:
    group = current()
    return group.size if group is not None else 1


def _ring_all_reduce_bytes(nbytes: int) -> int:
    """What each rank sends over the link to all-reduce ``nbytes`` in a ring: 2·(n−1)/n of them."""
    n = _ranks()
    return 2 * (n - 1) * nbytes // n


def _ring_cost(fraction_of: str):
    def cost(call: C.OpCall) -> C.Cost:
        n = _ranks()
        out = call.out_bytes()
        link = _ring_all_reduce_bytes(out) if fraction_of == "reduce" else (n - 1) * out // n
        return C.Cost(call.out_numel() if fraction_of == "reduce" else 0, call.in_bytes() + out, link)

    return cost


@register_op("workbench.all_reduce", cost=_ring_cost("reduce"), graph_safe=True)
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the tensor-parallel group's ranks (a new tensor; x is left as it was)."""
    group = current()
    if group is None or group.size == 1:
        return x
    import torch.distributed as dist

    out = x.contiguous().clone()
    dist.all_reduce(out, group=group.group)
    return out


@register_op("workbench.all_gather", cost=_ring_cost("gather"), graph_safe=True)
def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The group's ``x`` concatenated along ``dim`` in rank order."""
    group = current()
    if group is None or group.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x, group=group.group)
    return torch.cat(parts, dim=dim)


# ---- fused across the all-reduce -------------------------------------------------------------------------------

def reduce_first(norm):
    """A tactic of a fused op from ``norm``, a tactic of the norm op it fused: ``norm`` of ``x`` summed over the
    ranks, its other arguments and ``config`` as they are (``triton_pointwise`` and ``triton_gemma`` register it)."""
    def tactic(x: torch.Tensor, *args, config: dict | None = None, **kwargs):
        return norm(all_reduce(x), *args, config=config, **kwargs)

    tactic.__name__ = tactic.__qualname__ = f"all_reduce_{norm.__name__}"
    return tactic


def _reduce_norm_cost(call: C.OpCall) -> C.Cost:
    """The all-reduce's link bytes for x (the first argument) and its adds, plus the norm's ``_norm_cost``."""
    x = call.tensors()[0]
    return C.Cost(x.numel(call.sizes) + 4 * call.out_numel(), call.in_bytes() + call.out_bytes(),
                  _ring_all_reduce_bytes(x.nbytes(call.sizes)))


@register_op("workbench.all_reduce_add_rms_norm", cost=_reduce_norm_cost, graph_safe=True)
def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``x`` summed over the ranks, added to ``residual``, then RMSNorm: (normed, sum), as ``add_rms_norm``. The
    reference: the all-reduce, then ``add_rms_norm``'s (a kernel fusing both is for later: the module docstring)."""
    return add_rms_norm(all_reduce(x), residual, weight, eps)


@register_op("workbench.all_reduce_add_rms_norm_fp8", cost=_reduce_norm_cost, graph_safe=True)
def all_reduce_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                scale: torch.Tensor):
    """``add_rms_norm_fp8`` of ``x`` summed over the ranks: (normed as float8_e4m3fn with ``scale``, sum)."""
    return add_rms_norm_fp8(all_reduce(x), residual, weight, eps, scale)


@register_op("workbench.all_reduce_norm_add_rms_norm", cost=_reduce_norm_cost, graph_safe=True)
def all_reduce_norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 next_weight: torch.Tensor, eps: float):
    """Gemma's ``norm_add_rms_norm`` of ``x`` summed over the ranks (the post-norm reads the whole sum)."""
    return norm_add_rms_norm(all_reduce(x), residual, weight, next_weight, eps)


@register_op("workbench.all_reduce_norm_add_rms_norm_fp8", cost=_reduce_norm_cost, graph_safe=True)
def all_reduce_norm_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                     next_weight: torch.Tensor, eps: float, scale: torch.Tensor):
    """``norm_add_rms_norm_fp8`` of ``x`` summed over the ranks."""
    return norm_add_rms_norm_fp8(all_reduce(x), residual, weight, next_weight, eps, scale)
