"""``select_logits_rows``: the logits only where a token is sampled.

The runtime applies this pass to the graph it runs (it is not in the default pipeline: a workspace's graph keeps
every row's logits, which perplexity needs). The lm_head then reads the hidden states of the rows named by one
more graph input, ``logits_indices``, and a prefill step of thousands of tokens multiplies a few rows by the
vocabulary.

The lm_head is found by what it is: the node that computes the graph's logits output (walking back through
casts), whatever its op. A plugin that fuses the final norm into the lm_head is found the same way; its
token-wise arguments (those with the logits' token dimension) are each narrowed to the selected rows, which is
exact for any op that computes each row of its output from the same row of its inputs, as a head does. The pass
manager checks it like any other pass, with ``logits_indices`` naming every row.
"""

from __future__ import annotations

from ..ir import Node, Ref, TensorSpec
from .manager import Match, register_pass

#: The graph input that names the rows to compute, and its dimension.
LOGITS_INDICES = "logits_indices"
ROWS_DIM = "logits_rows"
#: Ops between the head and the graph's logits output that keep its rows as they are (casts, and Gemma 2's final
#: soft cap, which is elementwise).
ROW_PRESERVING = frozenset({"aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "workbench.softcap"})


def _head_chain(graph) -> list[Node]:
    """The producer of the graph's logits (its first output), then back through casts to the node that computes
    the logits from the hidden states, which ends the list; empty for a graph with no such node."""
    producers = {n.name: n for n in graph.nodes}
    chain, node = [], producers.get(graph.outputs[0]) if graph.outputs else None
    while node is not None:
        chain.append(node)
        if node.op not in ROW_PRESERVING or not (node.args and isinstance(node.args[0], Ref)):
            return chain
        node = producers.get(node.args[0].name)
    return []


def lm_head(graph) -> Node | None:
    """The node that computes the graph's logits (its first output) from the hidden states: the output's
    producer, walked back through casts. None for a graph with no such node."""
    chain = _head_chain(graph)
    return chain[-1] if chain else None


@register_pass("select_logits_rows", "lm_head computes only the rows the input logits_indices names",
               runtime_only=True)
def select_logits_rows(rw) -> list[Match]:
    graph = rw.graph
    chain = _head_chain(graph)
    head = chain[-1] if chain else None
    if head is None or LOGITS_INDICES in graph.inputs or head.out is None or len(head.out.shape) != 3:
        return []
    tokens = head.out.shape[1]
    specs = graph.specs()

    def token_wise(a) -> bool:
        spec = specs.get(a.name) if isinstance(a, Ref) else None
        return spec is not None and len(spec.shape) == 3 and spec.shape[1] == tokens

    if not any(token_wise(a) for a in [*head.args, *head.kwargs.values()]):
        return []
    graph.inputs[LOGITS_INDICES] = TensorSpec([ROWS_DIM], "int64")
    graph.dims[ROWS_DIM] = {"min": 1, "max": 1 << 20}
    created = []

    def narrowed(a):
        if not token_wise(a):
            return a
        spec = specs[a.name]
        node = rw.insert_before(head, Node(rw.fresh(f"{head.name}_rows"), "aten.index_select.default",
                                           [a, 1, Ref(LOGITS_INDICES)], {},
                                           [TensorSpec([spec.shape[0], ROWS_DIM, spec.shape[2]], spec.dtype)],
                                           head.module, head.layer))
        created.append(node.name)
        return Ref(node.name)

    head.args = [narrowed(a) for a in head.args]
    head.kwargs = {k: narrowed(v) for k, v in head.kwargs.items()}
    for node in chain:
        out = node.out
        node.outputs = [TensorSpec([out.shape[0], ROWS_DIM, *out.shape[2:]], out.dtype), *node.outputs[1:]]
    return [Match("logits_rows", head.layer, [head.name], [*created, head.name])]
