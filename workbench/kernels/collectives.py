"""Collectives as graph ops: what a tensor-parallel graph (``graph.passes.tensor_parallel``) inserts.

    workbench.all_reduce(x)          the sum of x over the ranks of the group (after a row-parallel linear)
    workbench.all_gather(x, dim)     the ranks' x concatenated along ``dim``, in rank order (the logits)

References run ``torch.distributed`` on the group of ``workbench.distributed.current()``; outside a group (one
rank) they return x itself. They are CUDA-graph safe on NCCL, which captures collectives in a graph; gloo runs on
the CPU, where nothing is captured. Cost: the memory they read and write, plus ``link_bytes``, what each rank
sends over the link in a ring: 2·(n−1)/n of x for an all-reduce, (n−1)/n of the gathered output for a gather.
"""

from __future__ import annotations

import torch

from ..distributed import current
from . import cost as C
from .registry import register_op


def _ring_cost(fraction_of: str):
    def cost(call: C.OpCall) -> C.Cost:
        group = current()
        n = group.size if group is not None else 1
        out = call.out_bytes()
        link = 2 * (n - 1) * out // n if fraction_of == "reduce" else (n - 1) * out // n
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
