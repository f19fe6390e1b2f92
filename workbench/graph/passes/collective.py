"""Fusion across the collective: the all-reduce after a row-parallel linear, with the residual add and the RMSNorm
that read its sum, become one op (``kernels/collectives.py``); and a parallel residual's two all-reduces become one
(``merge_parallel_all_reduces``, at the end of this file).

A sharded graph (``tensor_parallel.shard_tensor_parallel``) sums each row-parallel linear's partial output over the
ranks, and the sum goes straight into the residual add and the next norm, which the default pipeline fused already:

    all_reduce(o_proj)  ->  add_rms_norm(residual, ·, w, eps)        ==>  all_reduce_add_rms_norm(o_proj, residual,
                                                                                                  w, eps)

The fused op returns what the norm returned, (normed, sum), so the norm's ``getitem`` readers stay as they are.
Patterns, norm op -> fused op (an FP8 plan's norms quantize their output; Gemma normalizes the attention's and the
MLP's outputs before the add, so its reduced value must be the post-norm's input, argument 0):

    add_rms_norm            all_reduce_add_rms_norm              the reduced value either addend (x + r == r + x)
    add_rms_norm_fp8        all_reduce_add_rms_norm_fp8
    norm_add_rms_norm       all_reduce_norm_add_rms_norm         the reduced value argument 0 only
    norm_add_rms_norm_fp8   all_reduce_norm_add_rms_norm_fp8

Invariants: the all-reduce has no other reader and is no graph output (its sum is not needed on its own), and the
fused op reads the reduced op's input in the norm's place, so each fused value is the unfused one's bit for bit
(IEEE addition commutes). A decoder layer of the Llama, Mistral, Qwen and Gemma families matches twice: after o
(into the post-attention norm) and after down (into the next layer's input norm; the last layer's into the final
norm); each match is reported at the layer of the linear the all-reduce follows. GPT-2's row-parallel bias sits
between the all-reduce and its LayerNorm, so GPT-2 matches nothing. A graph without tensor parallelism has no
all-reduce and matches nothing.
"""

from __future__ import annotations

from ..ir import Node, Ref
from ..rewrite import Rewriter
from .manager import Match, register_pass

#: norm op -> (the op fused with the all-reduce before it, the argument positions the reduced value may take)
FUSED = {
    "workbench.add_rms_norm": ("workbench.all_reduce_add_rms_norm", (0, 1)),
    "workbench.add_rms_norm_fp8": ("workbench.all_reduce_add_rms_norm_fp8", (0, 1)),
    "workbench.norm_add_rms_norm": ("workbench.all_reduce_norm_add_rms_norm", (0,)),
    "workbench.norm_add_rms_norm_fp8": ("workbench.all_reduce_norm_add_rms_norm_fp8", (0,)),
}
ALL_REDUCE = "workbench.all_reduce"


def _reduced(rw: Rewriter, norm: Node, positions: tuple[int, ...]) -> tuple[int, Node] | None:
    """(position, all-reduce) for the all-reduce whose only reader is ``norm``, at one of ``positions``."""
    for i in positions:
        reduce = rw.only_reader(norm.args[i], norm) if i < len(norm.args) else None
        if reduce is not None and reduce.op == ALL_REDUCE and len(reduce.args) == 1 and not reduce.kwargs:
            return i, reduce
    return None


@register_pass("fuse_all_reduce_add_rms_norm", "all_reduce after a row-parallel linear + the residual add and "
                                               "RMSNorm reading it -> workbench.all_reduce_add_rms_norm",
               sharded=True)
def fuse_all_reduce_add_rms_norm(rw: Rewriter) -> list[Match]:
    matches = []
    for n in list(rw.graph.nodes):
        if n.op not in FUSED:
            continue
        op, positions = FUSED[n.op]
        found = _reduced(rw, n, positions)
        if found is None:
            continue
        i, reduce = found
        args = list(n.args)
        if i == 1:  # the reduced value first: x + r, the same sum as r + x
            args[0], args[1] = args[1], args[0]
        args[0] = reduce.args[0]
        # a fresh node, not the norm's name: a tuned choice naming the norm (a Triton tactic) does not apply to it
        fused = rw.insert_before(n, Node(rw.fresh(op.split(".")[-1]), op, args, dict(n.kwargs), list(n.outputs),
                                         n.module, n.layer))
        rw.replace_uses(n.name, Ref(fused.name))
        matches.append(Match(f"all_reduce + {n.op.split('.')[-1]}", reduce.layer, [reduce.name, n.name],
                             [fused.name]))
    return matches


# ---- one all-reduce for a parallel residual -----------------------------------------------------------------------

ADDS = ("aten.add.Tensor", "aten.add_.Tensor")


def _reduced_branch(rw: Rewriter, v, reader: Node) -> tuple[Node, list[Node], object] | None:
    """(the all-reduce, its nodes up to ``reader``, the bias added after it or None) when ``v`` is an all-reduce
    of a row-parallel linear's partial output, or that plus its bias (added after the all-reduce: once, not per
    rank), read by ``reader`` only."""
    n = rw.only_reader(v, reader)
    if n is None:
        return None
    bias, nodes = None, [n]
    if n.op == "aten.add.Tensor" and len(n.args) == 2 and not n.kwargs and isinstance(n.args[1], Ref) \
            and n.args[1].name in rw.graph.params:
        bias = n.args[1]
        n = rw.only_reader(n.args[0], n)
        if n is None:
            return None
        nodes.insert(0, n)
    if n.op != ALL_REDUCE or len(n.args) != 1 or n.kwargs:
        return None
    return n, nodes, bias


@register_pass("merge_parallel_all_reduces", "a parallel residual's two all-reduces (attention's o and the MLP's "
                                             "down, summed) -> one all-reduce of the partial sum", sharded=True)
def merge_parallel_all_reduces(rw: Rewriter) -> list[Match]:
    """GPT-NeoX, Falcon (and GPT-J, Phi-2) add the attention's and the MLP's outputs, both row-parallel: each rank
    sums its two partial outputs and one all-reduce sums the ranks' (Megatron's and TensorRT-LLM's parallel
    attention): half the collectives of such a layer, half its link bytes. The row-parallel biases are added
    after it, once, as before; the sum is the same up to the order of its fp32 additions."""
    matches = []
    for n in list(rw.graph.nodes):
        if n.op not in ADDS or len(n.args) != 2 or n.kwargs or not all(isinstance(a, Ref) for a in n.args):
            continue
        branches = [_reduced_branch(rw, a, n) for a in n.args]
        if None in branches:
            continue
        (ra, nodes_a, bias_a), (rb, nodes_b, bias_b) = branches
        spec = list(n.outputs)
        partial = rw.insert_before(n, Node(rw.fresh(f"partial_sum_{n.layer}"), "aten.add.Tensor",
                                           [ra.args[0], rb.args[0]], {}, spec, n.module, n.layer))
        reduce = last = rw.insert_before(n, Node(rw.fresh(f"all_reduce_{n.layer}"), ALL_REDUCE, [Ref(partial.name)],
                                                 {}, spec, n.module, n.layer))
        created = [partial.name, last.name]
        for bias in (b for b in (bias_a, bias_b) if b is not None):
            last = rw.insert_before(n, Node(rw.fresh(f"{reduce.name}_bias"), "aten.add.Tensor", [Ref(last.name), bias],
                                            {}, spec, n.module, n.layer))
            created.append(last.name)
        rw.replace_uses(n.name, Ref(last.name))
        matches.append(Match("o + down partial sums, one all_reduce", n.layer,
                             [x.name for x in (*nodes_a, *nodes_b, n)], created))
    return matches
