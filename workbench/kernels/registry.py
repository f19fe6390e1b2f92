"""The op registry: op name → reference implementation, cost model, tactics.

Every node of a workbench graph names an op here. The reference implementation
is the correctness oracle and the CPU path; ``tactics`` holds faster
implementations (Triton, cuBLAS) that the autotuner chooses between.

Registering an op is the plugin mechanism: a fused op added by a graph pass and
a custom kernel added from a notebook go through the same call::

    @register_op("mylib.scaled_silu", cost=cost.elementwise)
    def scaled_silu(x, scale):
        return torch.nn.functional.silu(x) * scale

ATen ops (``aten.<name>.<overload>``) and Python operators on symbolic sizes
(``operator.mul``) that torch.export emits are resolved on first use, so a new
architecture needs no hand-written entries; the table below only gives them
the right cost model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import WorkbenchError
from . import cost as C


@dataclass
class OpDef:
    name: str
    reference: Callable
    cost: C.CostFn = C.elementwise
    tactics: dict[str, Callable] = field(default_factory=dict)
    doc: str = ""
    #: writes memory other than its output (a KV cache): never merged, reordered or dropped by passes
    effects: bool = False


# Cost models of the ATen ops that torch.export emits for decoder LLMs. Anything
# not listed is costed as elementwise (one FLOP per output element).
_ATEN_COSTS: dict[str, C.CostFn] = {
    **{op: C.free for op in (
        "view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "permute", "expand", "slice",
        "select", "alias", "t", "detach", "sym_size", "_assert_tensor_metadata", "split",
        "split_with_sizes", "chunk", "unbind", "lift_fresh_copy", "dropout", "empty", "as_strided",
        "_assert_scalar", "sym_constrain_range_for_size", "scalar_tensor")},
    "reshape": C.reshape, "contiguous": C.reshape, "flatten": C.reshape,
    "to": C.cast, "_to_copy": C.cast, "type_as": C.cast,
    "clone": C.copy, "cat": C.copy, "stack": C.copy, "index": C.copy, "gather": C.copy,
    "embedding": C.embedding,
    "linear": C.matmul, "mm": C.matmul, "bmm": C.matmul, "matmul": C.matmul, "addmm": C.addmm,
    "scaled_dot_product_attention": C.attention,
    "mean": C.reduction, "sum": C.reduction, "amax": C.reduction, "max": C.reduction,
    "softmax": C.reduction, "_softmax": C.reduction, "log_softmax": C.reduction,
    "cumsum": C.reduction, "var_mean": C.reduction,
}


class OpRegistry:
    def __init__(self) -> None:
        self._ops: dict[str, OpDef] = {}

    def register(self, op: OpDef, *, replace: bool = False) -> OpDef:
        if op.name in self._ops and not replace:
            raise WorkbenchError(f"op {op.name!r} is already registered; pass replace=True to override it")
        self._ops[op.name] = op
        return op

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except WorkbenchError:
            return False
        return True

    def get(self, name: str) -> OpDef:
        op = self._ops.get(name)
        if op is None:
            op = self._resolve(name)
            self._ops[name] = op
        return op

    def names(self) -> list[str]:
        return sorted(self._ops)

    @staticmethod
    def _resolve(name: str) -> OpDef:
        namespace, _, rest = name.partition(".")
        if namespace == "aten":
            packet, _, overload = rest.partition(".")
            try:
                fn = getattr(getattr(torch.ops.aten, packet), overload or "default")
            except AttributeError:
                raise WorkbenchError(f"op {name!r} is not an ATen op known to torch {torch.__version__}") from None
            return OpDef(name, fn, _ATEN_COSTS.get(packet, C.elementwise), doc=str(fn._schema))
        if namespace == "operator" and hasattr(operator, rest):
            return OpDef(name, getattr(operator, rest), C.free, doc=f"Python operator.{rest} on sizes")
        raise WorkbenchError(f"op {name!r} is not registered; register it with "
                             "workbench.kernels.register_op (the plugin mechanism) before running this graph")


#: The process-wide registry that graphs are executed against.
REGISTRY = OpRegistry()


def register_op(name: str, *, cost: C.CostFn = C.elementwise, replace: bool = False, doc: str = "",
                effects: bool = False):
    """Decorator: register ``fn`` as the reference implementation of op ``name``."""

    def wrap(fn: Callable) -> Callable:
        REGISTRY.register(OpDef(name, fn, cost, doc=doc or (fn.__doc__ or "").strip(), effects=effects),
                          replace=replace)
        return fn

    return wrap


def get_op(name: str) -> OpDef:
    return REGISTRY.get(name)
