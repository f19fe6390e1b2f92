"""Horizontal fusion: linears that read the same input become one GEMM.

In a decoder layer the q, k and v projections read the same normed hidden state,
and so do gate and up. Each group becomes one ``linear`` whose weight (and bias)
is the concatenation of theirs along the output dim, a *derived* parameter that
weight loading computes from the checkpoint (``Param.derived``); the old outputs
become slices of the fused output, which the following views read unchanged.
"""

from __future__ import annotations

import os

from ..ir import Node, Param, Ref, TensorSpec
from ..rewrite import Rewriter
from .manager import Match, register_pass


def _fused_name(weight_names: list[str]) -> str:
    """model.layers.0.self_attn.{q,k,v}_proj.weight -> model.layers.0.self_attn.qkv_proj.weight"""
    modules = [w.rsplit(".", 1)[0] for w in weight_names]
    prefix = os.path.commonprefix(modules).rsplit(".", 1)[0]
    short = [m.rsplit(".", 1)[-1].removesuffix("_proj") for m in modules]
    joined = "".join(short) if all(len(s) == 1 for s in short) else "_".join(short)
    return f"{prefix}.{joined}_proj"


def _kind(name: str) -> str:
    return {"qkv_proj": "qkv", "gate_up_proj": "gate_up"}.get(name.rsplit(".", 1)[-1], "linears")


@register_pass("fuse_parallel_linears", "q/k/v and gate/up linears reading one input -> one GEMM, outputs sliced")
def fuse_parallel_linears(rw: Rewriter) -> list[Match]:
    g = rw.graph
    groups: dict[str, list[Node]] = {}
    for n in g.nodes:
        if n.op != "aten.linear.default" or not isinstance(n.args[0], Ref):
            continue
        w = n.args[1]
        if isinstance(w, Ref) and w.name in g.params and not g.params[w.name].derived:
            groups.setdefault(n.args[0].name, []).append(n)
    matches = []
    for members in groups.values():
        with_bias = {len(m.args) > 2 and m.args[2] is not None for m in members}
        if len(members) < 2 or len(with_bias) != 1:
            continue
        has_bias = with_bias.pop()
        weights = [g.params[m.args[1].name] for m in members]
        if len({(w.spec.dtype, w.spec.shape[1]) for w in weights}) != 1:
            continue
        base = _fused_name([w.name for w in weights])
        sizes = [w.spec.shape[0] for w in weights]
        total = sum(sizes)
        g.params[f"{base}.weight"] = Param(f"{base}.weight", "parameter", TensorSpec([total, weights[0].spec.shape[1]],
                                           weights[0].spec.dtype), [], {"op": "cat", "dim": 0,
                                           "inputs": [[w.name, w.aliases] for w in weights]})
        args = [members[0].args[0], Ref(f"{base}.weight")]
        if has_bias:
            biases = [g.params[m.args[2].name] for m in members]
            g.params[f"{base}.bias"] = Param(f"{base}.bias", "parameter", TensorSpec([total], biases[0].spec.dtype), [],
                                             {"op": "cat", "dim": 0, "inputs": [[b.name, b.aliases] for b in biases]})
            args.append(Ref(f"{base}.bias"))
        first = members[0]
        out = TensorSpec(first.out.shape[:-1] + [total], first.out.dtype)
        fused = rw.insert_before(first, Node(rw.fresh(base.rsplit(".", 1)[-1]), "aten.linear.default", args, {},
                                             [out], base, first.layer))
        start = 0
        created = [fused.name]
        for m, size in zip(members, sizes):
            part = rw.insert_before(first, Node(rw.fresh(f"{fused.name}_slice"), "aten.slice.Tensor",
                                                [Ref(fused.name), -1, start, start + size], {},
                                                [TensorSpec(m.out.shape, m.out.dtype, contiguous=False)],
                                                m.module, m.layer))
            rw.replace_uses(m.name, Ref(part.name))
            created.append(part.name)
            start += size
        matches.append(Match(_kind(base), first.layer, [m.name for m in members], created))
    return matches
