"""Horizontal fusion: linears that read the same input become one GEMM.

In a decoder layer the q, k and v projections read the same normed hidden state,
and so do gate and up. Each group becomes one ``linear`` whose weight (and bias)
is the concatenation of theirs along the output dim, a *derived* parameter that
weight loading computes from the checkpoint (``Param.derived``); the old outputs
become slices of the fused output, which the following views read unchanged.

A checkpoint may store a group packed already (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn``): its
linear is left as it is, and its outputs are put in the same form as a fused group's, so that the passes after this
one meet one shape: ``chunk(y, n, -1)`` and ``split(y, size, -1)`` become slices, and a slice ending past the
last column ends at it. Such a group is reported as ``"<kind> (packed in the checkpoint)"``. (NeoX's and Falcon's
``query_key_value`` interleave q, k and v by head: their readers are views, left as they are.)
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


#: the module names of linears packed in the checkpoint -> the group they hold
_PACKED = {"qkv_proj": "qkv", "gate_up_proj": "gate_up", "c_attn": "qkv", "query_key_value": "qkv"}


def _kind(weight: str) -> str:
    """The packed group a weight holds (``…c_attn.weight``, or its transpose ``….weight.T``), else "linears"."""
    module = weight.removesuffix(".T").removesuffix(".weight")
    return _PACKED.get(module.rsplit(".", 1)[-1], "linears")


def _split_along_last(rw: Rewriter, n: Node, reader: Node) -> bool:
    """Whether ``reader`` takes columns of ``n``'s [.., columns] output: a slice or chunk along the last dim."""
    last = len(n.out.shape) - 1
    if reader.op == "aten.slice.Tensor":
        return reader.args[0] == Ref(n.name) and reader.args[1] in (-1, last) and len(reader.args) == 4 \
            and all(isinstance(a, int) for a in reader.args[2:4])
    if reader.op in ("aten.chunk.default", "aten.split.Tensor"):
        dim = reader.args[2] if len(reader.args) > 2 else 0
        return dim in (-1, last) and isinstance(reader.args[1], int) \
            and all(u.op == "operator.getitem" for u in rw.users.get(reader.name, []))
    return False


def _packed(rw: Rewriter, n: Node) -> list[Match]:
    """Slices in place of ``chunk`` and clamped slice ends on a linear packed in the checkpoint (see above)."""
    g = rw.graph
    w = n.args[1] if len(n.args) > 1 else None
    # the checkpoint's tensor, or its transpose (GPT-2's Conv1D weight, see linear_from_matmul): the same packing
    if not (isinstance(w, Ref) and w.name in g.params and n.out is not None
            and (g.params[w.name].derived or {"op": "transpose"})["op"] == "transpose"):
        return []
    kind = _kind(w.name)
    columns = n.out.shape[-1]
    readers = rw.users.get(n.name, [])
    if kind == "linears" or not isinstance(columns, int) or not readers \
            or not all(_split_along_last(rw, n, r) for r in readers):
        return []
    replaced, created = [], [n.name]
    for r in list(readers):
        if r.op == "aten.slice.Tensor":
            if r.args[3] > columns:
                r.args = [*r.args[:3], columns]
            created.append(r.name)
            continue
        # torch.chunk's size (the last part may be smaller), or split's
        size = -(-columns // r.args[1]) if r.op == "aten.chunk.default" else r.args[1]
        slices = []
        for start in range(0, columns, size):
            end = min(start + size, columns)
            spec = TensorSpec(n.out.shape[:-1] + [end - start], n.out.dtype, contiguous=False)
            slices.append(rw.insert_before(r, Node(rw.fresh(f"{n.name}_slice"), "aten.slice.Tensor",
                                                   [Ref(n.name), -1, start, end], {}, [spec], r.module, r.layer)))
        for item in list(rw.users.get(r.name, [])):
            rw.replace_uses(item.name, Ref(slices[item.args[1]].name))
            replaced.append(item.name)
        replaced.append(r.name)
        created += [s.name for s in slices]
    return [Match(f"{kind} (packed in the checkpoint)", n.layer, replaced, created)]


@register_pass("fuse_parallel_linears", "q/k/v and gate/up linears reading one input -> one GEMM, outputs sliced")
def fuse_parallel_linears(rw: Rewriter) -> list[Match]:
    g = rw.graph
    packed = [m for n in list(g.nodes) if n.op == "aten.linear.default" for m in _packed(rw, n)]
    groups: dict[str, list[Node]] = {}
    for n in g.nodes:
        if n.op != "aten.linear.default" or not isinstance(n.args[0], Ref):
            continue
        w = n.args[1]
        # a weight packed in the checkpoint is a group already (Falcon-7B's query_key_value reads the norm its MLP
        # reads: one precision group each, not one GEMM)
        if isinstance(w, Ref) and w.name in g.params and not g.params[w.name].derived and _kind(w.name) == "linears":
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
    return sorted(packed + matches, key=lambda m: m.layer if m.layer is not None else -1)
