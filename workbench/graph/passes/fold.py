"""Constant folding of position functions: the rotary embedding becomes a table lookup.

The rotary module computes cos and sin from ``position_ids`` and buffers only, one
position at a time (no mixing across tokens). So its outputs for any positions are
rows of a table over positions 0..max_position_embeddings-1. The pass replaces the
subgraph by ``embedding(table, position_ids)`` and records how to build the table
as a derived constant: the subgraph itself, evaluated at those positions when
weights are loaded. The same ops run once per model instead of once per step, and
the values are bit-identical (each row is the same computation).
"""

from __future__ import annotations

from ..ir import Graph, Node, Param, Ref, TensorSpec
from ..rewrite import Rewriter, first_user
from .manager import Match, register_pass

_ALLOWED_INPUTS = {"position_ids", "input_ids"}


def _subgraph(rw: Rewriter, outputs: list[str]) -> Graph | None:
    """The nodes ``outputs`` depend on, as a graph of position_ids; None if they read weights."""
    g = rw.graph
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed or name in g.inputs or name in g.params:
            continue
        needed.add(name)
        stack.extend(rw.by_name[name].refs())
    nodes = [n for n in g.nodes if n.name in needed]
    reads = {r for n in nodes for r in n.refs()} - needed
    if any(r in g.params and g.params[r].kind == "parameter" for r in reads):
        return None
    if not {r for r in reads if r in g.inputs} <= _ALLOWED_INPUTS or "position_ids" not in reads:
        return None
    sub = Graph({k: v for k, v in g.inputs.items() if k in reads}, {k: g.params[k] for k in reads if k in g.params},
                nodes, outputs, {k: v for k, v in g.dims.items() if k in ("batch", "tokens")})
    sub.validate()
    return sub


@register_pass("fold_rope_tables", "rotary cos/sin computed per step -> precomputed tables read by position")
def fold_rope_tables(rw: Rewriter) -> list[Match]:
    g = rw.graph
    rotary = [n for n in g.nodes if n.module.endswith("rotary_emb")]
    inside = {n.name for n in rotary}
    outputs = [n.name for n in rotary if any(u.name not in inside for u in rw.users.get(n.name, []))
               or n.name in g.outputs]
    rows = g.meta.get("config", {}).get("max_position_embeddings")
    if not outputs or not rows:
        return []
    sub = _subgraph(rw, outputs)
    if sub is None:
        return []
    matches = []
    for out in outputs:
        node = rw.by_name[out]
        spec = node.out
        if spec is None or spec.shape[:2] != ["batch", "tokens"]:
            continue
        table = f"{node.module}.table.{out}"
        g.params[table] = Param(table, "constant", TensorSpec([rows, *spec.shape[2:]], spec.dtype), [],
                                {"op": "tabulate", "rows": rows, "output": out, "graph": sub.to_json(),
                                 "inputs": []})
        lookup = rw.insert_before(first_user(rw, [out]), Node(rw.fresh(f"{out}_lookup"), "aten.embedding.default",
                                                              [Ref(table), Ref("position_ids")], {}, [spec],
                                                              node.module, None))
        rw.replace_uses(out, Ref(lookup.name))
        matches.append(Match("rope table", None, sorted(inside), [lookup.name, table]))
    return matches
