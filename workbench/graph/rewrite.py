"""Small tools for rewriting a graph in place: who reads what, replace uses, insert, sweep.

Passes are written with these; they keep the IR's invariant (a node only reads
values defined before it) by inserting new nodes right before the first node
that reads them and sweeping dead nodes at the end.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

from .ir import Graph, Node, Ref, TensorSpec


class Rewriter:
    """An editing session on one graph: name → node, users, fresh names."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._counter = itertools.count()
        self.refresh()

    def refresh(self) -> None:
        self.by_name: dict[str, Node] = {n.name: n for n in self.graph.nodes}
        self.users: dict[str, list[Node]] = {}
        for n in self.graph.nodes:
            for r in set(n.refs()):
                self.users.setdefault(r, []).append(n)

    # ---- queries ------------------------------------------------------------------------
    def producer(self, v: Any) -> Node | None:
        """The node that defines ``v`` (a Ref), or None for inputs, params and literals."""
        return self.by_name.get(v.name) if isinstance(v, Ref) else None

    def only_reader(self, v: Any, reader: Node) -> Node | None:
        """The node defining ``v`` if ``reader`` is the only one reading it (so a rewrite may swallow it)."""
        n = self.producer(v)
        if n is None or self.n_users(n.name) != 1 or self.users[n.name][0] is not reader:
            return None
        return n

    def n_users(self, name: str) -> int:
        return len(self.users.get(name, ())) + (name in self.graph.outputs)

    def spec(self, v: Any) -> TensorSpec | None:
        if not isinstance(v, Ref):
            return None
        g = self.graph
        if v.name in g.inputs:
            return g.inputs[v.name]
        if v.name in g.params:
            return g.params[v.name].spec
        n = self.by_name.get(v.name)
        return n.out if n else None

    def fresh(self, base: str) -> str:
        while True:
            name = f"{base}_{next(self._counter)}"
            if name not in self.by_name and name not in self.graph.params and name not in self.graph.inputs:
                return name

    # ---- edits ----------------------------------------------------------------------------
    def replace_uses(self, old: str, new: Any) -> None:
        """Every read of value ``old`` now reads ``new`` (a Ref or a literal)."""
        for user in self.users.pop(old, []):
            user.args = _subst(user.args, old, new)
            user.kwargs = _subst(user.kwargs, old, new)
            if isinstance(new, Ref):
                self.users.setdefault(new.name, []).append(user)
        self.graph.outputs = [new.name if o == old and isinstance(new, Ref) else o for o in self.graph.outputs]

    def insert_before(self, anchor: Node, node: Node) -> Node:
        nodes = self.graph.nodes
        nodes.insert(nodes.index(anchor), node)
        self.by_name[node.name] = node
        for r in set(node.refs()):
            self.users.setdefault(r, []).append(node)
        return node

    def sweep(self) -> int:
        """Remove nodes whose values nobody reads (outputs and side-effect-free ops only); returns how many."""
        live = set(self.graph.outputs)
        kept = []
        for n in reversed(self.graph.nodes):
            if n.name in live:
                kept.append(n)
                live.update(n.refs())
        removed = len(self.graph.nodes) - len(kept)
        self.graph.nodes = kept[::-1]
        used = {r for n in self.graph.nodes for r in n.refs()} | set(self.graph.outputs)
        for name in [p for p, param in self.graph.params.items() if p not in used]:
            del self.graph.params[name]
        self.refresh()
        return removed


def _subst(v: Any, old: str, new: Any) -> Any:
    if isinstance(v, Ref):
        return new if v.name == old else v
    if isinstance(v, list):
        return [_subst(x, old, new) for x in v]
    if isinstance(v, dict):
        return {k: _subst(x, old, new) for k, x in v.items()}
    return v


def first_user(rw: Rewriter, names: Iterable[str]) -> Node:
    """The earliest node reading any of ``names``: where a node replacing them must go."""
    readers = {id(u) for n in names for u in rw.users.get(n, [])}
    return next(n for n in rw.graph.nodes if id(n) in readers)
