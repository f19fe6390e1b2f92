"""Tensor elimination: duplicate values, layout chains that collapse or cancel, folded weight transposes.

    eliminate_duplicates     two nodes with the same op and the same arguments compute the same value
                             (each decoder layer re-does unsqueeze(cos, 1)): keep the first
    collapse_layout_chains   reshape(reshape(x)) -> reshape(x);  transpose(transpose(x, a, b), a, b) -> x;
                             permute(permute(x)) -> one permute (or x);  to(to(x, wide), x.dtype) -> x
                             when the middle dtype holds every value of x's (bf16 -> fp32 -> bf16);
                             transpose/t/permute of a weight -> a weight stored transposed (derived param)
"""

from __future__ import annotations

import json

from ...kernels.registry import REGISTRY
from ..ir import Param, Ref, TensorSpec, encode_value
from ..rewrite import Rewriter
from .manager import Match, register_pass

_RESHAPES = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}
_TRANSPOSES = {"aten.transpose.int"}
#: dtype -> dtypes that represent all of its values exactly
_WIDER = {"bfloat16": {"float32", "float64"}, "float16": {"float32", "float64"}, "float32": {"float64"}}


@register_pass("eliminate_duplicates", "nodes computing the same op on the same arguments -> one node")
def eliminate_duplicates(rw: Rewriter) -> list[Match]:
    seen: dict[str, str] = {}
    matches = []
    for n in list(rw.graph.nodes):
        if REGISTRY.get(n.op).effects:
            continue
        key = json.dumps([n.op, encode_value(n.args), encode_value(n.kwargs)], sort_keys=True)
        first = seen.setdefault(key, n.name)
        if first != n.name:
            rw.replace_uses(n.name, Ref(first))
            matches.append(Match(n.op.split(".")[1], n.layer, [n.name], [first]))
    return matches


def _swap(dims: tuple[int, int], rank: int) -> tuple[int, int]:
    return tuple(sorted(d % rank for d in dims))


@register_pass("collapse_layout_chains", "reshape/transpose/permute/cast chains that collapse or cancel; "
                                         "weight transposes folded into the stored layout")
def collapse_layout_chains(rw: Rewriter) -> list[Match]:
    g = rw.graph
    matches = []
    for n in list(g.nodes):
        if not n.args or not isinstance(n.args[0], Ref) or n.out is None:
            continue
        src = n.args[0]
        inner = rw.only_reader(src, n)
        if n.op in _RESHAPES and inner is not None and inner.op in _RESHAPES:
            n.op, n.args = "aten.reshape.default", [inner.args[0], *n.args[1:]]
            rw.refresh()
            matches.append(Match("reshape chain", n.layer, [inner.name], [n.name]))
        elif n.op in _TRANSPOSES and inner is not None and inner.op in _TRANSPOSES:
            rank = len(n.out.shape)
            if _swap(n.args[1:3], rank) == _swap(inner.args[1:3], rank):
                rw.replace_uses(n.name, inner.args[0])
                matches.append(Match("transpose pair", n.layer, [inner.name, n.name], []))
        elif n.op == "aten.permute.default" and inner is not None and inner.op == "aten.permute.default":
            outer, first = list(n.args[1]), list(inner.args[1])
            composed = [first[d] for d in outer]
            if composed == list(range(len(composed))):
                rw.replace_uses(n.name, inner.args[0])
            else:
                n.args = [inner.args[0], composed]
                rw.refresh()
            matches.append(Match("permute pair", n.layer, [inner.name, n.name], []))
        elif n.op == "aten.to.dtype" and inner is not None and inner.op == "aten.to.dtype":
            x = rw.spec(inner.args[0])
            if x is not None and x.dtype == n.out.dtype and inner.out.dtype in _WIDER.get(x.dtype, ()):
                rw.replace_uses(n.name, inner.args[0])
                matches.append(Match("cast pair", n.layer, [inner.name, n.name], []))
        elif src.name in g.params and g.params[src.name].kind == "parameter" and len(n.out.shape) == 2 and (
                n.op == "aten.t.default" or (n.op == "aten.transpose.int" and _swap(n.args[1:3], 2) == (0, 1))
                or (n.op == "aten.permute.default" and list(n.args[1]) == [1, 0])):
            p = g.params[src.name]
            name = f"{src.name}.T"
            if name not in g.params:
                g.params[name] = Param(name, "parameter", TensorSpec(n.out.shape, n.out.dtype), [],
                                       {"op": "transpose", "dims": [0, 1], "inputs": [[p.name, p.aliases]]})
            rw.replace_uses(n.name, Ref(name))
            matches.append(Match("weight transpose folded", n.layer, [n.name], [name]))
    return matches
