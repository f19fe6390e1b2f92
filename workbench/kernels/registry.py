"""The op registry: op name → reference implementation, cost model, tactics.

Every node of a workbench graph names an op here. The reference implementation
is the correctness oracle and the CPU path; ``tactics`` holds faster
implementations (Triton, cuBLAS) that the autotuner chooses between.

Registering an op is the plugin mechanism: a fused op added by a graph pass and
a custom kernel added from a notebook go through the same call::

    @register_op("mylib.scaled_silu", cost=cost.elementwise, graph_safe=True)
    def scaled_silu(x, scale):
        return torch.nn.functional.silu(x) * scale

**CUDA-graph safety.** Every implementation says whether a CUDA graph may capture it: no host sync
(``.item()``, ``.tolist()``, ``bool(tensor)``), no allocation whose size depends on tensor values. The
reference's flag is ``OpDef.graph_safe`` (``register_op(graph_safe=...)``, False unless declared: an op
nobody vouched for is run eagerly rather than captured wrong); a tactic's is its function's
``graph_safe`` attribute. A tactic may also carry ``supports(args, kwargs) -> str | None``: None when it
can run arguments of those shapes and dtypes, else a one-line reason; it reads shapes only, so it can be
asked with meta tensors built from a graph's static specs.

**GPU defaults.** ``OpDef.gpu_defaults`` names the tactics, in order, that run on a GPU where no tuned
choice applies (an untuned engine, one tuned on another GPU, a choice that is not graph-safe): the first
that is graph-safe and supports the node's shapes; else the reference when it is graph-safe
(``default_impl``).

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
    #: the reference may be captured in a CUDA graph (no host sync, no value-dependent allocation)
    graph_safe: bool = False
    #: tactics to run on a GPU where no tuned choice applies, in order of preference (see ``default_impl``)
    gpu_defaults: tuple[str, ...] = ()

    def is_graph_safe(self, tactic: str) -> bool:
        """Whether implementation ``tactic`` ("reference" or a tactic name) may be captured in a CUDA graph."""
        if tactic == REFERENCE:
            return self.graph_safe
        fn = self.tactics.get(tactic)
        return fn is not None and bool(getattr(fn, "graph_safe", False))

    def unsupported(self, tactic: str, args: tuple, kwargs: dict) -> str | None:
        """Why ``tactic`` cannot run these arguments (its ``supports``), or None when it can."""
        if tactic == REFERENCE:
            return None
        fn = self.tactics.get(tactic)
        if fn is None:
            return f"op {self.name} has no tactic {tactic!r}"
        check = getattr(fn, "supports", None)
        return check(args, kwargs) if check is not None else None

    def default_impl(self, args: tuple | None = None, kwargs: dict | None = None) -> tuple[str, list[str]]:
        """The implementation a GPU runs where no tuned choice applies, and why earlier defaults were passed
        over (one line each): the first of ``gpu_defaults`` that is graph-safe and supports ``args`` (when
        given; meta tensors do), else the reference."""
        notes = []
        for name in self.gpu_defaults:
            if name not in self.tactics:
                continue
            if not self.is_graph_safe(name):
                notes.append(f"{self.name}: tactic {name} is not CUDA-graph safe")
                continue
            reason = self.unsupported(name, args, kwargs or {}) if args is not None else None
            if reason:
                notes.append(f"{self.name}: tactic {name} skipped ({reason})")
                continue
            return name, notes
        return REFERENCE, notes


REFERENCE = "reference"

#: ATen ops that read tensor values on the host or allocate by them: never captured in a CUDA graph
_ATEN_UNSAFE = {"item", "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "tolist",
                "bincount", "histc", "equal", "is_nonzero", "_assert_async", "argwhere"}

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
            return OpDef(name, fn, _ATEN_COSTS.get(packet, C.elementwise), doc=str(fn._schema),
                         graph_safe=packet not in _ATEN_UNSAFE)
        if namespace == "operator" and hasattr(operator, rest):  # on sizes: host integers, fixed per graph
            return OpDef(name, getattr(operator, rest), C.free, doc=f"Python operator.{rest} on sizes",
                         graph_safe=True)
        raise WorkbenchError(f"op {name!r} is not registered; load the plugin that registers it (`--plugin "
                             "MODULE_OR_FILE`, or workbench.load_plugins) or register it with "
                             "workbench.kernels.register_op before running this graph")


#: The process-wide registry that graphs are executed against.
REGISTRY = OpRegistry()


def register_op(name: str, *, cost: C.CostFn = C.elementwise, replace: bool = False, doc: str = "",
                effects: bool = False, graph_safe: bool = False):
    """Decorator: register ``fn`` as the reference implementation of op ``name``. ``graph_safe``: the
    reference does nothing a CUDA graph cannot capture (no host sync, no value-dependent allocation);
    until an op says so, GPU steps that contain it run eagerly."""

    def wrap(fn: Callable) -> Callable:
        REGISTRY.register(OpDef(name, fn, cost, doc=doc or (fn.__doc__ or "").strip(), effects=effects,
                                graph_safe=graph_safe), replace=replace)
        return fn

    return wrap


def get_op(name: str) -> OpDef:
    return REGISTRY.get(name)
