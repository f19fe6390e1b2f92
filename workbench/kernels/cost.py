"""Cost models: FLOPs and bytes of device memory moved by one op call.

A cost model sees an ``OpCall``: the op's arguments with every tensor replaced by
its ``TensorSpec``, its output specs, and the concrete sizes of the symbolic
dims. Bytes count each tensor input read once and each output written once (the
fewest a kernel must move); views move nothing. These are estimates for
rooflines and reports, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..graph.ir import TensorSpec


@dataclass(frozen=True)
class Cost:
    flops: int = 0
    bytes: int = 0
    #: bytes each rank sends to the others (collectives; 0 for every op of one device)
    link_bytes: int = 0


@dataclass
class OpCall:
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[TensorSpec | None]
    sizes: dict[str, int]

    def tensors(self) -> list[TensorSpec]:
        """Tensor arguments in order, lists flattened."""
        found: list[TensorSpec] = []

        def walk(v):
            if isinstance(v, TensorSpec):
                found.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
        walk(self.args)
        walk(list(self.kwargs.values()))
        return found

    def shape(self, spec: TensorSpec) -> tuple[int, ...]:
        return spec.concrete_shape(self.sizes)

    def in_bytes(self) -> int:
        return sum(t.nbytes(self.sizes) for t in self.tensors())

    def out_bytes(self) -> int:
        return sum(o.nbytes(self.sizes) for o in self.outputs if o is not None)

    def out_numel(self) -> int:
        return sum(o.numel(self.sizes) for o in self.outputs if o is not None)


CostFn = Callable[[OpCall], Cost]


def free(call: OpCall) -> Cost:
    """Views, shape arithmetic and assertions: no kernel runs."""
    return Cost(0, 0)


def elementwise(call: OpCall) -> Cost:
    return Cost(call.out_numel(), call.in_bytes() + call.out_bytes())


def copy(call: OpCall) -> Cost:
    return Cost(0, call.in_bytes() + call.out_bytes())


def reduction(call: OpCall) -> Cost:
    tensors = call.tensors()
    flops = tensors[0].numel(call.sizes) if tensors else 0
    return Cost(flops, call.in_bytes() + call.out_bytes())


def reshape(call: OpCall) -> Cost:
    """A reshape is a view of a contiguous tensor and a copy of any other."""
    src = call.tensors()[0]
    return free(call) if src.contiguous else copy(call)


def cast(call: OpCall) -> Cost:
    """``to``/``_to_copy``: free when neither dtype nor layout changes (ATen returns self)."""
    src, out = call.tensors()[0], call.outputs[0]
    if out is None or (src.dtype == out.dtype and src.contiguous):
        return free(call)
    return copy(call)


def embedding(call: OpCall) -> Cost:
    """Gather: reads one row per index and writes it; the table is not read whole."""
    ids = call.tensors()[1]
    return Cost(0, ids.nbytes(call.sizes) + 2 * call.out_bytes())


def matmul(call: OpCall) -> Cost:
    """``linear``, ``mm``, ``bmm``, ``matmul``, ``addmm``: 2·M·N·K, with K the shared dim."""
    tensors = call.tensors()
    if len(tensors) < 2 or call.outputs[0] is None:
        return elementwise(call)
    k = call.shape(tensors[0])[-1]
    return Cost(2 * call.out_numel() * k, call.in_bytes() + call.out_bytes())


def addmm(call: OpCall) -> Cost:
    bias, a, _b = call.tensors()[:3]
    k = call.shape(a)[-1]
    return Cost(2 * call.out_numel() * k, call.in_bytes() + call.out_bytes())


def attention(call: OpCall) -> Cost:
    """SDPA: QKᵀ and PV are 2·B·H·Tq·Tk·D each (the mask is general, so no causal halving)."""
    q, k = call.tensors()[:2]
    *bh, tq, d = call.shape(q)
    tk = call.shape(k)[-2]
    return Cost(4 * math.prod(bh) * tq * tk * d, call.in_bytes() + call.out_bytes())
